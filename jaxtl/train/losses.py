"""The training loss: cross-entropy with torch's label smoothing and class weights, over the unmasked rows;
for multi-label tasks torch's binary cross-entropy on the logits, with pos_weight and timm's smoothing.

``cross_entropy(label_smoothing, class_weights)`` computes what ``torch.nn.CrossEntropyLoss(weight=w,
label_smoothing=eps)`` computes with its default mean reduction on the batch's real rows (padding and
skipped files are masked out, as torch's ``ignore_index`` rows are):

    (1 - eps) * sum_i w[y_i] * -log p_i[y_i] / sum_i w[y_i]
        + eps / C * sum_i sum_c w[c] * -log p_i[c] / sum_i w[y_i]

(without weights, w = 1: the mean over the rows). ``balanced_class_weights`` is scikit-learn's
``compute_class_weight("balanced")``: ``n_samples / (n_classes * count[c])``.

``binary_cross_entropy(label_smoothing, class_weights, pos_weight)`` computes ``torch.nn.BCEWithLogitsLoss(
weight=w, pos_weight=p)`` (mean over every class of every real row) on targets smoothed as timm's
``BinaryCrossEntropy`` smooths a class index: ``t * (1 - eps) + eps / C`` (1 - eps + eps/C for a positive,
eps/C for a negative). ``balanced_pos_weight`` is each class's negatives over its positives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.config import ConfigError
from jaxtl.errors import DataError

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class CrossEntropy:
    """``loss(logits, targets, mask)``: torch's weighted, label-smoothed cross-entropy over the rows where
    ``mask`` is True (see the module's docstring); 0 for a batch without such rows.

    ``targets`` are class indices ``(B,)`` or class probabilities ``(B, C)`` (Mixup and CutMix). For
    probabilities torch smooths the targets (``t * (1 - eps) + eps / C``, which is timm's mixing of
    smoothed one-hot targets) and takes the mean over the rows, not over their class weights.
    The loss is ``numerator / denominator``: gradient accumulation sums the numerators of its
    micro-batches over the denominator of the whole batch, which equals the loss of one large batch.
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} is not in [0, 1]")
        self.label_smoothing = label_smoothing
        self.class_weights = None if class_weights is None else np.asarray(class_weights, np.float64)

    def _weights(self, num_classes: int, dtype) -> jax.Array:
        w = self.class_weights
        return jnp.ones(num_classes, dtype) if w is None else jnp.asarray(w, dtype)

    def denominator(self, targets: jax.Array, mask: jax.Array) -> jax.Array:
        """What the summed row losses are divided by: the rows' true-class weights (index targets) or their count."""
        rows = mask.astype(jnp.float32)
        if targets.ndim == 2 or self.class_weights is None:
            return jnp.sum(rows)
        return jnp.sum(jnp.asarray(self.class_weights, jnp.float32)[targets] * rows)

    def numerator(self, logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        """The sum of the rows' losses (each weighted as torch weighs it)."""
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 logits: the loss in float32
        log_p = jax.nn.log_softmax(logits, axis=-1)
        rows, eps = mask.astype(log_p.dtype), self.label_smoothing
        w = self._weights(log_p.shape[-1], log_p.dtype)
        if targets.ndim == 2:
            t = targets.astype(log_p.dtype)
            if eps:
                t = t * (1.0 - eps) + eps / log_p.shape[-1]
            return jnp.sum(-jnp.sum(log_p * t * w, axis=-1) * rows)
        nll = -jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0]
        total = (1.0 - eps) * jnp.sum(w[targets] * rows * nll)
        if eps:
            total = total + eps / log_p.shape[-1] * jnp.sum(-jnp.sum(log_p * w, axis=-1) * rows)
        return total

    def __call__(self, logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        log_p = jax.nn.log_softmax(logits, axis=-1)
        rows, eps = mask.astype(log_p.dtype), self.label_smoothing
        w = self._weights(log_p.shape[-1], log_p.dtype)
        if targets.ndim == 2:
            return self.numerator(logits, targets, mask) / jnp.maximum(jnp.sum(rows), 1.0)
        w_true = w[targets] * rows
        nll = -jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0]
        denominator = jnp.maximum(jnp.sum(w_true), jnp.finfo(log_p.dtype).tiny)
        total = (1.0 - eps) * jnp.sum(w_true * nll) / denominator
        if eps:
            smooth = -jnp.sum(log_p * w, axis=-1) * rows
            total = total + eps / log_p.shape[-1] * jnp.sum(smooth) / denominator
        return total


