"""The run directory: its lock, the resolved config, metrics.jsonl, the confusion matrix, events and figures.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one record per
epoch), ``checkpoints/latest`` and ``checkpoints/best`` (see :mod:`jaxtl.train.checkpoint`),
``tensorboard/`` (per-step training loss, per-epoch metrics and learning rates), ``curves.png``,
``confusion.json`` / ``confusion.png`` (the validation confusion matrix of the best checkpoint),
``report.html`` (:mod:`jaxtl.train.report`, written when the run ends), ``lr_find/`` (``jaxtl lr-find``'s
curves, where it was run) and ``.lock`` (held while a process runs it). In a multi-process run only the first
process writes it; the others get a :class:`RunDirectory` whose writes do nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.config import RunConfig, save_config
from jaxtl.errors import JaxtlError
from jaxtl.train.events import EventWriter
from jaxtl.train.figures import Figures, load_metrics, plot_confusion, plot_curves


class RunError(JaxtlError):
    """A run that cannot start or continue: names the run directory and what to do."""


class RunLock:
    """An exclusive lock on a run directory: a second run pointed at it refuses to start."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._file = None

    def __enter__(self) -> RunLock:
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RunError(
                f"run directory {self.path.parent} is in use by another jaxtl process; wait for it, or choose another "
                "run_dir (--set run_dir=...)"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class _Discard:
    """Stands in for the event writer and the figures on the processes that do not write the run directory."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RunDirectory:
    """Writes a run's files; on a process that is not the first (``primary=False``) every write is skipped.

    Figures are redrawn at most every ``figures_every_s`` seconds and at the end of every phase: on
    small data an epoch is shorter than drawing them.
    """

    def __init__(self, path: str | os.PathLike, *, primary: bool = True, figures_every_s: float = 30.0):
        self.path = Path(path)
        self.primary = primary
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.yaml"
        self.latest = self.path / "checkpoints" / "latest"
        self.best = self.path / "checkpoints" / "best"
        self.figures = Figures(figures_every_s) if primary else _Discard()

    def events(self, purge_step: int | None) -> EventWriter | _Discard:
        """The TensorBoard writer; ``purge_step`` hides what an interrupted run logged after its checkpoint."""
        return EventWriter(self.path / "tensorboard", purge_step=purge_step) if self.primary else _Discard()

    def write_config(self, config: RunConfig) -> None:
        if not self.primary:
            return
        try:
            save_config(config, self.config_path)
        except OSError as error:
            raise RunError(
                f"cannot write {self.config_path}: {error.strerror or error}; free disk space or make "
                f"{self.path} writable"
            ) from None

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        if self.primary:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record)) + "\n")

    def draw_curves(self, title: str) -> None:
        self.figures.update("curves", lambda: plot_curves(load_metrics(self.metrics_path), self.path / "curves.png",
                                                          title=title))  # fmt: skip

    def write_confusion(self, confusion: np.ndarray, classes: tuple[str, ...], epoch: int) -> None:
        """confusion.json (counts, rows the true class) and confusion.png of the best checkpoint's epoch."""
        if not self.primary:
            return
        data = {"epoch": epoch, "classes": list(classes), "matrix": confusion.tolist()}
        staging = self.path / "confusion.json.tmp"
        staging.write_text(json.dumps(data) + "\n")
        staging.replace(self.path / "confusion.json")
        self.figures.update("confusion", lambda: plot_confusion(confusion, classes, self.path / "confusion.png"))
