"""Phases: training in stages with different groups (progressive unfreezing is three phases).

A :class:`Phase` is a length (steps or epochs), the rules that group the parameters, the optimizer
settings, and per-group learning rates. Moving to the next phase rebuilds the groups and the
optimizer (one new compile of the step); :func:`carry_optimizer_state` moves over the state of every
parameter that stays trainable in a group of the same name (Adam's moments and step count), so
unfreezing a block does not reset the head's optimizer. ``carry_state=False`` starts the phase's
optimizer afresh, as a PyTorch loop that creates a new optimizer at each phase does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from jaxtl.optim.groups import ParamGroups
from jaxtl.optim.plateau import ScaleByPlateauState
from jaxtl.optim.settings import OptimizerConfig, Phase


def progressive_unfreezing(
    epochs: Sequence[int] = (1, 1, 1), lrs: Sequence[Mapping[str, float]] | None = None, **optimizer
) -> list[Phase]:
    """Head only, then the last block with the head, then everything: the classic three phases."""
    lrs = lrs or ({"head": 1e-3}, {"head": 1e-3, "blocks": 1e-4}, {"head": 1e-3, "backbone": 1e-5})
    config = OptimizerConfig(**optimizer)
    policies = ("head_only", "last_n_blocks:1", "full")
    names = ("head", "last_block", "all")
    return [
        Phase(name, policy, epochs=n, optimizer=config, lrs=dict(lr))
        for name, policy, n, lr in zip(names, policies, epochs, lrs, strict=True)
    ]


def _keyed_leaves(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _schedule_counts(tree: Any) -> set[str]:
    """The paths of the LR schedules' state in ``tree``: step counts (``optax.ScaleByScheduleState``) and
    reduce-on-plateau scales, which start afresh with each phase's optimizer."""

    def is_schedule(node: Any) -> bool:
        return isinstance(node, (optax.ScaleByScheduleState, ScaleByPlateauState))

    found = set()
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_schedule)[0]:
        if is_schedule(node):
            found.update(jax.tree_util.keystr(path + sub) for sub, _ in jax.tree_util.tree_flatten_with_path(node)[0])
    return found


def carry_optimizer_state(
    old_groups: ParamGroups, old_state: Any, new_groups: ParamGroups, new_state: Any
) -> tuple[Any, list[str]]:
    """``new_state`` (a fresh ``init`` of the next phase's optimizer) with the old state moved in.

    For each group trainable in both phases, every state leaf whose path (and so parameter) exists
    in both and whose shape matches is taken from ``old_state``: moments of parameters that stay,
    and the optimizer's step count (Adam's bias correction goes on). The LR schedule's count is
    not: each phase's schedule spans that phase's steps and starts at its step 0. Returns the state
    and the names of the groups carried.
    """
    carried = []
    inner = dict(new_state.inner_states)
    for name, state in new_state.inner_states.items():
        if name not in old_groups.groups or old_groups.groups[name].frozen or new_groups.groups[name].frozen:
            continue
        old_leaves = _keyed_leaves(old_state.inner_states[name])
        fresh = _schedule_counts(state)
        paths, treedef = jax.tree_util.tree_flatten_with_path(state)
        leaves = []
        for path, leaf in paths:
            key = jax.tree_util.keystr(path)
            old = old_leaves.get(key)
            same = old is not None and getattr(old, "shape", None) == getattr(leaf, "shape", None)
            leaves.append(old if same and key not in fresh else leaf)
        inner[name] = jax.tree_util.tree_unflatten(treedef, leaves)
        carried.append(name)
    return new_state._replace(inner_states=inner), carried
