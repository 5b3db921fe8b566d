"""A run's position (``RunState``) and what a checkpoint records about it (``CheckpointMeta``), as typed values.

A checkpoint's ``meta.json`` is :meth:`CheckpointMeta.to_json`: the position (phase, epoch in the
phase, next batch, step, the epoch's loss, accuracy and per-group norm sums so far), the best validation result,
early stopping's and reduce-on-plateau's records, the epoch's metrics, and what the model is:
architecture, classes, class_to_idx, the weights it started from, the preprocessing, and the
resolved run config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxtl.errors import JaxtlError
from jaxtl.optim.plateau import Plateau
from jaxtl.weights import Preprocessing


@dataclasses.dataclass(frozen=True)
class EpochTotals:
    """Sums over the batches of an epoch run so far: loss times examples, correct predictions, examples, and the
    per-group norms of the steps (:func:`jaxtl.train.diagnostics.add_step`)."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    groups: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def add(self, loss_sum: float, correct: float, count: float) -> EpochTotals:
        return EpochTotals(self.loss + loss_sum, self.correct + correct, self.count + count, self.groups)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.count, 1.0)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1.0)


@dataclasses.dataclass(frozen=True)
class Best:
    """The best validation result so far: the checkpoint metric's value, its epoch (1-based) and all metrics."""

    metric: float | None = None
    epoch: int | None = None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def improved_by(self, metrics: Mapping[str, float], key: str) -> bool:
        """Whether ``metrics`` beat this result on ``key`` (accuracy: higher; loss: lower)."""
        if self.metric is None:
            return True
        return metrics[key] < self.metric if key.endswith("loss") else metrics[key] > self.metric

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "epoch": self.epoch, **self.metrics}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Best:
        metrics = {k: v for k, v in data.items() if k not in ("metric", "epoch")}
        return cls(data.get("metric"), data.get("epoch"), metrics)


@dataclasses.dataclass(frozen=True)
class Watch:
    """Early stopping's record (``train.early_stopping``): the best value of its metric since it began watching,
    that value's epoch (1-based) and the epochs since without an improvement."""

    best: float | None = None
    epoch: int | None = None
    stale: int = 0

    def update(self, value: float, epoch: int, *, lower_is_better: bool, min_delta: float) -> Watch:
        """After an epoch whose metric is ``value``: an improvement is a change beyond ``min_delta`` in the
        metric's good direction (Keras' EarlyStopping); the first value always is one."""
        if self.best is None or (value < self.best - min_delta if lower_is_better else value > self.best + min_delta):
            return Watch(value, epoch, 0)
        return Watch(self.best, self.epoch, self.stale + 1)


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a run is: everything besides the arrays that a resumed run needs to continue exactly.

    Attributes:
        phase: index of the phase being run; ``len(phases)`` once every phase is done.
        epoch_in_phase: epochs of that phase completed.
        batch: the next batch of the current epoch (0 at an epoch boundary).
        step: optimizer steps taken in the whole run (the dropout keys and the loss curve's x axis).
        totals: the current epoch's sums over its batches before ``batch``.
        best: the best validation result so far.
        watch: early stopping's record (``train.early_stopping``).
        plateau: reduce-on-plateau's record (``optim.schedule: plateau``) in the current phase.
    """

    phase: int = 0
    epoch_in_phase: int = 0
    batch: int = 0
    step: int = 0
    totals: EpochTotals = EpochTotals()
    best: Best = Best()
    watch: Watch = Watch()
    plateau: Plateau = Plateau()

    @property
    def at_phase_start(self) -> bool:
        return self.epoch_in_phase == 0 and self.batch == 0

    def to_json(self) -> dict[str, Any]:
        data = {"phase": self.phase, "epoch_in_phase": self.epoch_in_phase, "batch": self.batch, "step": self.step}
        if self.batch:
            data["epoch_totals"] = dataclasses.asdict(self.totals)
        if self.watch != Watch():
            data["early_stopping"] = dataclasses.asdict(self.watch)
        if self.plateau != Plateau():
            data["plateau"] = self.plateau.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunState:
        totals = data.get("epoch_totals")
        return cls(
            phase=int(data["phase"]),
            epoch_in_phase=int(data["epoch_in_phase"]),
            batch=int(data.get("batch", 0)),
            step=int(data["step"]),
            totals=EpochTotals(**totals) if totals else EpochTotals(),
            best=Best.from_json(data.get("best") or {}),
            watch=Watch(**data["early_stopping"]) if data.get("early_stopping") else Watch(),
            plateau=Plateau.from_json(data["plateau"]) if data.get("plateau") else Plateau(),
        )


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says besides its arrays (its ``meta.json``).

    Attributes:
        state: the run's position after the checkpoint's last step.
        metrics: the last completed epoch's record (empty inside an epoch).
        arch: the registry name of the architecture.
        classes: class names in label order; ``class_to_idx`` maps them back.
        weights: the weights the run started from (``source``, and ``name`` and ``sha256`` when known).
        preprocessing: the eval preprocessing the model expects.
        config: the resolved run config, as plain values.
    """

    state: RunState
    metrics: Mapping[str, Any]
    arch: str
    classes: tuple[str, ...]
    class_to_idx: Mapping[str, int]
    weights: Mapping[str, Any]
    preprocessing: Preprocessing
    config: Mapping[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.state.to_json(),
            "best": self.state.best.to_json(),
            "metrics": dict(self.metrics),
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "class_to_idx": dict(self.class_to_idx),
            "weights": dict(self.weights),
            "preprocessing": dataclasses.asdict(self.preprocessing),
            "config": dict(self.config),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> CheckpointMeta:
        """Reads a checkpoint's meta.json; a missing or malformed entry is a JaxtlError naming ``source``."""
        try:
            p = data["preprocessing"]
            preprocessing = Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
            return cls(
                state=RunState.from_json(data),
                metrics=dict(data.get("metrics") or {}),
                arch=str(data["arch"]),
                classes=tuple(data["classes"]),
                class_to_idx=dict(data["class_to_idx"]),
                weights=dict(data.get("weights") or {}),
                preprocessing=preprocessing,
                config=dict(data["config"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise JaxtlError(
                f"{source}: meta.json lacks or garbles {error} (it is not a jaxtl training checkpoint, or was altered)"
            ) from None
