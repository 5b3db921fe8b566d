"""What ``jaxtl inspect`` prints besides the groups: a config's training settings, a run directory's diagnostics."""

from __future__ import annotations

import os
from pathlib import Path

from jaxtl.config import RunConfig
from jaxtl.data.augment.mixing import Mixing
from jaxtl.train.diagnostics import diagnostics_table
from jaxtl.train.figures import load_metrics
from jaxtl.train.run_dir import RunError
from jaxtl.train.task import checkpoint_metric


def training_summary(config: RunConfig) -> list[str]:
    """One line per setting of the config's batches, augmentation, loss, optimizer schedule, average and stopping."""
    d, t, o = config.data, config.train, config.optim
    batch = f"batch {d.batch_size}"
    if t.accumulate_steps > 1:
        effective = d.batch_size * t.accumulate_steps
        batch += f" x {t.accumulate_steps} accumulated micro-batches (an optimizer step sees {effective})"
    augment = [
        "RandomResizedCrop" if d.random_resized_crop else None,
        f"flip p {d.flip_p:g}" if d.flip_p else None,
        d.augment if d.augment != "none" else None,
        f"color jitter {tuple(d.color_jitter)}" if d.color_jitter else None,
        f"random erasing p {d.random_erasing:g}" if d.random_erasing else None,
    ]
    mixing = Mixing(d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob)
    weights = t.class_weights if isinstance(t.class_weights, str) or t.class_weights is None else list(t.class_weights)
    lines = [
        f"{batch}, precision {t.precision}, decoded cache {d.cache}, train-mode BatchNorm statistics "
        + ("across devices (SyncBatchNorm)" if t.bn_sync else "per device (DDP's)"),
        f"augmentation: {', '.join(a for a in augment if a) or 'none'}",
        f"mixing: {mixing.describe() if mixing.enabled else 'none'}",
        f"task: {config.task}, data {d.source}, train order "
        + ("class-balanced (with replacement)" if d.sampler == "class_balanced" else "a permutation every epoch"),
        f"loss: {'binary cross-entropy' if config.task == 'multilabel' else 'cross-entropy'}, label smoothing "
        f"{t.label_smoothing:g}, class weights {weights or 'none'}"
        + (
            f", pos_weight {t.pos_weight if isinstance(t.pos_weight, str) else list(t.pos_weight)}"
            if t.pos_weight
            else ""
        ),
        f"best checkpoint by {checkpoint_metric(config)}",
        f"optimizer: {o.name}, lr {o.lr:g}, weight decay {o.weight_decay:g}, schedule {o.schedule}"
        + (f" after {o.warmup_steps} warmup steps" if o.warmup_steps else ""),
    ]
    if t.ema is not None:
        warmup = " with timm's warmup" if t.ema.warmup else ""
        lines.append(
            f"weight average (EMA): decay {t.ema.decay:g}{warmup}, every {t.ema.every_steps} step(s); validation, "
            "best and predictions use it"
        )
    if t.early_stopping is not None:
        e = t.early_stopping
        lines.append(
            f"early stopping: {e.metric} not improved by more than {e.min_delta:g} for {e.patience} epoch(s) "
            f"ends the {e.ends}"
        )
    return lines


def run_summary(run_dir: str | os.PathLike) -> list[str]:
    """``jaxtl inspect RUN_DIR``: the run's epochs and phases, then each epoch's per-group diagnostics
    (:mod:`jaxtl.train.diagnostics`) from its metrics.jsonl, with what each column is."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise RunError(
            f"{run_dir} holds no metrics.jsonl (a run writes one record per epoch there); give a run directory "
            "with a finished epoch, a run config (.yaml) or an architecture"
        )
    records = load_metrics(path)
    phases = ", ".join(dict.fromkeys(str(record.get("phase")) for record in records))
    epochs = len({record.get("epoch") for record in records})
    return [
        f"{run_dir}: {epochs} epoch(s) in metrics.jsonl, phase(s) {phases}",
        *diagnostics_table(records),
        "grad_norm: the mean over the epoch's steps of the group's gradient L2 norm; update/weight: the mean of",
        "||update|| / ||weights before it||; distance: ||w - w0|| / ||w0|| at the epoch's end (w0: the weights the",
        "run started from); bn_*_drift: the same for the running mean / variance of the group's BatchNorm layers;",
        "-: not recorded (grad_norm and update/weight need train.group_diagnostics: true; a frozen group takes no",
        "steps), a group without BatchNorm, or a zero reference",
    ]
