"""`jaxtl data` and `jaxtl inspect`, run as a user runs them."""

import importlib.util
import os
import subprocess
import sys

JAXTL = [sys.executable, "-m", "jaxtl.cli"]


def run(*args, env=None):
    return subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=300, env=env or os.environ)


def test_data_synthetic_writes_and_reuses_the_dataset(tmp_path):
    out = tmp_path / "shapes"
    args = (
        "data",
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "3",
        "--train-per-class",
        "4",
        "--val-per-class",
        "2",
    )
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "train: 12 images, classes checkerboard, circle, square" in first.stdout
    assert "val: 6 images" in first.stdout
    assert sorted(p.name for p in (out / "train").iterdir()) == ["checkerboard", "circle", "square"]
    files = {p: p.read_bytes() for p in out.rglob("*.jpg")}
    assert run(*args).returncode == 0
    assert {p: p.read_bytes() for p in out.rglob("*.jpg")} == files


def test_data_synthetic_rejects_bad_arguments(tmp_path):
    result = run("data", "synthetic", "--out", str(tmp_path / "x"), "--num-classes", "12")
    assert result.returncode == 2
    assert "num_classes=12: the synthetic dataset has 2 to 8 classes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_data_prepare_runs_apart_and_explains_what_it_needs(tmp_path):
    """The preparing process needs tensorflow; without it the message says so and nothing is written."""
    result = run("data", "prepare", "tf_flowers", "--data-dir", str(tmp_path / "tfds"))
    # find_spec, not import: tensorflow must never enter a process that may import torch.
    if (
        importlib.util.find_spec("tensorflow") is not None
    ):  # a machine with tensorflow but no network: the download fails, with the name.
        assert result.returncode == 2 and "could not prepare tfds dataset 'tf_flowers'" in result.stderr
    else:
        assert result.returncode == 2
        assert "tfds builds tf_flowers with tensorflow, which is not installed: pip install tensorflow" in result.stderr
        assert not (tmp_path / "tfds").exists()
    assert "Traceback" not in result.stderr


def test_inspect_prints_the_groups_of_a_policy():
    result = run("inspect", "resnet50", "--policy", "last_n_blocks:1", "--num-classes", "7")
    assert result.returncode == 0, result.stderr
    assert "trainable: 32 tensors, 14,979,079 parameters (63.7%)" in result.stdout
    assert "layer4.* (30 keys)" in result.stdout
    bad = run("inspect", "resnet50", "--policy", "last_n_blocks:9")
    assert bad.returncode == 2 and "last_n_blocks(9): the model has 5 blocks before its head" in bad.stderr


def test_inspect_a_config_prints_every_phase():
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "efficientnet_b0_progressive.yaml"
    result = run("inspect", str(config), "--num-classes", "5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "efficientnet_b0 (5 classes), 3 phase(s)" in out
    assert "phase 1 'head' (head_only, 3 epochs)" in out and "phase 3 'all' (full, 3 epochs)" in out
    assert "trainable: 2 tensors, 6,405 parameters" in out  # head only: classifier.1 of 1280 -> 5
    assert "blocks                16" in out and "0.0001" in out
    bad = run("inspect", str(config), "--num-classes", "5", "--set", "phases.0.lrs.blocks=1e-3")
    assert bad.returncode == 2 and "unknown group(s) blocks" in bad.stderr


def test_inspect_a_config_shows_its_loss_mixing_average_and_accumulation():
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    sets = ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1", "train.ema.decay=0.999",
            "train.ema.warmup=true", "train.accumulate_steps=4", "data.batch_size=8"]  # fmt: skip
    result = run("inspect", str(config), "--num-classes", "5", *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "batch 8 x 4 accumulated micro-batches (an optimizer step sees 32)" in out
    assert "mixing: mixup alpha 0.2 and cutmix alpha 1 on a batch with p 1, cutmix chosen with p 0.5" in out
    assert "loss: cross-entropy, label smoothing 0.1, class weights none" in out
    assert "task: single_label, data synthetic, train order a permutation every epoch" in out
    assert "best checkpoint by val_acc1" in out
    assert "weight average (EMA): decay 0.999 with timm's warmup, every 1 step(s)" in out
