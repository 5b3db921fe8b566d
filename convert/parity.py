"""Numerical parity of a jaxtl model with the torchvision model it was converted from.

Checks eval-mode logits, train-mode logits and the BatchNorm running statistics after one forward,
the cross-entropy gradient of every parameter, and the logits of the model exported back to
torchvision, each against the tolerances of the numerics contract (docs/numerics.md). When logits
differ, the report names the first stage where the two models part, from per-stage activations.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
import torchvision
from flax import nnx

from convert.artifacts import torchvision_module
from convert.torchvision_state import to_torchvision, torch_to_jaxtl_layout
from jaxtl.arrays import to_device
from jaxtl.models.names import dotted_name

# (max abs diff, relative L2) per check; None where the contract sets no bound.
TOLERANCES: dict[str, tuple[float | None, float | None]] = {
    "eval logits": (1e-4, 1e-5),
    "train logits": (1e-4, 1e-5),
    "running stats": (1e-4, 1e-5),
    "gradients": (None, 1e-4),  # compared in float64, see check_parity
    "export logits": (1e-5, None),
}


def relative_l2(expected: np.ndarray, actual: np.ndarray, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) (the plain norm of the difference if both are zero)."""
    expected = np.asarray(expected, np.float64)
    difference = np.linalg.norm(np.asarray(actual, np.float64) - expected)
    norm = max(float(np.linalg.norm(expected)), floor)
    return float(difference / norm) if norm > 0 else float(difference)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor compared between torch (expected) and jaxtl (actual)."""

    check: str
    name: str
    max_abs: float
    rel_l2: float
    max_abs_limit: float | None
    rel_l2_limit: float | None

    @property
    def passed(self) -> bool:
        within_abs = self.max_abs_limit is None or self.max_abs <= self.max_abs_limit
        within_rel = self.rel_l2_limit is None or self.rel_l2 <= self.rel_l2_limit
        return within_abs and within_rel


def compare(
    check: str,
    name: str,
    expected,
    actual,
    limits: tuple[float | None, float | None] | None = None,
    *,
    floor: float = 0.0,
) -> Comparison:
    """Compares two arrays of the same shape; ``limits`` default to ``TOLERANCES[check]``.

    ``floor`` bounds the denominator of the relative L2 difference from below (see
    ``gradient_floor``).
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise ValueError(f"{check} {name}: torch shape {expected.shape} != jaxtl shape {actual.shape}")
    max_abs_limit, rel_limit = limits if limits is not None else TOLERANCES[check]
    max_abs = float(np.max(np.abs(expected.astype(np.float64) - actual))) if expected.size else 0.0
    return Comparison(check, name, max_abs, relative_l2(expected, actual, floor), max_abs_limit, rel_limit)


def gradient_floor(gradients: dict[str, np.ndarray]) -> float:
    """1e-6 of the largest gradient norm: the scale below which a gradient tensor is numerically zero.

    Some gradients are exactly zero in exact arithmetic: the bias of a BatchNorm whose output feeds
    (through a conv) another BatchNorm in train mode is removed by that BatchNorm's mean, as in
    EfficientNet's blocks without a residual. Both frameworks then return rounding noise (1e-15 in
    float64), whose relative difference means nothing; it is measured against this floor instead.
    """
    return 1e-6 * max(float(np.linalg.norm(g)) for g in gradients.values())


class ComparisonSet:
    """What a report of ``self.comparisons`` answers: passed, the failures, one check's records, its worst."""

    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def of(self, check: str) -> list[Comparison]:
        return [c for c in self.comparisons if c.check == check]

    def worst(self, check: str) -> Comparison:
        """The comparison of ``check`` with the largest relative L2 difference."""
        return max(self.of(check), key=lambda c: c.rel_l2)


@dataclasses.dataclass
class ParityReport(ComparisonSet):
    """All comparisons of one parity run, and where the models first diverge if they do."""

    arch: str
    input_shape: tuple[int, ...]
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    divergence: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def format(self) -> str:
        """A table: per check the number of tensors, the worst max-abs and relative L2, and the bounds."""
        lines = [f"parity {self.arch} on input {self.input_shape} (NHWC): {'PASS' if self.passed else 'FAIL'}"]
        lines.append(f"  {'check':<14} {'tensors':>7} {'max |diff|':>11} {'rel L2':>10}   bound (abs, rel)   result")
        for check in dict.fromkeys(c.check for c in self.comparisons):
            group = self.of(check)
            max_abs = max(c.max_abs for c in group)
            rel = max(c.rel_l2 for c in group)
            bound = ", ".join("-" if b is None else f"{b:.0e}" for b in TOLERANCES.get(check, (None, None)))
            result = "ok" if all(c.passed for c in group) else f"FAIL ({sum(not c.passed for c in group)})"
            lines.append(f"  {check:<14} {len(group):>7} {max_abs:>11.2e} {rel:>10.2e}   ({bound:<13})    {result}")
        for failure in self.failures[:10]:
            lines.append(
                f"  failed: {failure.check} {failure.name}: max|diff| {failure.max_abs:.3e}, "
                f"rel L2 {failure.rel_l2:.3e}"
            )
        lines.extend(f"  {line}" for line in self.notes + self.divergence)
        return "\n".join(lines)


