"""``lr_find``: fastai's learning-rate range test on one phase of a run config, and its suggestions.

    from jaxtl.train.lr_find import lr_find
    result = lr_find("configs/quickstart.yaml", phase=0)
    print(result.summary())  # valley, steep, minimum/10, each with the --set override that applies it
    result.plot("lr_find.png")

The test mirrors fastai's ``Learner.lr_find`` and its ``LRFinder`` callback (fastai/callback/schedule.py):
the phase trains on its train batches for ``num_iter`` steps while the learning rate grows exponentially from
``start_lr`` to ``end_lr`` (``SchedExp``: ``start * (end / start) ** (i / num_iter)`` at step ``i``, so the last
step runs just below ``end_lr``); each step's loss goes into fastai's ``AvgSmoothLoss`` (an exponential moving
average with ``beta=0.98``, debiased); the test stops once the smoothed loss is more than 4 times the lowest so
far (``stop_div``). The suggestions are fastai's ``valley`` (its default), ``steep`` and ``minimum`` (the lr
of the lowest smoothed loss, divided by 10), computed on the smoothed losses without the first
``num_iter // 10`` points and the last 5, as ``Learner.lr_find`` does.

One difference: fastai goes on training after a NaN loss (its smoothed loss then stays NaN, and its suggestions
drop every point from the first NaN on); here the test stops at the first non-finite smoothed loss, and the
suggestions are the ones fastai's would be. Suggestions are computed in float64 (fastai's in float32 tensors).

The test trains a copy: the model it starts from, any run directory and its checkpoints are untouched, and it
writes no file itself (:meth:`LRFindResult.plot` and :meth:`LRFindResult.save` do, where they are told to).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxtl.config import ConfigError, RunConfig
from jaxtl.data import Batch, data_sharding
from jaxtl.optim import ParamGroups, build_optimizer, group_lr
from jaxtl.train import distributed
from jaxtl.train.features import cached_batches, compute_features, is_cacheable
from jaxtl.train.fit import resolve_config, run_model
from jaxtl.train.inputs import RunData, RunLoaders, build_loaders, load_data, with_size
from jaxtl.train.losses import run_loss
from jaxtl.train.lr_curve import (
    DIVERGENCE,
    MIN_ITERATIONS,
    SKIP_END,
    STOP_DIVERGED,
    STOP_NON_FINITE,
    SUGGESTION_LABELS,
    SUGGESTIONS,
    LossRecord,
    Suggestion,
    exponential_lrs,
    scale_by_ramp,
    suggestion_window,
)
from jaxtl.train.progress import Progress
from jaxtl.train.run_dir import RunError
from jaxtl.train.run_steps import run_features_step, run_train_step
from jaxtl.train.step import ModelState, split_model

# -- the result --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """What a range test recorded, its suggestions, and the config overrides that apply them.

    Attributes:
        lrs: ``(n,)`` float64, the learning rate of each step: the phase's peak lr (its largest group's); every
            other group's lr kept its ratio to it.
        losses: ``(n,)`` float64, each step's batch loss.
        smoothed: ``(n,)`` float64, fastai's smoothed loss after each step.
        num_iter, start_lr, end_lr: the test's settings; ``n <= num_iter``.
        stop: why it stopped: ``"num_iter"``, ``"diverged"`` (the smoothed loss passed 4 times its lowest) or
            ``"non-finite"``.
        phase_index, phase_name: the phase tested (0-based, as ``phases.N`` counts).
        lr_settings: each config key that sets a trained group's lr (``optim.lr``, ``phases.N.lrs.GROUP``,
            ``phases.N.optimizer.lr``) and its value divided by the peak lr.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    num_iter: int
    start_lr: float
    end_lr: float
    stop: str
    phase_index: int
    phase_name: str
    lr_settings: Mapping[str, float]

    @property
    def suggestions(self) -> dict[str, Suggestion]:
        """``valley``, ``steep`` and ``minimum`` (see the module's docstring).

        Raises:
            RunError: fewer than two points are left once the first ``num_iter // 10`` and last 5 are dropped.
        """
        lrs, smoothed = self._fastai_record()
        lrs, smoothed = suggestion_window(lrs, smoothed, self.num_iter)
        if len(smoothed) < 2:
            raise RunError(
                f"the range test stopped ({self.stop}) after {len(self.lrs)} of {self.num_iter} steps, at lr "
                f"{self.lrs[-1]:.1e}: too few points are left for a suggestion once the first {self.num_iter // 10}"
                f" and the last {SKIP_END} are left out; start lower (start_lr) or take more steps (num_iter)"
            )
        return {name: suggest(lrs, smoothed) for name, suggest in SUGGESTIONS.items()}

    def _fastai_record(self) -> tuple[np.ndarray, np.ndarray]:
        """The steps as fastai's recorder holds them: after a non-finite smoothed loss that does not stop it, fastai
        goes on to ``num_iter`` steps, recording NaN from the next one on (``inf - inf`` in the lerp, or NaN)."""
        if self.stop != STOP_NON_FINITE:
            return self.lrs, self.smoothed
        smoothed = np.full(self.num_iter, np.nan)
        smoothed[: len(self.smoothed)] = self.smoothed
        return exponential_lrs(self.start_lr, self.end_lr, self.num_iter), smoothed

    def overrides(self, lr: float) -> list[str]:
        """The ``KEY=VALUE`` overrides that make ``lr`` the phase's peak lr, the other groups keeping their ratio."""
        return [f"{key}={lr * ratio:.1e}" for key, ratio in self.lr_settings.items()]

    def set_arguments(self, lr: float) -> str:
        """:meth:`overrides` as ``jaxtl train`` takes them: ``--set optim.lr=3.0e-04``."""
        return " ".join(f"--set {override}" for override in self.overrides(lr))

    def summary(self) -> str:
        """The stop, a table of the suggestions with their overrides, and the one to use (valley, fastai's)."""
        lines = [self._describe_stop()]
        suggestions = self.suggestions
        width = max(map(len, SUGGESTION_LABELS.values()))
        lines.append(f"  {'suggestion':<{width}}  lr       override")
        for name, suggestion in suggestions.items():
            label = SUGGESTION_LABELS[name]
            lines.append(f"  {label:<{width}}  {suggestion.lr:.1e}  {self.set_arguments(suggestion.lr)}")
        lines.append(f"use (valley, fastai's default): {self.set_arguments(suggestions['valley'].lr)}")
        return "\n".join(lines)

    def _describe_stop(self) -> str:
        steps = f"{len(self.lrs)} of {self.num_iter} steps"
        if self.stop == STOP_DIVERGED:
            return (
                f"stopped after {steps}, at lr {self.lrs[-1]:.1e}: the smoothed loss {self.smoothed[-1]:.4g} passed "
                f"{DIVERGENCE:g} times its lowest, {np.min(self.smoothed):.4g}"
            )
        if self.stop == STOP_NON_FINITE:
            return f"stopped after {steps}, at lr {self.lrs[-1]:.1e}: the loss is {self.losses[-1]}"
        lowest = np.min(self.smoothed)
        return f"ran all {steps}, lr {self.lrs[0]:.1e} to {self.lrs[-1]:.1e}; the lowest smoothed loss {lowest:.4g}"

    def to_json(self) -> dict[str, Any]:
        """Plain values (NaN and infinities as None): the settings, each step, and the suggestions if there are."""
        try:
            suggestions = {
                name: {**s._asdict(), "overrides": self.overrides(s.lr)} for name, s in self.suggestions.items()
            }
        except RunError:
            suggestions = None
        return {
            "phase": self.phase_index, "phase_name": self.phase_name, "num_iter": self.num_iter,
            "start_lr": self.start_lr, "end_lr": self.end_lr, "stop": self.stop,
            "lr_settings": dict(self.lr_settings), "lrs": _plain(self.lrs), "losses": _plain(self.losses),
            "smoothed": _plain(self.smoothed), "suggestions": suggestions,
        }  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Writes :meth:`to_json` to ``path`` (parent directories are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Saves a PNG of the smoothed loss against the lr (log scale) without the last 5 steps, as fastai's
        ``plot_lr_find`` draws it, with the suggestions marked (none when too few points are left)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        shown = slice(0, max(len(self.lrs) - SKIP_END, 0))
        axes.plot(self.lrs[shown], self.smoothed[shown], label="smoothed loss")
        try:
            suggestions = self.suggestions
        except RunError:
            suggestions = {}
        for (name, suggestion), color in zip(suggestions.items(), ("C1", "C2", "C3")):
            label = f"{SUGGESTION_LABELS[name]}: {suggestion.lr:.1e}"
            axes.plot(suggestion.at_lr, suggestion.at_loss, "o", color=color, label=label)
        axes.set_xscale("log")
        axes.set_xlabel(f"learning rate (peak group of phase {self.phase_index + 1}, {self.phase_name!r})")
        axes.set_ylabel("smoothed training loss")
        axes.grid(alpha=0.3, which="both")
        axes.legend(loc="best", fontsize=8)
        axes.set_title(title or f"lr-find, {self._describe_stop().split(':')[0]}", fontsize=9)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
        return path


def _plain(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


# -- the test ----------------------------------------------------------------------------------------------------


def lr_find(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    phase: int | str = 0,
    model: nnx.Module | None = None,
    data: RunData | Mapping[str, Any] | Sequence[Any] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    stop_div: bool = True,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> LRFindResult:
    """Runs fastai's learning-rate range test on one phase of ``config`` (see the module's docstring).

    The phase trains as it would in ``fit``: its groups and freezing, its BatchNorm policy, its optimizer
    (settings, weight decay, clipping) and loss, on the train loader's batches (epochs follow one another when
    ``num_iter`` is longer than one; a head-only phase trains on cached features as the trainer does), but with
    a constant schedule times the ramp. The ramp scales every trainable group's update by the same factor, so
    with per-group learning rates (differential learning rates) each group's lr grows from its ratio to the
    phase's peak lr (the largest group's): the lr recorded, plotted and suggested is that peak lr, and the
    overrides that apply a suggestion set every key the groups' lrs come from, keeping the ratios. A group with
    its own optax transformation has its updates scaled by the same factor. The step is compiled once.

    Args:
        config: a :class:`RunConfig`, a mapping as a YAML file would hold it, or a YAML path.
        phase: which phase: its index from 0 (as ``phases.N`` counts) or its name.
        model: a jaxtl model to start from instead of building ``config.model`` (e.g. a trained one); it is
            copied, and left as it was.
        data: the splits to use instead of ``config.data``, as :func:`jaxtl.train.fit` takes them.
        start_lr, end_lr: the ramp's first lr and the lr it would reach after ``num_iter`` steps; 0 < start < end.
        num_iter: steps at most (fastai's ``num_it``), at least ``MIN_ITERATIONS``.
        stop_div: stop once the smoothed loss passes 4 times its lowest.
        overrides: dotted ``key=value`` settings applied on top of ``config``.
        log: where progress lines go.

    Returns:
        The :class:`LRFindResult`.

    Raises:
        ConfigError: a bad phase, ramp or config value, naming it. RunError, DataError, WeightsError: as ``fit``.
    """
    _check_ramp(start_lr, end_lr, num_iter)
    config = resolve_config(config, None, overrides)
    index = _phase_index(config, phase)
    run_data = RunData.of(data) if data is not None else load_data(config.data)
    model, _, preprocessing = run_model(config, model, len(run_data.classes), None, log)
    model = _copy(model)  # split_model sets modes on it and the step donates its arrays: the caller's stay whole
    preprocessing = with_size(preprocessing, config.data.crop_size, config.data.resize_size)
    loaders = build_loaders(config, run_data, preprocessing, jax.device_count())
    try:
        return _RangeTest(config, index, model, run_data, preprocessing, loaders, log).run(
            start_lr, end_lr, num_iter, stop_div
        )
    finally:
        loaders.close()


def default_output(config: RunConfig, phase_index: int) -> Path:
    """Where ``jaxtl lr-find`` writes its plot by default: ``RUN_DIR/lr_find/phaseN-NAME.png`` (N from 1), a
    ``{time}`` in the run directory filled in as ``jaxtl train`` fills it; the JSON goes next to it."""
    run_dir = config.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    return Path(run_dir) / "lr_find" / f"phase{phase_index + 1}-{config.phases[phase_index].name}.png"


def _check_ramp(start_lr: float, end_lr: float, num_iter: int) -> None:
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a finite number > 0")
    if start_lr >= end_lr:
        raise ConfigError(f"start_lr={start_lr:g} must be below end_lr={end_lr:g}: the learning rate ramps up")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < MIN_ITERATIONS:
        raise ConfigError(
            f"num_iter={num_iter!r} must be an integer >= {MIN_ITERATIONS}: the suggestions leave out the first "
            f"num_iter // 10 steps and the last {SKIP_END}, and need 2 left (fastai's default is 100)"
        )


def _phase_index(config: RunConfig, phase: int | str) -> int:
    names = [p.name for p in config.phases]
    if isinstance(phase, str) and phase in names:
        return names.index(phase)
    if isinstance(phase, int) and not isinstance(phase, bool) and 0 <= phase < len(names):
        return phase
    listed = ", ".join(f"{i} {name!r}" for i, name in enumerate(names))
    raise ConfigError(f"phase={phase!r} is not a phase of the config; its phases (index from 0, name): {listed}")


def _copy(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf.copy(), state))


def collect_lr_settings(config: RunConfig, index: int, groups: ParamGroups) -> tuple[float, dict[str, float]]:
    """The phase's peak lr (its largest trained group's) and each config key that sets a trained group's lr,
    with its value divided by that peak: ``phases.N.lrs.GROUP`` for a group with its own lr, ``optim.lr`` (or
    ``phases.N.optimizer.lr`` when the phase has its own optimizer) for groups at ``lr * lr_mult``."""
    phase = config.phases[index]
    optimizer = phase.optimizer or config.optim
    base_key = f"phases.{index}.optimizer.lr" if phase.optimizer is not None else "optim.lr"
    values, peak = {}, 0.0
    for name, group in groups.groups.items():
        if group.frozen or group.transform is not None:
            continue
        key = base_key if group.lr is None else f"phases.{index}.lrs.{name}"
        values[key] = optimizer.lr if group.lr is None else group.lr
        peak = max(peak, group_lr(groups, name, optimizer))
    if not values:
        raise ConfigError(
            f"phase {index} {phase.name!r}: every trained group brings its own optax transformation; the range "
            "test ramps a learning rate that the optimizer's settings give"
        )
    if peak <= 0:
        raise ConfigError(
            f"phase {index} {phase.name!r}: every trained group's lr is 0 ({', '.join(values)}); the range test "
            "keeps the groups' ratios to the largest, so give one a learning rate above 0"
        )
    return peak, {key: value / peak for key, value in values.items()}


class _RangeTest:
    """One phase's range test: its groups, steps and batches, run until the record says stop."""

    def __init__(self, config: RunConfig, index: int, model, data: RunData, preprocessing, loaders: RunLoaders, log):
        self.config, self.index, self.phase = config, index, config.phases[index]
        self.data, self.preprocessing, self.loaders, self.log = data, preprocessing, loaders, log
        self.groups = self.phase.groups(model)
        self.cached = is_cacheable(config, model, self.groups)
        self.graphdef, state = split_model(model, self.groups)
        self.sharding = data_sharding(loaders.train.batch_size)  # train.accumulate_steps micro-batches in one
        self.replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        self.state = jax.device_put(state, self.replicated)
        # The loader epochs the phase's training would start with (epochs count across phases).
        self.first_epoch = sum(p.epochs or 0 for p in config.phases[:index])

    def run(self, start_lr: float, end_lr: float, num_iter: int, stop_div: bool) -> LRFindResult:
        peak, settings = collect_lr_settings(self.config, self.index, self.groups)
        optimizer_config = self.phase.optimizer or self.config.optim
        self.log(
            f"lr-find: phase {self.index + 1}/{len(self.config.phases)} {self.phase.name!r} ({self.phase.describe()})"
            f", up to {num_iter} steps, lr {start_lr:g} to {end_lr:g} (exponential), {len(self.loaders.train)} "
            f"batches of {self.config.data.batch_size} an epoch"
        )
        self.log(self.groups.summary(optimizer_config.lr, optimizer_config.weight_decay, optimizer_config.l2sp_alpha))
        lrs = exponential_lrs(start_lr, end_lr, num_iter)
        optimizer = self._optimizer(lrs / peak)
        step = self._train_step(optimizer)
        state = self.state
        opt_state = jax.device_put(optimizer.init(state.trainable), self.replicated)
        record, stop = LossRecord(num_iter, stop_div), None
        with Progress(num_iter, "lr-find", unit="img") as progress:
            for batch in self._batches(state):
                if not batch.mask.any():  # every file of the batch skipped (data.skip_bad_files): no step
                    continue
                i = len(record.lrs)
                inputs, labels, mask = self._put(batch, self.first_epoch + i // len(self.loaders.train))
                state, opt_state, metrics = step(state, opt_state, inputs, labels, mask, i)
                loss = float(metrics["loss"])  # each step's loss decides whether the next one runs
                stop = record.add(float(lrs[i]), loss)
                progress.update(1, images=int(batch.mask.sum()), loss=loss, lr=f"{lrs[i]:.1e}")
                if stop is not None:
                    break
        return LRFindResult(
            lrs=np.asarray(record.lrs), losses=np.asarray(record.losses), smoothed=np.asarray(record.smoothed),
            num_iter=num_iter, start_lr=start_lr, end_lr=end_lr, stop=stop, phase_index=self.index,
            phase_name=self.phase.name, lr_settings=settings,
        )  # fmt: skip

    def _optimizer(self, factors: np.ndarray) -> optax.GradientTransformation:
        """The phase's optimizer at a constant schedule (each group at its peak lr), then the ramp."""
        config = dataclasses.replace(self.phase.optimizer or self.config.optim, schedule="constant")
        return optax.chain(build_optimizer(self.groups, config), scale_by_ramp(factors))

    def _train_step(self, optimizer: optax.GradientTransformation) -> Callable:
        """The run's train step (its loss, Mixup/CutMix and accumulation), as the trainer builds it."""
        loss_fn = run_loss(self.config.train, self.data, self.log)
        return run_train_step(self.config, self.graphdef, optimizer, self.preprocessing, cached=self.cached,
                              num_classes=len(self.data.classes), loss_fn=loss_fn)  # fmt: skip

    def _batches(self, state: ModelState) -> Iterator[Batch]:
        """The train loader's batches, epoch after epoch; cached features for a head-only phase."""
        train = self.loaders.train
        features = self._features(state) if self.cached else None
        epoch = self.first_epoch
        while True:
            if features is not None:
                yield from cached_batches(train, epoch, 0, features)
            else:
                yield from train.epoch(epoch)
            epoch += 1

    def _features(self, state: ModelState):
        """The frozen backbone's features of the train split, computed once (the trainer's feature pass)."""
        started = time.perf_counter()
        step = run_features_step(self.config, self.graphdef, self.preprocessing)
        both = self.loaders.both
        features = compute_features(step, state, both, data_sharding(both.batch_size), len(self.data.train))
        self.log(f"  head-only phase on cached features: backbone run once in {time.perf_counter() - started:.1f}s")
        return features["train"]

    def _put(self, batch: Batch, epoch: int):
        size = self.loaders.train.batch_size
        inputs = distributed.put(batch.images, self.sharding, size)
        if self.loaders.device is not None:  # the policy, colour jitter and erasing, on the device
            put = functools.partial(distributed.put, sharding=self.sharding, batch_size=size)
            inputs = self.loaders.device(inputs, batch.indices, epoch, put)
        labels, mask = (distributed.put(array, self.sharding, size) for array in (batch.labels, batch.mask))
        return inputs, labels, mask
