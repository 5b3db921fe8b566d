"""Color operations on one uint8 (H, W, 3) image, computing what torchvision.transforms.v2.functional computes.

Every function takes one uint8 image of shape (H, W, 3), channels last, and its parameters as scalars
(Python numbers or jax scalars), and returns uint8 (H, W, 3). None branches on parameter values in
Python, so each can be vmapped over a batch with per-sample parameters, jit-compiled, and used as a
branch of ``lax.switch``. Factors are taken as float32: torchvision given the same float32 value
computes the same thing. The blends (saturation, contrast, sharpness) also take ``alpha``, the second
image's weight, for factors that are float64 sums such as torchvision's auto-augment ``1.0 + magnitude``.

torchvision's float32 arithmetic is copied step by step, including where PyTorch's CPU kernels fuse a
multiply and an add into one rounding (``Tensor.add_(other, alpha=...)`` is ``fma(other, alpha, self)``
in ``aten/src/ATen/native/ufunc/add.h``). XLA has no fused multiply-add operation, so those are computed
as exact products (a factor split into two 12-bit halves times an integer pixel is exact in float32)
summed with one correct rounding (:func:`_round_sum3`). The other way round, XLA:CPU contracts a multiply
feeding an add into one fused multiply-add where torchvision rounds twice, and rewrites a division by a
broadcast into a multiplication by the reciprocal: products that feed an add are assembled from exact
partial products (:func:`_multiply`, or :func:`_multiply_integer` where one factor is a pixel value), and
divisors are never broadcasts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtl.data.augment.exact import computed_once, split, two_sum

# torchvision.transforms.v2.functional._color._rgb_to_grayscale_image: ITU-R 601-2 luma, as float32 scalars.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _round_to_odd_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b rounded to odd: the nearest float32 with an odd significand unless the sum is exact."""
    s, e = two_sum(a, b)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    inexact_even = (e != 0) & ((bits & 1) == 0)
    # One ulp toward the exact sum: away from zero when the error has the sum's sign.
    step = jnp.where((e > 0) == (s > 0), 1, -1).astype(jnp.int32)
    return lax.bitcast_convert_type(jnp.where(inexact_even, bits + step, bits), jnp.float32)


def _round_sum3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """a + b + c with a single rounding to nearest-even (Boldo and Melquiond, "Emulation of FMA and
    correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008, algorithm 5.3)."""
    uh, ul = two_sum(b, c)
    th, tl = two_sum(a, uh)
    return th + _round_to_odd_sum(tl, ul)


def _fma_integer(x: jax.Array, alpha: jax.Array, c: jax.Array) -> jax.Array:
    """fma(x, alpha, c) in float32, for x holding integers of magnitude below 2**12."""
    hi, lo = split(alpha)
    return _round_sum3(c, x * hi, x * lo)


def _multiply(a: jax.Array, b: jax.Array) -> jax.Array:
    """fl(a * b), correctly rounded, from exact partial products only.

    XLA's CPU and GPU backends let LLVM contract a multiply feeding an add into one fused multiply-add,
    which torchvision's separately rounded ``mul`` then ``add`` never is. A contraction of an exact product
    changes nothing, so the rounded product is assembled from the four exact products of the 12-bit halves:
    the sum of the three small ones is kept to within 2**-60 of the product, far below the 2**-48 spacing
    of the exact 48-bit products, and :func:`_round_sum3` rounds the rest once."""
    ah, al = split(a)
    bh, bl = split(b)
    u, u_error = two_sum(ah * bl, al * bh)
    w, w_error = two_sum(u, al * bl)
    return _round_sum3(ah * bh, w, u_error + w_error)