def to_nhwc(x: torch.Tensor, *, channels_last: bool = False) -> np.ndarray:
    """A torch activation in jaxtl's layout: NCHW -> NHWC (unless torch's is ``channels_last`` already, as Swin's
    stages are); (N, C, 1, 1) pooled features -> (N, C)."""
    array = x.detach().float().numpy().copy()  # a copy: torchvision applies ReLU in place after the hook
    return np.transpose(array, (0, 2, 3, 1)) if array.ndim == 4 and not channels_last else array


def torch_intermediates(
    model: torch.nn.Module, x: torch.Tensor, names: list[str], channels_last: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Outputs of the submodules ``names`` during one forward of ``model``, in jaxtl layout; those whose names start
    with one of ``channels_last`` are NHWC in torch too."""
    captured: dict[str, np.ndarray] = {}

    def hook(name: str):
        layout = name.startswith(channels_last) if channels_last else False
        return lambda module, inputs, output: captured.__setitem__(name, to_nhwc(output, channels_last=layout))

    hooks = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: captured[name] for name in names}


def first_divergence(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], limits) -> list[str]:
    """Lines naming the first stage (in forward order) whose activations differ beyond ``limits``."""
    lines = []
    for name, reference in expected.items():
        candidate = np.asarray(actual[name])
        # torch's pooled features are (N, C, 1, 1) where jaxtl's are (N, C).
        result = compare("stage", name, reference.reshape(candidate.shape), candidate, limits)
        lines.append(f"{name:<10} max|diff| {result.max_abs:.3e}  rel L2 {result.rel_l2:.3e}")
        if not result.passed:
            return [f"first diverging stage: {name} (stage outputs up to it:)", *("  " + line for line in lines)]
    return ["no stage diverges beyond the bounds; the difference is in the final layer only"]


def _jax_forward(model: nnx.Module) -> Callable:
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        module = nnx.merge(graphdef, state, copy=True)
        return module(x), nnx.state(module, nnx.BatchStat)

    return lambda x: forward(state, x)


def eval_logits(model: nnx.Module, x: torch.Tensor) -> np.ndarray:
    """``model``'s eval-mode logits of the NCHW batch ``x``, computed as one compiled program (called eagerly, each
    of a model's ops compiles its own). Leaves ``model`` in eval mode."""
    model.eval()
    logits, _ = _jax_forward(model)(to_device(to_nhwc(x)))
    return np.asarray(logits)


# XLA:CPU spends most of a float64 gradient's compile in LLVM optimisation and the fusion
# emitters; the reference computation at a few pixels does not need either (compile 2-3x faster).
_FAST_COMPILE_CPU = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def fast_compile_options() -> dict:
    """XLA options for a float64 reference computation: ``_FAST_COMPILE_CPU`` on CPU, none elsewhere."""
    return dict(_FAST_COMPILE_CPU) if jax.default_backend() == "cpu" else {}


def _jax_loss_and_grads(model: nnx.Module, *, fast_compile: bool = False) -> Callable:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_grads(params, rest, x, labels):
        def loss_fn(params):
            # copy=True: BatchNorm writes its statistics inside a differentiated function
            # (docs/numerics.md, trap 18).
            module = nnx.merge(graphdef, params, rest, copy=True)
            logits = module(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, nnx.state(module, nnx.BatchStat))

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def run(x, labels):
        lowered = jax.jit(loss_and_grads).lower(params, rest, x, labels)
        return lowered.compile(compiler_options=fast_compile_options() if fast_compile else {})(params, rest, x, labels)

    return run


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {dotted_name(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def check_parity(
    torch_model: torch.nn.Module,
    jax_model: nnx.Module,
    arch: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    gradients: bool = True,
    float32_gradients: bool = False,
) -> ParityReport:
    """Compares ``jax_model`` with ``torch_model`` on the batch ``x`` (NCHW), leaving both unchanged.

    Logits and BatchNorm statistics are compared in float32 at the highest matmul precision on
    both sides (no TF32 on GPUs). Gradients are compared in float64: a ReLU whose input lies within
    float32 rounding of zero (and there are such units in every ResNet at these sizes) passes or
    blocks its gradient depending on the last bit, which moves whole gradient tensors by ~1e-3 in
    either framework. In float64 no unit lies that close, so the comparison tests the backward
    pass itself. With ``float32_gradients`` the float32 agreement is reported too (not judged).
    ``gradients=False`` leaves the float64 gradients out: for the largest members of a family, whose blocks are
    those of a smaller member whose gradients are compared, and whose float64 copies take 10 GB and more.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x_nhwc = to_device(to_nhwc(x))
    report = ParityReport(arch, tuple(x_nhwc.shape))
    with jax.default_matmul_precision("highest"):
        expected = _check_forward(report, "eval", torch_model, jax_model, x, x_nhwc)
        _check_forward(report, "train", torch_model, jax_model, x, x_nhwc)
        if gradients:
            torch_grads, jax_grads = _gradients(torch_model, jax_model, x, labels, torch.float64)
            floor = gradient_floor(torch_grads)
            for name in torch_grads:  # torch's order: the first failure listed is the earliest layer.
                report.comparisons.append(compare("gradients", name, torch_grads[name], jax_grads[name], floor=floor))
        if float32_gradients:
            float32 = _gradients(torch_model, jax_model, x, labels, torch.float32)
            report.notes.append(_float32_gradient_summary(*float32))
        _check_export(report, torch_model, jax_model, arch, x, expected)
    return report


def _set_mode(torch_model: torch.nn.Module, jax_model: nnx.Module, mode: str) -> None:
    """Puts both models in ``mode``; in train mode dropout and stochastic depth stay off on both
    sides, so that BatchNorm's train-mode behaviour is compared without random masks."""
    torch_model.train(mode == "train")
    for module in torch_model.modules():
        if isinstance(module, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
            module.eval()
    if mode == "train":
        jax_model.train()
        jax_model.set_attributes(deterministic=True, raise_if_not_found=False)
    else:
        jax_model.eval()


def _check_forward(report: ParityReport, mode: str, torch_model, jax_model, x, x_nhwc) -> np.ndarray:
    """Logits in ``mode`` ("eval" or "train") and, in train mode, the updated BN running statistics."""
    reference = copy.deepcopy(torch_model)
    candidate = nnx.clone(jax_model)
    _set_mode(reference, candidate, mode)
    with torch.no_grad():
        expected = reference(x).numpy()
    actual, statistics = _jax_forward(candidate)(x_nhwc)
    report.comparisons.append(compare(f"{mode} logits", "logits", expected, actual))
    if not report.comparisons[-1].passed:
        report.divergence += _locate_divergence(mode, torch_model, jax_model, x, x_nhwc)
    if mode == "train":
        torch_stats = reference.state_dict()
        for key, value in _flat(statistics).items():
            report.comparisons.append(compare("running stats", key, torch_stats[key].numpy(), value))
    return expected


def _float32_gradient_summary(torch_grads: dict[str, np.ndarray], jax_grads: dict[str, np.ndarray]) -> str:
    bound = TOLERANCES["gradients"][1]
    floor = gradient_floor(torch_grads)
    errors = {name: relative_l2(torch_grads[name], jax_grads[name], floor) for name in torch_grads}
    worst = max(errors, key=errors.get)
    within = sum(error <= bound for error in errors.values())
    return (
        f"float32 gradients: {within}/{len(errors)} tensors within rel L2 {bound:.0e}, worst {worst} "
        f"{errors[worst]:.2e}"
    )


def _gradients(torch_model, jax_model, x, labels, dtype: torch.dtype):
    """Cross-entropy gradients of every parameter in train mode, both frameworks, in ``dtype``."""
    reference = copy.deepcopy(torch_model).to(dtype)
    candidate = nnx.clone(jax_model)
    _set_mode(reference, candidate, "train")
    F.cross_entropy(reference(x.to(dtype)), labels).backward()
    with jax.enable_x64(dtype == torch.float64):
        jax_dtype = jnp.float64 if dtype == torch.float64 else jnp.float32
        floats = nnx.state(candidate, nnx.Any(nnx.Param, nnx.BatchStat))
        # Cast on the host: an eager cast (or jnp.asarray) compiles one XLA program per shape.
        nnx.update(candidate, jax.tree.map(lambda a: to_device(a, jax_dtype), floats))
        x_nhwc = to_device(to_nhwc(x.to(dtype)), jax_dtype)
        loss_and_grads = _jax_loss_and_grads(candidate, fast_compile=dtype == torch.float64)
        _, jax_grads = loss_and_grads(x_nhwc, to_device(labels.numpy()))
        jax_grads = _flat(jax_grads)
    torch_grads = torch_to_jaxtl_layout(candidate, {n: p.grad for n, p in reference.named_parameters()})
    return torch_grads, jax_grads


def _check_export(report: ParityReport, torch_model, jax_model, arch: str, x, expected: np.ndarray) -> None:
    # Strict load into torchvision's own module (a ViT's image size is the one its position embeddings imply).
    exported = torchvision_module(arch, to_torchvision(jax_model), _num_classes(torch_model))
    with torch.no_grad():
        report.comparisons.append(compare("export logits", "logits", expected, exported(x).numpy()))


def _locate_divergence(mode: str, torch_model, jax_model, x: torch.Tensor, x_nhwc: jax.Array) -> list[str]:
    reference = copy.deepcopy(torch_model)
    candidate = nnx.clone(jax_model)
    _set_mode(reference, candidate, mode)
    actual = candidate.forward_intermediates(x_nhwc)
    # torchvision's Swin computes its stages channels-last: the model names those outputs.
    expected = torch_intermediates(reference, x, list(actual), getattr(candidate, "torch_channels_last", ()))
    return [f"{mode} mode:", *first_divergence(expected, actual, TOLERANCES[f"{mode} logits"])]


def _num_classes(torch_model: torch.nn.Module) -> int:
    return [m for m in torch_model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
