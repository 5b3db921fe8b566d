"""The optimizer of a set of parameter groups: optax.partition over group labels.

Each trainable group gets its own transformation (AdamW, Adam or SGD with the group's peak LR on
the shared schedule shape, and its weight decay); frozen groups get ``optax.set_to_zero()``, which
holds no state. The train step differentiates only the trainable parameters
(:mod:`jaxtl.train.step`), so frozen ones normally never reach the optimizer at all; the partition
also accepts a full parameter tree, and then frozen leaves get zero updates and no state.

With ``schedule: plateau`` each trainable group's chain ends in :func:`jaxtl.optim.plateau.scale_by_plateau`,
whose scale (in the optimizer state) the training loop sets after each validation.

With ``l2sp_alpha`` set, each trainable group but ``head`` starts its chain with
:func:`jaxtl.optim.literature.l2sp` (the penalty's gradient, before clipping as a loss term's) and has no
weight decay: L2-SP's pull toward the starting weights replaces the pull toward zero.

Conventions follow torch.optim: AdamW's decay is decoupled and multiplied by the LR
(``p -= lr * (adam_update + wd * p)``), eps is added outside the square root; SGD adds ``wd * p``
to the gradient before momentum (``buf = momentum * buf + g``, no dampening).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtl.models.names import key_path_name
from jaxtl.optim.groups import ParamGroupError, ParamGroups
from jaxtl.optim.literature import l2sp, scale_by_relative_gradient_norm
from jaxtl.optim.plateau import Plateau, reductions, scale_by_plateau
from jaxtl.optim.scheduled_mask import start_at
from jaxtl.optim.settings import OptimizerConfig

HEAD_GROUP = "head"  # the classifier's group in every built-in policy: L2-SP (l2sp_alpha) leaves it out


def group_lr(groups: ParamGroups, name: str, config: OptimizerConfig) -> float:
    group = groups.groups[name]
    return group.lr if group.lr is not None else config.lr * group.lr_mult


def learning_rates(
    groups: ParamGroups, config: OptimizerConfig, total_steps: int, step: int,
    scale: Callable[[str, float], float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Each trainable group's learning rate at ``step`` of a phase of ``total_steps`` steps (groups with a transform
    of their own have none to tell); ``scale(name, peak)``: a factor on it, such as reduce-on-plateau's."""
    rates = {}
    for name, peak in plateau_peaks(groups, config).items():
        lr = schedule(config, peak, total_steps)
        rates[name] = float(lr(step) if callable(lr) else lr) * (scale(name, peak) if scale is not None else 1.0)
    return rates


def plateau_peaks(groups: ParamGroups, config: OptimizerConfig) -> dict[str, float]:
    """The configured lr of each group that ``schedule: plateau`` scales: the trainable ones without a transform."""
    return {
        name: group_lr(groups, name, config)
        for name, group in groups.groups.items()
        if not group.frozen and group.transform is None
    }


def step_plateau(
    plateau: Plateau,
    metrics: dict[str, float],
    groups: ParamGroups,
    config: OptimizerConfig,
    log: Callable[[str], None],
) -> tuple[Plateau, dict[str, float] | None]:
    """``schedule: plateau`` after an epoch's validation: torch's ReduceLROnPlateau step of ``plateau`` on
    ``metrics``. Returns the new plateau and, where a group's lr fell (logged), every group's new scale, which
    :func:`jaxtl.optim.plateau.set_plateau_scales` puts into the optimizer state (arrays: no recompilation)."""
    if config.schedule != "plateau":
        return plateau, None
    peaks = plateau_peaks(groups, config)
    stepped = plateau.step(metrics, config, peaks)
    reduced = reductions(plateau, stepped, peaks)
    if not reduced:
        return stepped, None
    log(
        f"  reduce on plateau: {config.plateau_metric} has not improved for {config.plateau_patience + 1} "
        f"epoch(s); {', '.join(reduced)}"
    )
    return stepped, stepped.scales(peaks)


def schedule(config: OptimizerConfig, peak: float, total_steps: int | None) -> optax.Schedule | float:
    """The LR schedule of one group: ``config.schedule``'s shape scaled to the group's ``peak``.

    For ``plateau`` this is the LR before the reductions (the peak, after a linear warmup over ``warmup_steps``
    as warmup_cosine's); the optimizer multiplies it by the group's plateau scale (:mod:`jaxtl.optim.plateau`).
    """
    if config.schedule == "constant":
        return peak
    if config.schedule == "plateau":
        return optax.linear_schedule(0.0, peak, config.warmup_steps) if config.warmup_steps else peak
    if not total_steps or total_steps < 1:
        raise ParamGroupError(f"schedule {config.schedule!r} needs the number of steps (got {total_steps})")
    if config.schedule == "warmup_cosine":
        if config.warmup_steps >= total_steps:
            raise ParamGroupError(f"warmup_steps={config.warmup_steps} must be fewer than the {total_steps} steps")
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, config.warmup_steps, total_steps, end_value=peak * config.final_lr_fraction
        )
    if config.schedule == "one_cycle":
        return optax.cosine_onecycle_schedule(total_steps, peak)
    return _torch_schedule(config, peak)


