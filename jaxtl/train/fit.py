"""``fit``: a training run from Python, as ``jaxtl train`` runs it (the command is a thin call of this).

from jaxtl.train import fit
result = fit("configs/quickstart.yaml", overrides=["phases.0.epochs=1"])
result = fit(config, freezing={"head": my_rules, "norms": Labels(my_labels, groups)}, resume=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxtl import models
from jaxtl.config import ConfigError, RunConfig, config_from_dict, load_config, read_config_file
from jaxtl.models.names import dotted_name
from jaxtl.optim import Freezing
from jaxtl.train import checkpoint as ckpt
from jaxtl.train import distributed
from jaxtl.train.callbacks import Callback
from jaxtl.train.diagnostics import starting_weights
from jaxtl.train.evaluate import SplitPredictions
from jaxtl.train.figures import load_metrics
from jaxtl.train.inputs import RunData, build_loaders, check_task, load_data, with_size
from jaxtl.train.loop import Run, Trainer
from jaxtl.train.report import write_report
from jaxtl.train.resume import check_resume_config, load_model_arrays, load_resume_point
from jaxtl.train.run_dir import RunDirectory, RunError, RunLock
from jaxtl.train.state import Best, CheckpointMeta


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What a run leaves.

    Attributes:
        run_dir: the run directory.
        history: one record per epoch of the whole run (resumed parts included), as in metrics.jsonl.
        best: the best validation result (its metric, epoch and metrics).
        best_checkpoint, latest_checkpoint: the checkpoint paths (``best`` is None if no epoch ran).
        classes: class names in label order.
        model: the trained model (its latest parameters), in train mode.
        skipped: unreadable files skipped (data.skip_bad_files), counted over all processes.
    """

    run_dir: Path
    history: list[dict[str, Any]]
    best: Best
    best_checkpoint: Path | None
    latest_checkpoint: Path
    classes: tuple[str, ...]
    model: nnx.Module
    skipped: int

    @property
    def best_metrics(self) -> dict[str, float]:
        return dict(self.best.metrics)


def fit(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    model: nnx.Module | None = None,
    freezing: Freezing | Mapping[str, Freezing] | None = None,
    data: RunData | Mapping[str, Any] | Sequence[Any] | None = None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> FitResult:
    """Trains as ``config`` says, in its run directory: phases, validation, metrics, checkpoints, and
    ``report.html`` (:mod:`jaxtl.train.report`) from the best checkpoint at the end.

    Args:
        config: a :class:`RunConfig`, a mapping as a YAML file would hold it, or a YAML path.
        model: a jaxtl model to train instead of building ``config.model`` (any architecture jaxtl has,
            e.g. from ``convert.from_torchvision``); its head must have as many classes as the data.
        freezing: what phases train, given in Python: a policy name, a rules function ``model -> [Rule]``,
            a list of rules or :class:`jaxtl.optim.Labels`; one for every phase, or a mapping by phase name.
        data: the splits to use instead of ``config.data``: a :class:`RunData`, ``{"train": source, "val": source}``
            or ``(train, val)``; sources as :mod:`jaxtl.data.sources` defines them.
        callbacks: :class:`Callback` objects that see each phase, step and epoch.
        resume: continue the run in ``config.run_dir`` from its latest checkpoint; what the checkpoint holds
            (architecture, classes, data, the phases run) must not change.
        overrides: dotted ``key=value`` settings applied on top of ``config`` (``"optim.lr=3e-4"``).
        log: where progress lines go.

    Returns:
        The run's :class:`FitResult`. A resumed run ends with the parameters an uninterrupted one would.

    Raises:
        ConfigError, RunError, DataError, WeightsError: one line naming the key, file or directory and what to do.
    """
    config = resolve_config(config, freezing, overrides)
    by_steps = [f"phases.{i}" for i, phase in enumerate(config.phases) if phase.epochs is None]
    if by_steps:
        raise ConfigError(f"{', '.join(by_steps)} set steps; a training run's phases are epochs long (set epochs)")
    if not resume and "{time}" in config.run_dir:  # a fresh directory per run, e.g. runs/quickstart-{time}
        config = dataclasses.replace(config, run_dir=config.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))
    primary = distributed.is_primary()  # the first process writes the run directory and the log
    log = log if primary else (lambda message: None)
    directory = RunDirectory(config.run_dir, primary=primary)
    directory.path.mkdir(parents=True, exist_ok=True)
    with RunLock(directory.path) if primary else contextlib.nullcontext():
        return _fit_locked(config, directory, _Given(model, data, tuple(callbacks), resume, log))


@dataclasses.dataclass(frozen=True)
class _Given:
    """What the caller of :func:`fit` gave besides the config."""

    model: nnx.Module | None
    data: Any
    callbacks: tuple[Callback, ...]
    resume: bool
    log: Callable[[str], None]


