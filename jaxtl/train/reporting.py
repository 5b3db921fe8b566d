"""What a training run shows people: TensorBoard event files, curve and confusion-matrix figures, a progress line.

A run directory gets, next to ``metrics.jsonl`` and the checkpoints:

- ``tensorboard/events.out.tfevents.*``: scalar summaries (losses, accuracies, learning rates) written by
  :class:`EventWriter` without TensorFlow or torch. View them with ``tensorboard --logdir RUN_DIR/tensorboard``
  (``pip install tensorboard``; it runs without TensorFlow).
- ``curves.png``: training and validation loss and accuracy per epoch, phases marked, from
  ``metrics.jsonl`` (:func:`load_metrics`, :func:`plot_curves`).
- ``confusion.png``: the validation confusion matrix (:func:`confusion_matrix`, :func:`plot_confusion`).

:class:`Progress` is the live progress line of an epoch on the terminal (or a few plain lines in a log).
matplotlib is imported only inside the plotting functions, so importing jaxtl does not import it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from jaxtl.errors import JaxtlError


class ReportingError(JaxtlError, ValueError):
    """Input that a report cannot be made from: names the value and what was expected."""


# -- TensorBoard event files ------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    # 0x82F63B78 is the Castagnoli polynomial 0x1EDC6F41 bit-reversed (RFC 3720, section 12.1 and appendix B.4).
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) of ``data`` as an unsigned 32-bit int; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` masked as TFRecord files store it (tensorflow/core/lib/hash/crc32c.h, ``Mask``)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is a ten-byte two's-complement varint (protobuf encoding guide)
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SESSION_LOG_START = 1  # tensorboard/compat/proto/event.proto, SessionLog.SessionStatus.START


def _float32_bytes(value: float) -> bytes:
    if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        value = math.copysign(math.inf, value)  # struct refuses to round to infinity; float32 storage would
    return struct.pack("<f", value)


def _encode_event(
    *,
    wall_time: float,
    step: int,
    file_version: str | None = None,
    values: Mapping[str, float] | None = None,
    session_status: int | None = None,
) -> bytes:
    """An ``Event`` protobuf (tensorboard/compat/proto/event.proto) with one of its ``what`` fields set."""
    event = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)  # fields 1 (double) and 2 (int64)
    if file_version is not None:
        event += _field(3, file_version.encode())
    if values is not None:
        # Summary.value (field 1) entries: tag (field 1), simple_value (field 2, float32: key 0x15).
        entries = (_field(1, tag.encode()) + b"\x15" + _float32_bytes(v) for tag, v in values.items())
        summary = b"".join(_field(1, entry) for entry in entries)
        event += _field(5, summary)
    if session_status is not None:
        event += _field(7, b"\x08" + _varint(session_status))  # SessionLog.status is field 1, an enum
    return event


def _tfrecord(data: bytes) -> bytes:
    """TFRecord framing: length (uint64 LE), masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _open_event_file(logdir: Path) -> tuple[Path, Any]:
    """Creates ``events.out.tfevents.{time}.{host}.{pid}.{n}`` with the first free ``n``, as TensorBoard names them."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
    stamp, n = int(time.time()), 0
    while True:
        path = logdir / f"events.out.tfevents.{stamp}.{host}.{os.getpid()}.{n}"
        try:
            return path, open(path, "xb")  # exclusive: never appends to another writer's file
        except FileExistsError:
            n += 1


class EventWriter:
    """Writes scalar summaries to a new TensorBoard event file in ``logdir``; no TensorFlow or torch needed.

    Each call appends one ``Event`` record and flushes, so a crash loses nothing already written and
    TensorBoard shows the run while it trains. Values are stored as float32 (``simple_value``), as TensorBoard
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
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path, self._file = _open_event_file(self.logdir)
        first_step = 0 if purge_step is None else _checked_step(purge_step)
        self._write(_encode_event(wall_time=time.time(), step=first_step, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(_encode_event(wall_time=time.time(), step=first_step, session_status=_SESSION_LOG_START))
        self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Logs one scalar ``value`` (anything ``float()`` accepts) under ``tag`` at ``step`` (an int >= 0)."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Logs several scalars, ``{tag: value}``, at one ``step`` in one record, and flushes."""
        if not values:
            raise ReportingError(f"scalars() at step {step} got no values; pass a non-empty {{tag: value}} dict")
        checked = {_checked_tag(tag): _checked_value(tag, value) for tag, value in values.items()}
        self._write(_encode_event(wall_time=time.time(), step=_checked_step(step), values=checked))
        self.flush()

    def flush(self) -> None:
        """Pushes written records to the operating system (readers see them)."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file; further writes raise. Closing twice is harmless."""
        self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, event: bytes) -> None:
        if self._file.closed:
            raise ReportingError(f"EventWriter for {self.path} is closed; open a new one to log more")
        self._file.write(_tfrecord(event))


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


# -- training curves ---------------------------------------------------------------------------------

_REQUIRED_KEYS = ("phase", "epoch", "train_loss", "val_loss", "val_acc1")


def load_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, one dict per line, in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportingError(f"{path}, line {number}: not a JSON record ({e})") from e
    return records


def _epoch_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records by epoch, the last one of each epoch kept (an epoch re-run after a crash is written again)."""
    if not records:
        raise ReportingError("no metrics records to plot; a run writes one per epoch to metrics.jsonl")
    by_epoch = {}
    for i, record in enumerate(records):
        missing = [k for k in _REQUIRED_KEYS if k not in record]
        if missing:
            raise ReportingError(f"metrics record {i} lacks {', '.join(missing)}: {dict(record)}")
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _phase_starts(epochs: list[Mapping[str, Any]]) -> list[tuple[float, str]]:
    """``(x, name)`` for each phase: where its first epoch starts on the epoch axis (epoch ``e`` ends at ``x=e``)."""
    starts = []
    for i, record in enumerate(epochs):
        if i == 0 or record["phase"] != epochs[i - 1]["phase"]:
            starts.append((int(record["epoch"]) - 1, str(record["phase"])))
    return starts


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Saves a PNG of a run's training curves: loss and accuracy per epoch, phase starts marked and named.

    Args:
        records: the per-epoch records the trainer writes to ``metrics.jsonl`` (:func:`load_metrics`), each with
            ``phase``, ``epoch`` (counted across phases, from 1), ``train_loss``, ``val_loss``, ``val_acc1`` and
            optionally ``train_acc1`` and ``val_acc5``. Of several records for one epoch the last counts.
        path: the PNG to write (parent directories are created).
        title: a line above both panels, e.g. the architecture and data set.

    Returns:
        ``path`` as a Path. The figure is 1100 x 420 pixels: loss on the left, accuracy on the right.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = _epoch_records(records)
    x = [int(r["epoch"]) for r in epochs]
    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    _plot_series(loss_axes, x, epochs, [("train_loss", "train"), ("val_loss", "validation")])
    accuracies = [("train_acc1", "train top-1"), ("val_acc1", "validation top-1"), ("val_acc5", "validation top-5")]
    _plot_series(accuracy_axes, x, epochs, accuracies)
    loss_axes.set_ylabel("cross-entropy loss")
    accuracy_axes.set_ylabel("accuracy")
    for axes in (loss_axes, accuracy_axes):
        for start, name in _phase_starts(epochs):
            axes.axvline(start, color="0.55", linestyle="--", linewidth=1)
            axes.text(
                start, 0.98, f" {name}", transform=axes.get_xaxis_transform(),
                rotation=90, va="top", ha="left", fontsize=8, color="0.35",
            )  # fmt: skip
        axes.set_xlabel("epoch")
        axes.set_xlim(x[0] - 1, x[-1] + 0.1)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def _plot_series(axes, x: list[int], epochs: list[Mapping[str, Any]], series: list[tuple[str, str]]) -> None:
    for key, label in series:
        points = [(xi, float(r[key])) for xi, r in zip(x, epochs, strict=True) if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", markersize=3, label=label)


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


class Figures:
    """Figures of a running job (``curves.png``, ``confusion.png``), redrawn at most every ``every_s`` seconds.

    Drawing and saving a figure takes 0.2-0.4 s on a CPU core, which is as long as a whole epoch of a
    head-only phase on cached features: redrawn every epoch, the figures were a quarter of such a run.
    :meth:`update` draws at once when ``every_s`` has passed since the last drawing (so the first epoch's
    figures appear at once), and otherwise keeps the newest drawing function of each name for later;
    :meth:`flush` draws what is pending (the trainer calls it at the end of every phase and on the way out
    of a run, so the figures a run leaves are its last epoch's). ``every_s=0`` draws on every update.

    Args:
        every_s: the least time between two drawings, in seconds (>= 0).
        clock: seconds as a float, monotonic (tests pass a fake one).
    """

    def __init__(self, every_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic):
        if not every_s >= 0:
            raise ReportingError(f"Figures every_s must be >= 0 seconds, got {every_s}")
        self.every_s = every_s
        self.clock = clock
        self._pending: dict[str, Callable[[], object]] = {}
        self._drawn = -math.inf

    def update(self, name: str, draw: Callable[[], object]) -> None:
        """Registers ``draw`` as the newest drawing of ``name``, and draws everything pending if it is time."""
        self._pending[name] = draw
        if self.clock() - self._drawn >= self.every_s:
            self.flush()

    @property
    def pending(self) -> list[str]:
        """The names whose newest drawing has not been drawn yet."""
        return list(self._pending)

    def flush(self) -> None:
        """Draws every pending figure now, in the order they were first registered."""
        while self._pending:
            name = next(iter(self._pending))
            self._pending.pop(name)()
        self._drawn = self.clock()


# -- confusion matrix --------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        labels: ``(N,)`` integer true classes in ``[0, num_classes)``.
        predictions: ``(N,)`` integer predicted classes in ``[0, num_classes)`` (argmax of the logits).
        num_classes: the number of classes, >= 1.

    Returns:
        ``(num_classes, num_classes)`` int64: ``[i, j]`` is how many examples of class ``i`` were predicted ``j``;
        the diagonal holds the correct ones, a row sums to the class's example count.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if num_classes < 1:
        raise ReportingError(f"num_classes must be >= 1, got {num_classes}")
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ReportingError(
            f"labels and predictions must be 1-D and equally long, got {labels.shape} and {predictions.shape}"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ReportingError(f"{name} must be integer class indices, got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ReportingError(
                f"{name} must lie in [0, {num_classes}), got values from {values.min()} to {values.max()}"
            )
    pairs = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


_MAX_CLASSES_WITH_COUNTS = 30  # beyond this the cells are too small to hold legible numbers


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Saves a PNG heatmap of a confusion matrix (from :func:`confusion_matrix`).

    Each cell is coloured by its share of the true class's examples (row-normalised), so rare classes are as
    readable as common ones; the cells hold the counts up to 30 classes. The title gives the overall accuracy.

    Args:
        matrix: ``(C, C)`` counts, rows the true class, columns the predicted one.
        class_names: ``C`` names, in class-index order (the run's ``classes``).
        path: the PNG to write (parent directories are created).

    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ReportingError(f"matrix must be ({n}, {n}) for {n} class names, got shape {matrix.shape}")
    total = int(matrix.sum())
    if total <= 0:
        raise ReportingError("the confusion matrix counts no examples; build it from the validation predictions")
    row_sums = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, np.float64), where=row_sums > 0)
    correct = int(np.trace(matrix))

    side = min(max(0.4 * n + 3, 5.0), 30.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    cell_points = side * 72 * 0.75 / n  # roughly: the axes take three quarters of the figure's height
    label_size = min(max(0.45 * cell_points, 5.0), 10.0)
    names = [str(c) for c in class_names]
    rotation = 45 if n <= _MAX_CLASSES_WITH_COUNTS else 90
    axes.set_xticks(range(n), names, rotation=rotation, ha="right", rotation_mode="anchor", fontsize=label_size)
    axes.set_yticks(range(n), names, fontsize=label_size)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"accuracy {correct / total:.1%} ({correct} / {total})")
    if n <= _MAX_CLASSES_WITH_COUNTS:
        cell_size = 9 if n <= 15 else 7
        for (i, j), count in np.ndenumerate(matrix):
            color = "white" if shares[i, j] > 0.5 else "black"
            axes.text(j, i, str(count), ha="center", va="center", fontsize=cell_size, color=color)
    figure.tight_layout()
    return _save(figure, path)


# -- progress line -----------------------------------------------------------------------------------


class Progress:
    """A progress line for a loop over batches, like tqdm but without the dependency.

    On a terminal the line is redrawn in place (``\\r``) at most ten times a second::

        epoch 3  37/120 [31%]  412.3 img/s  loss 0.531  eta 0:12

    On anything else (a log file, CI output, pytest's capture) a plain line is printed at most every
    ``log_every_s`` seconds and once by :meth:`close`, so logs stay short and the last line holds the
    final postfix values (a loss fetched after the last batch).

    Throughput is the images (or, when no images are reported, batches) done since the first update divided by
    the wall time since the first update: the time before the first batch, which includes jit compilation and
    the loader's start-up, does not count, and neither do the first update's images. The ETA extrapolates the
    batches still to do at that rate. The final line shows the whole wall time, first batch included.

    Args:
        total: the number of batches expected.
        desc: the label at the start of the line.
        stream: where to write; ``sys.stderr`` (as it is at construction) when None.
        unit: the name of what ``images`` counts, shown as ``{unit}/s``.
        log_every_s: on a non-terminal stream, the least time between two printed lines.
        clock: seconds as a float, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        unit: str = "img",
        log_every_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if total < 0:
            raise ReportingError(f"Progress total must be >= 0, got {total}")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.is_terminal = self.stream.isatty()
        self.log_every_s = log_every_s
        self.clock = clock
        self.batches, self.images = 0, 0
        self.postfix: dict[str, Any] = {}
        self._created = clock()
        self._first: tuple[float, int, int] | None = None  # (time, batches, images) at the first update
        self._last_shown = -math.inf
        self._shown_batches = -1
        self._dirty = False  # updated since the last printed line
        self._last_width = 0
        self._closed = False

    def update(self, n_batches: int = 1, images: int = 0, **postfix: float | int | str) -> None:
        """Records ``n_batches`` more batches holding ``images`` images; ``postfix`` values (e.g. ``loss=0.53``)
        are shown after the rate and replace earlier values of the same names. Pass Python numbers: a device
        array here would make the loop wait for the device."""
        if self._closed:
            raise ReportingError(f"Progress {self.desc!r} is closed; make a new one for the next loop")
        for name, value in postfix.items():
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
                raise ReportingError(f"postfix {name}={value!r} must be a Python number or string")
        now = self.clock()
        self.batches += n_batches
        self.images += images
        self.postfix.update(postfix)
        self._dirty = True
        if self._first is None:
            self._first = (now, self.batches, self.images)
        done = self.batches >= self.total
        if self.is_terminal:
            if done or now - self._last_shown >= 0.1:
                self._redraw(now)
        elif not done and now - max(self._last_shown, self._first[0]) >= self.log_every_s:
            self._print_line(now)

    def close(self) -> None:
        """Shows the final state (ending the terminal line); closing twice is harmless."""
        if self._closed:
            return
        now = self.clock()
        if self.is_terminal:
            self._redraw(now)
            self.stream.write("\n")
        elif self._dirty:
            self._print_line(now)
        self.stream.flush()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be shown at time ``now`` (the clock's time when None)."""
        now = self.clock() if now is None else now
        percent = 100.0 if self.total == 0 else 100.0 * self.batches / self.total
        if self.batches < self.total:
            percent = min(percent, 99.0)  # never show 100% before the end
        parts = [f"{self.desc}  {self.batches}/{self.total} [{percent:.0f}%]".lstrip()]
        rate, per_batch = self._rates(now)
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s" if self.images else f"{rate:.2f} batch/s")
        parts.extend(f"{name} {_format_value(value)}" for name, value in self.postfix.items())
        if self.batches >= self.total:
            parts.append(f"in {_format_duration(now - self._created)}")
        elif per_batch is not None:
            parts.append(f"eta {_format_duration((self.total - self.batches) * per_batch)}")
        return "  ".join(parts)

    def _rates(self, now: float) -> tuple[float | None, float | None]:
        """(throughput, seconds per batch) since the first update; None before a second update has timing."""
        if self._first is None:
            return None, None
        started, batches, images = self._first
        seconds, batches_since = now - started, self.batches - batches
        if seconds <= 0 or batches_since <= 0:
            return None, None
        done = self.images - images if self.images else batches_since
        return done / seconds, seconds / batches_since

    def _redraw(self, now: float) -> None:
        text = self.line(now)
        self.stream.write("\r" + text + " " * max(self._last_width - len(text), 0))
        self.stream.flush()
        self._last_width = len(text)
        self._last_shown, self._shown_batches = now, self.batches

    def _print_line(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._dirty = False
        self._last_shown, self._shown_batches = now, self.batches


def _format_value(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.3f}"
    return f"{value:.3e}"


def _format_duration(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    whole = int(round(max(seconds, 0.0)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
