"""A moving average of the weights (``train.ema``): torchvision's reference ``ExponentialMovingAverage``.

torchvision's classification reference keeps ``torch.optim.swa_utils.AveragedModel(model, avg_fn,
use_buffers=True)`` with ``avg_fn = decay * average + (1 - decay) * value`` over every parameter and
BatchNorm statistic, updated after every ``model_ema_steps``-th step; its first update copies the
model. jaxtl does the same after optimizer steps 0, k, 2k, ... of the run (``every_steps = k``), over
the whole model (frozen parameters too: a parameter frozen after it trained keeps converging to its
value, as torch's average does). With ``warmup`` the decay of the t-th update (t = 0 for the first) is
timm's ``ModelEmaV3`` warmup, ``min(decay, 1 - (1 + t) ** (-2/3))`` (the first update a copy there too).

The average is a function of the run's steps alone, so a run resumed from a checkpoint (which holds
the average beside the weights) ends with the average an uninterrupted run ends with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 default (warmup_gamma 1)


def decay_at(update: int, decay: float, warmup: bool) -> float:
    """The decay of the ``update``-th update of the run (0 for the first, which copies the weights)."""
    if update == 0:
        return 0.0
    if warmup:
        return max(min(decay, 1.0 - (1.0 + update) ** -WARMUP_POWER), 0.0)
    return decay


def _average(average, value, decay, keep):
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return value  # RNG state and counters: the model's
    return decay.astype(value.dtype) * average + keep.astype(value.dtype) * value


@jax.jit
def _update(average, state, decay, keep):
    return jax.tree.map(lambda a, v: _average(a, v, decay, keep), average, state)


def update(average, state, decay: float):
    """``decay * average + (1 - decay) * state`` leaf by leaf, each factor rounded to float32 from float64 as
    torch rounds a Python scalar (non-float leaves are the state's)."""
    return _update(average, state, np.float32(decay), np.float32(1.0 - decay))
