"""Phases: training in stages with different groups (progressive unfreezing is three phases).

A :class:`Phase` is a length (steps or epochs), the rules that group the parameters, the optimizer
settings, and per-group learning rates. Moving to the next phase rebuilds the groups and the
optimizer (one new compile of the step); :func:`carry_optimizer_state` moves over the state of every
parameter that stays trainable in a group of the same name (Adam's moments and step count), so
unfreezing a block does not reset the head's optimizer. ``carry_state=False`` starts the phase's
optimizer afresh, as a PyTorch loop that creates a new optimizer at each phase does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from jaxtl.optim.groups import BN_POLICIES, BNPolicy, ParamGroupError, ParamGroups, Rule, assign
from jaxtl.optim.optimizer import OptimizerConfig, build_optimizer
from jaxtl.optim.policies import get_policy


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of training.

    Attributes:
        name: for logs and checkpoints.
        policy: a built-in policy name (``"head_only"``, ``"last_n_blocks:1"``), a policy function,
            or an explicit list of rules.
        steps, epochs: the phase's length; exactly one is set.
        optimizer: optimizer settings of the phase.
        lrs: peak learning rate per group name, overriding the rules' (``{"head": 1e-3, "blocks": 1e-4}``).
        carry_state: carry the optimizer state of parameters that stay in a same-named trainable group.
        bn: every BatchNorm layer's mode in this phase, whatever the policy's groups say: ``"frozen"``
            (running statistics used and kept, the recipe's ``model.apply(set_batchnorm_eval)`` for
            fine-tuning on little data) or ``"train"``; None keeps each group's.
    """

    name: str
    policy: str | Callable | Sequence[Rule]
    steps: int | None = None
    epochs: int | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    lrs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    carry_state: bool = True
    bn: BNPolicy | None = None

    def __post_init__(self):
        if self.bn is not None and self.bn not in BN_POLICIES:
            raise ParamGroupError(f"phase {self.name!r}: bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        if (self.steps is None) == (self.epochs is None):
            raise ParamGroupError(f"phase {self.name!r}: set exactly one of steps and epochs")
        length = self.steps if self.steps is not None else self.epochs
        if length < 1:
            raise ParamGroupError(f"phase {self.name!r}: its length must be at least 1 (got {length})")

    def rules(self, model: nnx.Module) -> list[Rule]:
        if isinstance(self.policy, str):
            return get_policy(self.policy)(model)
        if callable(self.policy):
            return list(self.policy(model))
        return list(self.policy)

    def groups(self, model: nnx.Module) -> ParamGroups:
        """The phase's groups, with ``lrs`` applied; an ``lrs`` key that is no group is an error."""
        groups = assign(model, self.rules(model))
        unknown = [name for name in self.lrs if name not in groups.groups]
        if unknown:
            raise ParamGroupError(
                f"phase {self.name!r} sets lrs for unknown group(s) {', '.join(unknown)}; "
                f"its groups are {', '.join(groups.groups)}"
            )
        frozen = [name for name in self.lrs if groups.groups[name].frozen]
        if frozen:
            raise ParamGroupError(f"phase {self.name!r} sets lrs for frozen group(s) {', '.join(frozen)}")
        updated = {
            name: dataclasses.replace(group, lr=self.lrs[name]) if name in self.lrs else group
            for name, group in groups.groups.items()
        }
        if self.bn is None:
            return dataclasses.replace(groups, groups=updated)
        # Every BatchNorm in the phase's mode; groups that hold BatchNorm weights say so in the summary.
        holding = {groups.labels[f"{module}.weight"] for module in groups.batch_norms}
        updated = {
            name: dataclasses.replace(group, bn=self.bn) if name in holding else group
            for name, group in updated.items()
        }
        return dataclasses.replace(groups, groups=updated, batch_norms=dict.fromkeys(groups.batch_norms, self.bn))

    def optax(self, groups: ParamGroups, total_steps: int | None = None) -> optax.GradientTransformation:
        return build_optimizer(groups, self.optimizer, total_steps)


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
    """The paths of the step counts of the LR schedules (``optax.ScaleByScheduleState``) in ``tree``."""

    def is_schedule(node: Any) -> bool:
        return isinstance(node, optax.ScaleByScheduleState)

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
