"""`jaxtl.train.fit` from Python: the README's example, freezing written as functions, resume after an interruption."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import jaxtl
from jaxtl.config import ConfigError, load_config
from jaxtl.models.state_dict import state_dict
from jaxtl.train import Callback, RunError, fit, load_checkpoint

# For the tests whose uninterrupted, interrupted and resumed runs compile the same train and eval steps (keying and
# writing an entry costs more than it saves for a program compiled once).
shares_compiled_steps = pytest.mark.usefixtures("persistent_compilation_cache")

README = Path(__file__).parents[2] / "README.md"


def readme_example() -> str:
    """The Python block under the README's "Training from Python" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Training from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class Interrupt(Exception):
    pass


class StopAtStep(Callback):
    """Interrupts the run as a kill would, after step ``step`` (the run has checkpointed before it)."""

    def __init__(self, step: int):
        self.step = step
        self.steps: list[int] = []

    def on_step(self, step, metrics):
        self.steps.append(step)
        assert np.isfinite(metrics["loss"]) and metrics["count"] > 0
        if step == self.step:
            raise Interrupt(step)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example run as written (it trains and then resumes the finished run), and its namespace."""
    directory = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "readme_example"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        exec(compile(readme_example(), str(README), "exec"), namespace)
    return directory, namespace


def test_the_readme_example_trains_with_functions_as_freezing(example):
    directory, namespace = example
    result = namespace["result"]
    run_dir = directory / namespace["config"]["run_dir"]
    assert result.run_dir.resolve() == run_dir.resolve()
    assert [record["phase"] for record in result.history] == ["last_stage", "norms"]
    assert result.best.epoch in (1, 2) and 0.0 <= result.best_metrics["val_acc1"] <= 1.0
    saved = load_config(run_dir / "config.yaml")
    assert saved.phases[0].policy == "python:readme_example.last_stage"
    assert saved.phases[1].policy == "python:labels:readme_example.norms"
    model, meta = load_checkpoint(result.latest_checkpoint)
    assert meta.state.phase == 2 and meta.classes == result.classes


@pytest.mark.slow
@shares_compiled_steps
def test_a_run_interrupted_mid_phase_resumes_bitwise_and_keeps_frozen_parameters(example, tmp_path):
    _, namespace = example
    config, freezing = dict(namespace["config"]), namespace["freezing"]
    start = jaxtl.models.create("resnet18", num_classes=3, seed=0)
    initial = state_dict(start)

    whole = fit({**config, "run_dir": str(tmp_path / "whole")}, freezing=freezing, log=lambda line: None)
    interrupted = {**config, "run_dir": str(tmp_path / "interrupted")}
    stop = StopAtStep(5)  # phase 2 (the label function), after its mid-epoch checkpoint at step 4
    with pytest.raises(Interrupt):
        fit(interrupted, freezing=freezing, callbacks=[stop], log=lambda line: None)
    assert stop.steps == [1, 2, 3, 4, 5]
    resumed = fit(interrupted, freezing=freezing, resume=True, log=lambda line: None)

    final, expected = state_dict(resumed.model), state_dict(whole.model)
    assert final.keys() == expected.keys()
    for key in final:
        assert np.array_equal(final[key], expected[key]), key  # bitwise
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    # Frozen in both phases (the stem and every conv outside layer4): bit-identical to the start.
    frozen = [
        k for k in initial if k.startswith(("conv1.", "layer1.0.conv", "layer3.1.conv2")) or k == "bn1.running_mean"
    ]
    assert frozen
    for key in frozen:
        assert np.array_equal(final[key], initial[key]), key
    # Trained: layer4 (phase 1) and layer1's BatchNorm (phase 2, by the label function, with its own SGD).
    assert not np.array_equal(final["layer4.0.conv1.weight"], initial["layer4.0.conv1.weight"])
    assert not np.array_equal(final["layer1.0.bn1.weight"], initial["layer1.0.bn1.weight"])


def test_resume_refuses_a_change_of_what_the_checkpoint_holds(example):
    directory, namespace = example
    config = {**namespace["config"], "run_dir": str(directory / namespace["config"]["run_dir"])}
    with pytest.raises(RunError, match=r"^model.arch: the run was trained with model.arch='resnet18'"):
        fit(config, freezing=namespace["freezing"], resume=True, overrides=["model.arch=resnet34"])
    with pytest.raises(RunError, match=r"^phases.0.lrs"):
        fit(config, freezing=namespace["freezing"], resume=True, overrides=["phases.0.lrs={head: 0.5}"])
    with pytest.raises(RunError, match=r"phase 'last_stage' has run with policy="):
        fit(config, freezing={**namespace["freezing"], "last_stage": "head_only"}, resume=True)


def test_resume_reads_a_checkpoints_config_with_todays_defaults(example):
    """A key added to jaxtl after a checkpoint was written is its default there, not a change of the run."""
    from jaxtl.train.resume import check_resume_config

    directory, namespace = example
    _, meta = load_checkpoint(directory / namespace["config"]["run_dir"] / "checkpoints" / "latest")
    older = {**meta.config, "train": {k: v for k, v in meta.config["train"].items() if k != "label_smoothing"}}
    check_resume_config(older, meta.config, meta)  # no error: label_smoothing 0.0 is the default
    changed = {**meta.config, "train": {**meta.config["train"], "label_smoothing": 0.1}}
    with pytest.raises(RunError, match="train.label_smoothing: the run was trained with train.label_smoothing=0.0"):
        check_resume_config(older, changed, meta)


def test_freezing_names_unknown_phases_and_python_policies_need_python(example, tmp_path):
    directory, namespace = example
    with pytest.raises(ConfigError, match="freezing= names phase\\(s\\) nope; the config's phases: last_stage, norms"):
        fit(namespace["config"], freezing={"nope": "head_only"})
    with pytest.raises(ConfigError, match="phases.0 set steps; a training run's phases are epochs long"):
        fit({"run_dir": str(tmp_path / "steps"), "phases": [{"name": "p", "policy": "head_only", "steps": 3}]})
    assert not (tmp_path / "steps").exists()  # refused before anything is written
    saved = load_config(directory / namespace["config"]["run_dir"] / "config.yaml")
    model = jaxtl.models.abstract_model("resnet18", num_classes=3)
    with pytest.raises(jaxtl.optim.ParamGroupError, match="a config file cannot hold it: run it from Python"):
        saved.phases[0].groups(model)


def test_jaxtl_train_resume_refuses_another_architecture_in_one_line(example):
    import subprocess
    import sys

    directory, namespace = example
    run_dir = directory / namespace["config"]["run_dir"]
    command = [sys.executable, "-m", "jaxtl.cli", "train", "--resume", str(run_dir), "--set", "model.arch=resnet34"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "jaxtl train: error: model.arch: the run was trained with model.arch='resnet18'; a resumed run cannot change "
        "it to 'resnet34' (its checkpoint holds what that value made). Start a new run (another run_dir) instead"
    ]
    assert "resnet34" not in result.stdout  # nothing was built or downloaded


def test_a_yaml_config_takes_its_phases_freezing_from_python(tmp_path, example):
    from jaxtl.optim import Labels
    from jaxtl.train import resolve_config

    _, namespace = example
    path = tmp_path / "run.yaml"
    path.write_text("phases:\n  - {name: last_stage, epochs: 2}\n  - {name: norms}\n")
    config = resolve_config(path, namespace["freezing"], overrides=["optim.lr=3e-4"])
    assert config.phases[0].policy is namespace["last_stage"] and config.phases[0].epochs == 2
    assert isinstance(config.phases[1].policy, Labels) and config.phases[1].epochs == 1
    assert config.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="phases.0: phase 'last_stage': give exactly one of policy"):
        load_config(path)  # without Python, the file alone does not say what the phases train


@pytest.mark.slow
def test_a_callers_model_and_data_train_as_the_configs_own_would(example, tmp_path):
    from jaxtl.data import generate_synthetic, image_folder_splits

    _, namespace = example
    config = {**namespace["config"], "run_dir": str(tmp_path / "own")}
    own = fit(config, freezing=namespace["freezing"], log=lambda line: None)

    synthetic = namespace["config"]["data"]["synthetic"]
    splits = image_folder_splits(generate_synthetic(tmp_path / "data", seed=0, **synthetic))
    model = jaxtl.models.create("resnet18", num_classes=3, seed=0)  # what weights: None builds, from train.seed
    given = fit(
        {**config, "run_dir": str(tmp_path / "given")},
        model=model,
        data={"train": splits["train"], "val": splits["val"]},
        freezing=namespace["freezing"],
        log=lambda line: None,
    )
    assert given.classes == own.classes
    final, expected = state_dict(given.model), state_dict(own.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key
    wrong = jaxtl.models.create("resnet18", num_classes=5)
    with pytest.raises(RunError, match="the model given is not a resnet18 with 3 classes \\(its head has 5\\)"):
        fit({**config, "run_dir": str(tmp_path / "wrong")}, model=wrong, freezing=namespace["freezing"])


@pytest.mark.slow
def test_label_smoothing_and_balanced_class_weights_train_and_cannot_change_on_resume(example, tmp_path):
    _, namespace = example
    train = {**namespace["config"].get("train", {}), "label_smoothing": 0.1, "class_weights": "balanced"}
    config = {**namespace["config"], "run_dir": str(tmp_path / "smooth"), "train": train}
    lines: list[str] = []
    result = fit(config, freezing=namespace["freezing"], log=lines.append)
    assert [line for line in lines if line.startswith("loss: ")] == [
        "loss: cross-entropy, label smoothing 0.1, class weights: "
        + ", ".join(f"{name} 1" for name in result.classes)  # the generated set is balanced
    ]
    assert all(np.isfinite(record["train_loss"]) for record in result.history)
    with pytest.raises(RunError, match="train.label_smoothing: the run was trained with train.label_smoothing=0.1"):
        fit({**config, "train": {**train, "label_smoothing": 0.2}}, freezing=namespace["freezing"], resume=True)


@pytest.mark.slow
@shares_compiled_steps
def test_early_stopping_ends_a_phase_or_the_run_and_resumes_bitwise(example, tmp_path):
    _, namespace = example
    freezing = namespace["freezing"]
    phases = [{"name": "last_stage", "epochs": 3}, {"name": "norms", "epochs": 2}]
    # val_acc1 can never improve by more than 1: every epoch after a phase's first is stale.
    early = {"metric": "val_acc1", "patience": 1, "min_delta": 1.0, "ends": "phase"}
    train = {**namespace["config"]["train"], "early_stopping": early}
    config = {**namespace["config"], "phases": phases, "train": train}
    lines: list[str] = []
    whole = fit({**config, "run_dir": str(tmp_path / "whole")}, freezing=freezing, log=lines.append)
    # Phase 1 stops after its 2nd epoch; phase 2 starts at its planned epoch (4) and runs its 2.
    assert [(r["phase"], r["epoch"]) for r in whole.history] == [
        ("last_stage", 1), ("last_stage", 2), ("norms", 4), ("norms", 5)
    ]  # fmt: skip
    stops = [line.strip() for line in lines if "early stopping" in line]
    assert len(stops) == 2 and stops[0].startswith(
        "early stopping: val_acc1 has not improved by more than 1 for 1 epoch(s) (best "
    )
    assert stops[0].endswith("at epoch 1); ending phase 'last_stage'")

    interrupted = {**config, "run_dir": str(tmp_path / "interrupted")}
    stop = StopAtStep(8)  # in phase 2's first epoch (steps 7-9)
    with pytest.raises(Interrupt):
        fit(interrupted, freezing=freezing, callbacks=[stop], log=lambda line: None)
    resumed = fit(interrupted, freezing=freezing, resume=True, log=lambda line: None)
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key  # bitwise
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]

    ended = {**config, "run_dir": str(tmp_path / "run"), "train": {**train, "early_stopping": {**early, "ends": "run"}}}
    lines.clear()
    result = fit(ended, freezing=freezing, log=lines.append)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert any(line.strip().endswith("ending the run") for line in lines)


@pytest.mark.slow
@shares_compiled_steps
def test_mixing_accumulation_and_the_weight_average_train_and_resume_bitwise(example, tmp_path):
    """Mixup/CutMix, two accumulated micro-batches per step and the EMA together: killed inside an epoch and
    resumed, the run ends with the weights and the average an uninterrupted one ends with."""
    _, namespace = example
    freezing = namespace["freezing"]
    data = {**namespace["config"]["data"], "batch_size": 4, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}
    train = {**namespace["config"]["train"], "accumulate_steps": 2, "ema": {"decay": 0.9, "warmup": True}}
    config = {**namespace["config"], "data": data, "train": train}  # 24 images: 3 steps of 2 x 4 an epoch
    lines: list[str] = []
    whole = fit({**config, "run_dir": str(tmp_path / "whole")}, freezing=freezing, log=lines.append)
    assert "batch 4 x 2 accumulated on 1 device(s)" in lines[0]
    mixing = "mixing: mixup alpha 0.2 and cutmix alpha 1 on a batch with p 1, cutmix chosen with p 0.5; the loss on"
    assert any(line.startswith(mixing) for line in lines)
    assert any(" | val (EMA) loss " in line for line in lines)
    assert [r["step"] for r in whole.history] == [3, 6]

    interrupted = {**config, "run_dir": str(tmp_path / "interrupted")}
    stop = StopAtStep(5)  # phase 2, after its mid-epoch checkpoint at step 4
    with pytest.raises(Interrupt):
        fit(interrupted, freezing=freezing, callbacks=[stop], log=lambda line: None)
    resumed = fit(interrupted, freezing=freezing, resume=True, log=lambda line: None)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for average in (False, True):
        final, _ = load_checkpoint(resumed.latest_checkpoint, average=average)
        expected, _ = load_checkpoint(whole.latest_checkpoint, average=average)
        final, expected = state_dict(final), state_dict(expected)
        for key in expected:
            assert np.array_equal(final[key], expected[key]), (average, key)  # bitwise
    trained = state_dict(load_checkpoint(whole.latest_checkpoint, average=False)[0])
    averaged = state_dict(load_checkpoint(whole.latest_checkpoint)[0])
    assert not np.array_equal(trained["layer4.0.conv1.weight"], averaged["layer4.0.conv1.weight"])
    # never trained: d x + (1 - d) x, which is x up to float32's rounding (as in torch's average)
    np.testing.assert_allclose(trained["conv1.weight"], averaged["conv1.weight"], rtol=1e-6)


@pytest.mark.slow
@shares_compiled_steps
def test_reduce_on_plateau_lowers_each_groups_lr_per_phase_and_resumes_bitwise(example, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, namespace = example
    freezing = namespace["freezing"]
    phases = [{"name": "last_stage", "epochs": 3}, {"name": "norms", "epochs": 3}]
    # val_acc1 can never improve by more than 1: with no patience every epoch after a phase's first reduces.
    optim = {"schedule": "plateau", "plateau_metric": "val_acc1", "plateau_threshold": 1.0,
             "plateau_threshold_mode": "abs", "plateau_patience": 0, "min_lr": 2e-5}  # fmt: skip
    config = {**namespace["config"], "phases": phases, "optim": optim}  # 3 steps an epoch, a checkpoint every 2
    lines: list[str] = []
    whole = fit({**config, "run_dir": str(tmp_path / "whole")}, freezing=freezing, log=lines.append)
    # Epochs 2 and 5 reduce (layer4 down to min_lr); the last epoch of a phase reduces nothing, and the next phase
    # starts at its configured lrs (head 1e-3, not 1e-4).
    assert [line.strip() for line in lines if "reduce on plateau" in line] == [
        "reduce on plateau: val_acc1 has not improved for 1 epoch(s); group head lr 0.001 -> 0.0001, "
        "group layer4 lr 0.0001 -> 2e-05",
        "reduce on plateau: val_acc1 has not improved for 1 epoch(s); group head lr 0.001 -> 0.0001",
    ]
    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard")).Reload()
    logged = [event.value for event in events.Scalars("lr/head")]
    np.testing.assert_allclose(logged, [1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4], rtol=1e-6)
    np.testing.assert_allclose([event.value for event in events.Scalars("lr/layer4")], [1e-4, 1e-4, 2e-5], rtol=1e-6)

    interrupted = {**config, "run_dir": str(tmp_path / "interrupted")}
    stop = StopAtStep(9)  # after the mid-epoch checkpoint at step 8, in epoch 3 at the reduced lrs
    with pytest.raises(Interrupt):
        fit(interrupted, freezing=freezing, callbacks=[stop], log=lambda line: None)
    _, meta = load_checkpoint(tmp_path / "interrupted" / "checkpoints" / "latest")
    assert (meta.state.step, meta.state.plateau.lrs) == (8, {"head": 1e-4, "layer4": 2e-5})
    resumed = fit(interrupted, freezing=freezing, resume=True, log=lambda line: None)
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key  # bitwise
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]


def probe_config(run_dir, phases):
    return {
        "run_dir": str(run_dir), "model": {"arch": "resnet18", "weights": None},
        "data": {"source": "synthetic", "batch_size": 8, "crop_size": 64,
                 "synthetic": {"num_classes": 3, "train_per_class": 8, "val_per_class": 4}},
        "phases": phases,
    }  # fmt: skip


@pytest.mark.slow
def test_a_linear_probe_phase_sets_the_head_scikit_learn_fits_and_the_next_phase_fine_tunes_from_it(tmp_path):
    """LP-FT: the head after the probe phase is LogisticRegression(C) of the frozen backbone's features."""
    from sklearn.linear_model import LogisticRegression

    from jaxtl.config import config_from_dict
    from jaxtl.data.transforms import normalize
    from jaxtl.train.inputs import build_loaders, load_data

    probe = {"name": "probe", "policy": "head_only", "epochs": 1, "solver": "linear_probe", "probe_C": 0.5}
    lines: list[str] = []
    result = fit(probe_config(tmp_path / "lp", [probe]), log=lines.append)
    assert any("linear probe (C=0.5): L-BFGS converged in" in line for line in lines)
    # The reference: the same images through the run's eval pipeline, the backbone's features in eval mode.
    _, meta = load_checkpoint(result.latest_checkpoint)
    config = config_from_dict(probe_config(tmp_path / "x", [probe]))
    data = load_data(config.data)
    loaders = build_loaders(config, data, meta.preprocessing, 1)
    model = result.model
    model.eval()
    features, labels = [], []
    for batch in loaders.both.epoch(0):
        x = normalize(batch.images[batch.mask], meta.preprocessing.mean, meta.preprocessing.std)
        features.append(np.asarray(model.forward_features(x)))
        labels.append(batch.labels[batch.mask])
    loaders.close()
    x, y = np.concatenate(features)[: len(data.train)], np.concatenate(labels)[: len(data.train)]
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
    head = state_dict(result.model)
    np.testing.assert_allclose(head["fc.weight"].T, reference.coef_, rtol=2e-3, atol=2e-4)  # (in, out) in jaxtl
    np.testing.assert_allclose(head["fc.bias"], reference.intercept_, rtol=2e-3, atol=2e-4)
    assert result.history[0]["train_acc1"] == pytest.approx(reference.score(x, y), abs=1e-12)
    # The backbone did not move; the fine-tuning phase starts from the probe's head.
    both = fit(probe_config(tmp_path / "lpft", [probe, {"name": "finetune", "policy": "full", "epochs": 1}]),
               log=lambda line: None)  # fmt: skip
    assert [r["phase"] for r in both.history] == ["probe", "finetune"]
    assert both.history[0]["val_acc1"] == result.history[0]["val_acc1"]
    assert both.history[1]["step"] == len(data.train) // 8 + (len(data.train) % 8 > 0)  # the probe takes no step


