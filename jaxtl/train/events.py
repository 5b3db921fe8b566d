"""TensorBoard event files of a run's scalars, written with tensorboardX (no TensorFlow, no torch).

A run directory's ``tensorboard/events.out.tfevents.*`` hold its losses, accuracies and learning rates. View
them with ``tensorboard --logdir RUN_DIR/tensorboard`` (``pip install tensorboard``; it runs without TensorFlow).
tensorboardX is imported when the first :class:`EventWriter` opens, so importing jaxtl does not import it.
"""

from __future__ import annotations

import glob
import numbers
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxtl.errors import JaxtlError


class ReportingError(JaxtlError, ValueError):
    """Input that a report cannot be made from: names the value and what was expected."""


# Held while a writer imports tensorboardX (which hides torch for a moment) and while it picks its file name and
# creates the file, so that two writers of one process never pick the same name; other processes' ids differ.
_OPEN_LOCK = threading.Lock()


def _tensorboardx() -> Any:
    """The tensorboardX package, imported without importing torch (call it holding ``_OPEN_LOCK``)."""
    # tensorboardX's writer module imports torch when it is installed, only to accept torch tensors, which jaxtl
    # never logs; loading torch would add seconds, a GB of memory and a second CUDA runtime to a training run.
    hide_torch = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` now raises ImportError, which tensorboardX catches
    try:
        import tensorboardX
        import tensorboardX.event_file_writer
        import tensorboardX.proto.event_pb2
        import tensorboardX.proto.summary_pb2
    finally:
        if hide_torch and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return tensorboardX


def _free_suffix(logdir: Path) -> str:
    """``.{pid}.{n}`` with the least ``n`` that no event file of this host in ``logdir`` ends with.

    tensorboardX names a file ``events.out.tfevents.{time}.{host}{suffix}`` and truncates one of that name, so
    the suffix keeps writers of one process (and a process that reuses an earlier run's id) off each other's files.
    """
    pattern = f"events.out.tfevents.*.{glob.escape(socket.gethostname())}.{os.getpid()}"
    n = 0
    while any(logdir.glob(f"{pattern}.{n}")):
        n += 1
    return f".{os.getpid()}.{n}"


class EventWriter:
    """Writes scalar summaries to a new TensorBoard event file in ``logdir``, with tensorboardX's ``EventsWriter``.

    Each record is written and flushed when it is logged, in the calling thread (tensorboardX's ``FileWriter``
    queues records for a thread that writes them up to seconds later, so a run killed outright would lose the
    scalars of steps its checkpoint holds). Values are stored as float32 (``simple_value``), as TensorBoard
    stores scalars.

    Args:
        logdir: the directory for the event file, created if missing (a run's is ``RUN_DIR/tensorboard``).
        purge_step: for a resumed run, the first step this writer will log. TensorBoard then hides what earlier
            event files in ``logdir`` logged at that step or later (a ``SessionLog.START`` record at
            ``purge_step``, as TensorFlow's and torch's writers do), so the steps a crashed run logged after its
            last checkpoint do not show twice. Tested against TensorBoard's Python reader (``EventAccumulator``,
            which ``tensorboard --load_fast=false`` uses); its Rust data server is not tested here.

    Example::

        with EventWriter(run_dir / "tensorboard") as events:
            events.scalars({"train/loss": 0.53, "lr": 1e-3}, step=100)
    """

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None):
        first_step = None if purge_step is None else _checked_step(purge_step)
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        with _OPEN_LOCK:
            self._tbx = _tensorboardx()
            suffix = _free_suffix(self.logdir)
            self._writer = self._tbx.event_file_writer.EventsWriter(str(self.logdir / "events"), suffix)
        (self.path,) = self.logdir.glob(f"events.out.tfevents.*.{glob.escape(socket.gethostname())}{suffix}")
        self._closed = False
        if first_step is not None:
            event_pb2 = self._tbx.proto.event_pb2
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(session_log=start), first_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Logs one scalar ``value`` (anything ``float()`` accepts) under ``tag`` at ``step`` (an int >= 0)."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Logs several scalars, ``{tag: value}``, at one ``step`` in one record."""
        if not values:
            raise ReportingError(f"scalars() at step {step} got no values; pass a non-empty {{tag: value}} dict")
        checked = {_checked_tag(tag): _checked_value(tag, value) for tag, value in values.items()}
        step = _checked_step(step)
        if self._closed:
            raise ReportingError(f"EventWriter for {self.path} is closed; open a new one to log more")
        summary_pb2 = self._tbx.proto.summary_pb2
        entries = [summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in checked.items()]
        self._write(self._tbx.proto.event_pb2.Event(summary=summary_pb2.Summary(value=entries)), step)

    def _write(self, event: Any, step: int) -> None:
        event.wall_time, event.step = time.time(), step
        self._writer.write_event(event)
        self._writer.flush()

    def flush(self) -> None:
        """Every record is flushed as it is logged; kept for callers that flush before reading the file."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Closes the file; further writes raise. Closing twice is harmless."""
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ReportingError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def _checked_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag:
        raise ReportingError(f"a scalar's tag must be a non-empty string, got {tag!r}")
    return tag


def _checked_value(tag: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ReportingError(f"scalar {tag!r}: value {value!r} is not a number") from e
