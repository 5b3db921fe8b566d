"""Early stopping's record against Keras' EarlyStopping semantics, and its config."""

import pytest

from jaxtl.config import ConfigError


def test_early_stopping_counts_epochs_without_an_improvement_beyond_min_delta_as_keras_does():
    from jaxtl.train.state import RunState, Watch

    # Keras' EarlyStopping(monitor="val_loss", min_delta=0.05): an improvement is a drop of more than 0.05.
    watch = Watch()
    for epoch, value in enumerate([1.0, 0.97, 0.9, 0.88, 0.86, 0.8], start=1):
        watch = watch.update(value, epoch, lower_is_better=True, min_delta=0.05)
    assert watch == Watch(0.8, 6, 0)  # 0.97: stale; 0.9: better; 0.88, 0.86: stale; 0.8: better
    watch = Watch(0.9, 3, 0)
    for epoch, value in ((4, 0.88), (5, 0.86)):
        watch = watch.update(value, epoch, lower_is_better=True, min_delta=0.05)
    assert watch == Watch(0.9, 3, 2)
    # Accuracy: higher is better, and an equal value is no improvement.
    watch = Watch(0.5, 1, 0).update(0.5, 2, lower_is_better=False, min_delta=0.0)
    assert watch == Watch(0.5, 1, 1)
    state = RunState(phase=1, epoch_in_phase=2, step=9, watch=watch)
    assert RunState.from_json(state.to_json()) == state  # the checkpoint keeps it: resume counts on


def test_the_early_stopping_config_parses_and_names_a_wrong_value():
    from jaxtl.config import EarlyStoppingConfig, config_from_dict

    config = config_from_dict({"train": {"early_stopping": {"patience": 2, "ends": "run"}}}, (), "run.yaml")
    assert config.train.early_stopping == EarlyStoppingConfig(metric="val_loss", patience=2, min_delta=0.0, ends="run")
    with pytest.raises(ConfigError, match="run.yaml: train.early_stopping.patience = 0 is out of range"):
        config_from_dict({"train": {"early_stopping": {"patience": 0}}}, (), "run.yaml")
