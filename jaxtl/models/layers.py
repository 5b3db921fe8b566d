"""Torch-faithful layers: Conv2d, BatchNorm2d, Linear, pooling and their torch initialisers.

Every layer stores its parameters under torch's attribute names (``weight``, ``bias``,
``running_mean``, ``running_var``) so that the dotted path of a parameter is the torchvision
state_dict key. Layout is NHWC for activations, HWIO for conv kernels and (in, out) for linear
weights; ``TORCH_LAYOUT`` on each layer says how a torch tensor is permuted into that layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], Array]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _numpy_generator(key: Array) -> np.random.Generator | None:
    """A numpy generator seeded by a concrete jax key; None while tracing (an abstract or jitted build).

    Eager ``jax.random`` draws compile one small XLA program per parameter shape: ~20 s of a
    ResNet-18 build on 2 CPU cores, all of it before any weights are loaded. numpy draws the same
    distributions without compiling; traced builds keep jax.random.
    """
    if isinstance(key, jax.core.Tracer):
        return None
    data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    return np.random.default_rng(data.astype(np.uint64).tolist())


# Set while a model is built for its shapes only (registry.abstract_model): the initializers then
# trace a zeros broadcast instead of a random draw, a third of an abstract build's time.
_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxtl_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within it, the initializers of this module return zeros: for builds whose values are discarded."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _normal(key: Array, shape: tuple[int, ...], dtype, std: float) -> Array:
    if _SHAPES_ONLY.get():
        return jnp.zeros(shape, dtype)
    rng = _numpy_generator(key)
    if rng is None:
        return std * jax.random.normal(key, shape, dtype)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float64) * std, dtype)


def _uniform(key: Array, shape: tuple[int, ...], dtype, bound: float) -> Array:
    if _SHAPES_ONLY.get():
        return jnp.zeros(shape, dtype)
    rng = _numpy_generator(key)
    if rng is None:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)


def kaiming_normal_fan_out(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch ``kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`` for an HWIO kernel.

    torch's fan_out of a conv weight (O, I/groups, kh, kw) is O * kh * kw, groups not divided out.
    """
    kh, kw, _, out_channels = shape
    std = math.sqrt(2.0) / math.sqrt(out_channels * kh * kw)
    return _normal(key, shape, dtype, std)


