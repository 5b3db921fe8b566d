"""Float32 building blocks the augmentation ops share to compute torchvision's roundings exactly under XLA.

XLA may contract a multiply feeding an add into one fused multiply-add and fuses elementwise producers into
every consumer; these helpers are written so that neither changes a result (:func:`split`, :func:`two_sum`) nor
repeats work per pixel (:func:`computed_once`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x == hi + lo exactly, each with at most 12 significant bits: the product of either with a number of at
    most 12 significant bits (an integer below 2**12) is exact in float32. Bit masking, not Veltkamp's multiply,
    so no contraction can alter it."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, x - hi


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: s = fl(a + b) and the rounding error e, with s + e == a + b exactly."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def computed_once(values: jax.Array) -> jax.Array:
    """``values``, a 1-D array, written into a new array: the same values, computed once.

    XLA:CPU fuses an elementwise computation into every consumer, so a table read by a gather, or a term of x
    alone that feeds an (H, W) computation, is recomputed for each use (a division per pixel for
    :func:`jaxtl.data.augment.color.equalize`'s table). A scatter is never fused into its users, so the array it
    writes is computed once and each use is a load."""
    index = jnp.arange(values.shape[0])
    return jnp.zeros_like(values).at[index].set(values, indices_are_sorted=True, unique_indices=True)
