"""Evaluation: one function for the loop's validation, ``jaxtl eval`` and ``jaxtl predict``.

:func:`evaluate` runs the eval step (eval-mode BatchNorm and dropout, the run's precision, batches
sharded over the devices) over a loader and returns the loss, top-1 and top-5 accuracy and the
confusion matrix. :func:`evaluate_checkpoint` does it for a checkpoint on a split of its run's data;
:class:`Predictor` gives a checkpoint's class probabilities for images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.config import config_from_dict
from jaxtl.data import EvalTransform, Loader, data_sharding
from jaxtl.data.sources import is_multilabel
from jaxtl.errors import JaxtlError
from jaxtl.train import distributed
from jaxtl.train.faults import fault_point
from jaxtl.train.features import CachedFeatures, cached_batches
from jaxtl.train.figures import confusion_matrix
from jaxtl.train.inputs import load_data
from jaxtl.train.resume import load_checkpoint
from jaxtl.train.state import CheckpointMeta
from jaxtl.train.step import ModelState, make_eval_step
from jaxtl.train.task import DEFAULT_THRESHOLD, MultilabelMetrics, multilabel_metrics, probabilities
from jaxtl.xla import program_options


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Metrics over the examples evaluated, and the confusion matrix (rows: true class, columns: predicted);
    ``outputs``: each example's, where :func:`evaluate` was asked to keep them. A multi-label evaluation has
    ``multilabel`` (mAP, AUROC, F1) instead of the confusion matrix, and ``acc1`` is its subset accuracy."""

    loss: float
    acc1: float
    acc5: float
    count: int
    confusion: np.ndarray | None
    outputs: SplitPredictions | None = None
    multilabel: MultilabelMetrics | None = None

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """``val_loss``, ``val_acc1``, ``val_balanced_acc`` and, with more than five classes, ``val_acc5``; for a
        multi-label task ``val_loss``, ``val_acc1`` (every class right), ``val_map``, ``val_auroc``, ``val_f1`` and
        ``val_threshold`` (:class:`jaxtl.train.task.MultilabelMetrics`)."""
        out = {f"{prefix}loss": self.loss, f"{prefix}acc1": self.acc1}
        if self.multilabel is not None:
            return out | self.multilabel.metrics(prefix)
        if self.confusion.shape[0] > 5:
            out[f"{prefix}acc5"] = self.acc5
        out[f"{prefix}balanced_acc"] = balanced_accuracy(self.confusion)
        return out

    def per_class(self, classes: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """Each class's precision, recall, F1 and support (:func:`per_class_metrics`), by name; multi-label: its
        average precision, AUROC, F1 at the threshold and positives."""
        if self.multilabel is not None:
            return self.multilabel.per_class(classes)
        table = per_class_metrics(self.confusion)
        return {
            name: {key: float(values[i]) if key != "support" else int(values[i]) for key, values in table.items()}
            for i, name in enumerate(classes)
        }


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """A model's outputs for every readable image of a split, in the split's order (:func:`evaluate` with
    ``keep_outputs``, :func:`jaxtl.train.report.predict_split`).

    Attributes:
        log_probabilities: ``(N, C)`` float32 log-softmax of the logits (with TTA, of the averaged probabilities).
        labels: ``(N,)`` int64 true classes.
        indices: ``(N,)`` int64 each image's index in its source.
        skipped: the files skipped as unreadable (``data.skip_bad_files``).
    """

    log_probabilities: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    skipped: tuple[str, ...] = ()

    @property
    def losses(self) -> np.ndarray:
        """``(N,)`` float32 cross-entropy of each image: ``-log p(true class)``."""
        return -self.log_probabilities[np.arange(len(self.labels)), self.labels]

    @property
    def predictions(self) -> np.ndarray:
        """``(N,)`` int64 predicted classes (the argmax)."""
        return np.argmax(self.log_probabilities, axis=-1).astype(np.int64)

    def evaluation(self) -> Evaluation:
        """The split's loss, top-1 and top-5 accuracy and confusion matrix, as :func:`evaluate` gives them."""
        count, num_classes = self.log_probabilities.shape
        if not count:
            raise JaxtlError("no image of the split could be read, so there is nothing to report")
        top = np.argsort(-self.log_probabilities, axis=-1, kind="stable")[:, : min(5, num_classes)]
        return Evaluation(
            loss=float(np.mean(self.losses, dtype=np.float64)),
            acc1=float(np.mean(self.predictions == self.labels)),
            acc5=float(np.mean(np.any(top == self.labels[:, None], axis=-1))),
            count=count,
            confusion=confusion_matrix(self.labels, self.predictions, num_classes),
        )

    def top_losses(self, k: int) -> np.ndarray:
        """Positions (into these arrays) of the ``k`` highest losses, highest first; ties in split order."""
        return np.argsort(-self.losses, kind="stable")[:k]


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true class), as scikit-learn's
    ``precision_recall_fscore_support(..., zero_division=0)`` gives them: 0 where a class is never predicted
    (precision), has no example (recall) or both are 0 (F1)."""
    confusion = np.asarray(confusion, np.float64)
    true_positive, predicted, support = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def balanced_accuracy(confusion: np.ndarray) -> float:
    """The mean recall over the classes that have examples (scikit-learn's ``balanced_accuracy_score``)."""
    confusion = np.asarray(confusion, np.float64)
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else 0.0


def evaluate(
    eval_step,
    state: ModelState,
    loader: Loader,
    num_classes: int,
    features: CachedFeatures | None = None,
    *,
    keep_outputs: bool = False,
    threshold: float | None = None,
) -> Evaluation:
    """Runs ``eval_step`` (:func:`jaxtl.train.step.make_eval_step`) over one pass of ``loader``.

    Batches are sharded over the devices as in training; with ``features`` (the feature cache of a
    head-only phase) the cached features of the loader's examples stand in for their images. With
    ``keep_outputs`` the evaluation also holds every example's log-probabilities (:class:`SplitPredictions`;
    single-label). A multi-label loader's (multi-hot labels) evaluation holds
    :func:`jaxtl.train.task.multilabel_metrics` of every example's probabilities, at ``threshold`` (None: the one
    chosen on them).
    """
    multilabel = is_multilabel(loader.source)
    sharding, size = data_sharding(loader.batch_size), loader.batch_size
    loss = correct = correct5 = count = 0.0
    confusion = None if multilabel else np.zeros((num_classes, num_classes), np.int64)
    # Each batch's (log-probabilities, labels, indices), after an empty first entry that gives the arrays' shapes;
    # multi-label: each batch's (probabilities, multi-hot labels).
    kept = [(np.zeros((0, num_classes), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.int64))]
    probabilities, targets = [np.zeros((0, num_classes), np.float32)], [np.zeros((0, num_classes), np.uint8)]
    batches = cached_batches(loader, 0, 0, features) if features is not None else loader.epoch(0)
    for index, batch in enumerate(batches):
        labels = distributed.put(batch.labels, sharding, size)
        mask = distributed.put(batch.mask, sharding, size)
        logits, m = eval_step(state, distributed.put(batch.images, sharding, size), labels, mask)
        if index == 0:
            fault_point("train.eval")
        m = jax.device_get(m)
        rows = distributed.whole(batch.mask, sharding, size)  # every process's rows
        whole_labels = distributed.whole(batch.labels, sharding, size)
        if multilabel:
            probabilities.append(distributed.gather(jax.nn.sigmoid(jnp.asarray(logits, jnp.float32)))[rows])
            targets.append(whole_labels[rows])
        else:
            predictions = distributed.gather(jnp.argmax(logits, -1))
            confusion += confusion_matrix(whole_labels[rows], predictions[rows], num_classes)
        if keep_outputs and not multilabel:
            log_probabilities = distributed.gather(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
            indices = distributed.whole(batch.indices, sharding, size)
            kept.append((log_probabilities[rows], whole_labels[rows].astype(np.int64), indices[rows].astype(np.int64)))
        loss += float(m["loss"]) * float(m["count"])
        correct += float(m["correct"])
        correct5 += float(m["correct5"])
        count += float(m["count"])
    n = max(count, 1.0)
    outputs = SplitPredictions(*(np.concatenate(arrays) for arrays in zip(*kept))) if keep_outputs else None
    scores = None
    if multilabel:
        scores = multilabel_metrics(np.concatenate(probabilities), np.concatenate(targets), threshold)
    return Evaluation(loss / n, correct / n, correct5 / n, int(count), confusion, outputs, scores)


def eval_model_state(model: nnx.Module) -> tuple[nnx.GraphDef, ModelState]:
    """``model`` as the eval step takes it: every parameter a constant of the step."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, ModelState(nnx.State({}), params, rest)


def compute_dtype_of(precision: str):
    return jnp.bfloat16 if precision == "bf16" else None


@dataclasses.dataclass(frozen=True)
class CheckpointEvaluation:
    evaluation: Evaluation
    split: str
    skipped: tuple[str, ...]
    classes: tuple[str, ...] = ()


def evaluate_checkpoint(
    checkpoint: str | Path, split: str = "val", overrides: Sequence[str] = (), *, tta: str = "none"
) -> CheckpointEvaluation:
    """A checkpoint's metrics on a split of the data its run used (``overrides`` may point elsewhere).

    Evaluated as the run validated: its precision, its eval batch size, sharded over the devices; with
    ``tta="flip"`` each image's class probabilities averaged with its mirror image's.
    """
    model, meta = load_checkpoint(checkpoint)
    config = config_from_dict(meta.config, overrides, f"{checkpoint}/meta.json")
    data = load_data(config.data)
    if data.classes != meta.classes:
        raise JaxtlError(f"the data's classes {list(data.classes)} differ from the checkpoint's {list(meta.classes)}")
    d = config.data
    devices = jax.device_count()
    if d.eval_batch_size % devices:
        raise JaxtlError(f"data.eval_batch_size={d.eval_batch_size} does not split across {devices} devices")
    loader = Loader(
        data.val if split == "val" else data.train, EvalTransform(meta.preprocessing), batch_size=d.eval_batch_size,
        shuffle=False, num_workers=d.num_workers, skip_bad_files=d.skip_bad_files, worker_type=d.worker_type,
    )  # fmt: skip
    graphdef, state = eval_model_state(model)
    p = meta.preprocessing
    t = config.train
    step = make_eval_step(graphdef, mean=p.mean, std=p.std, compute_dtype=compute_dtype_of(t.precision),
                          compiler_options=program_options(t.ynnpack, "eval", t.precision), tta=tta)  # fmt: skip
    replicated = jax.sharding.NamedSharding(data_sharding(d.eval_batch_size).mesh, jax.sharding.PartitionSpec())
    try:
        evaluation = evaluate(step, jax.device_put(state, replicated), loader, meta.num_classes,
                              threshold=meta.metrics.get("val_threshold"))  # fmt: skip
    finally:
        loader.close()
    return CheckpointEvaluation(evaluation, split, tuple(loader.skipped), tuple(meta.classes))


class Predictor:
    """A checkpoint's class probabilities for images, with its eval preprocessing and class names.

    ``tta="flip"``: each image's probabilities averaged with its mirror image's (:func:`make_eval_step`).
    A multi-label checkpoint (``task: multilabel``) gives each class's sigmoid probability, and
    :attr:`threshold` is the one its run chose on validation.
    """

    def __init__(self, model: nnx.Module, meta: CheckpointMeta, *, tta: str = "none"):
        self.meta = meta
        self.multilabel = meta.config.get("task") == "multilabel"
        self.transform = EvalTransform(meta.preprocessing)
        graphdef, self.state = eval_model_state(model)
        p = meta.preprocessing
        train = meta.config.get("train", {})
        self.step = make_eval_step(
            graphdef, mean=p.mean, std=p.std, compute_dtype=compute_dtype_of(train.get("precision", "fp32")),
            compiler_options=program_options(train.get("ynnpack", "eval"), "eval", train.get("precision", "fp32")),
            tta=tta,
        )  # fmt: skip

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, tta: str = "none") -> Predictor:
        return cls(*load_checkpoint(checkpoint), tta=tta)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    @property
    def threshold(self) -> float:
        """The probability from which a multi-label checkpoint predicts a class (its run's ``val_threshold``)."""
        return float(self.meta.metrics.get("val_threshold", DEFAULT_THRESHOLD))

    def probabilities(self, image: Any) -> np.ndarray:
        """(num_classes,) float32 probabilities for one PIL image: a softmax, or per-class sigmoids (multi-label)."""
        images = self.transform(image)[None]
        shape = (1, self.meta.num_classes) if self.multilabel else (1,)
        labels, mask = np.zeros(shape, np.uint8 if self.multilabel else np.int32), np.ones((1,), bool)
        logits, _ = self.step(self.state, images, labels, mask)
        return np.asarray(probabilities(logits[0], self.multilabel))
