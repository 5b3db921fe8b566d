"""RandomErasing on one uint8 (H, W, 3) image: torchvision v2 ``RandomErasing``'s box sampling and ``erase``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# torchvision.transforms.v2.RandomErasing.make_params tries this many boxes before giving up.
ERASING_ATTEMPTS = 10


def sample_erasing(
    key: jax.Array,
    height: int,
    width: int,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Draws a box as torchvision's v2 ``RandomErasing`` does.

    Applied with probability ``p``; then up to 10 attempts, each an area fraction uniform in ``scale`` and
    an aspect ratio log-uniform in ``ratio``, h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect));
    the first box with h < height and w < width is placed uniformly (top in [0, height - h], left in
    [0, width - w]). If none fits, nothing is erased, as in torchvision. The draws are all made at once so
    that the shapes are fixed; sizes are computed in float32 where torchvision uses float64, which can move
    a rounding of h or w at an exact half.

    Args:
        key: a jax PRNG key.
        height, width: the image's size (static).
        p: probability of erasing.
        scale: (min, max) fraction of the image's area erased.
        ratio: (min, max) aspect ratio h / w of the box.

    Returns:
        (apply, top, left, h, w): bool and int32 scalars. When ``apply`` is False, h = w = top = left = 0,
        which :func:`erase` leaves unchanged.
    """
    apply_key, scale_key, ratio_key, top_key, left_key = jax.random.split(key, 5)
    area = height * width
    erase_area = area * jax.random.uniform(scale_key, (ERASING_ATTEMPTS,), minval=scale[0], maxval=scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = jnp.exp(jax.random.uniform(ratio_key, (ERASING_ATTEMPTS,), minval=log_ratio[0], maxval=log_ratio[1]))
    # Python's round, as torchvision's int(round(...)), rounds halves to even, as jnp.round does.
    hs = jnp.round(jnp.sqrt(erase_area * aspect)).astype(jnp.int32)
    ws = jnp.round(jnp.sqrt(erase_area / aspect)).astype(jnp.int32)
    fits = (hs < height) & (ws < width)
    first = jnp.argmax(fits)
    h, w = hs[first], ws[first]
    top = jax.random.randint(top_key, (), 0, height - h + 1)
    left = jax.random.randint(left_key, (), 0, width - w + 1)
    # torchvision's _RandomApplyTransform skips the transform when torch.rand(1) >= p.
    apply = (jax.random.uniform(apply_key) < p) & jnp.any(fits)
    zero = jnp.int32(0)
    return (
        apply,
        jnp.where(apply, top, zero),
        jnp.where(apply, left, zero),
        jnp.where(apply, h, zero),
        jnp.where(apply, w, zero),
    )


def erase(image: jax.Array, top, left, h, w, value=0) -> jax.Array:
    """torchvision's ``erase``: ``image[top : top + h, left : left + w] = value``, as a mask (the box is traced).

    Args:
        image: uint8 (H, W, 3).
        top, left, h, w: integer scalars; h = 0 or w = 0 erases nothing.
        value: a number or 3 numbers (one per channel) in [0, 255], converted to uint8 by truncation as
            torch's assignment of a float tensor into a uint8 one does.

    Returns:
        uint8 (H, W, 3).
    """
    height, width, _ = image.shape
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    fill = jnp.broadcast_to(jnp.asarray(value, dtype=jnp.float32).astype(image.dtype), (image.shape[-1],))
    return jnp.where(inside[..., None], fill, image)