def test_a_linear_probe_phase_needs_a_head_only_unaugmented_phase_of_one_epoch(tmp_path):
    with pytest.raises(ConfigError, match="phases.0: phase 'p': a linear_probe phase solves its head once: set epochs"):
        fit(probe_config(tmp_path / "a", [{"name": "p", "policy": "head_only", "epochs": 2, "solver": "linear_probe"}]))
    with pytest.raises(RunError, match="give it the head_only policy and no augmentation"):
        fit(probe_config(tmp_path / "b", [{"name": "p", "policy": "full", "epochs": 1, "solver": "linear_probe"}]),
            log=lambda line: None)  # fmt: skip


@pytest.mark.slow
@shares_compiled_steps
def test_gradual_unfreezing_until_plateau_moves_on_when_validation_stalls_and_resumes_bitwise(tmp_path):
    """phases.N.until: plateau: each phase ends once val_acc1 stalls (here: never improves by more than 1, so after
    its second epoch), the next layers unfreeze, and a run killed inside the second phase resumes bitwise."""
    until = {"until": "plateau", "until_metric": "val_acc1", "patience": 1, "min_delta": 1.0}
    phases = [
        {"name": "head", "policy": "head_only", "epochs": 4, **until},
        {"name": "last", "policy": "last_n_blocks:1", "epochs": 3, **until},
        {"name": "all", "policy": "full", "epochs": 1},
    ]
    lines: list[str] = []
    whole = fit(probe_config(tmp_path / "whole", phases), log=lines.append)
    assert [(r["phase"], r["epoch"]) for r in whole.history] == [
        ("head", 1), ("head", 2), ("last", 5), ("last", 6), ("all", 8)
    ]  # fmt: skip
    stops = [line.strip() for line in lines if "until plateau" in line]
    assert len(stops) == 2 and stops[1].endswith("ending phase 'last'")
    assert stops[0].startswith("until plateau: val_acc1 has not improved by more than 1 for 1 epoch(s) (best ")

    interrupted = probe_config(tmp_path / "interrupted", phases)
    with pytest.raises(Interrupt):  # 3 steps an epoch: step 8 is inside phase 'last''s second epoch
        fit({**interrupted, "train": {"checkpoint_every_steps": 1}}, callbacks=[StopAtStep(8)], log=lambda line: None)
    resumed = fit({**interrupted, "train": {"checkpoint_every_steps": 1}}, resume=True, log=lambda line: None)
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key  # bitwise
    assert [(r["phase"], r["epoch"], r["train_loss"]) for r in resumed.history] == [
        (r["phase"], r["epoch"], r["train_loss"]) for r in whole.history
    ]


