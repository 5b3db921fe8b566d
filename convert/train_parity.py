"""Training parity: one fine-tuning recipe run in PyTorch and in jaxtl from the same weights, compared.

A :class:`Recipe` is a small declarative description (phases of which blocks train, at which learning
rates, with the BatchNorm policy of the trainable blocks, ``"train"`` or ``"frozen"`` as everywhere in
jaxtl) that both sides read. The PyTorch side is written the way the recipe in docs/recipe.md writes it:
``requires_grad = False`` on frozen parameters, ``torch.optim.AdamW`` over parameter groups with their
own ``lr``, ``model.train()`` followed by ``model.apply(set_batchnorm_eval)`` (a frozen BatchNorm is one
in torch's eval mode), and a new optimizer at every phase boundary. The jaxtl side uses jaxtl's own
API: built-in policies as :class:`jaxtl.optim.Phase` rules, ``build_optimizer`` (a fresh one per
phase), ``split_model`` and ``make_train_step``.

Both runs see identical float batches in identical order (NCHW to torch, the same values NHWC to
jaxtl), with dropout and stochastic depth off on both sides (rates set to 0), so the runs are
deterministic functions of the weights and the batches. Compared: the loss at every step; at the
end every parameter and BatchNorm running statistic, and eval-mode logits on a held-out batch;
and, in both frameworks, every parameter that a phase freezes (and every BatchNorm statistic a
phase holds frozen) bit-identical at the end of the phase to its start.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import nnx

from convert.parity import Comparison, ComparisonSet, compare, fast_compile_options
from convert.torchvision_state import torch_to_jaxtl_layout
from jaxtl.arrays import to_device
from jaxtl.errors import JaxtlError
from jaxtl.models.registry import fill_rng_state
from jaxtl.models.state_dict import state_dict
from jaxtl.optim import BN_POLICIES, OptimizerConfig, ParamGroups, Phase, Rule, full, head_only, last_n_blocks
from jaxtl.train.losses import BinaryCrossEntropy
from jaxtl.train.step import make_eval_step, make_train_step, merge_model, split_model

# (max abs diff, relative difference) per check; None where no bound applies (the numerics contract,
# docs/numerics.md: N optimizer steps of a recipe, the loss of every step and every parameter and
# running statistic at the end within relative 1e-4, frozen tensors bit-identical).
TOLERANCES: dict[str, tuple[float | None, float | None]] = {
    "loss": (None, 1e-4),
    "parameters": (None, 1e-4),
    "running stats": (None, 1e-4),
    "eval logits": (None, 1e-4),
    "frozen torch": (0.0, None),  # bit-identical
    "frozen jaxtl": (0.0, None),
    "updates": (None, None),  # reported, not judged: see TrainingParityReport.format
    # With float64_reference: each float32 run against PyTorch's float64 run (reported, not judged).
    "float32 torch": (None, None),
    "float32 jaxtl": (None, None),
}
# With float64=True both runs are float64 from end to end: what is left is the implementation.
# Measured: EfficientNet-B0 progressive_unfreezing ends within 1e-12 (relative L2) everywhere.
TOLERANCES_FLOAT64: dict[str, tuple[float | None, float | None]] = {
    **TOLERANCES,
    "loss": (None, 1e-10),
    "parameters": (None, 1e-10),
    "running stats": (None, 1e-10),
    "eval logits": (None, 1e-10),
}
Trains = Literal["head", "last_block", "all"]


class RecipeError(JaxtlError, ValueError):
    """A recipe name or phase that the training parity harness cannot run."""


# The jaxtl groups each kind of phase trains (the names the built-in policies give them).
TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "head": ("head",),
    "last_block": ("head", "blocks"),
    "all": ("head", "backbone"),
}


@dataclasses.dataclass(frozen=True)
class RecipePhase:
    """One phase of a recipe.

    Attributes:
        steps: optimizer steps in the phase.
        trains: ``"head"`` (the new head only), ``"last_block"`` (the head and the last stage:
            ``layer4``; EfficientNet's last stage and the 1x1 conv after it) or ``"all"``.
        lrs: learning rate of each trainable group: ``head``, and ``blocks`` (last_block) or
            ``backbone`` (all).
        bn: BatchNorm policy of the trainable blocks, one of ``jaxtl.optim.BN_POLICIES``: ``"train"``
            (batch statistics, running statistics updated) or ``"frozen"`` (running statistics used
            and kept: torch's eval mode). BatchNorm in frozen blocks is always frozen.
    """

    steps: int
    trains: Trains
    lrs: Mapping[str, float]
    bn: Literal["train", "frozen"] = "train"

    def __post_init__(self):
        if self.trains not in TRAINABLE_GROUPS:
            raise RecipeError(f"trains={self.trains!r} is not one of {', '.join(TRAINABLE_GROUPS)}")
        if set(self.lrs) != set(TRAINABLE_GROUPS[self.trains]):
            raise RecipeError(
                f"a phase training {self.trains!r} needs lrs for {TRAINABLE_GROUPS[self.trains]}, got {dict(self.lrs)}"
            )
        if self.bn not in BN_POLICIES:
            raise RecipeError(f"bn={self.bn!r} is not one of {', '.join(map(repr, BN_POLICIES))}")
        if self.steps < 1:
            raise RecipeError(f"steps={self.steps} must be at least 1")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A fine-tuning recipe: AdamW phases, a new optimizer at each boundary."""

    name: str
    description: str
    phases: tuple[RecipePhase, ...]
    weight_decay: float = 1e-4

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


# The pretrained blocks train at 3e-5 (the recipe's backbone rate), not 1e-4: at 1e-4 a block of
# these random models whose BatchNorm is frozen trains chaotically (its loss rises), and
# 20 float32 steps then depend on rounding. PyTorch's own float32 run of bn_eval at 1e-4 differs from
# its float64 run by 7e-5 in the parameters, and a 6e-6 relative change of the learning rate moves
# them by 3e-4, while float64 runs of torch and jaxtl agree to 3e-15. At 3e-5 the same checks give
# 5e-7, 8e-7 and 1e-6: a comparison at 1e-4 then tests the implementation, not the rounding.
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in [
        Recipe(
            "feature_extraction",
            "backbone frozen (BN frozen), new head, AdamW lr 1e-3 wd 1e-4",
            (RecipePhase(20, "head", {"head": 1e-3}),),
        ),
        Recipe(
            "differential_lr",
            "full fine-tuning, BN in train mode, backbone lr 3e-5, head 3e-4",
            (RecipePhase(20, "all", {"head": 3e-4, "backbone": 3e-5}),),
        ),
        Recipe(
            "progressive_unfreezing",
            "head (lr 1e-3), then + last block (3e-5), then all (backbone 1e-5); a new optimizer at each boundary",
            (
                RecipePhase(7, "head", {"head": 1e-3}),
                RecipePhase(7, "last_block", {"head": 1e-3, "blocks": 3e-5}),
                RecipePhase(6, "all", {"head": 1e-3, "backbone": 1e-5}),
            ),
        ),
        Recipe(
            "bn_eval",
            "head (lr 1e-3) and last block (3e-5) train, BN of the whole model frozen (torch's eval mode)",
            (RecipePhase(20, "last_block", {"head": 1e-3, "blocks": 3e-5}, bn="frozen"),),
        ),
        Recipe(
            "bn_train",
            "head (lr 1e-3) and last block (3e-5) train, the last block's BN in train mode (running stats updated)",
            (RecipePhase(20, "last_block", {"head": 1e-3, "blocks": 3e-5}, bn="train"),),
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


# --- inputs ---------------------------------------------------------------------------------------


def create_training_pair(
    arch: str, *, num_classes: int = 5, seed: int = 0, **options: Any
) -> tuple[torch.nn.Module, nnx.Module]:
    """A random torchvision model ("pretrained": randomised BN statistics) with a new ``num_classes``
    head, replaced as the recipe does (``nn.Linear`` with torch's default init), and its jaxtl conversion.
    ``options`` go to torchvision's builder (a ViT's ``image_size``: the only input size it takes).
    """
    from convert.random_models import randomized_torchvision_model
    from convert.torchvision_state import from_torchvision

    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=seed, **options)
    torch.manual_seed(seed + 1)
    head_name = torch_blocks(torch_model)["head"][0]
    head = torch_model.get_submodule(head_name)
    if isinstance(head, torch.nn.Linear):  # model.fc = nn.Linear(...), model.classifier[3] = nn.Linear(...)
        torch_model.set_submodule(head_name, torch.nn.Linear(head.in_features, num_classes))
    else:  # model.classifier[-1] = nn.Linear(...) behind EfficientNet's and MobileNetV2's dropout
        head[-1] = torch.nn.Linear(head[-1].in_features, num_classes)
    return torch_model, from_torchvision(torch_model, arch, source=f"random torchvision {arch}")


def training_batches(
    steps: int,
    *,
    batch: int = 8,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 5,
    seed: int = 0,
    multilabel: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` float batches ((batch, 3, H, W) standard-normal images, as normalised images are, and
    int64 labels, or ``multilabel`` (batch, C) float 0/1 targets, each class present with probability 0.4),
    drawn in order from one ``torch.Generator``."""
    generator = torch.Generator().manual_seed(seed)

    def labels() -> torch.Tensor:
        if multilabel:
            return (torch.rand(batch, num_classes, generator=generator) < 0.4).float()
        return torch.randint(0, num_classes, (batch,), generator=generator)

    return [(torch.randn(batch, 3, *size, generator=generator), labels()) for _ in range(steps)]


def _disable_torch_dropout(torch_model: torch.nn.Module) -> None:
    for module in torch_model.modules():
        if isinstance(module, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
            module.p = 0.0


def disable_dropout(torch_model: torch.nn.Module, jax_model: nnx.Module) -> None:
    """Dropout and stochastic depth rates set to 0 on both sides: the runs become deterministic.

    The masks cannot match (torch's and JAX's generators differ), so they are taken out; at rate 0
    torch's Dropout and torchvision's StochasticDepth, and nnx.Dropout, pass their input unchanged.
    """
    _disable_torch_dropout(torch_model)
    for _, module in nnx.iter_modules(jax_model):
        if isinstance(module, nnx.Dropout):  # jaxtl's StochasticDepth is an nnx.Dropout
            module.rate = 0.0


# --- the PyTorch side, as the recipe writes it ------------------------------------------------------


def set_batchnorm_eval(module: torch.nn.Module) -> None:
    """The recipe's BatchNorm advice (docs/recipe.md, "BatchNorm during transfer learning"): eval mode."""
    if isinstance(module, torch.nn.BatchNorm2d):
        module.eval()


def torch_blocks(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Module names of the head and of the last block of a torchvision model, as the recipe names them.

    Read off the torchvision module, independently of jaxtl's ``blocks()``: ResNet's ``fc`` and ``layer4``;
    EfficientNet's ``classifier`` and its last stage with the 1x1 conv that follows it; MobileNet's
    ``classifier`` (V2) or ``classifier.3`` (V3, whose pretrained ``classifier.0`` stays in the backbone, the
    last block's end) and its last run of blocks of one width with the 1x1 conv that follows them.
    """
    if isinstance(model, torchvision.models.ResNet):
        return {"head": ("fc",), "last_block": ("layer4",)}
    if isinstance(model, torchvision.models.EfficientNet):
        last = len(model.features) - 1
        return {"head": ("classifier",), "last_block": (f"features.{last - 1}", f"features.{last}")}
    if isinstance(model, (torchvision.models.MobileNetV2, torchvision.models.MobileNetV3)):
        last = len(model.features) - 1
        width = model.features[last - 1].out_channels
        first = last - 1
        while first > 1 and model.features[first - 1].out_channels == width:
            first -= 1
        stage = tuple(f"features.{i}" for i in range(first, last + 1))
        if isinstance(model, torchvision.models.MobileNetV3):
            return {"head": ("classifier.3",), "last_block": (*stage, "classifier.0")}
        return {"head": ("classifier",), "last_block": stage}
    if isinstance(model, torchvision.models.ConvNeXt):
        # classifier[2] is replaced; the last stage of CNBlocks (no downsample follows it) and the pretrained
        # classifier.0 LayerNorm are the last block.
        last = len(model.features) - 1
        return {"head": ("classifier.2",), "last_block": (f"features.{last}", "classifier.0")}
    if isinstance(model, torchvision.models.SwinTransformer):
        # head is replaced; the last stage of Swin blocks (no patch merging follows it) and the final norm.
        return {"head": ("head",), "last_block": (f"features.{len(model.features) - 1}", "norm")}
    if isinstance(model, torchvision.models.VisionTransformer):
        # heads.head is replaced (model.heads.head = nn.Linear(...)); the last encoder layer, the final norm and,
        # where there is one, the pretrained heads.pre_logits are the last block.
        last = f"encoder.layers.{list(model.encoder.layers.named_children())[-1][0]}"
        pre_logits = ("heads.pre_logits",) if hasattr(model.heads, "pre_logits") else ()
        return {"head": ("heads.head",), "last_block": (last, "encoder.ln", *pre_logits)}
    raise RecipeError(f"{type(model).__name__}: the training parity harness does not know this architecture")


def _torch_param_groups(model: torch.nn.Module, phase: RecipePhase) -> dict[str, list[torch.nn.Parameter]]:
    """The phase's trainable parameters by group, chosen by name as the recipe does (``name.startswith("fc.")``)."""
    blocks = torch_blocks(model)
    head = tuple(f"{name}." for name in blocks["head"])
    last = tuple(f"{name}." for name in blocks["last_block"])
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in TRAINABLE_GROUPS[phase.trains]}
    for name, param in model.named_parameters():
        if name.startswith(head):
            groups["head"].append(param)
        elif phase.trains == "last_block" and name.startswith(last):
            groups["blocks"].append(param)
        elif phase.trains == "all":
            groups["backbone"].append(param)
    return groups


def _torch_trainable_modules(model: torch.nn.Module, phase: RecipePhase) -> list[torch.nn.Module]:
    if phase.trains == "all":
        return [model]
    blocks = torch_blocks(model)
    names = blocks["head"] + (blocks["last_block"] if phase.trains == "last_block" else ())
    return [model.get_submodule(name) for name in names]


def _torch_snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def train_torch(
    model: torch.nn.Module,
    recipe: Recipe,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    pos_weight: Sequence[float] | None = None,
) -> tuple[list[float], list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """Runs ``recipe`` on ``model`` in place, the recipe's way: ``CrossEntropyLoss`` of class indices, or
    ``BCEWithLogitsLoss(pos_weight=pos_weight)`` of multi-hot targets (labels of shape (N, C)).

    Returns:
        The loss of every step, and (phase, tensor name, value at the phase's start, at its end) of
        every parameter frozen in a phase and every running statistic of a BatchNorm in eval mode.
    """
    ce = torch.nn.CrossEntropyLoss()
    weights = None if pos_weight is None else torch.tensor(pos_weight)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 1:
            return ce(logits, labels)
        positive = None if weights is None else weights.to(logits.dtype)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                                    pos_weight=positive)  # fmt: skip

    losses: list[float] = []
    held: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    for index, phase in enumerate(recipe.phases):
        groups = _torch_param_groups(model, phase)
        for param in model.parameters():
            param.requires_grad = False
        for params in groups.values():
            for param in params:
                param.requires_grad = True
        # A new optimizer at every boundary, over the trainable parameters only, as the recipe does.
        optimizer = torch.optim.AdamW(
            [{"params": params, "lr": phase.lrs[name]} for name, params in groups.items()],
            weight_decay=recipe.weight_decay,
        )
        start = _torch_snapshot(model)
        for _ in range(phase.steps):
            images, labels = next(batches)
            model.train()
            model.apply(set_batchnorm_eval)
            if phase.bn == "train":
                for module in _torch_trainable_modules(model, phase):
                    module.train()
            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        end = _torch_snapshot(model)
        phase_name = f"phase {index + 1}"
        held += [(phase_name, n, start[n], end[n]) for n, p in model.named_parameters() if not p.requires_grad]
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.training:
                held += [
                    (phase_name, f"{module_name}.{s}", start[f"{module_name}.{s}"], end[f"{module_name}.{s}"])
                    for s in ("running_mean", "running_var")
                ]
    return losses, held


# --- the jaxtl side ---------------------------------------------------------------------------------


def jaxtl_phase(phase: RecipePhase, recipe: Recipe, name: str) -> Phase:
    """The recipe phase as a jaxtl Phase: a built-in policy, per-group lrs, a fresh optimizer."""
    policy = {"head": head_only, "last_block": last_n_blocks(1), "all": full()}[phase.trains]

    def rules(model: nnx.Module) -> list[Rule]:
        result = policy(model)
        if phase.bn == "frozen":  # BN of the trainable backbone blocks frozen too
            result = [
                dataclasses.replace(r, bn="frozen") if r.group_name != "head" and not r.frozen else r for r in result
            ]
        return result

    config = OptimizerConfig(name="adamw", weight_decay=recipe.weight_decay)
    return Phase(name, rules, steps=phase.steps, optimizer=config, lrs=dict(phase.lrs), carry_state=False)


def compiled_with(jitted: Callable, compiler_options: Mapping[str, Any] | None) -> Callable:
    """``jitted``, compiled with ``compiler_options`` at its first call (None: as jax would)."""
    if not compiler_options:
        return jitted
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = jitted.lower(*args).compile(compiler_options=dict(compiler_options))
        return compiled(*args)

    return call


def train_jaxtl(
    model: nnx.Module,
    recipe: Recipe,
    batches: Iterator[tuple[jax.Array, jax.Array]],
    *,
    compiler_options: Mapping[str, Any] | None = None,
    pos_weight: Sequence[float] | None = None,
) -> tuple[nnx.Module, list[float], list[tuple[str, str, np.ndarray, np.ndarray]], ParamGroups]:
    """Runs ``recipe`` with jaxtl's phases and train step; batches are NHWC float32 (not normalised again).

    ``compiler_options`` go to XLA for each phase's step (float64 runs compile with fewer passes). Labels of
    shape (N, C) are a multi-label task's targets: jaxtl's binary cross-entropy with ``pos_weight``.

    Returns:
        The trained model, the loss of every step, the held tensors (as :func:`train_torch`), and
        the groups of the last phase.
    """
    losses: list[float] = []
    held: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    step_index = 0
    groups = None
    loss_fn = None  # cross-entropy, or binary cross-entropy from the first batch of multi-hot labels
    for index, recipe_phase in enumerate(recipe.phases):
        phase = jaxtl_phase(recipe_phase, recipe, f"phase {index + 1}")
        groups = phase.groups(model)
        start = state_dict(model)
        graphdef, state = split_model(model, groups)
        optimizer = phase.optax(groups)
        opt_state = optimizer.init(state.trainable)
        step = compiled_with(make_train_step(graphdef, optimizer, donate=False, loss_fn=loss_fn), compiler_options)
        for _ in range(recipe_phase.steps):
            images, labels = next(batches)
            if loss_fn is None and labels.ndim == 2:
                loss_fn = BinaryCrossEntropy(pos_weight=pos_weight)
                step = compiled_with(make_train_step(graphdef, optimizer, donate=False, loss_fn=loss_fn),
                                     compiler_options)  # fmt: skip
            mask = jnp.ones(labels.shape[:1], bool)
            state, opt_state, metrics = step(state, opt_state, images, labels, mask, jnp.asarray(step_index))
            losses.append(float(metrics["loss"]))
            step_index += 1
        model = merge_model(graphdef, state)
        end = state_dict(model)
        held += [(phase.name, n, start[n], end[n]) for n in groups.labels if not groups.is_trainable(n)]
        for module_name, policy in groups.batch_norms.items():
            if policy == "frozen":
                held += [
                    (phase.name, f"{module_name}.{s}", start[f"{module_name}.{s}"], end[f"{module_name}.{s}"])
                    for s in ("running_mean", "running_var")
                ]
    return model, losses, held, groups


# --- comparison and report --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingParityReport(ComparisonSet):
    """Every comparison of one training-parity run, and where the runs part if they do.

    Attributes:
        arch, recipe, input_shape: what ran (input NHWC).
        dtype: ``"float32"`` or ``"float64"`` (both runs, end to end).
        losses: (torch, jaxtl) loss of every step.
        comparisons: Comparison records; ``check`` is a key of :data:`TOLERANCES`.
        groups: jaxtl group (in the last phase) of every parameter and running statistic.
        shapes: shape of every parameter and running statistic.
    """

    arch: str
    recipe: Recipe
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    losses: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def tolerances(self) -> dict[str, tuple[float | None, float | None]]:
        return TOLERANCES_FLOAT64 if self.dtype == "float64" else TOLERANCES

    @property
    def first_loss_divergence(self) -> int | None:
        """The first step (0-based) whose losses differ beyond the bound, or None."""
        return next((i for i, c in enumerate(self.of("loss")) if not c.passed), None)

    def largest_difference(self) -> Comparison:
        """Among the final parameters and running statistics, the one with the largest relative L2."""
        return max(self.of("parameters") + self.of("running stats"), key=lambda c: c.rel_l2)

    def format(self) -> str:
        """A table of the checks, a per-group table, and the divergence: first step, group and layer."""
        phases = " -> ".join(
            f"{p.trains} ({p.steps} steps{'' if p.trains == 'head' else f', BN {p.bn}'})" for p in self.recipe.phases
        )
        title = (
            f"training parity {self.arch}, recipe {self.recipe.name}: {self.recipe.steps} steps on "
            f"{self.input_shape} {self.dtype}"
        )
        lines = [
            f"{title} (NHWC): {'PASS' if self.passed else 'FAIL'}",
            f"  {self.recipe.description}; phases: {phases}",
            f"  {'check':<14} {'compared':>8} {'max |diff|':>11} {'rel':>10}   bound (abs, rel)   result",
        ]
        for check in dict.fromkeys(c.check for c in self.comparisons):
            group = self.of(check)
            bound = ", ".join("-" if b is None else f"{b:.0e}" for b in self.tolerances[check])
            if self.tolerances[check] == (None, None):
                result = "info"
            else:
                result = "ok" if all(c.passed for c in group) else f"FAIL ({sum(not c.passed for c in group)})"
            max_abs = max(c.max_abs for c in group)
            rel = max(c.rel_l2 for c in group)
            lines.append(f"  {check:<14} {len(group):>8} {max_abs:>11.2e} {rel:>10.2e}   ({bound:<13})    {result}")
        if any(self.tolerances[c.check] == (None, None) for c in self.comparisons):
            lines.append(
                "  info rows, not judged: updates = end - start of each trained tensor (float32 resolves it to ~1e-7 "
                "of the tensor, not of the update); float32 torch / jaxtl = each run against PyTorch's float64 run"
            )
        lines += self._group_table()
        lines += self._divergence()
        return "\n".join(lines)

    def _group_table(self) -> list[str]:
        final = self.of("parameters") + self.of("running stats")
        if not final:
            return []
        lines = [f"  per group (last phase): {'group':<10} {'tensors':>7} {'values':>10}   worst rel L2  tensor"]
        for group in dict.fromkeys(self.groups[c.name] for c in final):
            members = [c for c in final if self.groups[c.name] == group]
            worst = max(members, key=lambda c: c.rel_l2)
            values = sum(int(np.prod(self.shapes[c.name])) for c in members)
            lines.append(f"  {'':<24}{group:<10} {len(members):>7} {values:>10,}   {worst.rel_l2:>12.2e}  {worst.name}")
        return lines

    def _divergence(self) -> list[str]:
        lines = []
        losses = self.of("loss")
        first = self.first_loss_divergence
        if first is None and losses:
            worst = max(range(len(losses)), key=lambda i: losses[i].rel_l2)
            lines.append(f"  losses agree at every step (worst: step {worst}, rel {losses[worst].rel_l2:.2e})")
        elif first is not None:
            expected, actual = self.losses[first]
            lines.append(
                f"  losses part first at step {first}: torch {expected:.7g}, jaxtl {actual:.7g}, "
                f"rel {losses[first].rel_l2:.2e} (bound {self.tolerances['loss'][1]:.0e})"
            )
        final = self.of("parameters") + self.of("running stats")
        if final:
            worst = self.largest_difference()
            layer = worst.name.rsplit(".", 1)[0]
            shape = self.shapes[worst.name]
            lines.append(
                f"  largest final difference: group {self.groups[worst.name]}, layer {layer}: {worst.check} "
                f"{worst.name} {shape} ({int(np.prod(shape)):,} values): max|diff| {worst.max_abs:.3e}, "
                f"rel L2 {worst.rel_l2:.3e}"
            )
        for failure in self.failures[:10]:
            if failure.check != "loss":
                lines.append(
                    f"  failed: {failure.check} {failure.name}: max|diff| {failure.max_abs:.3e}, "
                    f"rel {failure.rel_l2:.3e}"
                )
        return lines


def check_training_parity(
    torch_model: torch.nn.Module,
    jax_model: nnx.Module,
    arch: str,
    recipe: Recipe,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    eval_batch: torch.Tensor | None = None,
    *,
    float64: bool = False,
    float64_reference: bool = False,
    pos_weight: Sequence[float] | None = None,
) -> TrainingParityReport:
    """Runs ``recipe`` in both frameworks on copies of the models and compares the runs.

    Args:
        torch_model: the torchvision model with its new head; left unchanged.
        jax_model: its jaxtl conversion (or a deliberately altered one); left unchanged.
        arch: registry name, for the report.
        recipe: what to run; ``recipe.steps`` batches are used.
        batches: (images (N, 3, H, W) float32, labels (N,) int64) in training order; labels (N, C) of 0/1:
            a multi-label task, ``BCEWithLogitsLoss(pos_weight=pos_weight)`` against jaxtl's binary cross-entropy.
        eval_batch: images (M, 3, H, W) whose eval-mode logits are compared at the end; the first
            batch when None.
        float64: run both sides in float64 from end to end (torch ``.double()``, jaxtl's state cast
            with ``jax.enable_x64``), against :data:`TOLERANCES_FLOAT64`: with float32 rounding out
            of the way, what remains is a difference of implementation. Where a float32 comparison
            fails, this tells rounding from a bug.
        float64_reference: also run the recipe in PyTorch in float64 and report how far each
            float32 run (torch's own and jaxtl's) ends from it: the size of float32 rounding on
            this recipe, against which a failure can be judged (not judged itself).

    Returns:
        The report; ``report.format()`` is the text.
    """
    if len(batches) < recipe.steps:
        raise ValueError(f"recipe {recipe.name} runs {recipe.steps} steps but {len(batches)} batches were given")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float64 if float64 else torch.float32
    batches = [(images.to(dtype), labels) for images, labels in batches[: recipe.steps]]
    eval_images = (batches[0][0] if eval_batch is None else eval_batch).to(dtype)
    reference, candidate = copy.deepcopy(torch_model).to(dtype), nnx.clone(jax_model)
    disable_dropout(reference, candidate)
    fill_rng_state(candidate)  # a model built on abstract_model elsewhere
    start = state_dict(candidate)
    torch_losses, torch_held = train_torch(reference, recipe, iter(batches), pos_weight)
    x64 = jax.enable_x64(True) if float64 else contextlib.nullcontext()
    with x64, jax.default_matmul_precision("highest"):
        if float64:
            _cast_floats(candidate, jnp.float64)
        jax_batches = [(to_device(_nhwc(x)), to_device(y.numpy())) for x, y in batches]
        # The float64 run is a reference: XLA:CPU compiles it 2-3x faster without LLVM's optimisation.
        options = fast_compile_options() if float64 else None
        candidate, jax_losses, jax_held, groups = train_jaxtl(
            candidate, recipe, iter(jax_batches), compiler_options=options, pos_weight=pos_weight
        )
        report = TrainingParityReport(
            arch,
            recipe,
            tuple(jax_batches[0][0].shape),
            str(dtype).removeprefix("torch."),
            list(zip(torch_losses, jax_losses)),
        )
        tolerances = report.tolerances
        for step, (expected, actual) in enumerate(report.losses):
            report.comparisons.append(
                compare("loss", f"step {step}", np.float64(expected), np.float64(actual), tolerances["loss"])
            )
        _compare_final(report, reference, candidate, start, groups)
        _compare_eval_logits(report, reference, candidate, groups, eval_images, options)
    for check, held in (("frozen torch", torch_held), ("frozen jaxtl", jax_held)):
        for phase, name, before, after in held:
            report.comparisons.append(compare(check, f"{phase}: {name}", before, after, tolerances[check]))
    if float64_reference and not float64:
        _compare_with_float64(report, torch_model, candidate, recipe, batches, reference)
    return report


def _nhwc(images: torch.Tensor) -> np.ndarray:
    """NCHW -> NHWC, keeping the dtype (float64 runs stay float64)."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def _cast_floats(model: nnx.Module, dtype) -> None:
    """Every floating-point array of ``model`` (parameters, BN statistics) cast to ``dtype`` in place."""

    def cast(value):
        # On the host: an eager astype (or jnp.asarray) compiles one XLA program per shape (~50 for EfficientNet-B0).
        return to_device(value, dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value

    nnx.update(model, jax.tree.map(cast, nnx.state(model)))


def _compare_with_float64(
    report: TrainingParityReport, torch_model, candidate, recipe: Recipe, batches, reference
) -> None:
    """Distances of the float32 runs from PyTorch's float64 run: losses per step, final tensors."""
    reference64 = copy.deepcopy(torch_model).double()
    _disable_torch_dropout(reference64)
    losses64, _ = train_torch(reference64, recipe, iter([(x.double(), y) for x, y in batches]))
    final64 = torch_to_jaxtl_layout(candidate, reference64.state_dict())
    runs = {
        "float32 torch": ([t for t, _ in report.losses], torch_to_jaxtl_layout(candidate, reference.state_dict())),
        "float32 jaxtl": ([j for _, j in report.losses], state_dict(candidate)),
    }
    for check, (losses, final) in runs.items():
        for step, (expected, actual) in enumerate(zip(losses64, losses)):
            report.comparisons.append(
                compare(check, f"loss step {step}", np.float64(expected), np.float64(actual), TOLERANCES[check])
            )
        for name, expected in final64.items():
            report.comparisons.append(compare(check, name, expected, final[name], TOLERANCES[check]))


def _compare_final(
    report: TrainingParityReport, reference, candidate, start: dict[str, np.ndarray], groups: ParamGroups
) -> None:
    torch_final = torch_to_jaxtl_layout(candidate, reference.state_dict())
    jax_final = state_dict(candidate)
    torch_start = start  # both runs start from the same values (the conversion is exact)
    for name in torch_final:  # torch's order: forward order, so the first failure is the earliest layer
        is_stat = name.endswith((".running_mean", ".running_var"))
        report.groups[name] = groups.labels[f"{name.rsplit('.', 1)[0]}.weight" if is_stat else name]
        report.shapes[name] = tuple(jax_final[name].shape)
        check = "running stats" if is_stat else "parameters"
        report.comparisons.append(compare(check, name, torch_final[name], jax_final[name], report.tolerances[check]))
        expected_update = torch_final[name].astype(np.float64) - torch_start[name]
        if np.any(expected_update):
            actual_update = jax_final[name].astype(np.float64) - torch_start[name]
            report.comparisons.append(compare("updates", name, expected_update, actual_update, TOLERANCES["updates"]))


def _compare_eval_logits(
    report: TrainingParityReport,
    reference,
    candidate,
    groups: ParamGroups,
    images: torch.Tensor,
    compiler_options: Mapping[str, Any] | None = None,
) -> None:
    with torch.no_grad():
        expected = reference.eval()(images).numpy()
    graphdef, state = split_model(candidate, groups)
    labels = jnp.zeros((images.shape[0],), jnp.int32)
    eval_step = compiled_with(make_eval_step(graphdef), compiler_options)
    actual, _ = eval_step(state, to_device(_nhwc(images)), labels, jnp.ones(labels.shape, bool))
    report.comparisons.append(
        compare("eval logits", "logits", expected, np.asarray(actual), report.tolerances["eval logits"])
    )


def run_training_parity(
    arch: str,
    recipe: str | Recipe,
    *,
    batch: int = 8,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 5,
    seed: int = 0,
    float64: bool = False,
    float64_reference: bool = False,
    multilabel: bool = False,
    pos_weight: Sequence[float] | None = None,
    builder_options: Mapping[str, Any] | None = None,
) -> TrainingParityReport:
    """:func:`check_training_parity` on a fresh random pair (:func:`create_training_pair`, torchvision's builder
    given ``builder_options``: ``{"image_size": 32}`` for a ViT on 32x32 batches) and batches
    (``multilabel``: multi-hot targets and binary cross-entropy with ``pos_weight``)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    options = dict(builder_options or {})
    torch_model, jax_model = create_training_pair(arch, num_classes=num_classes, seed=seed, **options)
    batches = training_batches(
        recipe.steps + 1, batch=batch, size=size, num_classes=num_classes, seed=seed + 1, multilabel=multilabel
    )
    return check_training_parity(
        torch_model,
        jax_model,
        arch,
        recipe,
        batches[:-1],
        eval_batch=batches[-1][0],
        float64=float64,
        float64_reference=float64_reference,
        pos_weight=pos_weight,
    )


__all__ = [
    "RECIPES",
    "TOLERANCES",
    "TOLERANCES_FLOAT64",
    "Recipe",
    "RecipeError",
    "RecipePhase",
    "TrainingParityReport",
    "check_training_parity",
    "create_training_pair",
    "disable_dropout",
    "get_recipe",
    "jaxtl_phase",
    "run_training_parity",
    "set_batchnorm_eval",
    "torch_blocks",
    "train_jaxtl",
    "train_torch",
    "training_batches",
]
