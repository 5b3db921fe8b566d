"""Rules and groups: the data that says which parameters train, at which learning rate, with which BN mode.

No jax here: a run config holds these, and a config is read (and its errors reported) before jax loads.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from typing import Any, Literal

from jaxtl.errors import JaxtlError

BNPolicy = Literal["train", "frozen"]
BN_POLICIES = ("train", "frozen")


class ParamGroupError(JaxtlError, ValueError):
    """Rules, labels or groups that do not describe the model's parameters."""


@dataclasses.dataclass(frozen=True)
class Group:
    """Settings of one parameter group.

    Attributes:
        name: the group's name, as labels refer to it.
        frozen: no gradient, no optimizer state, parameters bit-identical throughout.
        lr: the group's peak learning rate; None means ``base lr * lr_mult``.
        lr_mult: multiplier of the base learning rate when ``lr`` is None.
        weight_decay: the group's decoupled weight decay; None means the optimizer's default.
        bn: the BatchNorm layers whose weight is in this group: ``"train"`` normalises with batch
            statistics and updates the running ones (torch's ``.train()``), ``"frozen"`` uses and keeps
            the running statistics (torch's ``.eval()`` on those layers). None: ``"frozen"`` for a frozen
            group, ``"train"`` otherwise.
        transform: an optax GradientTransformation to use for this group instead of the optimizer
            built from the settings above (a researcher's own update rule).
        start_step: the phase's optimizer step from which the group trains; before it, its updates are zero
            and its optimizer state waits (:func:`jaxtl.optim.scheduled_mask.start_at`): unfreezing on a
            schedule inside one compiled step. 0: from the start.
    """

    name: str
    frozen: bool = False
    lr: float | None = None
    lr_mult: float = 1.0
    weight_decay: float | None = None
    bn: BNPolicy | None = None
    transform: Any = None
    start_step: int = 0

    def __post_init__(self):
        if self.bn is not None and self.bn not in BN_POLICIES:
            raise ParamGroupError(f"group {self.name!r}: bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        for field in ("lr", "weight_decay"):
            value = getattr(self, field)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ParamGroupError(f"group {self.name!r}: {field}={value} must be a finite number >= 0")
        if not (math.isfinite(self.lr_mult) and self.lr_mult >= 0):
            raise ParamGroupError(f"group {self.name!r}: lr_mult={self.lr_mult} must be a finite number >= 0")
        if self.start_step < 0 or (self.start_step and self.frozen):
            raise ParamGroupError(
                f"group {self.name!r}: start_step={self.start_step} must be >= 0, on a group that is not frozen"
            )

    @property
    def bn_policy(self) -> BNPolicy:
        return self.bn or ("frozen" if self.frozen else "train")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Parameters whose dotted name matches ``pattern`` go to group ``group`` with these settings.

    ``pattern`` is a glob (``"layer4.*"``, ``"*.bn*.weight"``; ``*`` also crosses dots) or, prefixed
    with ``re:``, a regular expression matched against the whole name (``"re:layer[34]\\..*"``).
    Rules are tried in order; the first that matches a parameter takes it. Rules naming the same
    group must give it the same settings.
    """

    pattern: str
    group: str | None = None
    frozen: bool = False
    lr: float | None = None
    lr_mult: float = 1.0
    weight_decay: float | None = None
    bn: BNPolicy | None = None

    def __post_init__(self):
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as error:
                raise ParamGroupError(f"rule {self.pattern!r}: invalid regular expression ({error})") from None

    @property
    def group_name(self) -> str:
        return self.group or self.pattern

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_group(self) -> Group:
        return Group(self.group_name, self.frozen, self.lr, self.lr_mult, self.weight_decay, self.bn)