@pytest.mark.slow
def test_runs_with_the_same_frozen_backbone_share_the_features_on_disk_and_train_as_without(tmp_path):
    """train.feature_cache_dir: the second run reads the first one's features and ends bitwise as it would have."""
    store = tmp_path / "features"
    head = {"name": "head", "policy": "head_only", "epochs": 2, "lrs": {"head": 1e-2}}
    shared = {**probe_config(tmp_path / "first", [head]), "train": {"feature_cache_dir": str(store)}}
    first: list[str] = []
    fit(shared, log=first.append)
    assert not any("features read from" in line for line in first) and len(list(store.glob("*.npz"))) == 1
    other_lr = [{**head, "lrs": {"head": 3e-3}}]  # another head, the same backbone: the same features
    second: list[str] = []
    cached = fit({**shared, "run_dir": str(tmp_path / "second"), "phases": other_lr}, log=second.append)
    assert any("features read from" in line for line in second)
    plain = fit({**probe_config(tmp_path / "plain", other_lr)}, log=lambda line: None)
    final, expected = state_dict(cached.model), state_dict(plain.model)
    assert all(np.array_equal(final[key], expected[key]) for key in expected)  # bitwise
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in plain.history]
    # Other images or another preprocessing are other features; a damaged file is computed again.
    data = {**shared["data"], "crop_size": 96}
    third: list[str] = []
    fit({**shared, "run_dir": str(tmp_path / "third"), "data": data}, log=third.append)
    assert not any("features read from" in line for line in third) and len(list(store.glob("*.npz"))) == 2
    for path in store.glob("*.npz"):
        path.write_bytes(b"damaged")
    fourth: list[str] = []
    fit({**shared, "run_dir": str(tmp_path / "fourth")}, log=fourth.append)
    assert any("cannot be read" in line and "computing them again" in line for line in fourth)


