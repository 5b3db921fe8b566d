"""Callbacks: code of your own that sees a run's phases, steps and epochs (diagnostics, early stops, plots).

Subclass :class:`Callback` and override what you need; pass instances to ``jaxtl.train.fit(...,
callbacks=[...])``. They run on the host, in the loop, on every process of a multi-process run.
Step metrics are pulled off the device every ``train.log_every`` steps (and at the end of an
epoch), so ``on_step`` is called in bursts, in step order, with host floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxtl.optim import ParamGroups, Phase
    from jaxtl.train.fit import FitResult
    from jaxtl.train.state import RunState


class Callback:
    """Hooks of a training run; each does nothing unless overridden."""

    def on_phase_start(self, phase: Phase, groups: ParamGroups, state: RunState) -> None:
        """A phase starts (or resumes at ``state``) with these parameter groups."""

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Step ``step`` (1-based, counted over the run) is done: its ``loss``, ``acc1`` and example ``count``."""

    def on_epoch_end(self, record: Mapping[str, Any], state: RunState) -> None:
        """An epoch is done and checkpointed: ``record`` is its metrics.jsonl line, ``state`` the position after it."""

    def on_fit_end(self, result: FitResult) -> None:
        """Every phase is done."""
