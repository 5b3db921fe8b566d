"""The settings a run config holds for training: the optimizer's, and phases with their freezing.

No jax at import: a config is read, and its errors reported, before jax loads. Turning settings
into groups and optax transformations imports what it needs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from jaxtl.bounds import bounded, out_of_bounds
from jaxtl.optim.rules import BN_POLICIES, BNPolicy, Group, ParamGroupError, Rule

if TYPE_CHECKING:
    import optax
    from flax import nnx

    from jaxtl.optim.groups import ParamGroups

ScheduleName = Literal[
    "constant", "warmup_cosine", "one_cycle", "step", "multistep", "exponential", "cosine_restarts", "plateau"
]
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleName)
PlateauMetric = Literal["val_loss", "val_acc1", "val_map"]  # val_map: multi-label tasks
PLATEAU_METRICS: tuple[str, ...] = typing.get_args(PlateauMetric)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings shared by all groups (each group may set its own lr and weight_decay).

    Attributes:
        name: ``"adamw"`` (torch.optim.AdamW), ``"adam"`` or ``"sgd"``.
        lr: base peak learning rate; a group's is ``group.lr`` or ``lr * group.lr_mult``.
        weight_decay: default weight decay of trainable groups (the recipe's 1e-4; torch AdamW's own default is
            0.01).
        betas, eps: Adam's; momentum, nesterov: SGD's.
        schedule: ``"constant"``, ``"warmup_cosine"`` (linear warmup then cosine to
            ``final_lr_fraction`` of the peak) or ``"one_cycle"``; or torch.optim.lr_scheduler's, stepped once
            per optimizer step (the LR at step k is what torch's scheduler gives after k ``scheduler.step()``
            calls): ``"step"`` (StepLR: ``gamma`` every ``step_size`` steps), ``"multistep"`` (MultiStepLR:
            ``gamma`` at each of ``milestones``), ``"exponential"`` (ExponentialLR: ``gamma`` every step),
            ``"cosine_restarts"`` (CosineAnnealingWarmRestarts: ``restart_steps`` = T_0, ``restart_mult`` =
            T_mult, eta_min = ``final_lr_fraction`` of the peak). ``"plateau"``: ReduceLROnPlateau, stepped once
            per epoch on ``plateau_metric`` after validation (mode min for ``val_loss``, max for ``val_acc1`` and
            ``val_map``): each group's lr times ``gamma`` (torch's factor, < 1) once the metric has not improved by
            ``plateau_threshold`` (``plateau_threshold_mode`` rel or abs) for more than ``plateau_patience``
            epochs, then ``plateau_cooldown`` epochs without counting, never below ``min_lr`` and only by more
            than ``plateau_eps``. Each phase starts at its configured lrs with a fresh scheduler, as a new torch
            optimizer and scheduler per phase would; a group with its own transformation is not scaled.
        warmup_steps: linear warmup length for warmup_cosine and plateau (from 0 at the phase's first step to
            the peak, which plateau's reductions then multiply).
        no_weight_decay: glob patterns of parameters never decayed, whatever their group
            (``("*.bias", "*bn*")`` is a common choice).
        clip_grad_norm: clip each group's gradient to this global norm first (None: off).
        l2sp_alpha: L2-SP (Li et al. 2018, :func:`jaxtl.optim.literature.l2sp`; None: off): every trainable group
            but ``head`` (the classifier's group in every built-in policy) and those with their own transform adds
            ``l2sp_alpha * (w - w0)`` to its gradient before clipping and the optimizer, as the penalty
            ``l2sp_alpha / 2 * ||w - w0||^2`` in the loss would, in place of its weight decay (w0: the group's
            weights when its optimizer state starts; ``no_weight_decay`` does not exempt a parameter from it).
            The head keeps ``weight_decay``, the paper's beta (coupled L2 with ``sgd`` and ``adam``, as the paper's).
        auto_rgn: Auto-RGN (Lee et al. 2023, :func:`jaxtl.optim.literature.scale_by_relative_gradient_norm`): each
            trainable group's update of each tensor times that tensor's relative gradient norm over the group's
            largest, every step. The maximum is per group: under ``full`` the new head is normalised apart from
            the backbone (the paper's models kept their classifier; one group for everything is its exact form).
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = bounded(1e-3, low=0)
    weight_decay: float = bounded(1e-4, low=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), low=0, high=1, open_high=True)  # a beta of 1 divides by 0
    eps: float = bounded(1e-8, low=0)
    momentum: float = bounded(0.9, low=0, high=1)
    nesterov: bool = False
    schedule: ScheduleName = "constant"
    warmup_steps: int = bounded(0, low=0)
    final_lr_fraction: float = bounded(0.0, low=0, high=1)
    step_size: int = bounded(1, low=1)
    gamma: float = bounded(0.1, low=0)
    milestones: tuple[int, ...] = bounded((), low=0)
    restart_steps: int = bounded(1, low=1)
    restart_mult: int = bounded(1, low=1)
    plateau_metric: PlateauMetric = "val_loss"
    plateau_patience: int = bounded(10, low=0)
    plateau_threshold: float = bounded(1e-4, low=0)
    plateau_threshold_mode: Literal["rel", "abs"] = "rel"
    plateau_cooldown: int = bounded(0, low=0)
    plateau_eps: float = bounded(1e-8, low=0)
    min_lr: float = bounded(0.0, low=0)
    no_weight_decay: tuple[str, ...] = ()
    clip_grad_norm: float | None = bounded(None, low=0)
    l2sp_alpha: float | None = bounded(None, low=0)
    auto_rgn: bool = False

    def __post_init__(self):
        if self.name not in ("adamw", "adam", "sgd"):
            raise ParamGroupError(f"optimizer {self.name!r} is not one of adamw, adam, sgd")
        if self.schedule not in SCHEDULES:
            raise ParamGroupError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ParamGroupError(f"milestones {list(self.milestones)} must increase (torch's MultiStepLR counts each)")
        if self.plateau_metric not in PLATEAU_METRICS:
            raise ParamGroupError(f"plateau_metric {self.plateau_metric!r} is not one of {', '.join(PLATEAU_METRICS)}")
        if self.plateau_threshold_mode not in ("rel", "abs"):
            raise ParamGroupError(f"plateau_threshold_mode {self.plateau_threshold_mode!r} is not one of rel, abs")
        if self.schedule == "plateau" and self.gamma >= 1:
            raise ParamGroupError(f"gamma={self.gamma} must be below 1 for schedule plateau (torch's factor < 1.0)")
        problem = out_of_bounds(self)
        if problem:
            raise ParamGroupError(f"optimizer: {problem}")


class Labels:
    """A freezing given as a label function ``(dotted_name, array) -> group name`` and the groups it names.

    The groups may bring their own optax transformation (:attr:`Group.transform`). Used as a phase's
    ``policy`` from Python: ``Phase("norms", Labels(label, [Group("head"), Group("rest", frozen=True)]))``.
    """

    def __init__(self, fn: Callable[[str, Any], str], groups: Sequence[Group] | Mapping[str, Group]):
        self.fn = fn
        self.groups = tuple(groups.values()) if isinstance(groups, Mapping) else tuple(groups)

    def assign(self, model: nnx.Module) -> ParamGroups:
        from jaxtl.optim.groups import assign_labels

        return assign_labels(model, self.fn, self.groups)

    def __repr__(self) -> str:
        return f"Labels({describe_function(self.fn)}, {[g.name for g in self.groups]})"


Freezing = str | Callable[..., Sequence[Rule]] | Sequence[Rule] | Labels
"""What a phase trains: a policy name, a rules function ``model -> [Rule]``, a list of rules, or :class:`Labels`."""

PYTHON_PREFIX = "python:"  # how a freezing written in Python is named in a saved config


def describe_function(fn: Any) -> str:
    """``module.qualname`` of a function, as a saved config names a freezing that only Python can give."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None) or type(fn).__name__}"