def torch_default_uniform(fan_in: int) -> Initializer:
    """torch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    The same bound is torch's default for the bias (nn.Linear.reset_parameters).
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return _uniform(key, shape, dtype, bound)

    return init


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input with explicit, symmetric padding (never 'SAME').

    Attributes:
        weight: kernel, shape (kh, kw, in_channels // groups, out_channels).
        bias: shape (out_channels,), or None.
    """

    TORCH_LAYOUT: ClassVar[dict[str, tuple[int, ...]]] = {"weight": (2, 3, 1, 0)}  # OIHW -> HWIO

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must divide by groups={groups}"
            )
        kh, kw = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        fan_in = in_channels // groups * kh * kw
        kernel_init = kernel_init or torch_default_uniform(fan_in)
        bias_init = bias_init or torch_default_uniform(fan_in)
        self.weight = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_channels // groups, out_channels), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H', W', C_out)."""
        kernel = self.weight[...].astype(x.dtype)
        if jax.default_backend() == "cpu":
            y = cpu_conv2d(x, kernel, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = xla_conv2d(x, kernel, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


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


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis, with torch's conventions.

    - momentum is torch's: running = (1 - momentum) * running + momentum * batch_statistic.
    - The batch is normalised with the biased variance, but running_var stores the unbiased one
      (n / (n - 1), n = N * H * W), as torch does (BatchNorm2d docs).
    - Mean and variance are computed in shifted, two-pass form, never as E[x^2] - E[x]^2.
    - Statistics are computed in float32 at least, whatever the activation dtype.
    - Inside :func:`batch_mask`, the statistics are those of the unmasked rows (padding excluded).

    ``use_running_average`` is the mode: ``model.eval()`` sets it True, ``model.train()`` False,
    on this layer or on any enclosing module (per-module BN mode).
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, use_running_average: bool = False
    ):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm2d momentum must be in [0, 1] (torch convention), got {momentum}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average
        ones, zeros = np.ones((num_features,), np.float32), np.zeros((num_features,), np.float32)
        self.weight = nnx.Param(jnp.asarray(ones))  # numpy first: no per-shape XLA compile
        self.bias = nnx.Param(jnp.asarray(zeros))
        self.running_mean = nnx.BatchStat(jnp.asarray(zeros))
        self.running_var = nnx.BatchStat(jnp.asarray(ones))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H, W, C); in train mode also updates running_mean / running_var."""
        if self.use_running_average:
            x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
            return ((x32 - self.running_mean[...]) * scale + self.bias[...]).astype(x.dtype)
        count = math.prod(x.shape[:-1])
        if count < 2:
            raise ValueError(
                f"BatchNorm2d in train mode needs more than 1 value per channel, got input shape {x.shape}; "
                "use a larger batch or put this module in eval mode (module.eval())"
            )
        y, batch_mean, var, count = batch_norm_train(x, self.weight[...], self.bias[...], _BATCH_MASK.get(), self.eps)
        m = self.momentum
        unbiased_var = var * (count / (count - 1))
        # set_value, not `[...] =`: the indexed form compares the shardings of old and new value,
        # which on a tracer builds a provenance message (half the trace time of an EfficientNet).
        self.running_mean.set_value((1.0 - m) * self.running_mean[...] + m * batch_mean)
        self.running_var.set_value((1.0 - m) * self.running_var[...] + m * unbiased_var)
        return y


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


class Linear(nnx.Module):
    """torch.nn.Linear with torch's default init.

    Attributes:
        weight: shape (in_features, out_features) (torch stores (out, in)).
        bias: shape (out_features,), or None.
    """

    TORCH_LAYOUT: ClassVar[dict[str, tuple[int, ...]]] = {"weight": (1, 0)}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        weight_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        weight_init = weight_init or torch_default_uniform(in_features)
        bias_init = bias_init or torch_default_uniform(in_features)
        self.weight = nnx.Param(weight_init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        """(..., in_features) -> (..., out_features)."""
        y = x @ self.weight[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Sequential(nnx.List):
    """torch.nn.Sequential: children are addressed by index, so paths read ``layer1.0.conv1.weight``."""

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x


Pair = tuple[int, int]


def xla_conv2d(x: Array, kernel: Array, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> Array:
    """torch's Conv2d (symmetric zero padding) as one ``lax.conv_general_dilated``: (N, H, W, C) x HWIO."""
    (ph, pw) = padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=stride,
        padding=((ph, ph), (pw, pw)),
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def taps_conv2d(x: Array, kernel: Array, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> Array:
    """The same conv as a sum over kernel taps of (strided slice of x) @ (the tap's kernel), per group.

    Each tap is a plain (grouped) matrix product, so the gradients are matrix products and slices too.
    """
    kh, kw, cg, out = kernel.shape
    n, height, width, _ = x.shape
    out_h = _out_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = _out_size(width, kw, stride[1], padding[1], dilation[1])
    og = out // groups
    # (kh * kw, G, Cg, Og): group g maps input channels [g*Cg, (g+1)*Cg) to outputs [g*Og, (g+1)*Og).
    weights = kernel.reshape(kh * kw, cg, groups, og).transpose(0, 2, 1, 3)
    y = None
    for index, tap in enumerate(_tap_slices(_pad_spatial(x, padding), (kh, kw), stride, dilation, (out_h, out_w))):
        if groups == 1:
            term = jnp.einsum("nhwc,co->nhwo", tap, weights[index, 0])
        else:
            tap = tap.reshape(n, out_h, out_w, groups, cg)
            term = jnp.einsum("nhwgc,gco->nhwgo", tap, weights[index]).reshape(n, out_h, out_w, out)
        y = term if y is None else y + term
    return y


def cpu_conv2d(x: Array, kernel: Array, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> Array:
    """The conv as XLA:CPU runs it fastest; the same function as :func:`xla_conv2d` (tested to float64 rounding).

    Measured on 2 cores (jax 0.10), batch 32 unless noted:

    - Depthwise (groups = channels): strided taps (:func:`depthwise_conv2d`); XLA:CPU's grouped-conv
      kernel gradient is a dense conv with C^2 scratch (41 GB for EfficientNet-B7 at 57x71).
    - Forward: one XLA conv, except 1x1 kernels (1.7x faster as a matrix product) and outputs of at
      most 2x2 pixels, which run as tap matrix products (3x3, 512 channels on a 2x2 map: 455 ms as an
      XLA:CPU conv, 10 ms as taps).
    - Backward: the taps' gradients (matrix products and slices) for those convs and for strided
      ones, where a group has 16 or more input channels: XLA:CPU's gradients are 4-11x slower there
      (3x3 stride 2, 256 -> 512 on 4x4: 141 ms against 13 ms). Stride-1 3x3 convs on larger maps keep
      XLA's gradients, 1.5-2x slower to run (128 channels at 28x28: 1216 against 549 ms) but much
      cheaper to compile; so does the stem (3 input channels, 7x7), where XLA's is 6x faster.
    - Grouped convs (ResNeXt's 32 or 64 groups): XLA's forward (about 2x faster than taps at batch
      32), the taps' gradients always: XLA:CPU's grouped-conv gradients are 15-90x slower (3x3,
      128 channels in 32 groups at 56x56, batch 32: forward and backward 61.7 s against 2.2 s).
    """
    kh, kw, cg, out = kernel.shape
    if groups == x.shape[-1] == out and cg == 1:
        return depthwise_conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)
    out_hw = _out_size(x.shape[1], kh, stride[0], padding[0], dilation[0]) * _out_size(
        x.shape[2], kw, stride[1], padding[1], dilation[1]
    )
    taps_forward = (kh, kw) == (1, 1) or out_hw <= 4
    if taps_forward:
        return taps_conv2d(x, kernel, stride, padding, dilation, groups)  # differentiated as taps too
    # Tap gradients where XLA's are slowest; a stride-1 3x3 conv on a larger map keeps XLA's
    # (1.5-2x slower to run, but 9 slices and 18 products more to compile per conv).
    if groups > 1 or (cg >= 16 and stride != (1, 1)):
        return _conv_with_taps_gradient(x, kernel, stride, padding, dilation, groups)
    return xla_conv2d(x, kernel, stride, padding, dilation, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_with_taps_gradient(x, kernel, stride, padding, dilation, groups):
    """XLA's conv forward, the taps' gradients backward."""
    return xla_conv2d(x, kernel, stride, padding, dilation, groups)


def _conv_with_taps_gradient_fwd(x, kernel, stride, padding, dilation, groups):
    return xla_conv2d(x, kernel, stride, padding, dilation, groups), (x, kernel)


def _conv_with_taps_gradient_bwd(stride, padding, dilation, groups, residuals, dy):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: taps_conv2d(x, k, stride, padding, dilation, groups), x, kernel)
    return vjp(dy)


_conv_with_taps_gradient.defvjp(_conv_with_taps_gradient_fwd, _conv_with_taps_gradient_bwd)


def depthwise_conv2d(
    x: Array, kernel: Array, *, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> Array:
    """A depthwise conv (groups = channels) as a sum over kernel taps of strided slices.

    Computes what ``conv_general_dilated(..., feature_group_count=C)`` computes. XLA:CPU lowers
    the kernel gradient of a grouped conv to a dense one whose scratch memory grows with C^2
    (41 GB for EfficientNet-B7 at 57x71); here every op is elementwise or a reduction.

    The gradient is written out rather than left to autodiff, which keeps every tap's slice as a
    residual and transposes each tap on its own (a pad, an add and a reduction per tap: 75 ops to
    compile for a 5x5 kernel). Here the input gradient is the same taps sum over the cotangent,
    dilated by the stride, with the flipped kernel (one fused loop), and the kernel gradient one
    reduction per tap: half the ops to compile, and only x kept for the backward pass.

    Args:
        x: (N, H, W, C).
        kernel: (kh, kw, 1, C).
        stride, padding, dilation: per spatial axis; padding is symmetric.

    Returns:
        (N, H', W', C).
    """
    return _depthwise(x, kernel, tuple(stride), tuple(padding), tuple(dilation))


def _tap_slices(x: Array, kernel_hw: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> list[Array]:
    """The ``out_hw`` strided slices of (already padded) x that meet each kernel tap, in kernel order."""
    (kh, kw), (sh, sw), (dh, dw), (out_h, out_w) = kernel_hw, stride, dilation, out_hw
    n, channels = x.shape[0], x.shape[3]
    return [
        jax.lax.slice(
            x,
            (0, i * dh, j * dw, 0),
            (n, i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, channels),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _depthwise_valid(x: Array, kernel: Array, stride: Pair, dilation: Pair) -> Array:
    """Depthwise cross-correlation of an already padded x: sum over taps of slice * weight."""
    kh, kw, _, channels = kernel.shape
    out_hw = (
        _out_size(x.shape[1], kh, stride[0], 0, dilation[0]),
        _out_size(x.shape[2], kw, stride[1], 0, dilation[1]),
    )
    # lax ops, not jnp indexing and operators: those trace a small jit each, k*k times per conv.
    weights = kernel.reshape(kh * kw, channels)
    out = None
    for index, tap in enumerate(_tap_slices(x, (kh, kw), stride, dilation, out_hw)):
        weight = jax.lax.index_in_dim(weights, index, keepdims=False)
        tap = jax.lax.mul(tap, jax.lax.broadcast_in_dim(weight, tap.shape, (3,)))
        out = tap if out is None else jax.lax.add(out, tap)
    return out


def _pad_spatial(x: Array, padding: Pair) -> Array:
    (ph, pw) = padding
    return jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph, ph, 0), (pw, pw, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, stride, padding, dilation):
    return _depthwise_valid(_pad_spatial(x, padding), kernel, stride, dilation)


def _depthwise_fwd(x, kernel, stride, padding, dilation):
    return _depthwise(x, kernel, stride, padding, dilation), (x, kernel)


def _depthwise_bwd(stride, padding, dilation, residuals, dy):
    x, kernel = residuals
    kh, kw, _, channels = kernel.shape
    # Kernel gradient: each tap's slice times dy, summed over N, H', W' (at least in float32, as
    # the forward statistics are). One reduction per tap: a reduction over the stacked taps runs
    # 3x slower on XLA:CPU (it takes its fast reduction kernel only for a plain product).
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dy_acc = dy.astype(acc)
    taps = _tap_slices(_pad_spatial(x, padding), (kh, kw), stride, dilation, dy.shape[1:3])
    dkernel = jnp.stack([jnp.sum(tap.astype(acc) * dy_acc, axis=(0, 1, 2)) for tap in taps])
    dkernel = dkernel.reshape(kh, kw, 1, channels)
    # Input gradient: the transpose of "pad, then strided slices" is a stride-1 correlation of dy,
    # dilated by the stride and padded to reach every input pixel, with the flipped kernel.
    pads = [(0, 0, 0)]
    for axis, k in ((1, kh), (2, kw)):
        s, p, d = stride[axis - 1], padding[axis - 1], dilation[axis - 1]
        covered = (dy.shape[axis] - 1) * s + 1  # padded input rows the slices start from, dilated dy's length
        pads.append((d * (k - 1) - p, x.shape[axis] + p - covered, s - 1))
    dy_dilated = jax.lax.pad(dy, jnp.zeros((), dy.dtype), (*pads, (0, 0, 0)))
    dx = _depthwise_valid(dy_dilated, jax.lax.rev(kernel, (0, 1)), (1, 1), dilation)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def zeros_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch ``nn.init.zeros_``."""
    return jnp.zeros(shape, dtype) if isinstance(key, jax.core.Tracer) else jnp.asarray(np.zeros(shape), dtype)


def uniform_init(bound: float) -> Initializer:
    """torch ``nn.init.uniform_(w, -bound, bound)``."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return _uniform(key, shape, dtype, bound)

    return init


class Activation(nnx.Module):
    """A parameter-free activation that holds a place in a Sequential, as torch's nn.SiLU / nn.ReLU do."""

    def __init__(self, function: Callable[[Array], Array]):
        self.function = function

    def __call__(self, x: Array) -> Array:
        return self.function(x)


class StochasticDepth(nnx.Dropout):
    """torchvision.ops.StochasticDepth in "row" mode: drops a whole sample's residual branch.

    In train mode each sample is kept with probability 1 - p and then scaled by 1 / (1 - p); in
    eval mode (``deterministic=True``) the input passes unchanged. The mask comes from the
    ``dropout`` RNG stream the module was built with, or from ``rngs`` passed at call time.
    """

    def __init__(self, p: float, *, rngs: nnx.Rngs):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
        super().__init__(p, broadcast_dims=(1, 2, 3), rngs=rngs)  # one Bernoulli per sample (NHWC)

    @property
    def p(self) -> float:
        return self.rate


def max_pool2d(x: Array, *, kernel_size: int, stride: int, padding: int) -> Array:
    """torch.nn.functional.max_pool2d on NHWC: padding counts as -inf, never as zeros."""
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # a concrete value, so JAX picks the differentiable max reducer
        jax.lax.max,
        window_dimensions=(1, kernel_size, kernel_size, 1),
        window_strides=(1, stride, stride, 1),
        padding=((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


def global_avg_pool(x: Array) -> Array:
    """AdaptiveAvgPool2d(1) + flatten: the mean over H and W. (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
