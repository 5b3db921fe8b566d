"""The task, decided in one place: single-label (softmax, cross-entropy, accuracy) or multi-label (sigmoid,
binary cross-entropy, mAP, AUROC and F1 at a threshold chosen on validation).

The labels say which: class indices ``(B,)`` or multi-hot vectors ``(B, C)`` (a source with
``multilabel = True``; ``task: multilabel`` in a run config). On the device the steps count the rows they get
right (:func:`correct_rows`: the top class, or every class on the right side of probability 0.5: scikit-learn's
``accuracy_score``, the subset accuracy, which the records keep as ``acc1``) and take the eval loss
(:func:`eval_loss`). On the host :func:`multilabel_metrics` computes what scikit-learn's
``average_precision_score``, ``roc_auc_score`` and ``f1_score(zero_division=0)`` compute, per class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.train.losses import BinaryCrossEntropy, CrossEntropy

# The thresholds a multi-label run chooses from on validation: the one with the highest macro F1 (the lowest of
# equals), which ``predict`` then applies.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_THRESHOLD = 0.5


def checkpoint_metric(config) -> str:
    """The validation metric that picks a run's ``best`` checkpoint: ``train.checkpoint_metric``, or by default
    ``val_acc1`` for a single-label task and ``val_map`` for a multi-label one."""
    chosen = config.train.checkpoint_metric
    return chosen or ("val_map" if config.task == "multilabel" else "val_acc1")


def scores(metrics: dict, prefix: str = "val_") -> str:
    """An epoch's scores for the log: top-1 (and top-5) accuracy, or (multi-label) mAP, F1 at the threshold and the
    share of images with every class right."""
    get = lambda name: metrics[f"{prefix}{name}"]  # noqa: E731
    if f"{prefix}map" in metrics:
        return f"mAP {get('map'):.3f} F1 {get('f1'):.3f} (threshold {get('threshold'):g}) acc {get('acc1'):.3f}"
    return f"acc@1 {get('acc1'):.3f}" + (f" acc@5 {get('acc5'):.3f}" if f"{prefix}acc5" in metrics else "")


def correct_rows(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """How many unmasked rows are right: the argmax is the label, or (multi-hot labels) every class's
    probability is on the label's side of 0.5 (a logit of 0)."""
    if labels.ndim == 2:
        return jnp.sum(jnp.all((logits > 0) == (labels > 0), axis=-1) & mask)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & mask)


def eval_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Validation's plain loss: cross-entropy of class indices, binary cross-entropy of multi-hot labels."""
    return (BinaryCrossEntropy() if labels.ndim == 2 else CrossEntropy())(logits, labels, mask)


def probabilities(logits: jax.Array, multilabel: bool) -> jax.Array:
    """Class probabilities: independent sigmoids (multi-label) or a softmax over the classes."""
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class MultilabelMetrics:
    """A multi-label evaluation: per class (C,) arrays and their macro means.

    Attributes:
        average_precision: scikit-learn's ``average_precision_score`` of each class; NaN for a class without
            positives (it has none to rank), left out of ``mean_average_precision``.
        auroc: ``roc_auc_score`` of each class; NaN where a class has no positive or no negative.
        f1: ``f1_score(zero_division=0)`` of each class at ``threshold``.
        support: each class's positives.
        threshold: the probability from which a class is predicted (chosen on these outputs, or given).
    """

    average_precision: np.ndarray
    auroc: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    threshold: float

    @property
    def mean_average_precision(self) -> float:
        return _nanmean(self.average_precision)

    @property
    def macro_auroc(self) -> float:
        return _nanmean(self.auroc)

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.f1)) if len(self.f1) else 0.0

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}map": self.mean_average_precision, f"{prefix}auroc": self.macro_auroc,
                f"{prefix}f1": self.macro_f1, f"{prefix}threshold": self.threshold}  # fmt: skip

    def per_class(self, classes: Sequence[str]) -> dict[str, dict[str, float]]:
        return {
            name: {
                "ap": _plain(self.average_precision[i]),
                "auroc": _plain(self.auroc[i]),
                "f1": float(self.f1[i]),
                "support": int(self.support[i]),
            }  # fmt: skip
            for i, name in enumerate(classes)
        }


def multilabel_metrics(
    probabilities: np.ndarray, targets: np.ndarray, threshold: float | None = None
) -> MultilabelMetrics:
    """Per-class average precision, AUROC and F1 of (N, C) ``probabilities`` against (N, C) 0/1 ``targets``;
    ``threshold`` None: the one of :data:`THRESHOLDS` with the highest macro F1 (the lowest of equals)."""
    scores, truth = np.asarray(probabilities, np.float64), np.asarray(targets) > 0
    if threshold is None:
        threshold = max(THRESHOLDS, key=lambda t: (float(np.mean(f1_scores(scores >= t, truth))), -t))
    columns = range(scores.shape[1])
    return MultilabelMetrics(
        average_precision=np.array([average_precision(scores[:, c], truth[:, c]) for c in columns]),
        auroc=np.array([roc_auc(scores[:, c], truth[:, c]) for c in columns]),
        f1=f1_scores(scores >= threshold, truth),
        support=truth.sum(axis=0).astype(np.int64),
        threshold=float(threshold),
    )


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores, from
    the highest; NaN without positives."""
    positives = int(np.sum(truth))
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last row of each group of equal scores
    true_positives = np.cumsum(truth)[last]
    precision = true_positives / (last + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """scikit-learn's ``roc_auc_score`` (the trapezoidal area, ties counting half): the Mann-Whitney statistic
    from average ranks; NaN without a positive or without a negative."""
    positives = int(np.sum(truth))
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank of each tie group
    return float((np.sum(ranks[truth]) - positives * (positives + 1) / 2.0) / (positives * negatives))


def f1_scores(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(C,) F1 of each class's predictions, 0 where it has neither a prediction nor a positive."""
    true_positive = np.sum(predicted & truth, axis=0)
    total = np.sum(predicted, axis=0) + np.sum(truth, axis=0)
    return np.where(total > 0, 2.0 * true_positive / np.maximum(total, 1), 0.0)


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(np.mean(present)) if len(present) else float("nan")


def _plain(value: float) -> float | None:
    """A metric for JSON: None where it is undefined (NaN)."""
    return None if np.isnan(value) else float(value)
