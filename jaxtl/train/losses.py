"""The training loss: cross-entropy with torch's label smoothing and class weights, over the unmasked rows.

``cross_entropy(label_smoothing, class_weights)`` computes what ``torch.nn.CrossEntropyLoss(weight=w,
label_smoothing=eps)`` computes with its default mean reduction on the batch's real rows (padding and
skipped files are masked out, as torch's ``ignore_index`` rows are):

    (1 - eps) * sum_i w[y_i] * -log p_i[y_i] / sum_i w[y_i]
        + eps / C * sum_i sum_c w[c] * -log p_i[c] / sum_i w[y_i]

(without weights, w = 1: the mean over the rows). ``balanced_class_weights`` is scikit-learn's
``compute_class_weight("balanced")``: ``n_samples / (n_classes * count[c])``.
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
    """The loss a run trains with: its ``train.label_smoothing`` and ``train.class_weights`` (``"balanced"``:
    from the labels of ``data.train``); says which in ``log`` when it is not plain cross-entropy."""
    weights, num_classes = train.class_weights, len(data.classes)
    if weights == "balanced":
        from jaxtl.data import labels_of

        weights = balanced_class_weights(labels_of(data.train), num_classes)
    elif weights is not None and len(weights) != num_classes:
        raise ConfigError(
            f"train.class_weights has {len(weights)} weights; the data has {num_classes} classes "
            f"({', '.join(data.classes[:8])}{', ...' if num_classes > 8 else ''}): give one per class, in this order"
        )
    if weights is not None or train.label_smoothing:
        described = ", ".join(f"{name} {w:.4g}" for name, w in zip(data.classes, weights)) if weights else "none"
        log(f"loss: cross-entropy, label smoothing {train.label_smoothing:g}, class weights: {described}")
    return cross_entropy(train.label_smoothing, weights)