def describe_freezing(freezing: Any) -> str | None:
    """A policy name as it is; a rules function or Labels as ``python:module.name`` (rules lists are data)."""
    if freezing is None or isinstance(freezing, str):
        return freezing
    if isinstance(freezing, Labels):
        return f"{PYTHON_PREFIX}labels:{describe_function(freezing.fn)}"
    return f"{PYTHON_PREFIX}{describe_function(freezing)}"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of training.

    Attributes:
        name: for logs and checkpoints.
        policy: a built-in policy name (``"head_only"``, ``"last_n_blocks:1"``), a rules function
            ``model -> [Rule]``, or :class:`Labels` (a label function with its groups).
        rules: instead of ``policy``, an explicit list of rules (a config's ``rules:``). A list of rules
            given as ``policy`` is moved here.
        steps, epochs: the phase's length; exactly one is set (the trainer runs phases of epochs).
        optimizer: optimizer settings of the phase; None: the run's (``RunConfig.optim``).
        lrs: peak learning rate per group name, overriding the rules' (``{"head": 1e-3, "blocks": 1e-4}``).
        carry_state: carry the optimizer state of parameters that stay in a same-named trainable group.
        bn: every BatchNorm layer's mode in this phase, whatever the policy's groups say: ``"frozen"``
            (running statistics used and kept, the recipe's ``model.apply(set_batchnorm_eval)`` for
            fine-tuning on little data) or ``"train"``; None keeps each group's.
        solver: ``"optimizer"`` (steps of the phase's optimizer) or ``"linear_probe"``: the head is set to
            the converged L2-penalised logistic regression of the frozen backbone's features
            (:func:`jaxtl.train.probe.linear_probe`, ``C=probe_C``), the first half of LP-FT (Kumar et al.,
            "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022,
            arXiv:2202.10054), whose next phase fine-tunes from that head. One epoch, head-only groups, no
            augmentation: the features are computed once.
        probe_C: the linear probe's inverse L2 strength (scikit-learn's ``C``).
        unfreeze_at: per group name, the phase's optimizer step from which that group trains (its updates
            held at zero before): progressive unfreezing in one optimizer and one compiled step, gradients
            computed throughout (:mod:`jaxtl.optim.scheduled_mask`), where phases recompile and skip the
            backward pass through frozen layers.
        until: ``"epochs"`` (all of them) or ``"plateau"``: the phase ends early once ``until_metric`` has not
            improved by more than ``min_delta`` for ``patience`` epochs, and the next phase (the next layers
            unfrozen) starts: gradual unfreezing driven by validation. ``epochs`` is then the most it runs.
    """

    name: str
    policy: str | Callable[..., Sequence[Rule]] | Labels | None = None
    rules: tuple[Rule, ...] = ()
    steps: int | None = bounded(None, low=1)
    epochs: int | None = bounded(None, low=1)
    optimizer: OptimizerConfig | None = None
    lrs: Mapping[str, float] = bounded(dataclasses.MISSING, low=0, default_factory=dict)
    carry_state: bool = True
    bn: BNPolicy | None = None
    solver: Literal["optimizer", "linear_probe"] = "optimizer"
    probe_C: float = bounded(1.0, low=0)  # noqa: N815 (scikit-learn's name)
    unfreeze_at: Mapping[str, int] = bounded(dataclasses.MISSING, low=0, default_factory=dict)
    until: Literal["epochs", "plateau"] = "epochs"
    until_metric: PlateauMetric = "val_loss"
    patience: int = bounded(2, low=1)
    min_delta: float = bounded(0.0, low=0)

    def __post_init__(self):
        if self.bn is not None and self.bn not in BN_POLICIES:
            raise ParamGroupError(f"phase {self.name!r}: bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        if (self.steps is None) == (self.epochs is None):
            raise ParamGroupError(f"phase {self.name!r}: set exactly one of steps and epochs")
        length = self.steps if self.steps is not None else self.epochs
        if length < 1:
            raise ParamGroupError(f"phase {self.name!r}: its length must be at least 1 (got {length})")
        policy = self.policy
        if not isinstance(policy, (str, Labels)) and isinstance(policy, Sequence):
            if self.rules:
                raise ParamGroupError(f"phase {self.name!r}: give rules once, as policy or as rules")
            object.__setattr__(self, "rules", tuple(policy))
            object.__setattr__(self, "policy", None)
        object.__setattr__(self, "rules", tuple(self.rules))
        if (self.policy is None) == (not self.rules):
            raise ParamGroupError(
                f"phase {self.name!r}: give exactly one of policy (a name such as head_only, a rules function or "
                "Labels) and rules"
            )
        if not all(isinstance(rule, Rule) for rule in self.rules):
            raise ParamGroupError(f"phase {self.name!r}: rules must be Rule objects")
        problem = out_of_bounds(self)
        if problem:
            raise ParamGroupError(f"phase {self.name!r}: {problem}")
        if self.solver == "linear_probe" and (self.epochs != 1 or self.until != "epochs"):
            raise ParamGroupError(
                f"phase {self.name!r}: a linear_probe phase solves its head once: set epochs: 1 (and no until)"
            )
        if self.probe_C == 0:
            raise ParamGroupError(f"phase {self.name!r}: probe_C must be > 0 (the probe's inverse L2 strength)")
        if self.until == "plateau" and self.epochs is None:
            raise ParamGroupError(f"phase {self.name!r}: until: plateau counts epochs: give epochs, not steps")

    @property
    def freezing(self) -> Freezing:
        """The policy, or the rules when the phase lists them."""
        return self.policy if self.policy is not None else self.rules

    def describe(self) -> str:
        """The freezing for a log line: the policy's name, ``rules: a, b, c`` or ``python:module.name``."""
        if self.rules:
            return "rules: " + ", ".join(rule.pattern for rule in self.rules)
        return describe_freezing(self.policy)

    def describe_length(self) -> str:
        """How long the phase runs, for a log line: ``3 epochs``, ``up to 5 epochs, until val_loss plateaus ...``."""
        if self.solver == "linear_probe":
            return f"1 epoch: the head's linear probe, C={self.probe_C:g}"
        if self.until == "plateau":
            return (f"up to {self.epochs} epochs, until {self.until_metric} plateaus (patience {self.patience}, "
                    f"min_delta {self.min_delta:g})")  # fmt: skip
        return f"{self.epochs} epochs" if self.epochs is not None else f"{self.steps} steps"

    def groups(self, model: nnx.Module) -> ParamGroups:
        """The phase's groups, with ``lrs`` applied; an ``lrs`` key that is no group is an error."""
        groups = self._assign(model)
        unknown = [name for name in self.lrs if name not in groups.groups]
        if unknown:
            raise ParamGroupError(
                f"phase {self.name!r} sets lrs for unknown group(s) {', '.join(unknown)}; "
                f"its groups are {', '.join(groups.groups)}"
            )
        frozen = [name for name in self.lrs if groups.groups[name].frozen]
        if frozen:
            raise ParamGroupError(f"phase {self.name!r} sets lrs for frozen group(s) {', '.join(frozen)}")
        for key in [name for name in self.unfreeze_at if name not in groups.groups or groups.groups[name].frozen]:
            raise ParamGroupError(
                f"phase {self.name!r} sets unfreeze_at for {key!r}, which is no trainable group; its trainable groups "
                f"are {', '.join(n for n, g in groups.groups.items() if not g.frozen)}"
            )
        updated = {}
        for name, group in groups.groups.items():
            if name in self.lrs:
                group = dataclasses.replace(group, lr=self.lrs[name])
            if name in self.unfreeze_at:
                group = dataclasses.replace(group, start_step=self.unfreeze_at[name])
            updated[name] = group
        if self.bn is None:
            return dataclasses.replace(groups, groups=updated)
        # Every BatchNorm in the phase's mode; groups that hold BatchNorm weights say so in the summary.
        holding = {groups.labels[f"{module}.weight"] for module in groups.batch_norms}
        updated = {
            name: dataclasses.replace(group, bn=self.bn) if name in holding else group
            for name, group in updated.items()
        }
        return dataclasses.replace(groups, groups=updated, batch_norms=dict.fromkeys(groups.batch_norms, self.bn))

    def _assign(self, model: nnx.Module) -> ParamGroups:
        from jaxtl.optim.groups import assign
        from jaxtl.optim.policies import get_policy

        policy = self.policy
        if self.rules:
            return assign(model, self.rules)
        if isinstance(policy, Labels):
            return policy.assign(model)
        if isinstance(policy, str):
            if policy.startswith(PYTHON_PREFIX):
                raise ParamGroupError(
                    f"phase {self.name!r} was trained with a freezing written in Python ({policy}); a config file "
                    f"cannot hold it: run it from Python, jaxtl.train.fit(..., freezing={{{self.name!r}: ...}})"
                )
            return assign(model, get_policy(policy)(model))
        return assign(model, list(policy(model)))

    def optax(
        self, groups: ParamGroups, total_steps: int | None = None, default: OptimizerConfig | None = None
    ) -> optax.GradientTransformation:
        """The phase's optimizer; ``default`` (the run's settings) stands in for ``optimizer=None``."""
        from jaxtl.optim.optimizer import build_optimizer

        return build_optimizer(groups, self.optimizer or default or OptimizerConfig(), total_steps)
