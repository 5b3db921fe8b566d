"""`jaxtl suggest`: the decision table, and the command on the generated dataset and on a copy of it.

No pretrained weights can be had here, so the command runs with ``--weights null``: torchvision's random init.
Its pooled features see colour and hardly any shape, which decides how the two datasets are built. On the
generated dataset (shapes drawn in random colours on random backgrounds) a probe on random features stays near
chance; on a copy whose images are tinted with one colour per class (each image's grey levels times its class's
colour, the shapes kept), it is near perfect. The two have the same counts, so only the probe differs: the
first gets "small dataset, different domain" (fine-tune the last blocks), the second "small dataset, similar
domain" (feature extraction). With pretrained weights the same numbers measure how close the data is to the
pretraining data; here they only test that the advice follows the probe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxtl.config import config_from_dict, load_config
from jaxtl.data import generate_synthetic
from jaxtl.errors import DataError
from jaxtl.train.suggest import (
    IMBALANCE_RATIO,
    SIMILAR_LIFT,
    SMALL_PER_CLASS,
    VERY_SMALL_PER_CLASS,
    DatasetCounts,
    ProbeEvidence,
    choose_advice,
    plain_config,
    probe_evidence,
)

JAXTL = [sys.executable, "-m", "jaxtl.cli"]
# The feature pass at 96 pixels instead of 224: a fifth of the time, and the same story.
SMALL_INPUT = ["--weights", "null", "--set", "data.crop_size=96"]
TINTS = np.array([[220, 40, 40], [40, 200, 40], [50, 60, 230]], np.float32)


def run(*args):
    return subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=300, env=os.environ)


def write_tinted_copy(source: Path, target: Path) -> Path:
    """The ImageFolder tree ``source`` again under ``target``, each image's grey levels times its class's tint."""
    for split in ("train", "val"):
        for index, folder in enumerate(sorted((source / split).iterdir())):
            (target / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir()):
                grey = np.asarray(Image.open(path).convert("L"), np.float32)[..., None] / 255.0
                tinted = np.clip(grey * TINTS[index], 0, 255).astype(np.uint8)
                Image.fromarray(tinted).save(target / split / folder.name / path.name, quality=90)
    return target


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The generated shapes (3 classes, 24 train and 8 val images each) and their tinted copy."""
    base = tmp_path_factory.mktemp("suggest")
    shapes = generate_synthetic(base / "shapes", num_classes=3, train_per_class=24, val_per_class=8)
    return shapes, write_tinted_copy(shapes, base / "tinted")


def numbers(output: str) -> dict[str, float]:
    """The probe's numbers as the command prints them."""
    found = re.search(
        r"val accuracy ([\d.]+) on (\d+) images \(train ([\d.]+)\); chance ([\d.]+) .* lift (-?[\d.]+)", output
    )
    assert found, output
    return dict(zip(("val", "count", "train", "chance", "lift"), map(float, found.groups())))


