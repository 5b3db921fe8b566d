"""Ending a phase or the run early on validation: ``train.early_stopping`` and ``phases.N.until: plateau``."""

from __future__ import annotations

from collections.abc import Callable

from jaxtl.config import EarlyStoppingConfig
from jaxtl.optim import Phase
from jaxtl.train.state import Watch


def stopping_of(phase: Phase, early_stopping: EarlyStoppingConfig | None) -> EarlyStoppingConfig | None:
    """What ends ``phase`` early: its ``until: plateau`` (which then ends it alone), or ``train.early_stopping``."""
    if phase.until == "plateau":
        return EarlyStoppingConfig(phase.until_metric, phase.patience, phase.min_delta, ends="phase")
    return early_stopping


def watch_epoch(
    watch: Watch, metrics: dict, epoch: int, phase: Phase, early_stopping: EarlyStoppingConfig | None,
    log: Callable[[str], None],
) -> tuple[Watch, str | None]:  # fmt: skip
    """The record after an epoch's validation ``metrics``, and "phase" or "run" when it ends one (logged).

    Keras' EarlyStopping: an epoch improves when the metric beats the best by more than ``min_delta``; after
    ``patience`` epochs without one, the phase (or the run) ends. The record is part of the run's state, so a
    resumed run ends where an uninterrupted one does.
    """
    early = stopping_of(phase, early_stopping)
    if early is None:
        return watch, None
    watch = watch.update(metrics[early.metric], epoch, lower_is_better=early.metric.endswith("loss"),
                         min_delta=early.min_delta)  # fmt: skip
    if watch.stale < early.patience:
        return watch, None
    what = f"phase {phase.name!r}" if early.ends == "phase" else "the run"
    reason = "until plateau" if phase.until == "plateau" else "early stopping"
    log(
        f"  {reason}: {early.metric} has not improved by more than {early.min_delta:g} for {watch.stale} epoch(s) "
        f"(best {watch.best:.4f} at epoch {watch.epoch}); ending {what}"
    )
    return watch, early.ends
