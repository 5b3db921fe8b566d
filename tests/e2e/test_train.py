"""`jaxtl train`, `predict`, `eval`, `export` end to end on generated data, as a user runs them.

Runs are shrunk by overrides (a few images per class, one or two epochs) and use random-init
weights, which need no download.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from devices import host_devices_env
from tiny import TINY

JAXTL = [sys.executable, "-m", "jaxtl.cli"]
CONFIGS = Path(__file__).parents[2] / "configs"


def run(*args, env=None, check=True, timeout=900):
    result = subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=timeout, env=env or os.environ)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train(run_dir, config="quickstart.yaml", *overrides, **kwargs):
    sets = [f"run_dir={run_dir}", *TINY, *overrides]
    return run("train", str(CONFIGS / config), *[a for s in sets for a in ("--set", s)], **kwargs)


def kill_after_step(run_dir, config, overrides, step, timeout=900):
    """Runs ``jaxtl train`` and SIGKILLs it once checkpoints/latest holds step ``step`` or later."""
    command = [*JAXTL, "train", str(CONFIGS / config)]
    for s in (f"run_dir={run_dir}", *TINY, *overrides):
        command += ["--set", s]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = Path(run_dir) / "checkpoints" / "latest" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= step:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_trees_equal(a, b):
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


def arrays(checkpoint):
    from jaxtl.train.checkpoint import load_arrays
    from jaxtl.weights import flatten_arrays

    return flatten_arrays(load_arrays(checkpoint)["model"])


@pytest.mark.slow
def test_quickstart_runs_and_its_checkpoint_predicts_evaluates_and_exports(tmp_path, production_xla_env):
    run_dir = tmp_path / "run"
    # Compiled as a user's run is, not with the suite's cheap options (tests/conftest.py).
    result = train(run_dir, "quickstart.yaml", "phases.0.epochs=2", "phases.1.epochs=1", env=production_xla_env)
    out = result.stdout
    assert "head-only phase on cached features" in out and "optimizer state carried over for group(s) head" in out
    assert "best val acc@1" in out and f"jaxtl predict {run_dir}/checkpoints/best" in out
    records = metrics(run_dir)
    assert [(r["phase"], r["epoch"]) for r in records] == [("head", 1), ("head", 2), ("last_block", 3)]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_acc1"] <= 1 for r in records)
    best_meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert best_meta["classes"] == ["checkerboard", "circle", "square"]
    assert best_meta["class_to_idx"] == {"checkerboard": 0, "circle": 1, "square": 2}
    assert best_meta["best"]["val_acc1"] == max(r["val_acc1"] for r in records)
    assert (run_dir / "config.yaml").is_file()

    # The confusion matrix is the best checkpoint's: its diagonal is the best accuracy.
    confusion = json.loads((run_dir / "confusion.json").read_text())
    matrix = np.array(confusion["matrix"])
    assert confusion["classes"] == best_meta["classes"] and confusion["epoch"] == best_meta["best"]["epoch"]
    assert matrix.sum() == 3 * 3 and np.trace(matrix) / matrix.sum() == pytest.approx(best_meta["best"]["val_acc1"])
    assert (matrix.sum(axis=1) == 3).all()  # rows are the true classes: 3 val images each
    from PIL import Image

    for figure in ("curves.png", "confusion.png"):
        with Image.open(run_dir / figure) as image:
            assert image.format == "PNG" and min(image.size) > 300

    # TensorBoard reads the event file: per-epoch metrics equal metrics.jsonl's (float32), lrs logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/acc1", "val/loss", "val/acc1", "lr/head", "lr/blocks", "train/loss_step"} <= set(
        events.Tags()["scalars"]
    )
    logged = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert logged == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Scalars("lr/blocks")] == [records[-1]["step"]]  # trains in phase 2 only
    # One progress line per epoch here (epochs end before the 10 s between log lines), with the final loss.
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[:3] for line in progress] == [["epoch", str(e), "5/5"] for e in (1, 2, 3)]
    assert all("img/s" in line and " loss " in line for line in progress)

    # eval of the best checkpoint reproduces the logged best accuracy, balanced accuracy and per-class table
    evaluated = run("eval", str(run_dir / "checkpoints" / "best"), env=production_xla_env)
    assert f"acc@1 {best_meta['best']['val_acc1']:.4f}" in evaluated.stdout
    best_record = next(r for r in records if r["epoch"] == best_meta["best"]["epoch"])
    assert f"balanced acc {best_record['val_balanced_acc']:.4f}" in evaluated.stdout
    per_class = best_record["val_per_class"]
    assert list(per_class) == best_meta["classes"] and all(row["support"] == 3 for row in per_class.values())
    for name, row in per_class.items():
        line = f"  {name:<12}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
        assert line in evaluated.stdout.splitlines()
    assert "val/balanced_acc" in events.Tags()["scalars"]
    flipped = run("eval", str(run_dir / "checkpoints" / "best"), "--tta", "flip", env=production_xla_env)
    assert re.search(r"on val \(9 images, TTA: flip\): acc@1 [0-9.]+ balanced acc [0-9.]+ loss", flipped.stdout)

    # predict names the stored classes; a bad file gets its own error line, the others still run
    val = Path(out.split("try: jaxtl predict ")[1].split()[1]).parents[1]
    images = sorted(val.rglob("*.jpg"))[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    best = str(run_dir / "checkpoints" / "best")
    predicted = run("predict", best, *map(str, images), str(bad), "--top-k", "3", check=False, env=production_xla_env)
    assert predicted.returncode == 1
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 4 and "not an image PIL can read" in lines[-1]
    for line in lines[:3]:
        names = [part.split()[0] for part in line.split(": ", 1)[1].split(", ")]
        assert sorted(names) == ["checkerboard", "circle", "square"]

    # export: torchvision loads it strictly and predicts what jaxtl predicts
    import torch
    import torchvision
    from PIL import Image

    from jaxtl.data import EvalTransform, normalize
    from jaxtl.weights import Preprocessing

    exported = tmp_path / "model.pth"
    run("export", str(run_dir / "checkpoints" / "best"), "--out", str(exported))
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["classes"] == best_meta["classes"]
    torch_model = torchvision.models.get_model("resnet18", num_classes=3)
    torch_model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    p = sidecar["preprocessing"]
    transform = EvalTransform(Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])}))
    x = np.stack([normalize(transform(Image.open(i).convert("RGB")), p["mean"], p["std"]) for i in images])
    with torch.no_grad():
        torch_probs = torch.softmax(torch_model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))), -1).numpy()
    for line, probs in zip(lines[:3], torch_probs):
        first = line.split(": ", 1)[1].split(", ")[0].split()
        assert first[0] == best_meta["classes"][int(np.argmax(probs))]
        assert float(first[1]) == pytest.approx(float(probs.max()), abs=2e-3)


@pytest.mark.slow
def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    overrides = ("phases.0.epochs=2", "phases.1.epochs=3")
    # Loader worker processes for the uninterrupted run, threads (auto, 2 workers) for the cut one:
    # the same batches either way.
    train(tmp_path / "whole", "quickstart.yaml", *overrides, "data.worker_type=process")
    # Stop a second run with SIGKILL once its first checkpoint of phase 2 exists, then resume it.
    kill_after_step(tmp_path / "cut", "quickstart.yaml", overrides, 2 * 5 + 2)  # into phase 2
    resumed = run("train", "--resume", str(tmp_path / "cut"))
    assert "resumed from" in resumed.stdout
    whole, cut = (
        arrays(tmp_path / "whole" / "checkpoints" / "latest"),
        arrays(tmp_path / "cut" / "checkpoints" / "latest"),
    )
    assert whole.keys() == cut.keys()
    for key in whole:
        assert np.array_equal(whole[key], cut[key]), key
    # The epoch the kill interrupted was redone from its start: every epoch's losses are the same.
    last = {r["epoch"]: r for r in metrics(tmp_path / "cut")}
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in metrics(tmp_path / "whole")] == [
        (e, last[e]["train_loss"], last[e]["val_loss"]) for e in sorted(last)
    ]
    # TensorBoard shows the resumed run as one run: what the killed process logged after its
    # checkpoint is purged, so each step appears once with the uninterrupted run's values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curve(run, tag):
        return [(e.step, e.value) for e in EventAccumulator(str(tmp_path / run / "tensorboard")).Reload().Scalars(tag)]

    assert curve("cut", "val/loss") == curve("whole", "val/loss")
    assert curve("cut", "train/loss_step") == curve("whole", "train/loss_step")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feature_caching_equals_training_through_the_frozen_backbone(tmp_path, precision):
    # In bf16 the feature pass computes the backbone as the train step's forward pass does (bf16
    # parameters and inputs), and validation too: float32 features moved the losses by ~1e-3.
    common = ("phases.0.epochs=2", f"train.precision={precision}")
    train(tmp_path / "cached", "resnet18_feature_extraction.yaml", *common)
    train(tmp_path / "uncached", "resnet18_feature_extraction.yaml", *common, "train.feature_cache=false")
    cached, uncached = metrics(tmp_path / "cached"), metrics(tmp_path / "uncached")
    tolerance = 1e-6 if precision == "fp32" else 2e-5
    for a, b in zip(cached, uncached, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=tolerance)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=tolerance)
    a, b = (
        arrays(tmp_path / "cached" / "checkpoints" / "latest"),
        arrays(tmp_path / "uncached" / "checkpoints" / "latest"),
    )
    np.testing.assert_allclose(a["fc.weight"], b["fc.weight"], atol=tolerance)


@pytest.mark.slow
def test_data_parallel_on_8_cpu_devices_matches_one_device(tmp_path):
    env = host_devices_env(8)
    overrides = ("data.batch_size=8", "data.eval_batch_size=8", "phases.0.epochs=1", "phases.1.epochs=1")
    eight = train(tmp_path / "eight", "quickstart.yaml", *overrides, env=env)
    assert "on 8 device(s)" in eight.stdout
    one = train(tmp_path / "one", "quickstart.yaml", *overrides)
    assert "on 1 device(s)" in one.stdout
    for a, b in zip(metrics(tmp_path / "eight"), metrics(tmp_path / "one"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "quickstart.yaml"))
def test_every_config_runs_shrunk(tmp_path, config):
    from jaxtl.config import load_config

    loaded = load_config(CONFIGS / config)
    epochs = [f"phases.{i}.epochs=1" for i in range(len(loaded.phases))]
    shrink = ["optim.warmup_steps=1"] if "finetune" in config else []
    result = train(tmp_path / "run", config, *epochs, *shrink, "data.crop_size=32")
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "best" / "meta.json").is_file()
    assert len(metrics(run_dir)) == len(epochs)
    multilabel = loaded.task == "multilabel"  # its figures are the curves; mAP picks the best checkpoint
    assert ("best val mAP" if multilabel else "best val acc@1") in result.stdout
    single = () if multilabel else ("confusion.png", "confusion.json", "report.html")
    for output in ("curves.png", "config.yaml", *single):
        assert (run_dir / output).is_file(), output
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # best holds what latest holds, optimizer state included (the same state when best is the last epoch).
    from jaxtl.train.checkpoint import load_arrays, load_meta

    best, latest = run_dir / "checkpoints" / "best", run_dir / "checkpoints" / "latest"
    best_arrays, latest_arrays = load_arrays(best), load_arrays(latest)
    held = {"model", "opt_state"} | ({"ema"} if "ema:" in (CONFIGS / config).read_text() else set())
    assert best_arrays.keys() == latest_arrays.keys() == held  # the weight average too where train.ema is on
    if load_meta(best)["step"] == load_meta(latest)["step"]:
        assert_trees_equal(best_arrays, latest_arrays)


def test_config_errors_are_one_clear_line(tmp_path):
    bad = run("train", str(CONFIGS / "quickstart.yaml"), "--set", "optim.lr=-1", check=False)
    assert bad.returncode == 2 and "optim.lr = -1.0 is out of range" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run("train", str(CONFIGS / "quickstart.yaml"), "--set", "data.batchsize=4", check=False)
    assert unknown.returncode == 2 and "unknown key(s) data.batchsize" in unknown.stderr
    missing = run("train", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 2 and "nope.yaml does not exist" in missing.stderr
    resume = run("train", "--resume", str(tmp_path), check=False)
    assert resume.returncode == 2 and "not a jaxtl run directory" in resume.stderr


@pytest.mark.slow
def test_the_timm_style_config_killed_and_resumed_ends_bitwise_equal(tmp_path):
    """configs/resnet50_timm_finetune.yaml (device augmentation, Mixup/CutMix, label smoothing, the EMA, AdamW
    with warmup + cosine) with two accumulated micro-batches: SIGKILLed in its second epoch and resumed, it ends
    with the weights, the average and the optimizer state of an uninterrupted run. On a ResNet-18: what is resumed
    is the same for any model, and the ResNet-50, compiled in each of the three processes, doubled this test's time
    (103 s against 53 s alone); the config runs as written, on its ResNet-50, in test_every_config_runs_shrunk."""
    overrides = ["model.arch=resnet18", "data.crop_size=32", "phases.0.epochs=2", "optim.warmup_steps=2",
                 "train.accumulate_steps=2", "data.batch_size=2", "train.checkpoint_every_steps=2"]  # fmt: skip
    whole = train(tmp_path / "whole", "resnet50_timm_finetune.yaml", *overrides)
    assert "mixing: mixup alpha 0.2 and cutmix alpha 1" in whole.stdout and "val (EMA) loss" in whole.stdout
    kill_after_step(tmp_path / "cut", "resnet50_timm_finetune.yaml", overrides, 6)  # 5 steps of 2 x 2 an epoch
    run("train", "--resume", str(tmp_path / "cut"))
    from jaxtl.train.checkpoint import load_arrays

    whole_arrays, cut_arrays = (load_arrays(tmp_path / name / "checkpoints" / "latest") for name in ("whole", "cut"))
    assert set(whole_arrays) == {"model", "ema", "opt_state"}
    assert_trees_equal(whole_arrays, cut_arrays)
