"""A sweep's comparison: each run's record, the per-policy aggregates, the text table, CSV, JSON and the plot."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxtl.durable import sync_directory
from jaxtl.train.run_dir import RunError


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically: a kill leaves the old file or the new one, whole."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
        sync_directory(path.parent)
    finally:
        staging.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """A finished run's numbers (its ``sweep-result.json``).

    Attributes:
        policy, seed: what it trained; run_dir: its directory, relative to the sweep's.
        best_val_acc1, best_val_loss: the highest validation accuracy and the lowest validation loss of its epochs.
        best_epoch: the first epoch with ``best_val_acc1``; epochs, steps: how many it ran.
        trainable_params: the most parameters any of its phases trains.
        flops_per_step: XLA's count for one compiled train step, averaged over its steps (a linear probe's solve
            and the feature pass of a cached head-only phase are no steps).
        step_s: the median of its step times (None with one step per epoch).
        wall_s: its training time (weights, compiles, feature pass, validation and checkpoints included; the
            report written at the end not).
    """

    policy: str
    seed: int
    run_dir: str
    best_val_acc1: float
    best_val_loss: float
    best_epoch: int
    epochs: int
    steps: int
    trainable_params: int
    flops_per_step: float
    step_s: float | None
    wall_s: float

    @classmethod
    def read(cls, path: Path) -> SweepRun:
        """The record in ``path``; RunError naming it when it is no such record."""
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunError(f"{path} cannot be read ({error}); delete it to run that run again") from None
        missing = [name for name in names if not isinstance(data, Mapping) or name not in data]
        if missing:
            raise RunError(f"{path} lacks {', '.join(missing)}; delete it to run that run again")
        return cls(**{name: data[name] for name in names})


# -- per-policy aggregates and the table ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicySummary:
    """One policy over its seeds: means, and sample standard deviations (None with one seed) of the accuracy and
    loss; the trainable parameters; FLOPs per step, step time and wall time averaged over the seeds."""

    policy: str
    seeds: int
    val_acc1_mean: float
    val_acc1_std: float | None
    val_loss_mean: float
    val_loss_std: float | None
    trainable_params: int
    flops_per_step: float
    step_s: float | None
    wall_s: float


def summarize(runs: Sequence[SweepRun]) -> list[PolicySummary]:
    """Per-policy aggregates of ``runs``, in the order the policies first appear."""
    by_policy: dict[str, list[SweepRun]] = {}
    for run in runs:
        by_policy.setdefault(run.policy, []).append(run)

    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    summaries = []
    for policy, group in by_policy.items():
        accuracy, loss = [r.best_val_acc1 for r in group], [r.best_val_loss for r in group]
        step_times = [r.step_s for r in group if r.step_s is not None]
        summaries.append(
            PolicySummary(
                policy=policy,
                seeds=len(group),
                val_acc1_mean=statistics.fmean(accuracy),
                val_acc1_std=spread(accuracy),
                val_loss_mean=statistics.fmean(loss),
                val_loss_std=spread(loss),
                trainable_params=max(r.trainable_params for r in group),
                flops_per_step=statistics.fmean(r.flops_per_step for r in group),
                step_s=statistics.fmean(step_times) if step_times else None,
                wall_s=statistics.fmean(r.wall_s for r in group),
            )  # fmt: skip
        )
    return summaries


def _mean_spread(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A sweep's table: ``rows`` (one :class:`PolicySummary` per policy) and ``runs`` (one :class:`SweepRun` per
    policy and seed); :meth:`table` renders it, as ``jaxtl sweep`` prints it."""

    out_dir: Path
    rows: tuple[PolicySummary, ...]
    runs: tuple[SweepRun, ...]

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "sweep.csv"

    @property
    def json_path(self) -> Path:
        return self.out_dir / "sweep.json"

    @property
    def plot_path(self) -> Path:
        return self.out_dir / "sweep.png"

    def table(self) -> str:
        """The rows as aligned text: accuracy and loss as mean ± sample standard deviation over the seeds."""
        header = ("policy", "seeds", "best val acc@1", "best val loss", "trainable", "GFLOPs/step", "step ms", "wall s")
        lines = [
            (
                row.policy,
                str(row.seeds),
                _mean_spread(row.val_acc1_mean, row.val_acc1_std, 3),
                _mean_spread(row.val_loss_mean, row.val_loss_std, 4),
                f"{row.trainable_params:,}",
                f"{row.flops_per_step / 1e9:.4g}",
                "-" if row.step_s is None else f"{row.step_s * 1e3:.1f}",
                f"{row.wall_s:.1f}",
            )  # fmt: skip
            for row in self.rows
        ]
        widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))
            for cells in (header, *lines)
        )

    def csv(self) -> str:
        """The rows as CSV, one line per policy, numbers unrounded (an empty cell: no spread with one seed)."""
        out = io.StringIO()
        names = [f.name for f in dataclasses.fields(PolicySummary)]
        writer = csv.DictWriter(out, names, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})
        return out.getvalue()

    def write(self, title: str = "") -> None:
        """``sweep.csv`` (the rows), ``sweep.json`` (the rows and the runs) and ``sweep.png`` in ``out_dir``."""
        staging = self.csv_path.with_name(f".{self.csv_path.name}.tmp-{os.getpid()}")
        staging.write_text(self.csv(), encoding="utf-8")
        os.replace(staging, self.csv_path)
        rows, runs = [dataclasses.asdict(r) for r in self.rows], [dataclasses.asdict(r) for r in self.runs]
        write_json(self.json_path, {"policies": rows, "runs": runs})
        plot_sweep(self.rows, self.plot_path, title=title)


def plot_sweep(rows: Sequence[PolicySummary], path: str | os.PathLike, *, title: str = "") -> Path:
    """A PNG of best validation accuracy (mean, error bars one sample standard deviation) against trainable
    parameters (log scale) on the left and against wall time on the right, each point named by its policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, sharey=True)
    for axes, key, label in ((left, "trainable_params", "trainable parameters"), (right, "wall_s", "wall time (s)")):
        for row in rows:
            x = getattr(row, key)
            axes.errorbar(x, row.val_acc1_mean, yerr=row.val_acc1_std or 0.0, fmt="o", capsize=4, markersize=5)
            axes.annotate(row.policy, (x, row.val_acc1_mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    left.set_xscale("log")
    left.set_ylabel("best validation accuracy (mean ± s.d. over seeds)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