def _torch_schedule(config: OptimizerConfig, peak: float) -> optax.Schedule:
    """torch.optim.lr_scheduler's closed forms, in steps: the LR after ``count`` ``scheduler.step()`` calls."""
    gamma = config.gamma
    if config.schedule == "step":
        return lambda count: peak * gamma ** (count // config.step_size)
    if config.schedule == "multistep":
        milestones = jnp.asarray(config.milestones or (0,), jnp.int32)
        passed = (lambda count: jnp.sum(count >= milestones)) if config.milestones else (lambda count: 0)
        return lambda count: peak * gamma ** passed(count)
    if config.schedule == "exponential":
        return lambda count: peak * gamma**count
    # CosineAnnealingWarmRestarts(T_0, T_mult, eta_min): cycle i lasts T_0 * T_mult**i steps.
    t0, mult, low = config.restart_steps, config.restart_mult, peak * config.final_lr_fraction

    # The cycles' first steps, in integers (a logarithm in float32 can land a boundary in the wrong cycle).
    starts, lengths = [0], [t0]
    while mult > 1 and starts[-1] + lengths[-1] < 2**31:
        starts.append(starts[-1] + lengths[-1])
        lengths.append(lengths[-1] * mult)
    later_starts = jnp.asarray(starts[1:], jnp.int32)
    starts_array, lengths_array = jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.float32)

    def cosine_restarts(count):
        count = jnp.asarray(count)
        if mult == 1:
            cycle_start, length = (count // t0) * t0, jnp.float32(t0)
        else:
            cycle = jnp.sum(count >= later_starts)
            cycle_start, length = starts_array[cycle], lengths_array[cycle]
        return low + (peak - low) * (1 + jnp.cos(jnp.pi * (count - cycle_start) / length)) / 2

    return cosine_restarts


def _decay_mask(groups: ParamGroups, patterns: tuple[str, ...]) -> Callable[[Any], Any] | None:
    if not patterns:
        return None
    excluded = {n for n in groups.labels if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    return lambda params: _map_names(lambda name, _: name not in excluded, params)


def _base_transform(config: OptimizerConfig, lr, weight_decay: float, mask) -> optax.GradientTransformation:
    if config.name == "adamw":
        b1, b2 = config.betas
        return optax.adamw(lr, b1=b1, b2=b2, eps=config.eps, weight_decay=weight_decay, mask=mask)
    if config.name == "adam":  # torch.optim.Adam: L2 added to the gradient
        b1, b2 = config.betas
        decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity()
        return optax.chain(decay, optax.adam(lr, b1=b1, b2=b2, eps=config.eps))
    decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity()
    return optax.chain(decay, optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))


def build_optimizer(
    groups: ParamGroups, config: OptimizerConfig | None = None, total_steps: int | None = None
) -> optax.GradientTransformation:
    """One optax transformation over a parameter tree (an ``nnx.State`` of Params) labelled by group.

    ``config`` None: the default :class:`OptimizerConfig`.
    """
    config = config or OptimizerConfig()
    _check_l2sp(groups, config)
    transforms = {}
    mask = _decay_mask(groups, config.no_weight_decay)
    for name, group in groups.groups.items():
        if group.frozen:
            transforms[name] = optax.set_to_zero()
            continue
        if group.transform is not None:
            transforms[name] = start_at(group.start_step, group.transform) if group.start_step else group.transform
            continue
        lr = schedule(config, group_lr(groups, name, config), total_steps)
        anchored = config.l2sp_alpha is not None and name != HEAD_GROUP
        decay = group.weight_decay if group.weight_decay is not None else config.weight_decay
        tx = _base_transform(config, lr, 0.0 if anchored else decay, mask)
        if config.clip_grad_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
        if anchored:
            tx = optax.chain(l2sp(config.l2sp_alpha), tx)
        if config.schedule == "plateau":  # the update of AdamW (decay included) or SGD is linear in the lr
            tx = optax.chain(tx, scale_by_plateau())
        if config.auto_rgn:
            tx = scale_by_relative_gradient_norm(tx)
        transforms[name] = start_at(group.start_step, tx) if group.start_step else tx
    labels = groups.labels
    return optax.partition(transforms, lambda params: _map_names(lambda name, _: labels[name], params))


def _check_l2sp(groups: ParamGroups, config: OptimizerConfig) -> None:
    if config.l2sp_alpha is None:
        return
    if HEAD_GROUP not in groups.groups:
        raise ParamGroupError(
            f"optim.l2sp_alpha anchors every trainable group but {HEAD_GROUP!r} at its starting weights, and no group "
            f"is named {HEAD_GROUP!r} (groups: {', '.join(groups.groups)}): name the classifier's group "
            f"{HEAD_GROUP!r}, as the built-in policies do"
        )
    decayed = [
        name
        for name, group in groups.groups.items()
        if name != HEAD_GROUP and not group.frozen and group.transform is None and group.weight_decay is not None
    ]
    if decayed:
        raise ParamGroupError(
            f"group(s) {', '.join(decayed)} set weight_decay, which optim.l2sp_alpha replaces with L2-SP's pull toward "
            "the starting weights: drop their weight_decay or l2sp_alpha"
        )


def _map_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``fn(dotted_name, leaf)`` over a parameter tree whose paths are the model's attribute paths."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(key_path_name(path), leaf), tree)


def group_state_leaves(opt_state: Any) -> dict[str, int]:
    """Number of array leaves of optimizer state held per group (frozen groups hold none)."""
    inner = opt_state.inner_states
    return {name: len(jax.tree.leaves(state.inner_state)) for name, state in inner.items()}
