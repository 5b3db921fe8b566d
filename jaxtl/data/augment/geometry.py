"""Geometric augmentations on one uint8 (H, W, 3) image, as torchvision's v2 tensor kernels compute them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.data.augment.exact import computed_once, split, two_sum


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


def _multiply(x: jax.Array, small: jax.Array) -> jax.Array:
    """fl(x * small) in float32 for ``small`` with at most 12 significant bits, whatever XLA fuses.

    Both partial products are exact, so their one rounded sum is the rounded product, with or without a
    fused multiply-add (XLA contracts x * a + b on CPU and GPU; it cannot change an exact product)."""
    hi, lo = split(x)
    return hi * small + lo * small


def _exact_product(x: jax.Array, small: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(p, e) with p = fl(x * small) and p + e == x * small exactly, for ``small`` with at most 12 significant bits.

    hi * small and lo * small are exact (at most 24 significant bits each); TwoSum of the two is the
    rounded product and its exact error."""
    hi, lo = split(x)
    return two_sum(hi * small, lo * small)


def _round_sum3(c: jax.Array, product: jax.Array, product_error: jax.Array) -> jax.Array:
    """c + product + product_error rounded once, for (product, product_error) from :func:`_exact_product`.

    With the pair an exact product, this is fma(x, small, c). The sum is rounded once by rounding its low
    part to odd first (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums", IEEE TC 2008,
    algorithm 5.3); no multiply is left for XLA to contract."""
    total, total_error = two_sum(c, product)
    low, low_error = two_sum(total_error, product_error)
    bits = lax.bitcast_convert_type(low, jnp.int32)
    # Round to odd: an inexact low part with an even significand moves one ulp toward the exact value.
    step = jnp.where((low_error > 0) == (low > 0), 1, -1).astype(jnp.int32)
    bits = jnp.where((low_error != 0) & ((bits & 1) == 0), bits + step, bits)
    return total + lax.bitcast_convert_type(bits, jnp.float32)


def _computed_once_2d(index: jax.Array) -> jax.Array:
    """An (H, W) int32 array, summed with zeros: the same values, computed once.

    The gather that reads an image at these indices writes each pixel's channels separately, and a fused
    index would be recomputed for every channel. A reduction is not fused into its users (and costs one
    add per pixel, where a scatter of H * W values costs more than the arithmetic it saves)."""
    return jnp.sum(jnp.stack([index, jnp.zeros_like(index)], axis=-1), axis=-1)


def _check_size(height: int, width: int) -> None:
    if max(height, width) > 4096:
        raise ValueError(f"images up to 4096 pixels a side, not {height}x{width}")  # 12-bit coordinates


