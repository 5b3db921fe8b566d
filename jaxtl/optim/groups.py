"""Parameter groups: which parameters train, at which learning rate and weight decay, with which BN policy.

Groups are data. The primitive is a label function ``(dotted_name, array) -> group name`` plus a
:class:`Group` for each name; ordered :class:`Rule` lists (glob or regex patterns on torchvision's
dotted names, first match wins) compile into exactly that, and the built-in policies
(:mod:`jaxtl.optim.policies`) are rule lists written with this same public API.

    groups = assign(model, [Rule("fc.*", group="head", lr=1e-3),
                            Rule("layer4.*", group="layer4", lr=1e-4, bn="train"),
                            Rule("*", group="frozen", frozen=True)])
    print(groups.summary())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxtl.models.layers import BatchNorm2d
from jaxtl.models.names import collapse_names, dotted_name
from jaxtl.optim.rules import BN_POLICIES, BNPolicy, Group, ParamGroupError, Rule

__all__ = [
    "BN_POLICIES",
    "BNPolicy",
    "Group",
    "ParamGroupError",
    "ParamGroups",
    "Rule",
    "assign",
    "assign_labels",
    "parameters",
]


def parameters(model: nnx.Module) -> dict[str, nnx.Param]:
    """The model's parameters by dotted (torchvision) name, in the model's order."""
    return {dotted_name(path): p for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _batch_norms(model: nnx.Module) -> dict[str, BatchNorm2d]:
    return {dotted_name(path): m for path, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)}


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """The parameters of one model assigned to groups.

    Attributes:
        groups: settings by group name, in the order the rules (or the groups given) name them.
        labels: group name of every parameter, by dotted name, in the model's order.
        sizes: element count of every parameter.
        batch_norms: BN policy of every BatchNorm layer, by module name.
    """

    groups: dict[str, Group]
    labels: dict[str, str]
    sizes: dict[str, int]
    batch_norms: dict[str, BNPolicy]

    def names(self, group: str) -> list[str]:
        return [name for name, label in self.labels.items() if label == group]

    def is_trainable(self, name: str) -> bool:
        return not self.groups[self.labels[name]].frozen

    @property
    def trainable_names(self) -> frozenset[str]:
        return frozenset(name for name in self.labels if self.is_trainable(name))

    def trainable_filter(self) -> Callable[[tuple, Any], bool]:
        """An NNX filter selecting the trainable parameters: ``nnx.split(model, groups.trainable_filter(), ...)``."""
        trainable = self.trainable_names

        def is_trainable(path: tuple, value: Any) -> bool:
            return isinstance(value, nnx.Param) and dotted_name(path) in trainable

        return is_trainable

    def apply_bn_policy(self, model: nnx.Module) -> None:
        """Puts each BatchNorm layer of ``model`` in its group's mode (call after ``model.train()``).

        Dropout and stochastic depth inside a module whose parameters are all frozen are turned off
        too: a frozen block computes what it computes in eval mode, which is also what makes a
        frozen backbone's features cacheable.
        """
        for name, module in _batch_norms(model).items():
            module.use_running_average = self.batch_norms[name] == "frozen"
        trainable = self.trainable_names
        for path, module in nnx.iter_modules(model):
            if isinstance(module, nnx.Dropout) and path:
                parent = dotted_name(path[:-1])
                inside = [n for n in self.labels if n.startswith(parent + ".")] if parent else list(self.labels)
                if inside and not any(n in trainable for n in inside):
                    module.deterministic = True

    def summary(
        self, base_lr: float | None = None, default_weight_decay: float | None = None, l2sp_alpha: float | None = None
    ) -> str:
        """Per group: its parameters (whole modules collapsed), counts, LR, weight decay, BN policy.

        ``l2sp_alpha`` (``optim.l2sp_alpha``): the groups it anchors (all but ``head`` and those with their own
        transformation) show ``l2sp ALPHA`` for their decay, which it replaces.
        """
        total = sum(self.sizes.values())
        trainable = sum(self.sizes[n] for n in self.trainable_names)
        lines = [
            f"{len(self.labels)} parameter tensors, {total:,} parameters; trainable: "
            f"{len(self.trainable_names)} tensors, {trainable:,} parameters ({100 * trainable / max(total, 1):.1f}%)",
            f"  {'group':<16} {'tensors':>7} {'params':>12}  {'lr':<10} {'wd':<8} {'bn':<7} parameters",
        ]
        universe = list(self.labels)
        for group in self.groups.values():
            names = self.names(group.name)
            count = sum(self.sizes[n] for n in names)
            if group.frozen:
                lr, wd = "frozen", "-"
            else:
                lr = _format_lr(group, base_lr)
                decay = group.weight_decay if group.weight_decay is not None else default_weight_decay
                wd = "-" if decay is None else f"{decay:g}"
                if l2sp_alpha is not None and group.name != "head" and group.transform is None:
                    wd = f"l2sp {l2sp_alpha:g}"
            norms = [m for m in self.batch_norms if self.labels.get(f"{m}.weight") == group.name]
            bn = group.bn_policy if norms else "-"
            modules = collapse_names(names, universe)
            shown = ", ".join(modules[:6]) + (f", ... ({len(modules) - 6} more)" if len(modules) > 6 else "")
            if group.start_step:
                shown = f"(from step {group.start_step}) {shown}"
            lines.append(f"  {group.name:<16} {len(names):>7} {count:>12,}  {lr:<10} {wd:<8} {bn:<7} {shown}")
        return "\n".join(lines)


def _format_lr(group: Group, base_lr: float | None) -> str:
    if group.lr is not None:
        return f"{group.lr:.3g}"
    if base_lr is not None:
        return f"{base_lr * group.lr_mult:.3g}"
    return f"x{group.lr_mult:g}"


def assign(model: nnx.Module, rules: Sequence[Rule]) -> ParamGroups:
    """Assigns every parameter of ``model`` to the group of the first rule that matches its name.

    Raises:
        ParamGroupError: a parameter no rule matches, a rule that matches nothing, rules giving one
            group different settings, a BN policy on a group without BatchNorm layers, or every
            parameter frozen.
    """
    if not rules:
        raise ParamGroupError("no rules: give at least one, e.g. Rule('*') to train everything")
    groups: dict[str, Group] = {}
    for rule in rules:
        group = rule.to_group()
        if group.name in groups and groups[group.name] != group:
            raise ParamGroupError(
                f"rules for group {group.name!r} disagree: {groups[group.name]} vs {group} (rule {rule.pattern!r}); "
                "give the group one set of settings or use different group names"
            )
        groups.setdefault(group.name, group)
    used: set[int] = set()

    def label(name: str, value: Any) -> str:
        for index, rule in enumerate(rules):
            if rule.matches(name):
                used.add(index)
                return rule.group_name
        raise ParamGroupError(
            f"parameter {name!r} matches no rule (rules: {', '.join(r.pattern for r in rules)}); "
            "every parameter needs a group: end the rules with a catch-all such as Rule('*', frozen=True)"
        )

    result = assign_labels(model, label, groups, _check_unused=False)
    unused = [rule.pattern for index, rule in enumerate(rules) if index not in used]
    if unused:
        raise ParamGroupError(
            f"rule(s) matching no parameter: {', '.join(map(repr, unused))} (an earlier rule may take all their "
            f"parameters); parameter names look like {', '.join(list(result.labels)[:3])}"
        )
    return result


def assign_labels(
    model: nnx.Module,
    label_fn: Callable[[str, Any], str],
    groups: Mapping[str, Group] | Sequence[Group],
    *,
    _check_unused: bool = True,
) -> ParamGroups:
    """Assigns parameters with a user's ``label_fn(dotted_name, array) -> group name``.

    ``groups`` gives the settings of every group the function may return (a mapping by name or a
    sequence of :class:`Group`). Raises ParamGroupError for an unknown label, a group without
    parameters, a BN policy on a group without BatchNorm layers, or every parameter frozen.
    """
    if not isinstance(groups, Mapping):
        groups = {g.name: g for g in groups}
    params = parameters(model)
    labels = {}
    for name, param in params.items():
        label = label_fn(name, param.get_value())
        if label not in groups:
            raise ParamGroupError(
                f"parameter {name!r} was labelled {label!r}, which is not a group (groups: {', '.join(groups)})"
            )
        labels[name] = label
    empty = [g for g in groups if g not in labels.values()]
    if empty and _check_unused:
        raise ParamGroupError(f"group(s) without parameters: {', '.join(empty)}")
    groups = {name: group for name, group in groups.items() if name in set(labels.values())}
    norms = _batch_norms(model)
    batch_norms = {}
    for module_name in norms:
        group = groups[labels[f"{module_name}.weight"]]
        batch_norms[module_name] = group.bn_policy
    for group in groups.values():
        if group.bn is not None and not any(labels.get(f"{m}.weight") == group.name for m in norms):
            held = collapse_names([n for n in labels if labels[n] == group.name], labels)
            raise ParamGroupError(
                f"group {group.name!r} sets bn={group.bn!r} but holds no BatchNorm weights "
                f"(its parameters: {', '.join(held[:4])})"
            )
    if all(groups[label].frozen for label in labels.values()):
        raise ParamGroupError(
            "every parameter is frozen, so training would change nothing; unfreeze at least the head "
            "(e.g. the head_only policy) or a group"
        )
    sizes = {name: int(np.prod(p.get_value().shape)) for name, p in params.items()}
    return ParamGroups(groups=groups, labels=labels, sizes=sizes, batch_norms=batch_norms)
