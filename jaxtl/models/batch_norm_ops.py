"""Train-mode batch normalisation: the batch-mask context, and the op with torch's closed-form gradient."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

Array = jax.Array


_BATCH_MASK: contextvars.ContextVar[Array | None] = contextvars.ContextVar("jaxtl_batch_mask", default=None)


@contextlib.contextmanager
def batch_mask(mask: Array | None) -> Iterator[None]:
    """Marks which rows of the batch are examples (True) and which are padding (False) while tracing a forward pass.

    BatchNorm layers in train mode then compute the batch mean and variance, and update the running
    statistics, over the examples only, as torch does on a smaller last batch; padding rows come out
    as zeros (normalised with statistics that are not theirs, over a few layers they would overflow)
    and take no other part. A loader pads its last batch to the
    fixed shape a jitted step needs; ``make_train_step`` wraps the forward pass in this context.

    Example::

        with batch_mask(mask):   # mask: (N,) bool
            logits = model(x)
    """
    token = _BATCH_MASK.set(mask)
    try:
        yield
    finally:
        _BATCH_MASK.reset(token)


def current_batch_mask() -> Array | None:
    """The (N,) mask of the innermost :func:`batch_mask` context, or None outside one."""
    return _BATCH_MASK.get()


_GROUPS: contextvars.ContextVar[int] = contextvars.ContextVar("jaxtl_batch_norm_groups", default=1)


@contextlib.contextmanager
def batch_norm_groups(groups: int) -> Iterator[None]:
    """BatchNorm in train mode takes the statistics of each of ``groups`` equal, consecutive blocks of rows.

    With the batch sharded over ``groups`` devices (a block per device) these are the statistics per
    device that PyTorch's DistributedDataParallel computes without SyncBatchNorm: each replica
    normalises its rows with its own statistics, the running statistics follow the first replica's (DDP
    broadcasts rank 0's buffers before each forward pass), and the averaged gradient is the gradient of
    the batch's mean loss. ``groups=1`` (the default): statistics over the whole batch, SyncBatchNorm's.
    """
    if groups < 1:
        raise ValueError(f"batch_norm_groups({groups}): groups must be >= 1")
    token = _GROUPS.set(groups)
    try:
        yield
    finally:
        _GROUPS.reset(token)


def current_batch_norm_groups() -> int:
    return _GROUPS.get()


def batch_norm_train(
    x: Array, weight: Array, bias: Array, mask: Array | None, eps: float
) -> tuple[Array, Array, Array, Array]:
    """Train-mode batch normalisation over all axes but the last: (y, batch mean, biased variance, count).

    The statistics are those of the rows where ``mask`` (N,) is True (all rows if None), computed in
    float32 at least and in shifted two-pass form; they are returned outside the gradient, for the
    running statistics. The gradient is torch's closed form (``native_batch_norm_backward``)::

        dx = weight * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),   xhat = (x - mean) * rstd

    over the same rows (padding rows get none). The backward pass keeps x in its own dtype (the
    buffer the layer before wrote anyway) and per-channel vectors, and reads the activations twice;
    differentiating the forward pass instead would store a float32 copy of x - mean and read the
    activations three times (the mean's gradient is a further reduction).
    """
    if mask is not None and mask.shape != x.shape[:1]:
        raise ValueError(f"batch_mask of shape {mask.shape} does not match the batch of input shape {x.shape}")
    groups = current_batch_norm_groups()
    if groups > 1:
        return _grouped(x, weight, bias, mask, eps, groups)
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # of the statistics (bf16 compute casts weight too)
    rows = math.prod(x.shape[1:-1])
    if mask is None:
        weights, count = None, x.shape[0] * rows  # a Python int: n / (n - 1) rounds once
    else:
        weights = mask.astype(dtype)
        count = jnp.sum(weights) * rows
    # A batch without real rows (an all-padding micro-batch) divides by 1, not 0: its statistics are then 0
    # and finite, its rows come out as zeros, its gradient is 0 and the running statistics keep their values.
    divisor = count if mask is None else jnp.maximum(count, 1.0)
    y, mean, var = _batch_norm(x, weight, bias, weights, jnp.asarray(divisor, dtype), eps)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), count


def _grouped(x, weight, bias, mask, eps, groups):
    """:func:`batch_norm_train` per block of rows (:func:`batch_norm_groups`); the first block's statistics."""
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows does not split into {groups} BatchNorm groups")
    blocks = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])

    def block_norm(block, rows):
        y, mean, var, count = batch_norm_train(block, weight, bias, rows, eps)
        return y, mean, var, jnp.asarray(count, jnp.float32)

    with batch_norm_groups(1):
        if mask is None:
            y, mean, var, _ = jax.vmap(lambda block: block_norm(block, None))(blocks)
            count = math.prod(blocks.shape[1:-1])  # a Python int, as batch_norm_train's without a mask
        else:
            y, mean, var, counts = jax.vmap(block_norm)(blocks, mask.reshape(groups, -1))
            count = counts[0]
    return y.reshape(x.shape), mean[0], var[0], count


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm(x, weight, bias, weights, count, eps):
    return _batch_norm_fwd(x, weight, bias, weights, count, eps)[0]


def _row_weights(weights: Array, ndim: int) -> Array:
    return weights.reshape((-1,) + (1,) * (ndim - 1))


def _batch_norm_fwd(x, weight, bias, weights, count, eps):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    # Statistics of x - (one sample per channel): where |mean| >> std (post-ReLU inputs) the
    # float32 sums stay small and exact enough; torch accumulates them in float64 on CPU.
    # Row 0 is an example: loaders pad at the end.
    shift = x32[(0,) * (x.ndim - 1)]
    shifted = x32 - shift
    if weights is None:
        shifted_mean = jnp.mean(shifted, axis=axes)
        centered = shifted - shifted_mean
        var = jnp.mean(jnp.square(centered), axis=axes)
    else:
        w = _row_weights(weights, x.ndim)
        shifted_mean = jnp.sum(shifted * w, axis=axes) / count
        centered = shifted - shifted_mean
        var = jnp.sum(jnp.square(centered) * w, axis=axes) / count
    rstd = jax.lax.rsqrt(var + eps)
    y = centered * (weight * rstd) + bias
    if weights is not None:  # padding rows out as zeros: normalised with a batch's statistics that are not
        y = jnp.where(_row_weights(weights, x.ndim) > 0, y, 0.0)  # theirs, layer after layer, they overflow
    y = y.astype(x.dtype)
    return (y, shift + shifted_mean, var), (x, shift, shifted_mean, rstd, weight, weights, count)


def _batch_norm_bwd(eps, residuals, cotangents):
    x, shift, shifted_mean, rstd, weight, weights, count = residuals
    dy = cotangents[0].astype(shift.dtype)
    axes = tuple(range(x.ndim - 1))
    xhat = ((x.astype(shift.dtype) - shift) - shifted_mean) * rstd
    if weights is not None:
        dy = dy * _row_weights(weights, x.ndim)
    dbias = jnp.sum(dy, axis=axes)
    dweight = jnp.sum(dy * xhat, axis=axes)
    dx = (weight * rstd) * (dy - dbias / count - xhat * (dweight / count))
    if weights is not None:
        dx = dx * _row_weights(weights, x.ndim)
    return dx.astype(x.dtype), dweight.astype(weight.dtype), dbias.astype(weight.dtype), None, None


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
