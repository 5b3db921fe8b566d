"""Figures of a run: training curves and the confusion matrix as PNGs, redrawn at most every N seconds.

A run directory gets, next to ``metrics.jsonl`` and the checkpoints:

- ``curves.png``: training and validation loss and accuracy per epoch, phases marked, from
  ``metrics.jsonl`` (:func:`load_metrics`, :func:`plot_curves`).
- ``confusion.png``: the validation confusion matrix (:func:`confusion_matrix`, :func:`plot_confusion`).

:class:`Figures` limits how often a running job redraws them. matplotlib is imported only inside the plotting
functions, so importing jaxtl does not import it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.train.events import ReportingError

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
    :meth:`update` draws at once when ``every_s`` has passed since the last drawing or, for the first, since
    the figures were created (a run's first epoch of minutes is drawn at once; a run shorter than ``every_s``
    is drawn once, at its end), and otherwise keeps the newest drawing function of each name for later;
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
        self._drawn = clock()

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
