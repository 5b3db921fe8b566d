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
    statistics, over the examples only, as torch does on a smaller last batch; padding rows are
    normalised with those statistics and take no other part. A loader pads its last batch to the
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
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # of the statistics (bf16 compute casts weight too)
    rows = math.prod(x.shape[1:-1])
    if mask is None:
        weights, count = None, x.shape[0] * rows  # a Python int: n / (n - 1) rounds once
    else:
        weights = mask.astype(dtype)
        count = jnp.sum(weights) * rows
    y, mean, var = _batch_norm(x, weight, bias, weights, jnp.asarray(count, dtype), eps)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), count


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
    y = (centered * (weight * rstd) + bias).astype(x.dtype)
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
