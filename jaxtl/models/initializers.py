"""torch's parameter initialisers (kaiming normal, normal, default uniform, zeros) for HWIO and (in, out) weights.

With a concrete key they draw with numpy (no XLA compile per shape); while tracing, with jax.random;
within :func:`shapes_only`, they return zeros.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.arrays import to_device

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], Array]


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
    return to_device(rng.standard_normal(shape, dtype=np.float64) * std, dtype)


def _uniform(key: Array, shape: tuple[int, ...], dtype, bound: float) -> Array:
    if _SHAPES_ONLY.get():
        return jnp.zeros(shape, dtype)
    rng = _numpy_generator(key)
    if rng is None:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return to_device(rng.uniform(-bound, bound, shape), dtype)


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


def normal_init(std: float) -> Initializer:
    """torch ``nn.init.normal_(w, 0, std)``."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return _normal(key, shape, dtype, std)

    return init


def zeros_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch ``nn.init.zeros_``."""
    return jnp.zeros(shape, dtype) if isinstance(key, jax.core.Tracer) else to_device(np.zeros(shape), dtype)


def uniform_init(bound: float) -> Initializer:
    """torch ``nn.init.uniform_(w, -bound, bound)``."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return _uniform(key, shape, dtype, bound)

    return init


def trunc_normal_init(std: float, a: float = -2.0, b: float = 2.0) -> Initializer:
    """torch ``nn.init.trunc_normal_(w, mean=0, std=std, a=a, b=b)``: N(0, std^2) restricted to [a, b].

    As in torch, ``a`` and ``b`` are absolute bounds, not multiples of ``std``: with torch's defaults (+-2) and
    the std of 0.02 that ConvNeXt, ViT and Swin use, the truncation lies 100 standard deviations out.
    """

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        if _SHAPES_ONLY.get():
            return jnp.zeros(shape, dtype)
        rng = _numpy_generator(key)
        if rng is None:
            return std * jax.random.truncated_normal(key, a / std, b / std, shape, dtype)
        values = rng.standard_normal(shape) * std
        outside = (values < a) | (values > b)
        while outside.any():  # redraw the rare values outside [a, b]: the truncated distribution exactly
            values[outside] = rng.standard_normal(int(outside.sum())) * std
            outside = (values < a) | (values > b)
        return to_device(values, dtype)

    return init
