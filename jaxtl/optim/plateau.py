"""Reduce-on-plateau (``optim.schedule: plateau``): torch's ReduceLROnPlateau, decided on the host, run on the device.

The decision is torch's (torch/optim/lr_scheduler.py, ``ReduceLROnPlateau.step``), taken after each
epoch's validation by :meth:`Plateau.step` on host floats, so each group's learning rate is the one
torch's scheduler gives after as many ``scheduler.step(metric)`` calls. The learning rate itself lives
in the compiled train step: :func:`scale_by_plateau` multiplies each trainable group's updates by a
float32 scale held in the optimizer state, and :func:`set_plateau_scales` returns the optimizer state
with new scales, so a reduction changes an array, not the program. The scale is in every checkpoint
with the optimizer state; :class:`Plateau` (the best value, the counters, the lrs) is in the run's state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from jaxtl.optim.settings import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau's state between epochs: what a resumed run needs to decide as torch would.

    Attributes:
        best: the best value of ``optim.plateau_metric`` so far; None before the first epoch (torch's
            ``mode_worse``, inf for a loss and -inf for an accuracy).
        bad_epochs: epochs since ``best`` without an improvement (torch's ``num_bad_epochs``).
        cooldown_left: epochs of cooldown left after a reduction (torch's ``cooldown_counter``).
        lrs: each scheduled group's learning rate after the last step (torch's ``_last_lr``); a group
            absent is at its configured peak.
    """

    best: float | None = None
    bad_epochs: int = 0
    cooldown_left: int = 0
    lrs: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def lr(self, group: str, peak: float) -> float:
        """The learning rate of ``group``, whose configured one is ``peak``."""
        return self.lrs.get(group, peak)

    def scale(self, group: str, peak: float) -> float:
        """The lr of ``group`` over its configured ``peak``: the factor :func:`scale_by_plateau` multiplies by."""
        return self.lr(group, peak) / peak if peak else 1.0

    def scales(self, peaks: Mapping[str, float]) -> dict[str, float]:
        """:meth:`scale` of each group in ``peaks`` (group name -> configured lr)."""
        return {name: self.scale(name, peak) for name, peak in peaks.items()}

    def step(self, metrics: Mapping[str, float], config: OptimizerConfig, peaks: Mapping[str, float]) -> Plateau:
        """torch's ``ReduceLROnPlateau.step(metrics[config.plateau_metric])`` over groups whose configured lrs are
        ``peaks``: the record after the epoch whose validation ``metrics`` are given."""
        value = float(metrics[config.plateau_metric])
        best, bad_epochs, cooldown_left = self.best, self.bad_epochs + 1, self.cooldown_left
        if _is_better(value, self.best, config):
            best, bad_epochs = value, 0
        if cooldown_left > 0:
            cooldown_left, bad_epochs = cooldown_left - 1, 0  # bad epochs in cooldown are ignored
        lrs = {name: self.lr(name, peak) for name, peak in peaks.items()}
        if bad_epochs > config.plateau_patience:
            lrs = {name: _reduced(lr, config) for name, lr in lrs.items()}
            cooldown_left, bad_epochs = config.plateau_cooldown, 0
        return Plateau(best, bad_epochs, cooldown_left, lrs)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lrs": dict(self.lrs)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plateau:
        best = data.get("best")
        return cls(
            best=None if best is None else float(best),
            bad_epochs=int(data.get("bad_epochs", 0)),
            cooldown_left=int(data.get("cooldown_left", 0)),
            lrs={str(name): float(lr) for name, lr in (data.get("lrs") or {}).items()},
        )


def reductions(before: Plateau, after: Plateau, peaks: Mapping[str, float]) -> list[str]:
    """``group NAME lr OLD -> NEW`` for each group whose lr ``after`` is lower than ``before``."""
    return [
        f"group {name} lr {before.lr(name, peak):g} -> {after.lr(name, peak):g}"
        for name, peak in peaks.items()
        if after.lr(name, peak) != before.lr(name, peak)
    ]


def _is_better(value: float, best: float | None, config: OptimizerConfig) -> bool:
    """torch's ``_is_better``, operation for operation (a threshold of 1 or more in ``rel`` mode never improves on
    the initial inf, as in torch)."""
    threshold, minimize = config.plateau_threshold, config.plateau_metric.endswith("loss")
    if best is None:
        best = math.inf if minimize else -math.inf
    if config.plateau_threshold_mode == "rel":
        return value < best * (1.0 - threshold) if minimize else value > best * (threshold + 1.0)
    return value < best - threshold if minimize else value > best + threshold


def _reduced(lr: float, config: OptimizerConfig) -> float:
    """torch's ``_reduce_lr`` for one group: ``gamma`` (torch's factor) times, down to ``min_lr``, kept unless it
    falls by more than ``plateau_eps``."""
    new = max(lr * config.gamma, config.min_lr)
    return new if lr - new > config.plateau_eps else lr


class ScaleByPlateauState(NamedTuple):
    """The factor a group's updates are multiplied by: its current lr over its configured one (float32, shape ())."""

    scale: jax.Array


def scale_by_plateau() -> optax.GradientTransformation:
    """Multiplies the updates by the scale in its state; 1 until :func:`set_plateau_scales` changes it."""

    def init(params):
        del params
        return ScaleByPlateauState(jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def _is_plateau_state(node: Any) -> bool:
    return isinstance(node, ScaleByPlateauState)


def set_plateau_scales(opt_state: Any, scales: Mapping[str, float]) -> Any:
    """``opt_state`` (of :func:`jaxtl.optim.build_optimizer`) with each named group's plateau scale replaced.

    Args:
        opt_state: an ``optax.partition`` state whose groups hold a :class:`ScaleByPlateauState`.
        scales: group name -> its new scale (a Python float, stored as a float32 array of shape ()).

    Returns:
        A new state; the other leaves are the same arrays. A group named that holds no plateau scale is an error.
    """
    inner = dict(opt_state.inner_states)
    for name, scale in scales.items():
        if name not in inner or not any(map(_is_plateau_state, _plateau_nodes(inner[name]))):
            raise ValueError(f"group {name!r} holds no plateau scale (optim.schedule is not plateau for it)")
        value = jnp.asarray(scale, jnp.float32)
        inner[name] = jax.tree.map(
            lambda node, value=value: ScaleByPlateauState(value) if _is_plateau_state(node) else node,
            inner[name],
            is_leaf=_is_plateau_state,
        )
    return opt_state._replace(inner_states=inner)


def get_plateau_scales(opt_state: Any) -> dict[str, float]:
    """Each group's plateau scale in ``opt_state`` (groups without one are left out)."""
    found = {}
    for name, state in opt_state.inner_states.items():
        nodes = [node for node in _plateau_nodes(state) if _is_plateau_state(node)]
        if nodes:
            found[name] = float(nodes[0].scale)
    return found


def _plateau_nodes(tree: Any) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_is_plateau_state)