def _fit_locked(config: RunConfig, directory: RunDirectory, given: _Given) -> FitResult:
    log, callbacks, data = given.log, given.callbacks, given.data
    resumed = meta = None
    restart = given.resume and not ckpt.has_checkpoint(directory.latest) and directory.config_path.is_file()
    if restart:
        # Stopped before its first checkpoint (on cached features the first is written at the phase's end).
        log(f"{directory.path} has no checkpoint yet: the run starts again from its beginning")
    elif given.resume:
        resumed = load_resume_point(directory.path, log)
        meta = CheckpointMeta.from_json(resumed.meta, str(resumed.path))
        check_resume_config(meta.config, config.to_dict(), meta)
    elif ckpt.has_checkpoint(directory.latest):
        raise RunError(
            f"{directory.path} already holds a run (checkpoint {directory.latest}); continue it with --resume "
            "(fit(..., resume=True)), or choose another run_dir (--set run_dir=...)"
        )
    run_data = RunData.of(data) if data is not None else load_data(config.data)
    check_task(config, run_data)
    for split, source in (("train", run_data.train), ("val", run_data.val)):
        problems = getattr(source, "problems", None) or ()  # rows or samples skipped as bad (data.skip_bad_files)
        if problems:
            more = f"; and {len(problems) - 1} more (jaxtl data inspect lists them)" if len(problems) > 1 else ""
            log(f"{split}: skipped {len(problems)} bad row(s) or sample(s) (data.skip_bad_files): {problems[0]}{more}")
    if meta is not None and run_data.classes != meta.classes:
        raise RunError(f"the data's classes {list(run_data.classes)} differ from the checkpoint's {list(meta.classes)}")
    model, weights, preprocessing = run_model(config, given.model, len(run_data.classes), meta, log)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, arch=weights["arch"]))
    directory.write_config(config)
    # run_model builds a resumed run's own model at random init: its starting weights are loaded again.
    resumed_weights = meta.weights if meta is not None and given.model is None else None
    start = starting_weights(model, config, len(run_data.classes), resumed_weights, log)
    if resumed is not None:
        load_model_arrays(model, resumed.arrays["model"], source=str(resumed.path))
    preprocessing = with_size(preprocessing, config.data.crop_size, config.data.resize_size)
    devices = jax.device_count()
    loaders = build_loaders(config, run_data, preprocessing, devices)
    log(
        f"run {directory.path}: {config.model.arch}, {len(run_data.classes)} classes, {len(run_data.train)} train / "
        f"{len(run_data.val)} val images, batch {config.data.batch_size}"
        + (f" x {k} accumulated" if (k := config.train.accumulate_steps) > 1 else "")
        + f" on {devices} device(s)"
        + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", {len(config.phases)} phase(s)"
    )
    run = Run(config, model, run_data, {k: v for k, v in weights.items() if k != "arch"}, preprocessing, directory,
              start)  # fmt: skip
    with contextlib.closing(loaders):  # worker processes and their shared memory
        trainer = Trainer(run, loaders, callbacks, log=log)
        state, model = trainer.train(resumed, restart=restart)
    skipped = loaders.skipped
    count = round(distributed.total(len(skipped)))  # each process skips the files of its rows
    if count:
        log(f"skipped {count} unreadable file(s) (data.skip_bad_files): {', '.join(skipped[:5])}")
    if directory.primary and directory.best.exists():
        if run_data.multilabel:
            log("report.html: single-label tasks only; the per-class AP, AUROC and F1 are in metrics.jsonl")
        elif jax.process_count() == 1:
            _write_report(directory, run_data, log, trainer.best_outputs)
        else:  # one process evaluating alone would keep the others waiting at their shutdown barrier
            log(f"report.html: write it with `jaxtl eval {directory.best} --report` (not in a multi-process run)")
    result = FitResult(
        run_dir=directory.path.absolute(), history=_history(directory.metrics_path) if directory.primary else [],
        best=state.best, best_checkpoint=directory.best.absolute() if directory.best.exists() else None,
        latest_checkpoint=directory.latest.absolute(), classes=run_data.classes, model=model, skipped=count,
    )  # fmt: skip
    for callback in callbacks:
        callback.on_fit_end(result)
    return result


def _write_report(
    directory: RunDirectory, data: RunData, log: Callable[[str], None], outputs: SplitPredictions | None
) -> None:
    """RUN_DIR/report.html from the best checkpoint, on the images the run validated on; ``outputs``: the val
    outputs of the epoch that saved ``best`` where the loop kept them (else the report evaluates it again)."""
    predictions = figures = None
    if outputs is not None:
        missing = np.setdiff1d(np.arange(len(data.val)), outputs.indices)  # files skipped as unreadable
        predictions = dataclasses.replace(outputs, skipped=tuple(data.val.describe(int(i)) for i in missing))
        # The run's figures, drawn at its end from the final metrics and the best epoch's confusion matrix.
        drawn = {name: directory.path / f"{name}.png" for name in ("curves", "confusion")}
        if all(path.is_file() for path in drawn.values()):
            figures = {name: path.read_bytes() for name, path in drawn.items()}
    try:
        report = write_report(directory.best, directory.path / "report.html", source=data.val,
                              predictions=predictions, figures=figures)  # fmt: skip
    except Exception as error:  # the run's checkpoints and metrics are written: its report is not worth failing it
        log(
            f"report.html was not written: {type(error).__name__}: {error}; write it with "
            f"`jaxtl eval {directory.best} --report`"
        )
        return
    log(f"report: {report.path}")


