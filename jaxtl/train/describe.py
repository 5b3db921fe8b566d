"""What a run config trains with beyond its phases, in words: ``jaxtl inspect CONFIG`` prints it."""

from __future__ import annotations

from jaxtl.config import RunConfig
from jaxtl.data.augment.mixing import Mixing


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
        f"loss: cross-entropy, label smoothing {t.label_smoothing:g}, class weights {weights or 'none'}",
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