class BinaryCrossEntropy:
    """``loss(logits, targets, mask)``: torch's ``BCEWithLogitsLoss(weight=, pos_weight=)`` on the rows where
    ``mask`` is True, over (B, C) multi-hot or soft (Mixup) targets, smoothed as the module's docstring says.

    Per element ``w[c] * ((1 - t) * x + (1 + (p[c] - 1) * t) * softplus(-x))``, torch's stable form; the mean
    is over rows x classes, which :meth:`numerator` / :meth:`denominator` split for gradient accumulation.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        pos_weight: Sequence[float] | None = None,
    ):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} is not in [0, 1]")
        self.label_smoothing = label_smoothing
        self.class_weights = None if class_weights is None else np.asarray(class_weights, np.float64)
        self.pos_weight = None if pos_weight is None else np.asarray(pos_weight, np.float64)

    def denominator(self, targets: jax.Array, mask: jax.Array) -> jax.Array:
        """The number of (row, class) terms the mean is over."""
        return jnp.sum(mask.astype(jnp.float32)) * targets.shape[-1]

    def numerator(self, logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        t = targets.astype(x.dtype)
        if self.label_smoothing:
            t = t * (1.0 - self.label_smoothing) + self.label_smoothing / x.shape[-1]
        log_weight = 1.0 if self.pos_weight is None else 1.0 + (jnp.asarray(self.pos_weight, x.dtype) - 1.0) * t
        terms = (1.0 - t) * x + log_weight * jax.nn.softplus(-x)
        if self.class_weights is not None:
            terms = terms * jnp.asarray(self.class_weights, x.dtype)
        return jnp.sum(terms * mask.astype(x.dtype)[:, None])

    def __call__(self, logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        return self.numerator(logits, targets, mask) / jnp.maximum(self.denominator(targets, mask), 1.0)


def balanced_pos_weight(targets: np.ndarray, classes: Sequence[str]) -> list[float]:
    """Each class's ``negatives / positives`` in the (N, C) multi-hot ``targets`` (torch's documented use of
    ``pos_weight``): a loss that weighs a class's positives as much as its negatives.

    Raises:
        DataError: a class without positives (its weight would be infinite), naming it.
    """
    targets = np.asarray(targets) > 0
    positives = targets.sum(axis=0)
    empty = [classes[i] for i in np.flatnonzero(positives == 0)]
    if empty:
        raise DataError(
            f"train.pos_weight: balanced needs a positive example of every class, and {', '.join(empty[:5])} "
            "has none in the train split; give the weights as a list instead"
        )
    return ((len(targets) - positives) / positives).tolist()


def cross_entropy(label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None) -> CrossEntropy:
    """torch's ``CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)`` (:class:`CrossEntropy`)."""
    return CrossEntropy(label_smoothing, class_weights)


def balanced_class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[float]:
    """scikit-learn's "balanced" class weights of ``labels``: ``len(labels) / (num_classes * count[c])``.

    Raises:
        DataError: a class without examples (its weight would be infinite), naming it.
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(
            f"train.class_weights: balanced needs an example of every class, and class index "
            f"{', '.join(map(str, empty[:5]))} has none in the train split; give the weights as a list instead"
        )
    return (len(labels) / (num_classes * counts)).tolist()


def run_loss(train, data, log: Callable[[str], None] = print) -> LossFn:
    """The loss a run trains with: cross-entropy, or binary cross-entropy for a multi-label ``data``, with its
    ``train.label_smoothing``, ``train.class_weights`` (``"balanced"``: from the labels of ``data.train``; single-
    label only) and ``train.pos_weight`` (multi-label only); says which in ``log`` when it is not the plain loss."""
    from jaxtl.data import labels_of

    weights, num_classes, multilabel = train.class_weights, len(data.classes), data.multilabel
    pos_weight = getattr(train, "pos_weight", None)
    if weights == "balanced":
        if multilabel:
            raise ConfigError(
                "train.class_weights: balanced is for single-label tasks; a multi-label task balances each class's "
                "positives against its negatives with train.pos_weight: balanced"
            )
        weights = balanced_class_weights(labels_of(data.train), num_classes)
    if pos_weight is not None and not multilabel:
        raise ConfigError("train.pos_weight weighs the positives of a multi-label task; this task is single-label")
    if pos_weight == "balanced":
        pos_weight = balanced_pos_weight(labels_of(data.train), data.classes)
    for key, values in (("class_weights", weights), ("pos_weight", pos_weight)):
        if values is not None and len(values) != num_classes:
            raise ConfigError(
                f"train.{key} has {len(values)} weights; the data has {num_classes} classes "
                f"({', '.join(data.classes[:8])}{', ...' if num_classes > 8 else ''}): one per class, in this order"
            )
    name = "binary cross-entropy" if multilabel else "cross-entropy"
    if weights is not None or pos_weight is not None or train.label_smoothing:
        described = ", ".join(f"{name} {w:.4g}" for name, w in zip(data.classes, weights)) if weights else "none"
        positives = ", ".join(f"{c} {w:.4g}" for c, w in zip(data.classes, pos_weight)) if pos_weight else None
        log(f"loss: {name}, label smoothing {train.label_smoothing:g}, class weights: {described}"
            + (f", pos_weight: {positives}" if positives else ""))  # fmt: skip
    if multilabel:
        return BinaryCrossEntropy(train.label_smoothing, weights, pos_weight)
    return cross_entropy(train.label_smoothing, weights)
