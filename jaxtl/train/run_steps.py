"""A run's compiled steps as its config asks for them: precision, seed, loss, mixing, accumulation, BatchNorm
statistics across devices, diagnostics and XLA options applied to :mod:`jaxtl.train.step`'s pure factories.

The trainer, ``jaxtl lr-find``, ``jaxtl suggest`` and ``jaxtl sweep`` build their steps here, so that each runs
the step a training run of the same config runs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from jaxtl.config import DataConfig, RunConfig
from jaxtl.data.augment.mixing import Mixing
from jaxtl.optim import ParamGroups
from jaxtl.train.evaluate import compute_dtype_of
from jaxtl.train.step import full_model, head_of, make_eval_step, make_features_step, make_train_step
from jaxtl.weights import Preprocessing
from jaxtl.xla import program_options


def run_mixing(data: DataConfig) -> Mixing:
    """Mixup / CutMix as ``data`` sets them (disabled when both alphas are 0)."""
    return Mixing(data.mixup_alpha, data.cutmix_alpha, data.mix_prob, data.mix_switch_prob)


def run_train_step(
    config: RunConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, preprocessing: Preprocessing,
    *, num_classes: int, cached: bool, loss_fn: Callable, groups: ParamGroups | None = None,
) -> Callable:  # fmt: skip
    """The train step of a phase: through the head only on cached features (``cached``), else the whole model.

    ``groups``: the phase's groups, whose per-step norms the step returns with ``train.group_diagnostics``.
    """
    t, p = config.train, preprocessing
    return make_train_step(
        graphdef, optimizer, mean=p.mean, std=p.std, forward=head_of if cached else full_model,
        compute_dtype=compute_dtype_of(t.precision), seed=t.seed, loss_fn=loss_fn,
        compiler_options=program_options(t.ynnpack, "train", t.precision), mixing=run_mixing(config.data),
        num_classes=num_classes, accumulate_steps=t.accumulate_steps,
        bn_groups=1 if t.bn_sync else jax.device_count(), groups=groups if t.group_diagnostics else None,
    )  # fmt: skip


def run_eval_step(config: RunConfig, graphdef: nnx.GraphDef, preprocessing: Preprocessing, *, cached: bool) -> Callable:
    """The validation step of a phase (through the head only on cached features)."""
    t, p = config.train, preprocessing
    return make_eval_step(
        graphdef, mean=p.mean, std=p.std, forward=head_of if cached else full_model,
        compute_dtype=compute_dtype_of(t.precision), compiler_options=program_options(t.ynnpack, "eval", t.precision),
    )  # fmt: skip


def run_features_step(config: RunConfig, graphdef: nnx.GraphDef, preprocessing: Preprocessing) -> Callable:
    """The feature pass of a frozen backbone, at the run's precision (as the head will see the features)."""
    t, p = config.train, preprocessing
    return make_features_step(
        graphdef, mean=p.mean, std=p.std, compute_dtype=compute_dtype_of(t.precision),
        compiler_options=program_options(t.ynnpack, "eval", t.precision),
    )  # fmt: skip
