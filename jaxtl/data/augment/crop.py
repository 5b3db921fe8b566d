"""RandomResizedCrop on the device: torchvision's box sampling and its antialiased uint8 bilinear resize of the box."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _resize_weights(offset, length, out_size: int, canvas_size: int) -> tuple[jax.Array, jax.Array]:
    """Fixed-point antialiased bilinear weights of ATen's uint8 resize along one axis.

    Returns (out_size, canvas_size) int32 weights reading the ``length`` pixels from ``offset`` of a
    canvas axis, and their precision (bits).
    """
    # ATen's _compute_indices_min_size_weights_aa (UpSampleKernel.cpp), bilinear filter (interp_size 2):
    # scale = in / out, support = scale (downscale) or 1, weights filter((j - center + 0.5) * invscale)
    # over the input pixels of the box, normalised to sum to 1.
    length_f = jnp.asarray(length, jnp.float32)
    scale = length_f / out_size
    support = jnp.maximum(scale, 1.0)
    invscale = 1.0 / support
    center = scale * (jnp.arange(out_size, dtype=jnp.float32) + 0.5)
    position = jnp.arange(canvas_size, dtype=jnp.int32) - jnp.asarray(offset, jnp.int32)
    inside = (position >= 0) & (position < jnp.asarray(length, jnp.int32))
    distance = (position.astype(jnp.float32)[None, :] - center[:, None] + 0.5) * invscale
    weights = jnp.where(inside[None, :], jnp.maximum(1.0 - jnp.abs(distance), 0.0), 0.0)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    # compute_index_ranges_int16_weights: the largest precision whose largest weight still fits int16
    # ((int)(0.5 + wt_max * 2^(precision + 1)) < 2^15, at most 22), weights rounded half away from zero.
    wt_max = jnp.max(weights)
    candidates = jnp.arange(22, dtype=jnp.int32)
    fits = (0.5 + wt_max * jnp.exp2((candidates + 1).astype(jnp.float32))).astype(jnp.int32) < 2**15
    precision = jnp.sum(jnp.cumprod(fits.astype(jnp.int32)))
    fixed = jnp.floor(0.5 + weights * jnp.exp2(precision.astype(jnp.float32))).astype(jnp.int32)
    return fixed, precision


def _resample(image: jax.Array, weights: jax.Array, precision: jax.Array, axis: int) -> jax.Array:
    # ImagingResampleHorizontal/Vertical (UpSampleKernelAVX): integer sum from half a unit, shifted
    # right by the precision, saturated to uint8.
    subscripts = "oh,hwc->owc" if axis == 0 else "ow,hwc->hoc"
    total = jnp.einsum(subscripts, weights, image.astype(jnp.int32), preferred_element_type=jnp.int32)
    total = (total + jnp.left_shift(1, precision - 1)) >> precision
    return jnp.clip(total, 0, 255).astype(jnp.uint8)


def resized_crop(canvas: jax.Array, height, width, top, left, crop_h, crop_w, size: int) -> jax.Array:
    """torchvision's ``F.resized_crop(image, top, left, crop_h, crop_w, [size, size], BILINEAR, antialias=True)``.

    The image occupies the top-left ``height`` x ``width`` of ``canvas``; the box must lie inside it
    (as :func:`sample_random_resized_crop`'s do). The arithmetic is ATen's uint8 CPU kernel (PIL's
    fixed-point separable resampling: width first, rounded to uint8, then height), which is what
    torchvision's data-loader workers run.

    Args:
        canvas: (H, W, 3) uint8, fixed shape.
        height: image height on the canvas, int scalar (kept for the caller's bookkeeping; the box bounds the read).
        width: image width on the canvas, int scalar.
        top: box top row, int scalar (possibly traced).
        left: box left column, int scalar.
        crop_h: box height, int scalar >= 1.
        crop_w: box width, int scalar >= 1.
        size: output side, static int.

    Returns:
        (size, size, 3) uint8.
    """
    del height, width  # the box lies inside the image, so its bounds are the only ones the weights need
    canvas_h, canvas_w = canvas.shape[:2]
    weights_x, precision_x = _resize_weights(left, crop_w, size, canvas_w)
    weights_y, precision_y = _resize_weights(top, crop_h, size, canvas_h)
    rows = _resample(canvas, weights_x, precision_x, axis=1)  # (canvas_h, size, 3)
    return _resample(rows, weights_y, precision_y, axis=0)


def sample_random_resized_crop(
    key: jax.Array,
    height,
    width,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A box of torchvision's ``RandomResizedCrop.make_params`` for an image of ``height`` x ``width``.

    Ten attempts at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    the first box that fits wins, at a uniform position; when none fits, the centred box of the
    clamped ratio. Same algorithm and distribution, not torch's random stream.

    Args:
        key: a jax PRNG key.
        height: image height, int scalar (possibly traced).
        width: image width, int scalar.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) width / height.

    Returns:
        (top, left, crop_h, crop_w), int32 scalars.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    area = (height * width).astype(jnp.float32)
    target_area = area * jax.random.uniform(k_area, (10,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(k_ratio, (10,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    # int(round(...)): Python's round is half to even, as jnp.round.
    w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    # Fallback to a central crop of the ratio clamped to the bounds.
    in_ratio = width.astype(jnp.float32) / height.astype(jnp.float32)
    narrow = in_ratio < min(ratio)
    wide = in_ratio > max(ratio)
    fallback_w = jnp.where(wide, jnp.round(height * max(ratio)).astype(jnp.int32), width)
    fallback_h = jnp.where(narrow, jnp.round(width / min(ratio)).astype(jnp.int32), height)
    crop_w = jnp.where(found, w[first], fallback_w)
    crop_h = jnp.where(found, h[first], fallback_h)
    # torch.randint(0, n - size + 1): uniform over the n - size + 1 positions.
    random_top = jax.random.randint(k_top, (), 0, height - crop_h + 1)
    random_left = jax.random.randint(k_left, (), 0, width - crop_w + 1)
    top = jnp.where(found, random_top, (height - crop_h) // 2)
    left = jnp.where(found, random_left, (width - crop_w) // 2)
    return top, left, crop_h, crop_w