@pytest.mark.slow
def test_the_advice_follows_the_probe_on_the_shapes_and_on_their_tinted_copy(datasets, tmp_path):
    shapes, tinted = datasets
    results = {}
    for name, root in (("shapes", shapes), ("tinted", tinted)):
        out = tmp_path / f"{name}.yaml"
        result = run("suggest", str(root), *SMALL_INPUT, "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        print(result.stdout)  # the evidence, in the test log
        results[name] = result.stdout, out
        assert "3 classes (checkerboard, circle, square); 72 train images, 24 val images" in result.stdout
        assert "train images per class: median 24, min 24, max 24 (imbalance 1.0)" in result.stdout
        assert "the backbone is a random initialisation, not pretrained weights" in result.stdout
        assert f"config: {out}; start with: jaxtl train {out}" in result.stdout

    shapes_out, shapes_yaml = results["shapes"]
    tinted_out, tinted_yaml = results["tinted"]
    shapes_probe, tinted_probe = numbers(shapes_out), numbers(tinted_out)
    assert shapes_probe["chance"] == tinted_probe["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert shapes_probe["count"] == tinted_probe["count"] == 24
    assert tinted_probe["val"] >= 0.9 and tinted_probe["lift"] >= SIMILAR_LIFT
    assert shapes_probe["lift"] < 0.5  # measured 0.19: shapes are all but invisible to random features
    assert shapes_probe["train"] == 1.0  # 72 rows of 512 features: the probe fits the train split, and only it

    assert "-> small dataset, different domain      fine-tune the last blocks" in shapes_out
    assert f"domain: different (probe lift {shapes_probe['lift']:.2f}; similar from {SIMILAR_LIFT:g}" in shapes_out
    assert "-> small dataset, similar domain        feature extraction" in tinted_out
    assert "suggested: feature extraction: freeze the backbone, train a new head" in tinted_out

    for root, path, policies in (
        (shapes, shapes_yaml, ["head_only", "last_n_blocks:2"]),
        (tinted, tinted_yaml, ["head_only"]),
    ):
        config = load_config(path)
        assert config.data.source == "folder" and config.data.root == str(root.resolve())
        assert config.model.arch == "resnet18" and config.model.weights is None and config.data.crop_size == 96
        assert [phase.policy for phase in config.phases] == policies
        assert config.phases[0].lrs == {"head": 1.0e-3}
        assert path.read_text().startswith(f"# Suggested by `jaxtl suggest {root.resolve()}`.\n# dataset: 3 classes")
    assert load_config(shapes_yaml).phases[1].lrs == {"head": 1.0e-3, "blocks": 1.0e-4}


@pytest.mark.slow
def test_the_suggested_config_trains(datasets, tmp_path):
    _, tinted = datasets
    path = tmp_path / "tinted.yaml"
    assert run("suggest", str(tinted), *SMALL_INPUT, "--out", str(path)).returncode == 0
    result = run("train", str(path), "--set", f"run_dir={tmp_path / 'run'}")  # as written: 10 epochs of the head
    assert result.returncode == 0, result.stdout + result.stderr
    assert "head-only phase on cached features" in result.stdout
    accuracy = float(re.search(r"best val acc@1 ([\d.]+)", result.stdout).group(1))
    assert accuracy >= 0.6  # chance is 1/3: the head learns what the probe found (0.958 when measured)


def test_without_out_the_config_is_printed(datasets, tmp_path):
    shapes, _ = datasets
    result = run("suggest", str(shapes), *SMALL_INPUT, "--set", "data.eval_batch_size=24")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split("config (write it with --out CONFIG.yaml):\n")[1]
    (tmp_path / "printed.yaml").write_text(printed)
    config = load_config(tmp_path / "printed.yaml")
    assert config.data.eval_batch_size == 24 and config.data.root == str(shapes.resolve())


@pytest.mark.parametrize(
    "args, message",
    [
        (["/missing/data", "--weights", "null"], "/missing/data"),
        (["{root}", "--out", "suggested.txt"], "--out suggested.txt: give a .yaml file"),
        (["{root}", "--weights", "null", "--set", "optim.lrr=1"], "optim.lrr"),
        (["{root}", "--arch", "resnet05", "--weights", "null"], "unknown architecture 'resnet05'"),
    ],
)
def test_bad_input_gets_one_clear_error(datasets, args, message):
    shapes, _ = datasets
    result = run("suggest", *(arg.format(root=shapes) for arg in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# -- the decision table, without a model -------------------------------------------------------------------------


def counts(per_class: list[int]) -> DatasetCounts:
    return DatasetCounts(tuple(f"c{i}" for i in range(len(per_class))), tuple(per_class), tuple([5] * len(per_class)))


def evidence(val_accuracy: float, chance: float = 0.25) -> ProbeEvidence:
    return ProbeEvidence(val_accuracy, 1.0, chance, 100, 512, "test", random_init=False, converged=True)


@pytest.mark.parametrize(
    "median, accuracy, row, policies",
    [
        (VERY_SMALL_PER_CLASS - 1, 1.0, "very small dataset, similar domain", ["head_only"]),
        (VERY_SMALL_PER_CLASS - 1, 0.25, "very small dataset, different domain", ["head_only"]),
        (VERY_SMALL_PER_CLASS, 0.9, "small dataset, similar domain", ["head_only"]),
        (SMALL_PER_CLASS - 1, 0.5, "small dataset, different domain", ["head_only", "last_n_blocks:2"]),
        (SMALL_PER_CLASS, 0.8, "large dataset, similar domain", ["head_only", "full"]),
        (5000, 0.7, "large dataset, different domain", ["head_only", "full"]),
    ],
)
def test_each_row_of_the_decision_table(median, accuracy, row, policies):
    advice = choose_advice(counts([median] * 4), evidence(accuracy))  # chance 0.25: lift 0.8 at 0.85
    assert advice.row == row and [phase["policy"] for phase in advice.phases] == policies
    assert not advice.class_weights


def test_the_lift_threshold_is_the_share_of_the_way_from_chance_to_perfect():
    at = 0.25 + SIMILAR_LIFT * 0.75  # chance 0.25
    assert evidence(at).lift == pytest.approx(SIMILAR_LIFT)
    assert evidence(at + 1e-9).domain == "similar" and evidence(at - 1e-3).domain == "different"
    assert evidence(0.25).lift == 0 and evidence(1.0).lift == 1 and evidence(0.0).lift < 0


def test_the_two_large_rows_differ_in_the_backbones_learning_rate():
    similar = choose_advice(counts([500] * 3), evidence(1.0)).phases[1]["lrs"]
    different = choose_advice(counts([500] * 3), evidence(0.3)).phases[1]["lrs"]
    assert similar == {"head": 1.0e-4, "backbone": 1.0e-5} and different == {"head": 1.0e-3, "backbone": 1.0e-4}


def test_an_imbalanced_train_split_weights_the_loss_by_class():
    ratio = int(IMBALANCE_RATIO)
    assert choose_advice(counts([20, 20 * ratio, 30]), evidence(1.0)).class_weights
    assert not choose_advice(counts([20, 20 * ratio - 1, 30]), evidence(1.0)).class_weights
    assert counts([20, 20 * ratio - 1, 30]).median_per_class == 30


def test_chance_is_the_most_frequent_train_classs_share_of_val():
    rng = np.random.default_rng(0)
    train_labels = np.array([0] * 30 + [1] * 10 + [2] * 10)
    val_labels = np.array([0] * 6 + [1] * 2 + [2] * 2)
    centres = rng.normal(size=(3, 8)) * 4
    train, val = (centres[labels] + rng.normal(size=(len(labels), 8)) for labels in (train_labels, val_labels))
    result = probe_evidence(train, train_labels, val, val_labels, weights="test", random_init=False)
    assert result.chance == 0.6 and result.val_accuracy == 1.0 and result.lift == 1.0
    assert result.val_count == 10 and result.feature_dim == 8 and result.converged
    with pytest.raises(DataError, match="the val split's 2 images are all of one class"):
        probe_evidence(train, train_labels, val[:2], val_labels[:2], weights="test", random_init=False)


def test_the_written_config_holds_what_differs_from_the_defaults_and_loads_back():
    data = {
        "run_dir": "runs/x-{time}",
        "model": {"arch": "resnet18", "weights": None},
        "data": {"source": "folder", "root": "/data/x"},
        "optim": {"name": "adamw", "weight_decay": 1.0e-4},
        "phases": [{"name": "head", "policy": "head_only", "epochs": 10, "lrs": {"head": 1.0e-3}}],
    }
    config = config_from_dict(data, ["data.crop_size=96", "train.class_weights=balanced"])
    plain = plain_config(config)
    assert plain["data"] == {"source": "folder", "root": "/data/x", "crop_size": 96}
    assert plain["optim"] == {"name": "adamw", "lr": 1.0e-3, "weight_decay": 1.0e-4}
    assert plain["phases"] == data["phases"] and plain["train"] == {"class_weights": "balanced"}
    assert config_from_dict(plain) == config
