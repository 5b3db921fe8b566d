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


def test_until_plateau_is_a_phases_own_early_stopping_and_does_not_mix_with_the_runs():
    from jaxtl.config import EarlyStoppingConfig, config_from_dict
    from jaxtl.optim import Phase
    from jaxtl.train.state import Watch
    from jaxtl.train.stopping import stopping_of, watch_epoch

    phases = [{"name": "head", "policy": "head_only", "epochs": 5, "until": "plateau", "patience": 2, "min_delta": 0.1}]
    config = config_from_dict({"phases": phases}, (), "run.yaml")
    phase = config.phases[0]
    assert stopping_of(phase, None) == EarlyStoppingConfig("val_loss", patience=2, min_delta=0.1, ends="phase")
    lines: list[str] = []
    watch, ends = Watch(), []
    for epoch, loss in enumerate([1.0, 0.85, 0.8, 0.79], start=1):  # 0.8 and 0.79 improve by less than 0.1
        watch, stop = watch_epoch(watch, {"val_loss": loss}, epoch, phase, None, lines.append)
        ends.append(stop)
    assert ends == [None, None, None, "phase"] and watch == Watch(0.85, 2, 2)
    assert lines == ["  until plateau: val_loss has not improved by more than 0.1 for 2 epoch(s) (best 0.8500 at "
                     "epoch 2); ending phase 'head'"]  # fmt: skip
    assert stopping_of(Phase("p", "full", epochs=1), None) is None
    with pytest.raises(ConfigError, match=r"run.yaml: phases.0 end\(s\) on a plateau and train.early_stopping is set"):
        config_from_dict({"phases": phases, "train": {"early_stopping": {"patience": 1}}}, (), "run.yaml")
    with pytest.raises(ConfigError, match="until: plateau counts epochs: give epochs, not steps"):
        config_from_dict({"phases": [{"name": "p", "policy": "full", "steps": 3, "until": "plateau"}]}, (), "run.yaml")
