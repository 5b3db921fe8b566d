"""fastai's learning-rate range test, as formulas: the ramp, the smoothed loss, the stop and the suggestions.

Each mirrors fastai's code (fastai/callback/schedule.py: ``SchedExp``, ``LRFinder``, ``valley``, ``steep``,
``minimum``; fastai/learner.py: ``AvgSmoothLoss``); :mod:`jaxtl.train.lr_find` runs the test with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

# fastai's constants: AvgSmoothLoss(beta=0.98), LRFinder's `smooth_loss > 4 * best_loss`, and the points
# Learner.lr_find leaves out of its suggestions (`recorder.losses[num_it // 10 : -5]`).
SMOOTHING = 0.98
DIVERGENCE = 4.0
SKIP_END = 5
MIN_ITERATIONS = SKIP_END + 2  # two points left for a slope (steep) when nothing diverges

# Why a test stopped, as LRFindResult.stop holds it.
STOP_DONE, STOP_DIVERGED, STOP_NON_FINITE = "num_iter", "diverged", "non-finite"


# -- the schedule, the smoothing and the stop -----------------------------------------------------------------


def exponential_lrs(start_lr: float, end_lr: float, num_iter: int) -> np.ndarray:
    """``(num_iter,)`` float64: the learning rate of each step, fastai's ``SchedExp(start_lr, end_lr)`` at
    ``pct = i / num_iter`` (LRFinder's ``train_iter / num_it``, ``train_iter`` counting the steps done)."""
    # Python floats, as fastai computes them: numpy's vectorised power can differ in the last bit.
    return np.array([start_lr * (end_lr / start_lr) ** (i / num_iter) for i in range(num_iter)], np.float64)


class SmoothedLoss:
    """fastai's ``AvgSmoothLoss``: ``val = torch.lerp(loss, val, beta)`` from ``val = 0``, reported as
    ``val / (1 - beta ** count)`` so that the first values are not pulled towards 0.

    torch computes a lerp with a weight of 0.5 or more as ``end - (end - start) * (1 - weight)``
    (ATen/native/Lerp.h), so an infinite loss makes ``val`` infinite (where ``start + weight * (end - start)``
    would make it NaN), and the test stops as diverged, as fastai's does.
    """

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self.count, self.value = beta, 0, 0.0

    def add(self, loss: float) -> float:
        """Takes one step's loss; returns the smoothed loss after it."""
        self.count += 1
        self.value = self.value - (self.value - loss) * (1 - self.beta)
        return self.value / (1 - self.beta**self.count)


@dataclasses.dataclass
class LossRecord:
    """The steps of a range test as they come: their learning rates, losses and smoothed losses, and the stop.

    :meth:`add` decides after each step, in LRFinder's order: the lowest smoothed loss is updated, then the
    test stops if the smoothed loss is more than ``DIVERGENCE`` times it (``stop_div``), or is not finite, or
    ``num_iter`` steps are done.
    """

    num_iter: int
    stop_div: bool = True
    lrs: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    smoothed: list[float] = dataclasses.field(default_factory=list)
    best: float = math.inf
    smoothing: SmoothedLoss = dataclasses.field(default_factory=SmoothedLoss)

    def add(self, lr: float, loss: float) -> str | None:
        """Records one step; returns why the test stops after it (``STOP_*``), or None to go on."""
        smoothed = self.smoothing.add(loss)
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        self.best = min(self.best, smoothed)
        if self.stop_div and smoothed > DIVERGENCE * self.best:
            return STOP_DIVERGED
        if not math.isfinite(smoothed):
            return STOP_NON_FINITE
        return STOP_DONE if len(self.lrs) >= self.num_iter else None


# -- the suggestions ---------------------------------------------------------------------------------------------


class Suggestion(NamedTuple):
    """A suggested learning rate and the point of the curve it comes from (``at_lr``, ``at_loss``), which the
    plot marks: for ``minimum`` the lowest point, whose lr is ten times the suggestion."""

    lr: float
    at_lr: float
    at_loss: float


def suggestion_window(lrs: np.ndarray, smoothed: np.ndarray, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """The points the suggestions use, as ``Learner.lr_find`` takes them from fastai's recorder: without the
    first ``num_iter // 10`` and the last ``SKIP_END``, and cut before the first NaN.

    Args:
        lrs, smoothed: ``(n,)`` the learning rates and smoothed losses of the steps, as fastai records them.
        num_iter: the test's planned number of steps.
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    stop = len(smoothed) - SKIP_END
    nan = np.flatnonzero(np.isnan(smoothed))
    if len(nan):
        stop = min(stop, int(nan[0]))
    start = num_iter // 10
    return lrs[start : max(start, stop)], smoothed[start : max(start, stop)]


def valley(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """fastai's ``valley``: the middle of the longest valley, the longest decreasing run of losses.

    A point's valley length is 1 plus the longest among the earlier points with a higher loss (a longest
    strictly decreasing subsequence, by dynamic programming); the valley ends at the first point with the
    longest, and starts that many points before it (one before its first point, as fastai counts: a valley
    of ``k`` points spans ``k`` intervals). The suggestion is the point a third plus a sixth of the way in:
    ``start + int(span / 3) + int(span / 6)``. With no decrease at all it is the first point; a valley of the
    first two points alone gives index -1, the last point, as fastai's indexing does.
    """
    losses = np.asarray(losses, np.float64)
    length = np.ones(len(losses), np.int64)
    for i in range(1, len(losses)):
        higher = losses[:i] > losses[i]
        if higher.any():
            length[i] = length[:i][higher].max() + 1
    end = int(np.argmax(length))  # the first of the longest
    start = end - int(length[end]) if length[end] > 1 else 0
    third = (end - start) / 3
    index = start + int(third) + int(third / 2)
    return Suggestion(float(lrs[index]), float(lrs[index]), float(losses[index]))


def steep(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """fastai's ``steep``: the lr where the loss falls fastest against log(lr), the left point of the two
    consecutive points with the most negative ``(loss[i + 1] - loss[i]) / (log lr[i + 1] - log lr[i])``."""
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    index = int(np.argmin(slopes))
    return Suggestion(float(lrs[index]), float(lrs[index]), float(losses[index]))


def minimum(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """fastai's ``minimum``: a tenth of the lr of the lowest loss (the first, if several are equal)."""
    index = int(np.argmin(losses))
    return Suggestion(float(lrs[index]) / 10, float(lrs[index]), float(losses[index]))


SUGGESTIONS: dict[str, Callable[[np.ndarray, np.ndarray], Suggestion]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
}
SUGGESTION_LABELS = {"valley": "valley", "steep": "steep", "minimum": "minimum/10"}


def scale_by_ramp(factors: Sequence[float] | np.ndarray) -> optax.GradientTransformation:
    """Multiplies the updates of step ``k`` (counted from 0) by ``factors[k]``, and by the last factor after.

    Chained after an optimizer whose every lr multiplies its whole update (AdamW with its decoupled decay, Adam,
    SGD), this is that optimizer with every lr times ``factors[k]``. The factors are a constant of the compiled
    step, indexed by the transformation's own step count: one compile for the whole ramp.

    Args:
        factors: ``(n,)`` n >= 1, held in float32.
    """
    ramp = jnp.asarray(factors, jnp.float32)
    if ramp.ndim != 1 or not len(ramp):
        raise ValueError(f"factors must be a non-empty 1-D sequence, got shape {ramp.shape}")
    last = len(ramp) - 1
    return optax.scale_by_schedule(lambda count: ramp[jnp.minimum(count, last)])
