"""torchvision's v2 ColorJitter on the device: its draws (ranges, a random order of the ops) and applying them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.data.augment import color


class ColorJitterParams(NamedTuple):
    """One draw of torchvision's v2 ``ColorJitter``, as arrays (a batch of draws stacks them).

    Attributes:
        order: int32 (4,), a permutation of 0 (brightness), 1 (contrast), 2 (saturation), 3 (hue).
        factors: float32 (4,), the factor of each op, indexed as ``order``'s values.
        enabled: bool (4,), False for an op whose range was None or collapsed to its identity.
    """

    order: jax.Array
    factors: jax.Array
    enabled: jax.Array


def _jitter_range(value, name: str, center: float, bound: tuple[float, float], clip_first_on_zero: bool):
    """torchvision.transforms.v2.ColorJitter._check_input: None, or the (min, max) a factor is drawn from."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"If {name} is a single number, it must be non negative.")
        low, high = center - value, center + value
        if clip_first_on_zero:
            low = max(low, 0.0)
    elif len(value) == 2:
        low, high = (float(v) for v in value)
    else:
        raise TypeError(f"{name}={value} should be a single number or a sequence with length 2.")
    if not bound[0] <= low <= high <= bound[1]:
        raise ValueError(f"{name} values should be between {bound} and increasing, but got {[low, high]}.")
    return None if low == high == center else (float(low), float(high))


def sample_color_jitter(key: jax.Array, brightness=None, contrast=None, saturation=None, hue=None) -> ColorJitterParams:
    """Draws ColorJitter's parameters as torchvision's v2 ``ColorJitter.make_params`` does: a uniformly random
    order of the four ops, each factor uniform in its range.

    Args:
        key: a jax PRNG key.
        brightness, contrast, saturation: None, a number b >= 0 (the range [max(0, 1 - b), 1 + b]) or (min, max).
        hue: None, a number h in [0, 0.5] (the range [-h, h]) or (min, max) within [-0.5, 0.5].
            An op whose range is None or collapses to its identity (b = 0, h = 0) is skipped, as in torchvision.

    Returns:
        ColorJitterParams; vmap over keys for a batch.
    """
    ranges = (
        _jitter_range(brightness, "brightness", 1.0, (0.0, float("inf")), True),
        _jitter_range(contrast, "contrast", 1.0, (0.0, float("inf")), True),
        _jitter_range(saturation, "saturation", 1.0, (0.0, float("inf")), True),
        _jitter_range(hue, "hue", 0.0, (-0.5, 0.5), False),
    )
    identities = (1.0, 1.0, 1.0, 0.0)
    low = jnp.array([r[0] if r else i for r, i in zip(ranges, identities)], dtype=jnp.float32)
    high = jnp.array([r[1] if r else i for r, i in zip(ranges, identities)], dtype=jnp.float32)
    order_key, factor_key = jax.random.split(key)
    order = jax.random.permutation(order_key, 4).astype(jnp.int32)
    factors = jax.random.uniform(factor_key, (4,), minval=low, maxval=high)
    enabled = jnp.array([r is not None for r in ranges])
    return ColorJitterParams(order=order, factors=factors, enabled=enabled)


def _keep(image: jax.Array, factor: jax.Array) -> jax.Array:
    del factor
    return image


_JITTER_OPS = (color.adjust_brightness, color.adjust_contrast, color.adjust_saturation, color.adjust_hue, _keep)


def apply_color_jitter(image: jax.Array, params: ColorJitterParams) -> jax.Array:
    """Applies one ColorJitter draw, as torchvision's v2 ``ColorJitter.transform`` does: the enabled ops in
    ``params.order``, each with its factor.

    Args:
        image: uint8 (H, W, 3).
        params: one draw of :func:`sample_color_jitter`.

    Returns:
        uint8 (H, W, 3), exactly what torchvision computes with the same factors in the same order.
    """
    for position in range(4):
        op = params.order[position]
        branch = jnp.where(params.enabled[op], op, len(_JITTER_OPS) - 1)
        image = lax.switch(branch, _JITTER_OPS, image, params.factors[op])
    return image
