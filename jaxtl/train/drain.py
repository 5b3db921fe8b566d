"""The train loop's metrics drain: each step's metrics pulled off the device in groups (``train.log_every``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxtl.train.callbacks import Callback
from jaxtl.train.diagnostics import add_step, group_scalars, step_means
from jaxtl.train.progress import Progress
from jaxtl.train.run_dir import RunError
from jaxtl.train.state import EpochTotals


class Drain:
    """Pulls the pending steps' metrics off the device: checks the loss, sums the epoch (per-group norms too),
    reports each step.

    Args:
        phase_name, loader_epoch: where the steps are, for the message of a non-finite loss.
        totals: the epoch's sums before the first pending step (a resumed epoch's, or empty).
        callbacks: their ``on_step`` sees each step's loss, accuracy and example count.
        events: the event writer (``train/loss_step``, ``groups/NAME/grad_norm_step`` and ``update_ratio_step``).
        last_good: the sentence naming the last good checkpoint, for the message of a non-finite loss.
    """

    def __init__(self, phase_name: str, loader_epoch: int, totals: EpochTotals, callbacks: Sequence[Callback],
                 events: Any, last_good: Callable[[], str]):  # fmt: skip
        self.phase_name, self.loader_epoch, self.totals = phase_name, loader_epoch, totals
        self.callbacks, self.events, self.last_good = callbacks, events, last_good
        self.pending: list[tuple[int, Any]] = []  # (step number, metrics on the device)
        self.progress: Progress | None = None

    def __call__(self) -> None:
        if not self.pending:
            return
        loss_sum, count, drained = 0.0, 0.0, {}
        steps, values = zip(*self.pending)
        self.pending.clear()
        for number, m in zip(steps, jax.device_get(values)):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise RunError(
                    f"non-finite training loss ({loss}) at step {number} (phase {self.phase_name!r}, epoch "
                    f"{self.loader_epoch + 1}); stopped without writing a checkpoint of it. {self.last_good()} "
                    "Lower the learning rate (optim.lr, phases.N.lrs) or set optim.clip_grad_norm"
                )
            n, correct = float(m["count"]), float(m["correct"])
            loss_sum, count = loss_sum + loss * n, count + n
            self.totals = self.totals.add(loss * n, correct, n)
            if "groups" in m:  # the step's per-group norms (make_train_step's groups=)
                drained = add_step(drained, m["groups"])
                self.totals = dataclasses.replace(self.totals, groups=add_step(self.totals.groups, m["groups"]))
            step_metrics = {"loss": loss, "acc1": correct / max(n, 1.0), "count": n}
            for callback in self.callbacks:
                callback.on_step(number, step_metrics)
        if count:
            self.events.scalar("train/loss_step", loss_sum / count, steps[-1])
            if self.progress is not None:
                self.progress.update(0, loss=self.totals.mean_loss)
        if drained:  # each group's means over the drained steps: every train.log_every steps
            self.events.scalars(group_scalars(step_means(drained), suffix="_step"), steps[-1])
