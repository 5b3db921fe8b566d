"""A multi-label task end to end from the CLI: the generated multi-label set (one to three figures per image, its
labels in CSV files), a head phase on cached features then a fine-tuning phase, killed mid-epoch and resumed to
the uninterrupted run's bits; its metrics against scikit-learn's, and `jaxtl predict` over the threshold."""

import json
import os
import signal

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score
from test_reliability import JAXTL, assert_same_checkpoint, resume, run
from test_train import CONFIGS
from tiny import TINY

from jaxtl.data.sources.label_file import label_file_splits
from jaxtl.data.synthetic import CLASSES, generate_synthetic
from jaxtl.train import Predictor

MULTILABEL = [
    *TINY,
    "task=multilabel",
    "data.synthetic.multilabel=true",
    "data.crop_size=32",
    "phases=[{name: head, policy: head_only, epochs: 2, lrs: {head: 1.0e-2}},"
    " {name: all, policy: full, epochs: 2, lrs: {head: 1.0e-3, backbone: 1.0e-4}}]",
    "train.pos_weight=balanced",
    "train.label_smoothing=0.1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, compilation_cache):
    """One jaxtl cache (the generated dataset) for the module's runs; never the user's."""
    cache = tmp_path_factory.mktemp("jaxtl-cache")
    return dict(os.environ, JAXTL_CACHE=str(cache), JAX_COMPILATION_CACHE_DIR=str(compilation_cache))


def command(run_dir, *overrides):
    sets = [f"run_dir={run_dir}", *MULTILABEL, *overrides]
    return [*JAXTL, "train", str(CONFIGS / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("multilabel") / "whole"
    result = run(command(run_dir), env)
    assert "loss: binary cross-entropy, label smoothing 0.1" in result.stdout
    assert "mAP" in result.stdout and "threshold" in result.stdout
    return run_dir


@pytest.mark.slow
def test_a_multilabel_run_killed_mid_epoch_resumes_to_the_uninterrupted_bits(tmp_path, env, whole):
    cut = tmp_path / "cut"
    run(command(cut), env, expect=-signal.SIGKILL, fault="kill:train.step:12")  # in the fine-tuning phase
    resume(cut, env)
    assert_same_checkpoint(whole / "checkpoints" / "latest", cut / "checkpoints" / "latest")
    assert_same_checkpoint(whole / "checkpoints" / "best", cut / "checkpoints" / "best")
    keys = ("epoch", "step", "train_loss", "train_acc1", "val_loss", "val_map", "val_auroc", "val_f1", "val_threshold")
    last = {r["epoch"]: [r[k] for k in keys] for r in records(cut)}
    assert [last[epoch] for epoch in sorted(last)] == [[r[k] for k in keys] for r in records(whole)]


@pytest.mark.slow
def test_the_records_are_scikit_learns_metrics_of_the_checkpoints_predictions(env, whole, monkeypatch):
    history = records(whole)
    assert [r["phase"] for r in history] == ["head", "head", "all", "all"]
    last = history[-1]
    source = _val_source(env, monkeypatch)
    predictor = Predictor.from_checkpoint(whole / "checkpoints" / "latest")
    scores = np.stack([predictor.probabilities(source.load(i)[0]) for i in range(len(source))])
    truth = source.labels()
    present = truth.sum(0) > 0  # a class without positives in val has no AP, as scikit-learn warns
    assert last["val_map"] == pytest.approx(average_precision_score(truth[:, present], scores[:, present]), abs=1e-5)
    predicted = (scores >= last["val_threshold"]).astype(int)
    assert last["val_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-5)
    per_class = last["val_per_class"]
    assert list(per_class) == list(CLASSES[:3]) and set(per_class["circle"]) == {"ap", "auroc", "f1", "support"}


@pytest.mark.slow
def test_predict_prints_the_classes_over_the_runs_threshold(env, whole, monkeypatch):
    source = _val_source(env, monkeypatch)
    paths = [source.samples[i][0] for i in range(4)]
    result = run([*JAXTL, "predict", str(whole / "checkpoints" / "best"), *paths], env)
    predictor = Predictor.from_checkpoint(whole / "checkpoints" / "best")
    for path, line in zip(paths, result.stdout.strip().splitlines()[-4:]):
        p = predictor.probabilities(source.load(paths.index(path))[0])
        over = [i for i in np.argsort(-p, kind="stable") if p[i] >= predictor.threshold]
        expected = ", ".join(f"{CLASSES[i]} {p[i]:.3f}" for i in over) or "none"
        assert line == f"{path}: {expected} (threshold {predictor.threshold:g})"


@pytest.mark.slow
def test_an_exported_multilabel_model_keeps_its_task_and_threshold(env, whole, monkeypatch, tmp_path):
    from jaxtl.artifacts import model_and_info
    from jaxtl.artifacts.loading import load_classifier
    from jaxtl.artifacts.stablehlo import export_stablehlo

    best = whole / "checkpoints" / "best"
    predictor = Predictor.from_checkpoint(best)
    model, info = model_and_info(best)
    export_stablehlo(model, info, tmp_path / "artifact", platforms=("cpu",))
    classifier = load_classifier(tmp_path / "artifact")
    assert classifier.multilabel and classifier.info.task == "multilabel"
    assert classifier.threshold == predictor.threshold and 0 < predictor.threshold < 1
    source = _val_source(env, monkeypatch)
    for index in range(3):
        image = source.load(index)[0]
        np.testing.assert_allclose(classifier.probabilities(image), predictor.probabilities(image), atol=1e-6)


def _val_source(env, monkeypatch):
    """The run's val split, read from the dataset it generated into its cache."""
    monkeypatch.setenv("JAXTL_CACHE", env["JAXTL_CACHE"])
    root = generate_synthetic(num_classes=3, train_per_class=6, val_per_class=3, multilabel=True)
    return label_file_splits(
        {"train": root / "train.csv", "val": root / "val.csv"}, label_column="labels", label_separator=" ",
        classes=CLASSES[:3],
    )["val"]  # fmt: skip


@pytest.mark.slow
def test_eval_of_a_multilabel_checkpoint_prints_its_records_metrics_at_its_threshold(env, whole):
    best = whole / "checkpoints" / "best"
    epoch = json.loads((best / "meta.json").read_text())["metrics"]
    result = run([*JAXTL, "eval", str(best)], env)
    head = result.stdout.strip().splitlines()[0]
    assert f"mAP {epoch['val_map']:.4f} AUROC {epoch['val_auroc']:.4f} F1 {epoch['val_f1']:.4f}" in head, head
    assert f"(threshold {epoch['val_threshold']:g})" in head and f"loss {epoch['val_loss']:.4f}" in head
    assert [line.split()[0] for line in result.stdout.strip().splitlines()[2:]] == list(CLASSES[:3])