@pytest.mark.slow
@shares_compiled_steps
def test_a_run_stopped_inside_a_phase_on_cached_features_writes_its_best_and_starts_again_on_resume(tmp_path):
    """On cached features the checkpoints wait for the phase's end; a run that stops inside the phase writes the best
    epoch it has, and --resume, finding no latest, starts the run again and ends bitwise as an uninterrupted one."""
    from jaxtl.train.checkpoint import has_checkpoint, load_meta

    head = [{"name": "head", "policy": "head_only", "epochs": 4, "lrs": {"head": 1e-2}}]
    whole = fit(probe_config(tmp_path / "whole", head), log=lambda line: None)
    interrupted = probe_config(tmp_path / "interrupted", head)
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    with pytest.raises(Interrupt):  # 3 steps an epoch: step 8 is inside the third epoch
        fit(interrupted, callbacks=[StopAtStep(8)], log=lambda line: None)
    assert not has_checkpoint(checkpoints / "latest")
    first_two = whole.history[:2]
    best_epoch = max(first_two, key=lambda r: r["val_acc1"])["epoch"]  # the first of equals: improvement is strict
    assert load_meta(checkpoints / "best")["metrics"]["epoch"] == best_epoch
    lines: list[str] = []
    resumed = fit(interrupted, resume=True, log=lines.append)
    assert f"{tmp_path / 'interrupted'} has no checkpoint yet: the run starts again from its beginning" in lines
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    assert all(np.array_equal(final[key], expected[key]) for key in expected)  # bitwise
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in whole.history]
    assert load_meta(checkpoints / "best")["metrics"]["epoch"] == whole.best.epoch
