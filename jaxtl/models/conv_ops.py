"""The convolutions behind Conv2d: one XLA conv, sums over kernel taps, depthwise taps, and XLA:CPU's pick of them.

All take NHWC input and an HWIO kernel, with torch's symmetric zero padding, and compute the same
function; they differ in what XLA compiles and how fast it runs, forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
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
