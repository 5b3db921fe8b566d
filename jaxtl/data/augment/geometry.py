"""Geometric augmentations on one uint8 (H, W, 3) image, as torchvision's v2 tensor kernels compute them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def hflip(image: jax.Array, flag) -> jax.Array:
    """Flips ``image`` left-right where ``flag`` is true (torchvision's ``F.horizontal_flip``).

    Args:
        image: (H, W, C) array of any dtype.
        flag: bool scalar, possibly traced.

    Returns:
        (H, W, C) array, ``image``'s dtype.
    """
    return jnp.where(flag, image[:, ::-1], image)


def _sin_cos_degrees(degrees: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin and cos of an angle in degrees, reduced to [-45, 45] first.

    torchvision computes in float64 and rounds the matrix to float32; float32 trigonometry of a large
    angle is off by a few ulps, which moves source coordinates that fall on .5 (30 and 90 degree
    turns) to the other pixel. Reducing by whole quarter turns (exact in float32) keeps multiples of
    90 degrees exact and the rest within an ulp of the rounded float64 values.
    """
    quarter = jnp.round(degrees / 90.0)
    rest = jnp.deg2rad(degrees - 90.0 * quarter)
    sin, cos = jnp.sin(rest), jnp.cos(rest)
    quarter = jnp.mod(quarter.astype(jnp.int32), 4)
    # sin(r + k * 90), cos(r + k * 90) for k = 0, 1, 2, 3.
    sin_k = jnp.stack([sin, cos, -sin, -cos])[quarter]
    cos_k = jnp.stack([cos, -sin, -cos, sin])[quarter]
    return sin_k, cos_k


def _inverse_affine_matrix(center, angle, translate, shear) -> list[jax.Array]:
    # torchvision.transforms.v2.functional._geometry._get_inverse_affine_matrix with scale 1 and
    # inverted=True, term by term (float32 here, float64 there).
    sin_sx, cos_sx = _sin_cos_degrees(shear[0])
    sin_sy, cos_sy = _sin_cos_degrees(shear[1])
    sin_rot, cos_rot = _sin_cos_degrees(angle)
    sin_rot_minus_sy, cos_rot_minus_sy = _sin_cos_degrees(angle - shear[1])
    cx, cy = center
    tx, ty = translate
    tan_sx = sin_sx / cos_sx
    cx_plus_tx = cx + tx
    cy_plus_ty = cy + ty
    a = cos_rot_minus_sy / cos_sy
    b = -(a * tan_sx + sin_rot)
    c = sin_rot_minus_sy / cos_sy
    d = cos_rot - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * cx_plus_tx - m1 * cy_plus_ty
    m5 = cy - m3 * cx_plus_tx - m4 * cy_plus_ty
    return [m0, m1, m2, m3, m4, m5]


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x == hi + lo exactly, each with at most 12 significant bits (bit masking: no multiply to contract)."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, x - hi


def _multiply(x: jax.Array, small: jax.Array) -> jax.Array:
    """fl(x * small) in float32 for ``small`` with at most 12 significant bits, whatever XLA fuses.

    Both partial products are exact, so their one rounded sum is the rounded product, with or without a
    fused multiply-add (XLA contracts x * a + b on CPU and GPU; it cannot change an exact product)."""
    hi, lo = _split(x)
    return hi * small + lo * small


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: s = fl(a + b) and the error e, s + e == a + b exactly."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _fma(x: jax.Array, small: jax.Array, c: jax.Array) -> jax.Array:
    """fma(x, small, c): x * small + c rounded once, for ``small`` with at most 12 significant bits.

    x * small is the exact hi * small + lo * small; the three-term sum is rounded once by rounding the
    low part to odd first (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums", IEEE TC
    2008, algorithm 5.3)."""
    hi, lo = _split(x)
    upper, upper_error = _two_sum(hi * small, lo * small)
    total, total_error = _two_sum(c, upper)
    low, low_error = _two_sum(total_error, upper_error)
    bits = lax.bitcast_convert_type(low, jnp.int32)
    # Round to odd: an inexact low part with an even significand moves one ulp toward the exact value.
    step = jnp.where((low_error > 0) == (low > 0), 1, -1).astype(jnp.int32)
    bits = jnp.where((low_error != 0) & ((bits & 1) == 0), bits + step, bits)
    return total + lax.bitcast_convert_type(bits, jnp.float32)


def _warp_nearest(image: jax.Array, matrix: list[jax.Array], fill) -> jax.Array:
    """Samples ``image`` at the inverse-mapped centre of every output pixel, nearest neighbour.

    Source coordinates that fall within float32 error of a pixel boundary go to the side torch's float32
    arithmetic puts them on, so every step below is torch's, rounded as torch rounds it.
    """
    height, width = image.shape[:2]
    if max(height, width) > 4096:
        raise ValueError(f"images up to 4096 pixels a side, not {height}x{width}")  # _multiply's 12 bits
    # The barrier keeps the half sizes opaque: XLA rewrites a division by a constant into a multiplication
    # by its rounded reciprocal, which is not torch's division.
    half_w, half_h = lax.optimization_barrier((jnp.float32(0.5 * width), jnp.float32(0.5 * height)))
    m = [jnp.asarray(v, jnp.float32) for v in matrix]
    # torchvision's _affine_grid: base grid [x, y, 1] of output pixel centres relative to the image
    # centre (linspace((1 - ow) / 2, (ow - 1) / 2)), times the matrix divided by the half sizes (the
    # transposed theta .div_), as torch's CPU bmm sums it: fma(y, t1, x * t0) + t2 (measured bit for bit).
    x = jnp.arange(width, dtype=jnp.float32) - jnp.float32((width - 1) * 0.5)
    y = (jnp.arange(height, dtype=jnp.float32) - jnp.float32((height - 1) * 0.5))[:, None]
    grid_x = _fma(m[1] / half_w, y, _multiply(m[0] / half_w, x)) + m[2] / half_w
    grid_y = _fma(m[4] / half_h, y, _multiply(m[3] / half_h, x)) + m[5] / half_h
    # grid_sample(align_corners=False, nearest): ATen's GridSamplerKernel unnormalises as
    # (coord + 1) * (size / 2) - 0.5 and rounds half to even (nearbyint); outside [0, size) reads the fill.
    source_x = jnp.round(_multiply(grid_x + 1.0, half_w) - 0.5)
    source_y = jnp.round(_multiply(grid_y + 1.0, half_h) - 0.5)
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    ix = jnp.clip(source_x, 0, width - 1).astype(jnp.int32)
    iy = jnp.clip(source_y, 0, height - 1).astype(jnp.int32)
    sampled = image[iy, ix]
    return jnp.where(inside[..., None], sampled, jnp.asarray(fill, image.dtype))


def affine(
    image: jax.Array,
    angle,
    translate_x,
    translate_y,
    shear_x,
    shear_y,
    fill=0,
    center=None,
) -> jax.Array:
    """torchvision's ``F.affine(image, angle, [tx, ty], 1.0, [shear_x, shear_y], NEAREST, fill, center)``.

    Rotation is clockwise for a positive ``angle`` (torchvision's affine convention); translations are
    in pixels and used as given (torchvision's tensor kernel does not round them).

    Args:
        image: (H, W, C) uint8.
        angle: rotation in degrees, scalar (possibly traced).
        translate_x: horizontal translation in pixels, scalar.
        translate_y: vertical translation in pixels, scalar.
        shear_x: shear parallel to x in degrees, scalar.
        shear_y: shear parallel to y in degrees, scalar.
        fill: value of the pixels that map outside the image: scalar or (C,).
        center: (x, y) pivot in pixel coordinates, or None for the image centre (torchvision's default).

    Returns:
        (H, W, C) uint8.
    """
    height, width = image.shape[:2]
    if center is None:
        center_f = (0.0, 0.0)
    else:
        # torchvision: the pivot relative to the image centre.
        center_f = (center[0] - width * 0.5, center[1] - height * 0.5)
    angle, translate_x, translate_y, shear_x, shear_y = (
        jnp.asarray(v, jnp.float32) for v in (angle, translate_x, translate_y, shear_x, shear_y)
    )
    matrix = _inverse_affine_matrix(center_f, angle, (translate_x, translate_y), (shear_x, shear_y))
    return _warp_nearest(image, matrix, fill)


def rotate(image: jax.Array, angle, fill=0) -> jax.Array:
    """torchvision's ``F.rotate(image, angle, NEAREST, expand=False, fill=fill)``: counter-clockwise for positive.

    torchvision's fast paths (rot90 for multiples of 90 degrees) sample the same pixels as the general
    warp, whose source coordinates are then whole numbers, so they need no branch here.

    Args:
        image: (H, W, C) uint8.
        angle: degrees, scalar (possibly traced).
        fill: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    # rotate_image: the affine matrix of -angle (its rotation sense is the opposite of affine's). Its
    # angle % 360 is left out: _sin_cos_degrees reduces by exact quarter turns, float32 % 360 would round.
    angle = jnp.asarray(angle, jnp.float32)
    zero = jnp.float32(0.0)
    matrix = _inverse_affine_matrix((0.0, 0.0), -angle, (zero, zero), (zero, zero))
    return _warp_nearest(image, matrix, fill)


def shear_x(image: jax.Array, magnitude, fill=0) -> jax.Array:
    """torchvision's auto-augment ShearX: ``F.affine(image, 0, [0, 0], 1, [degrees(atan(magnitude)), 0],
    NEAREST, fill, center=[0, 0])``, a horizontal shear pivoting on the top-left corner.

    tan(degrees(atan(m))) is m, so the inverse matrix is [1, m, m * H / 2; 0, 1, 0] in closed form
    (torchvision's float64 round trip lands on the same float32 values; a float32 one does not).

    Args:
        image: (H, W, C) uint8.
        magnitude: float32 scalar, the tangent of the shear (x moves by magnitude * y).
        fill: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    height = image.shape[0]
    m = jnp.asarray(magnitude, jnp.float32)
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    # _get_inverse_affine_matrix with center_f = (-W/2, -H/2): matrix[2] = cx - cx - tan * cy.
    return _warp_nearest(image, [one, m, m * jnp.float32(height * 0.5), zero, one, zero], fill)


def shear_y(image: jax.Array, magnitude, fill=0) -> jax.Array:
    """torchvision's auto-augment ShearY: ``F.affine(image, 0, [0, 0], 1, [0, degrees(atan(magnitude))],
    NEAREST, fill, center=[0, 0])``; the inverse matrix is [1, 0, 0; m, 1, m * W / 2].

    Args:
        image: (H, W, C) uint8.
        magnitude: float32 scalar, the tangent of the shear (y moves by magnitude * x).
        fill: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    width = image.shape[1]
    m = jnp.asarray(magnitude, jnp.float32)
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    return _warp_nearest(image, [one, zero, zero, m, one, m * jnp.float32(width * 0.5)], fill)


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