def resolve_config(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike,
    freezing: Freezing | Mapping[str, Freezing] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """``config`` as a RunConfig, with ``overrides`` applied and ``freezing`` set as the phases' policies."""
    if isinstance(config, RunConfig):
        if not overrides and freezing is None:
            return config
        data, source = _editable(config), "config"
    elif isinstance(config, Mapping):
        data, source = dict(config), "config"
    else:
        if freezing is None:
            return load_config(config, overrides)
        data, source = read_config_file(config), str(config)
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            return config_from_dict(data, overrides, source)  # the error that names what the top level must be
        data = dict(data)
    if freezing is not None:
        data = _with_freezing(data, freezing, source)
    return config_from_dict(data, overrides, source)


def _editable(config: RunConfig) -> dict[str, Any]:
    """``config`` as plain values, keeping the phases' Python-only policies as they are."""
    data = config.to_dict()
    for plain, phase in zip(data["phases"], config.phases):
        plain["policy"] = phase.policy
    return data


def _with_freezing(data: dict[str, Any], freezing: Any, source: str) -> dict[str, Any]:
    phases = data.get("phases")
    if phases is None:
        phases = RunConfig().to_dict()["phases"]
    if not isinstance(phases, list) or not all(isinstance(p, Mapping) and "name" in p for p in phases):
        raise ConfigError(f"{source}: phases must be a list of mappings with a name, to take freezing= by name")
    names = [p["name"] for p in phases]
    by_name = dict(freezing) if isinstance(freezing, Mapping) else dict.fromkeys(names, freezing)
    unknown = [name for name in by_name if name not in names]
    if unknown:
        raise ConfigError(
            f"freezing= names phase(s) {', '.join(map(str, unknown))}; the config's phases: {', '.join(names)}"
        )
    updated = []
    for phase in phases:
        phase = dict(phase)
        if phase["name"] in by_name:
            phase["policy"], phase["rules"] = by_name[phase["name"]], []
        updated.append(phase)
    return {**data, "phases": updated}


def run_model(config: RunConfig, model, num_classes: int, meta: CheckpointMeta | None, log):
    """(model, weights info with its ``arch``, preprocessing): the caller's, the checkpoint's, or the config's."""
    arch = config.model.arch
    if model is not None:
        spec = getattr(model, "weight_spec", None)
        arch = getattr(spec, "arch", None) or arch
        _check_model(model, arch, num_classes)
    elif meta is not None:  # resuming: the checkpoint's arrays replace every parameter, so no weights are needed
        model = models.create(arch, num_classes=num_classes, seed=config.train.seed)
    else:
        model = models.load_pretrained(
            arch, num_classes=num_classes, weights=config.model.weights, seed=config.train.seed,
            download_timeout_s=config.model.download_timeout_s,
            allow_random_init_fallback=config.model.allow_random_init_fallback, log=log,
        )  # fmt: skip
    if meta is not None:
        return model, {"arch": meta.arch, **meta.weights}, meta.preprocessing
    spec = model.weight_spec
    weights = {"arch": arch, "source": spec.source, "name": spec.name, "sha256": spec.sha256}
    return model, {k: v for k, v in weights.items() if v is not None}, spec.preprocessing


def _check_model(model: nnx.Module, arch: str, num_classes: int) -> None:
    """A caller's model must be ``arch`` (set model.arch to its architecture) with ``num_classes`` outputs."""
    arrays = nnx.to_flat_state(nnx.state(model, nnx.Param))
    options = models.model_options(arch, {dotted_name(path): variable.get_value() for path, variable in arrays})
    expected = _shapes(models.abstract_model(arch, num_classes=num_classes, **options))
    if _shapes(model) != expected:
        head = getattr(model, "num_classes", "?")
        raise RunError(
            f"the model given is not a {arch} with {num_classes} classes (its head has {head}); set model.arch to its "
            f"architecture, and give it the data's {num_classes} classes (jaxtl.models.reset_head after resizing)"
        )


def _shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {path: tuple(variable.get_value().shape) for path, variable in nnx.to_flat_state(state)}


def _history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, the last of each epoch (a resumed run redoes an epoch whose checkpoint was lost)."""
    if not path.exists():
        return []
    by_epoch = {record["epoch"]: record for record in load_metrics(path)}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]
