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


def cross_entropy(label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None) -> LossFn:
    """``loss(logits, labels, mask)``: torch's weighted, label-smoothed cross-entropy over the rows where
    ``mask`` is True (see the module's docstring); 0 for a batch without such rows."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} is not in [0, 1]")
    weights = None if class_weights is None else np.asarray(class_weights, np.float64)

    def loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 logits: the loss in float32
        log_p = jax.nn.log_softmax(logits, axis=-1)
        rows = mask.astype(log_p.dtype)
        w = jnp.ones(log_p.shape[-1], log_p.dtype) if weights is None else jnp.asarray(weights, log_p.dtype)
        w_true = w[labels] * rows
        nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
        denominator = jnp.maximum(jnp.sum(w_true), jnp.finfo(log_p.dtype).tiny)
        total = (1.0 - label_smoothing) * jnp.sum(w_true * nll) / denominator
        if label_smoothing:
            smooth = -jnp.sum(log_p * w, axis=-1) * rows
            total = total + label_smoothing / log_p.shape[-1] * jnp.sum(smooth) / denominator
        return total

    return loss


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