def _half_sizes(height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """W / 2 and H / 2 in float32, kept opaque: XLA rewrites a division by a constant into a multiplication
    by its rounded reciprocal, which is not torch's division."""
    return lax.optimization_barrier((jnp.float32(0.5 * width), jnp.float32(0.5 * height)))


def _centred(size: int) -> jax.Array:
    """torchvision's _affine_grid base coordinates along one axis: linspace((1 - size) / 2, (size - 1) / 2).

    Whole or half-integers of magnitude below 2048 (12 significant bits), exact in float32."""
    return jnp.arange(size, dtype=jnp.float32) - jnp.float32((size - 1) * 0.5)


def _source_index(grid: jax.Array, half: jax.Array, size: int) -> jax.Array:
    """The source pixel of normalised coordinates ``grid``: an int32 index, or -1 outside [0, size).

    grid_sample(align_corners=False, nearest): ATen's GridSamplerKernel unnormalises as
    fma(coord + 1, size / 2, -0.5), one rounding (its vectorised kernel's fmadd), and rounds half to even
    (nearbyint); outside [0, size) reads the fill. Rounding the product first instead moves exact ties where
    size / 2 is a half-integer (odd sizes). fl(grid + 1) is the same for +0 and -0, so the sign of a zero
    ``grid`` never matters."""
    source = jnp.round(_round_sum3(jnp.float32(-0.5), *_exact_product(grid + 1.0, half)))
    inside = (source >= 0) & (source < size)
    return jnp.where(inside, jnp.clip(source, 0, size - 1).astype(jnp.int32), -1)


def _gather(image: jax.Array, flat_index: jax.Array, fill) -> jax.Array:
    """``image`` read at (H, W) row-major pixel indices into a flattened ``image``; index H * W reads ``fill``."""
    height, width, channels = image.shape
    fill = jnp.broadcast_to(jnp.asarray(fill, image.dtype), (1, channels))
    pixels = jnp.concatenate([image.reshape(height * width, channels), fill])
    return pixels[_computed_once_2d(flat_index)]


def _flat_index(row: jax.Array, column: jax.Array, height: int, width: int) -> jax.Array:
    """row * W + column where both are inside (>= 0), else H * W (the fill); broadcasts."""
    return jnp.where((row >= 0) & (column >= 0), row * width + column, height * width)


def _warp_nearest(image: jax.Array, matrix: list[jax.Array], fill) -> jax.Array:
    """Samples ``image`` at the inverse-mapped centre of every output pixel, nearest neighbour.

    Source coordinates that fall within float32 error of a pixel boundary go to the side torch's float32
    arithmetic puts them on, so every step below is torch's, rounded as torch rounds it.
    """
    height, width = image.shape[:2]
    _check_size(height, width)
    half_w, half_h = _half_sizes(height, width)
    m = [jnp.asarray(v, jnp.float32) for v in matrix]
    # torchvision's _affine_grid: base grid [x, y, 1] of output pixel centres relative to the image
    # centre, times the matrix divided by the half sizes (the transposed theta .div_), as torch's CPU
    # bmm sums it: fma(y, t1, x * t0) + t2 (measured bit for bit). x * t0 depends on x alone and the
    # exact product y * t1 on y alone: both are computed once per column and per row, and only the
    # rounding of their sum and what follows is per pixel (the same operations on the same values).
    x, y = _centred(width), _centred(height)
    x_term_x = computed_once(_multiply(m[0] / half_w, x))
    x_term_y = computed_once(_multiply(m[3] / half_h, x))
    y_term_x = [computed_once(v) for v in _exact_product(m[1] / half_w, y)]
    y_term_y = [computed_once(v) for v in _exact_product(m[4] / half_h, y)]
    grid_x = _round_sum3(x_term_x[None, :], y_term_x[0][:, None], y_term_x[1][:, None]) + m[2] / half_w
    grid_y = _round_sum3(x_term_y[None, :], y_term_y[0][:, None], y_term_y[1][:, None]) + m[5] / half_h
    column = _source_index(grid_x, half_w, width)
    row = _source_index(grid_y, half_h, height)
    return _gather(image, _flat_index(row, column, height, width), fill)


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


def translate(image: jax.Array, translate_x, translate_y, fill=0) -> jax.Array:
    """torchvision's ``F.affine(image, 0, [translate_x, translate_y], 1.0, [0, 0], NEAREST, fill)``: a shift.

    torchvision's auto-augment TranslateX / TranslateY are this with ``int(magnitude)`` pixels along one
    axis. The tensor kernel does not round the translation; any value is computed as :func:`affine` does.

    The inverse matrix is [1, 0, -tx; 0, 1, -ty] (exactly: sin 0 and tan 0 are 0, cos 0 is 1), so each
    source coordinate depends on one axis: fma(y, 0, x * t0) is x * t0 rounded, and fma(y, t4, x * 0) is
    y * t4 rounded (only a zero's sign differs, which the + 1 of the unnormalisation erases). The source
    columns and rows are computed once, on W and H values, with :func:`affine`'s operations.

    Args:
        image: (H, W, C) uint8.
        translate_x: horizontal translation in pixels, scalar (possibly traced).
        translate_y: vertical translation in pixels, scalar.
        fill: value of the pixels that map outside the image: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    height, width = image.shape[:2]
    _check_size(height, width)
    half_w, half_h = _half_sizes(height, width)
    translate_x, translate_y = (jnp.asarray(v, jnp.float32) for v in (translate_x, translate_y))
    # _inverse_affine_matrix: m2 = -tx, m5 = -ty; grid = x * (1 / (W / 2)) + m2 / (W / 2).
    grid_x = _multiply(1.0 / half_w, _centred(width)) + (-translate_x) / half_w
    grid_y = _multiply(1.0 / half_h, _centred(height)) + (-translate_y) / half_h
    column = computed_once(_source_index(grid_x, half_w, width))
    row = computed_once(_source_index(grid_y, half_h, height))
    # A row take, then a column take: each copies whole rows or pixels, with no per-pixel index arithmetic.
    sampled = jnp.take(
        jnp.take(image, jnp.maximum(row, 0), axis=0, mode="clip"), jnp.maximum(column, 0), axis=1, mode="clip"
    )
    inside = (row[:, None] >= 0) & (column[None, :] >= 0)
    return jnp.where(inside[..., None], sampled, jnp.asarray(fill, image.dtype))


def shear_x(image: jax.Array, magnitude, fill=0) -> jax.Array:
    """torchvision's auto-augment ShearX: ``F.affine(image, 0, [0, 0], 1, [degrees(atan(magnitude)), 0],
    NEAREST, fill, center=[0, 0])``, a horizontal shear pivoting on the top-left corner.

    tan(degrees(atan(m))) is m, so the inverse matrix is [1, m, m * H / 2; 0, 1, 0] in closed form
    (torchvision's float64 round trip lands on the same float32 values; a float32 one does not).

    The source row depends on y alone: fma(y, 1 / (H / 2), x * 0) is y * (1 / (H / 2)) rounded, up to a
    zero's sign. The source column is :func:`affine`'s per-pixel rounding of x * t0 + y * t1 (computed
    once per column and per row) plus t2.

    Args:
        image: (H, W, C) uint8.
        magnitude: float32 scalar, the tangent of the shear (x moves by magnitude * y).
        fill: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    height, width = image.shape[:2]
    _check_size(height, width)
    half_w, half_h = _half_sizes(height, width)
    m = jnp.asarray(magnitude, jnp.float32)
    x, y = _centred(width), _centred(height)
    # _get_inverse_affine_matrix with center_f = (-W/2, -H/2): matrix[2] = cx - cx - tan * cy.
    x_term = computed_once(_multiply(1.0 / half_w, x))
    y_term, y_term_error = (computed_once(v) for v in _exact_product(m / half_w, y))
    grid_x = (
        _round_sum3(x_term[None, :], y_term[:, None], y_term_error[:, None]) + (m * jnp.float32(height * 0.5)) / half_w
    )
    column = _source_index(grid_x, half_w, width)
    row = _source_index(_multiply(1.0 / half_h, y), half_h, height)
    row_start = computed_once(jnp.where(row >= 0, row * width, -1))[:, None]
    return _gather(image, jnp.where((row_start >= 0) & (column >= 0), row_start + column, height * width), fill)


def shear_y(image: jax.Array, magnitude, fill=0) -> jax.Array:
    """torchvision's auto-augment ShearY: ``F.affine(image, 0, [0, 0], 1, [0, degrees(atan(magnitude))],
    NEAREST, fill, center=[0, 0])``; the inverse matrix is [1, 0, 0; m, 1, m * W / 2].

    The source column depends on x alone (x * (1 / (W / 2)) rounded: fma(y, 0, p) is p); the source row
    is :func:`affine`'s per-pixel rounding of x * t3 + y * t4 plus t5.

    Args:
        image: (H, W, C) uint8.
        magnitude: float32 scalar, the tangent of the shear (y moves by magnitude * x).
        fill: scalar or (C,).

    Returns:
        (H, W, C) uint8.
    """
    height, width = image.shape[:2]
    _check_size(height, width)
    half_w, half_h = _half_sizes(height, width)
    m = jnp.asarray(magnitude, jnp.float32)
    x, y = _centred(width), _centred(height)
    x_term = computed_once(_multiply(m / half_h, x))
    y_term, y_term_error = (computed_once(v) for v in _exact_product(1.0 / half_h, y))
    grid_y = (
        _round_sum3(x_term[None, :], y_term[:, None], y_term_error[:, None]) + (m * jnp.float32(width * 0.5)) / half_h
    )
    row = _source_index(grid_y, half_h, height)
    column = computed_once(_source_index(_multiply(1.0 / half_w, x), half_w, width))
    return _gather(image, _flat_index(row, column[None, :], height, width), fill)
