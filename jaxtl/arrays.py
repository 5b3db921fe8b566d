"""Host values onto the device without compiling.

``jnp.asarray(numpy_array)`` runs a small XLA program (``jit(stage)``) that is compiled once per shape and dtype
(jax 0.10): building a model value by value with it compiled 30-75 programs (0.2-0.5 s of compiling per model in a
fresh process), and casting a model's parameters to float64 compiled one per parameter shape. ``jax.device_put``
transfers the buffer without compiling anything.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_device(values: Any, dtype: Any = None) -> jax.Array:
    """``values`` (a numpy array, scalar or nested list) as a jax array of ``dtype`` (numpy's choice when None,
    canonicalised as jax does: float32 and int32 unless x64 is enabled), on the default device.

    The values are copied first: on the CPU ``device_put`` may keep a suitably aligned host buffer without copying,
    and the caller's array must not become the device array's storage.
    """
    return jax.device_put(np.array(values, dtype=dtype))