def _multiply_integer(x: jax.Array, b: jax.Array) -> jax.Array:
    """fl(x * b), correctly rounded, for x holding integers of magnitude below 2**12 (pixel values).

    With ``b == hi + lo`` split into 12-bit halves, both ``x * hi`` and ``x * lo`` are exact, so their sum,
    rounded once, is the rounded product. A contraction of either product with the add into one fused
    multiply-add rounds the same exact sum once, so no fusion XLA applies changes it, and the sum is an add,
    never contracted with what it feeds. Three operations where :func:`_multiply` takes some forty."""
    hi, lo = split(b)
    return x * hi + x * lo


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dekker's TwoProduct: p = fl(a * b) and the error e, with p + e == a * b exactly."""
    ah, al = split(a)
    bh, bl = split(b)
    p = _multiply(a, b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _to_float(image: jax.Array) -> jax.Array:
    return image.astype(jnp.float32)


def _to_uint8(x: jax.Array) -> jax.Array:
    """Clamp to [0, 255] and truncate, as ``Tensor.clamp_(0, 255).to(torch.uint8)`` does."""
    return jnp.clip(x, 0.0, 255.0).astype(jnp.uint8)


def _factor(value) -> jax.Array:
    return jnp.asarray(value, dtype=jnp.float32)


def _grayscale_float(image: jax.Array) -> jax.Array:
    """(H, W) float32 luma: torchvision's ``r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)``,
    the two ``add_`` fused multiply-adds."""
    x = _to_float(image)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    luma = _multiply_integer(r, jnp.float32(GRAY_WEIGHTS[0]))
    luma = _fma_integer(g, jnp.float32(GRAY_WEIGHTS[1]), luma)
    return _fma_integer(b, jnp.float32(GRAY_WEIGHTS[2]), luma)


def rgb_to_grayscale(image: jax.Array) -> jax.Array:
    """torchvision's ``rgb_to_grayscale(image, num_output_channels=3)``.

    Args:
        image: uint8 (H, W, 3).

    Returns:
        uint8 (H, W, 3), the luma truncated (a gray pixel v becomes v - 1: the weights sum to 0.9999)
        and repeated over the channels. Exact.
    """
    luma = _grayscale_float(image).astype(jnp.uint8)
    return jnp.broadcast_to(luma[..., None], image.shape)


def _second_weight(factor, alpha) -> jax.Array:
    """The weight of the second image in a blend: ``alpha`` as float32 where given, else ``1 - factor``
    rounded to float32 (torchvision's ``1.0 - factor`` in float64, rounded to float32 by ``add_``, is the
    same number for a float32 factor)."""
    return jnp.float32(1.0) - _factor(factor) if alpha is None else _factor(alpha)


def _blend(image: jax.Array, other: jax.Array, ratio: jax.Array, alpha: jax.Array, other_is_integer: bool) -> jax.Array:
    """torchvision.transforms.v2.functional._color._blend on uint8: ``image.mul(ratio).add_(other, alpha=1 - ratio)``,
    clamped to [0, 255] and truncated; ``alpha`` is the ``1 - ratio`` torchvision computes."""
    scaled = _multiply_integer(_to_float(image), ratio)
    if other_is_integer:
        blended = _fma_integer(other, alpha, scaled)
    else:
        p, e = _two_product(other, alpha)
        blended = _round_sum3(scaled, p, e)
    return _to_uint8(blended)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    """torchvision's ``adjust_brightness``: ``image * factor`` in float32, clamped and truncated.

    Args:
        image: uint8 (H, W, 3).
        factor: float32 scalar >= 0; 1 is the identity, 0 gives black.

    Returns:
        uint8 (H, W, 3). Exact.
    """
    return _to_uint8(_to_float(image) * _factor(factor))


def adjust_saturation(image: jax.Array, factor, alpha=None) -> jax.Array:
    """torchvision's ``adjust_saturation``: a blend with the floored luma.

    Args:
        image: uint8 (H, W, 3).
        factor: float32 scalar >= 0; 1 is the identity, 0 gives the floored luma.
        alpha: optional float32 scalar, the weight of the floored luma: torchvision's ``1.0 - factor``, which it
            computes in float64 from its Python float factor before rounding to float32. None (the default)
            takes ``1 - factor`` rounded to float32, torchvision's value for any float32 factor. A caller whose
            factor is ``1.0 + m`` in float64 for a float32 m (torchvision's auto-augment ops) passes
            ``alpha=-m``: ``1.0 - (1.0 + m)`` is exactly -m in float64 where ``1 - float32(1 + m)`` is not.

    Returns:
        uint8 (H, W, 3). Exact.
    """
    gray = jnp.floor(_grayscale_float(image))[..., None]
    return _blend(image, gray, _factor(factor), _second_weight(factor, alpha), other_is_integer=True)


def adjust_contrast(image: jax.Array, factor, alpha=None) -> jax.Array:
    """torchvision's ``adjust_contrast``: a blend with the mean of the floored luma.

    The floored luma is summed exactly in int32 and divided by H * W in float32, as ``torch.mean`` does;
    ``torch.mean``'s float32 sum is exact too while it stays below 2**24, i.e. for H * W <= 65793.

    Args:
        image: uint8 (H, W, 3).
        factor: float32 scalar >= 0; 1 is the identity, 0 gives the mean gray.
        alpha: optional float32 scalar, the weight of the mean gray: torchvision's ``1.0 - factor``, which it
            computes in float64 from its Python float factor before rounding to float32. None (the default)
            takes ``1 - factor`` rounded to float32, torchvision's value for any float32 factor. A caller whose
            factor is ``1.0 + m`` in float64 for a float32 m (torchvision's auto-augment ops) passes
            ``alpha=-m``: ``1.0 - (1.0 + m)`` is exactly -m in float64 where ``1 - float32(1 + m)`` is not.

    Returns:
        uint8 (H, W, 3). Exact for H * W <= 65793.
    """
    gray = jnp.floor(_grayscale_float(image)).astype(jnp.int32)
    mean = jnp.sum(gray).astype(jnp.float32) / jnp.float32(gray.size)
    return _blend(image, mean, _factor(factor), _second_weight(factor, alpha), other_is_integer=False)


def adjust_sharpness(image: jax.Array, factor, alpha=None) -> jax.Array:
    """torchvision's ``adjust_sharpness``: a blend with the image smoothed by the 3x3 kernel
    [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, the one-pixel border kept as it is.

    torchvision rounds the float32 convolution to integers; its exact value is an integer over 13, never
    within float32 error of a half, so the rounded value is computed exactly in integers here.

    Args:
        image: uint8 (H, W, 3).
        factor: float32 scalar >= 0; 1 is the identity, 0 gives the smoothed image. Only ``alpha`` (by
            default ``1 - factor``) enters the result.
        alpha: optional float32 scalar, the weight of the smoothed image: torchvision's ``1.0 - factor``, which it
            computes in float64 from its Python float factor before rounding to float32. None (the default)
            takes ``1 - factor`` rounded to float32, torchvision's value for any float32 factor. A caller whose
            factor is ``1.0 + m`` in float64 for a float32 m (torchvision's auto-augment ops) passes
            ``alpha=-m``: ``1.0 - (1.0 + m)`` is exactly -m in float64 where ``1 - float32(1 + m)`` is not.

    Returns:
        uint8 (H, W, 3); images with H <= 2 or W <= 2 unchanged, as in torchvision. Exact.
    """
    height, width, _ = image.shape
    if height <= 2 or width <= 2:
        return image
    x = image.astype(jnp.int32)
    window = sum(x[dy : height - 2 + dy, dx : width - 2 + dx] for dy in range(3) for dx in range(3))
    weighted = window + 4 * x[1:-1, 1:-1]
    blurred = (weighted + 6) // 13  # round(weighted / 13): no ties, 13 is odd
    view = x[1:-1, 1:-1]
    # torchvision: view.add_(blurred.sub_(view), alpha=1 - factor), a fused multiply-add.
    alpha = _second_weight(factor, alpha)
    inner = _to_uint8(_fma_integer((blurred - view).astype(jnp.float32), alpha, view.astype(jnp.float32)))
    return jnp.asarray(image).at[1:-1, 1:-1].set(inner)


def _rgb_to_hsv(x: jax.Array) -> jax.Array:
    """torchvision.transforms.v2.functional._color._rgb_to_hsv on float32 (H, W, 3) in [0, 1]."""
    r, g = x[..., 0], x[..., 1]
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = jnp.ones_like(maxc)
    s = channels_range / jnp.where(eqc, ones, maxc)
    divisor = jnp.where(eqc, ones, channels_range)
    # Channel by channel: XLA rewrites a division by a broadcast into a multiplication by its reciprocal,
    # which rounds differently from torchvision's division.
    rc, gc, bc = ((maxc - x[..., c]) / divisor for c in range(3))
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = ((rc + 2.0) - bc) * (maxc_eq_g & maxc_neq_r)
    hr = (bc - gc) * ~maxc_neq_r
    hb = ((gc + 4.0) - rc) * (maxc_neq_r & ~maxc_eq_g)
    h = (hr + hg) + hb
    h = lax.rem(_multiply(h, jnp.float32(1.0 / 6.0)) + 1.0, jnp.float32(1.0))
    return jnp.stack((h, s, maxc), axis=-1)


# torchvision.transforms.v2.functional._color._hsv_to_rgb: which of (v, p, q, t) each channel takes, by sector.
# numpy, not jnp: a jax array built at import would start the XLA backend before jax.distributed.initialize.
_HSV_SELECT = np.array([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=np.int32)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """torchvision.transforms.v2.functional._color._hsv_to_rgb on float32 (H, W, 3)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = _multiply(h, jnp.float32(6.0))
    i = jnp.floor(h6)
    f = h6 - i
    sector = jnp.remainder(i.astype(jnp.int32), 6)
    sxf = _multiply(s, f)
    one_minus_s = 1.0 - s
    q = jnp.clip((1.0 - sxf) * v, 0.0, 1.0)
    t = jnp.clip((sxf + one_minus_s) * v, 0.0, 1.0)
    p = jnp.clip(one_minus_s * v, 0.0, 1.0)
    vpqt = jnp.stack((v, p, q, t), axis=-1)
    select = jnp.moveaxis(jnp.asarray(_HSV_SELECT)[:, sector], 0, -1)
    return jnp.take_along_axis(vpqt, select, axis=-1)


def adjust_hue(image: jax.Array, hue_factor) -> jax.Array:
    """torchvision's ``adjust_hue``: to float32 in [0, 1], to HSV, hue shifted modulo 1, back to RGB, to uint8.

    Args:
        image: uint8 (H, W, 3).
        hue_factor: float32 scalar in [-0.5, 0.5]. 0 is not the identity: the float32 round trip and the
            truncating conversion back to uint8 (``x * 255.999``) move some pixels, as in torchvision.

    Returns:
        uint8 (H, W, 3). Exact: every step is an elementwise IEEE operation in torchvision's order.
    """
    # torchvision's to_dtype_image: uint8 -> float32 multiplies by 1 / 255, float32 -> uint8 by 255.999, truncating.
    x = _multiply_integer(_to_float(image), jnp.float32(1.0 / 255.0))
    hsv = _rgb_to_hsv(x)
    h = jnp.remainder(hsv[..., 0] + _factor(hue_factor), jnp.float32(1.0))
    rgb = _hsv_to_rgb(hsv.at[..., 0].set(h))
    return (rgb * jnp.float32(255.0 + 1.0 - 1e-3)).astype(jnp.uint8)


def posterize(image: jax.Array, bits) -> jax.Array:
    """torchvision's ``posterize``: keeps the ``bits`` most significant bits of each value.

    Args:
        image: uint8 (H, W, 3).
        bits: integer scalar in [0, 8]; 8 is the identity, 0 gives black.

    Returns:
        uint8 (H, W, 3). Exact.
    """
    bits = jnp.asarray(bits, dtype=jnp.int32)
    mask = ((1 << bits) - 1) << (8 - bits)
    return image & mask.astype(jnp.uint8)


def invert(image: jax.Array) -> jax.Array:
    """torchvision's ``invert``: 255 - x (bitwise not).

    Args:
        image: uint8 (H, W, 3).

    Returns:
        uint8 (H, W, 3). Exact.
    """
    return ~image


def solarize(image: jax.Array, threshold) -> jax.Array:
    """torchvision's ``solarize``: inverts the values >= ``threshold`` (compared in float32, as torch
    promotes a uint8 tensor against a float).

    Args:
        image: uint8 (H, W, 3).
        threshold: float32 scalar in [0, 255]; 0 inverts every value.

    Returns:
        uint8 (H, W, 3). Exact.
    """
    return jnp.where(_to_float(image) >= _factor(threshold), ~image, image)


def _channel_extremes(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(3,) per-channel minimum and maximum of a uint8 (H, W, 3) image, exact (integers).

    Reduced over the rows first, as an (H, W * 3) array whose reduced axis is the major one, then over the
    W pixels of one row: XLA:CPU reduces a major axis with vector loads, where reducing (H, W) of the
    interleaved channels at once runs one channel element at a time (about five times slower)."""
    rows = image.reshape(image.shape[0], -1)
    channels = image.shape[-1]
    minimum = jnp.min(jnp.min(rows, axis=0).reshape(-1, channels), axis=0)
    maximum = jnp.max(jnp.max(rows, axis=0).reshape(-1, channels), axis=0)
    return minimum, maximum


def autocontrast(image: jax.Array) -> jax.Array:
    """torchvision's ``autocontrast``: each channel stretched from its [min, max] to [0, 255];
    a constant channel is left as it is.

    Args:
        image: uint8 (H, W, 3).

    Returns:
        uint8 (H, W, 3). Exact.
    """
    x = _to_float(image)
    minimum, maximum = (value.astype(jnp.float32) for value in _channel_extremes(image))
    constant = maximum == minimum
    inv_scale = (maximum - minimum) * jnp.float32(1.0 / 255.0)
    minimum = jnp.where(constant, 0.0, minimum)
    inv_scale = jnp.where(constant, 1.0, inv_scale)
    # XLA rewrites a division by a broadcast into a multiplication by the reciprocal, which rounds differently
    # from torchvision's division; a divisor selected per pixel (x >= minimum always holds) is divided by.
    divisor = jnp.where(x >= minimum, inv_scale, jnp.float32(1.0))
    return _to_uint8((x - minimum) / divisor)


def equalize(image: jax.Array) -> jax.Array:
    """torchvision's ``equalize``: per-channel histogram equalization with PIL's lookup table.

    torchvision.transforms.v2.functional._color.equalize_image maps each channel through the lookup table
    ``(cum_hist[k - 1] + step // 2) // step`` (0 for k = 0), clamped to [0, 255], with ``step`` the count of
    the channel's pixels below its maximum over 255, and leaves a channel with ``step`` 0 unchanged. Here the
    three tables, the identity for a channel with ``step`` 0, are computed in integers from the histograms
    as torchvision computes them, and each pixel is looked up in its channel's table.

    Args:
        image: uint8 (H, W, 3).

    Returns:
        uint8 (H, W, 3). Exact: integer arithmetic, and each pixel takes the entry of its own value.
    """
    height, width, channels = image.shape
    # One scatter per channel: a channel's uint8 values index its histogram directly (XLA:CPU scatters a
    # strided channel about twice as fast as one interleaved histogram of 3 * 256 bins).
    hist = jnp.stack(
        [
            jnp.zeros(256, jnp.int32).at[image[..., c].reshape(-1)].add(1, mode="promise_in_bounds")
            for c in range(channels)
        ]
    )
    cum_hist = jnp.cumsum(hist, axis=1)
    # The maximum's count: the first value whose cumulative count is the total.
    num_non_max = height * width - jnp.take_along_axis(hist, jnp.argmax(cum_hist, axis=1)[:, None], axis=1)
    step = num_non_max // 255
    lut = jnp.clip((cum_hist[:, :-1] + step // 2) // jnp.maximum(step, 1), 0, 255)
    lut = jnp.concatenate([jnp.zeros((channels, 1), dtype=jnp.int32), lut], axis=1)
    lut = jnp.where(step != 0, lut, jnp.arange(256, dtype=jnp.int32)).astype(jnp.uint8)
    # Channel c's table at 256 * c of the flattened tables.
    index = image.astype(jnp.int32) + 256 * jnp.arange(channels, dtype=jnp.int32)
    return computed_once(lut.reshape(-1))[index]
