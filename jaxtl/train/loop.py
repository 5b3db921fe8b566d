"""The training loop: phases of epochs over a typed :class:`RunState`, validation, metrics and checkpoints.

All I/O lives here and in the run directory; the steps it calls are pure (:mod:`jaxtl.train.step`).
The run is a function of its config: the loader order and the random transforms are functions of
(seed, epoch, index), dropout keys of (seed, step), so a run resumed from ``latest`` ends with the
parameters an uninterrupted run ends with.

Crashes: at the end of an epoch ``best`` (when improved) is saved before ``latest``, so the epoch a
resume starts from always has its ``best`` on disk; with ``train.checkpoint_every_steps`` ``latest``
is also saved inside epochs, with the position of the next batch and the epoch's sums so far. In a
phase on cached features both are saved at the phase's end (a ``best`` of an earlier epoch as soon as
the run stops inside the phase). A non-finite loss or parameter stops the run before any checkpoint
of it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtl.config import RunConfig
from jaxtl.data import data_sharding
from jaxtl.optim import (
    ParamGroups,
    Phase,
    Plateau,
    carry_optimizer_state,
    learning_rates,
    plateau_peaks,
    set_plateau_scales,
)
from jaxtl.optim.optimizer import step_plateau
from jaxtl.train import checkpoint as ckpt
from jaxtl.train import distributed, ema
from jaxtl.train.callbacks import Callback
from jaxtl.train.diagnostics import epoch_diagnostics, group_scalars
from jaxtl.train.drain import Drain
from jaxtl.train.evaluate import SplitPredictions, compute_dtype_of, evaluate
from jaxtl.train.faults import fault_point
from jaxtl.train.feature_store import feature_key, load_or_compute
from jaxtl.train.features import (
    CachedFeatures,
    cached_batches,
    compute_features,
    head_sees_fixed_features,
    is_cacheable,
)
from jaxtl.train.inputs import RunData, RunLoaders
from jaxtl.train.losses import run_loss
from jaxtl.train.probe_head import probe_head
from jaxtl.train.progress import Progress
from jaxtl.train.resume import load_model_arrays, model_arrays, unflatten_like
from jaxtl.train.run_dir import RunDirectory, RunError
from jaxtl.train.run_steps import run_eval_step, run_features_step, run_mixing, run_train_step
from jaxtl.train.saving import RunCheckpoints, checkpoint_arrays
from jaxtl.train.state import Best, CheckpointMeta, EpochTotals, RunState, Watch
from jaxtl.train.step import (
    ModelState,
    merge_model,
    split_model,
)
from jaxtl.train.stopping import stopping_of, watch_epoch
from jaxtl.train.task import checkpoint_metric, scores
from jaxtl.weights import Preprocessing


@dataclasses.dataclass
class Run:
    """What a run trains: its config, model, data, the weights it starts from, its preprocessing, its directory,
    and the arrays it started from (:func:`jaxtl.train.diagnostics.starting_weights`; None: no distances)."""

    config: RunConfig
    model: nnx.Module
    data: RunData
    weights: dict[str, Any]
    preprocessing: Preprocessing
    directory: RunDirectory
    start: dict[str, Any] | None = None

    def meta(self, state: RunState, record: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(
            state=state, metrics=record, arch=self.config.model.arch, classes=self.data.classes,
            class_to_idx=self.data.class_to_idx, weights=self.weights, preprocessing=self.preprocessing,
            config=self.config.to_dict(),
        )  # fmt: skip


@dataclasses.dataclass
class PhaseContext:
    """One phase as the loop runs it: its groups, compiled steps, optimizer, and (head-only) cached features."""

    index: int
    phase: Phase
    groups: ParamGroups
    graphdef: nnx.GraphDef
    train_step: Callable
    eval_step: Callable
    features: dict[str, CachedFeatures] | None
    total_steps: int
    first_loader_epoch: int  # the loader epoch of the phase's first epoch (epochs count across phases)
    ema: ModelState | None = None  # the moving average of the weights (train.ema), split as the model is

    def where(self, loader_epoch: int) -> str:
        """The phase and epoch, for a message."""
        return f"phase {self.phase.name!r}, epoch {loader_epoch + 1}"


class Trainer:
    """Runs the phases of ``run`` from a checkpoint's position (or the start), calling ``callbacks``."""

    def __init__(self, run: Run, loaders: RunLoaders, callbacks: Sequence[Callback] = (), *,
                 log: Callable[[str], None] = print, progress_every_s: float = 10.0):  # fmt: skip
        self.run = run
        self.config = run.config
        self.loaders = loaders
        self.callbacks = tuple(callbacks)
        self.log = log
        self.progress_every_s = progress_every_s
        self.sharding = data_sharding(self.loaders.train.batch_size)  # accumulate_steps micro-batches in one
        mixing = run_mixing(run.config.data)
        if mixing.enabled:
            log(f"mixing: {mixing.describe()}; the loss on the mixed class probabilities")
        self.replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        self.compute_dtype = compute_dtype_of(run.config.train.precision)
        self.loss_fn = run_loss(run.config.train, run.data, log)
        self.events: Any = None
        self.ema_arrays: dict | None = None  # the average between phases, as checkpoints hold it
        self.checkpoints = RunCheckpoints(run.directory)
        # The val outputs of the epoch that saved ``best``, for report.html: kept where the report is written
        # (the primary of a one-process run of a single-label task); they are small (at most 2**24 values, 64 MiB).
        self.keep_outputs = (
            not run.data.multilabel
            and run.directory.primary
            and jax.process_count() == 1
            and len(run.data.val) * len(run.data.classes) <= 1 << 24
        )
        self.best_outputs: SplitPredictions | None = None
        self.drift_references: dict[tuple[str, ...], float] = {}  # the starting weights' norms, once per run

    @property
    def phases(self) -> tuple[Phase, ...]:
        return self.config.phases

    def train(self, resumed: ckpt.GoodCheckpoint | None, *, restart: bool = False) -> tuple[RunState, nnx.Module]:
        """Every phase from the resume point (or the start); returns the final state and the trained model.

        ``restart``: the run starts again from the beginning in a directory where it stopped before its first
        checkpoint (what that attempt logged to TensorBoard is hidden, as a resume hides its interrupted tail).
        """
        state, opt_leaves, previous = RunState(), None, None
        if self.config.train.ema is not None:
            self.ema_arrays = model_arrays(self.run.model)  # the first update copies the model anyway
        if resumed is not None:
            if self.config.train.ema is not None:
                self.ema_arrays = resumed.arrays["ema"]
            state = RunState.from_json(resumed.meta)
            opt_leaves = resumed.arrays["opt_state"]
            if state.at_phase_start and 0 < state.phase <= len(self.phases):
                # Saved at the end of the previous phase: its optimizer state seeds this one's carry-over.
                previous = self._previous_phase(state.phase - 1, opt_leaves)
                opt_leaves = None
            where = self.phases[state.phase].name if state.phase < len(self.phases) else "(all phases done)"
            self.log(f"resumed from {resumed.path}: phase {where}, epoch {state.epoch_in_phase + 1}, "
                     f"batch {state.batch}, step {state.step}")  # fmt: skip
        directory = self.run.directory
        purge_step = state.step + 1 if resumed is not None or restart else None  # hides the interrupted tail
        with directory.events(purge_step) as self.events:
            try:
                while state.phase < len(self.phases):  # early stopping may end the run before its last phase
                    state, previous = self._run_phase(state.phase, state, opt_leaves, previous)
                    opt_leaves = None
            except BaseException:
                # A run that stops (a non-finite loss, Ctrl-C) leaves its best epoch's checkpoint and the figures of
                # its last epoch too, but a checkpoint or figure that cannot be written must not hide why it stopped.
                with contextlib.suppress(Exception):
                    self.checkpoints.write_pending_best()
                with contextlib.suppress(Exception):
                    directory.figures.flush()
                raise
            directory.figures.flush()
        return state, self.run.model

    # -- phases ---------------------------------------------------------------------------------

    def _previous_phase(self, index: int, opt_leaves: dict) -> tuple[ParamGroups, Any]:
        phase = self.phases[index]
        groups = phase.groups(self.run.model)
        _, model_state = split_model(self.run.model, groups)
        optimizer = phase.optax(groups, phase.epochs * len(self.loaders.train), self.config.optim)
        return groups, unflatten_like(optimizer.init(model_state.trainable), opt_leaves)

    def _run_phase(self, index: int, state: RunState, opt_leaves, previous) -> tuple[RunState, tuple]:
        phase, model = self.phases[index], self.run.model
        groups = phase.groups(model)
        optimizer_config = phase.optimizer or self.config.optim
        where = f"phase {index + 1}/{len(self.phases)} {phase.name!r} ({phase.describe()}, {phase.describe_length()}):"
        self.log(where)
        self.log(groups.summary(optimizer_config.lr, optimizer_config.weight_decay, optimizer_config.l2sp_alpha))
        graphdef, model_state = split_model(model, groups)
        model_state = jax.device_put(model_state, self.replicated)
        total_steps = phase.epochs * len(self.loaders.train)
        optimizer = phase.optax(groups, total_steps, self.config.optim)
        opt_state = optimizer.init(model_state.trainable)
        if opt_leaves is not None:  # resuming inside this phase
            opt_state = unflatten_like(opt_state, opt_leaves)
        elif previous is not None and phase.carry_state:
            opt_state, carried = carry_optimizer_state(previous[0], previous[1], groups, opt_state)
            if carried:
                self.log(f"  optimizer state carried over for group(s) {', '.join(carried)}")
        if optimizer_config.schedule == "plateau":  # the scales of the record: 1 at a phase's start, none carried
            opt_state = set_plateau_scales(opt_state, state.plateau.scales(plateau_peaks(groups, optimizer_config)))
        # Committed like the step's outputs: an uncommitted leaf (a fresh count) would compile the step twice.
        opt_state = jax.device_put(opt_state, self.replicated)
        context = self._phase_context(index, groups, graphdef, optimizer, model_state)
        if self.ema_arrays is not None:
            average = nnx.merge(*nnx.split(model))  # a model of its own for the average, split like the model
            load_model_arrays(average, self.ema_arrays, source="the moving average")
            context.ema = jax.device_put(split_model(average, groups)[1], self.replicated)
        for callback in self.callbacks:
            callback.on_phase_start(phase, groups, state)
        while state.phase == index:  # the phase's epochs, or fewer when early stopping ends it
            state, model_state, opt_state = self._run_epoch(context, state, model_state, opt_state)
        self.run.directory.figures.flush()
        return state, (groups, opt_state)

    def _phase_context(self, index: int, groups: ParamGroups, graphdef, optimizer, model_state) -> PhaseContext:
        phase, model, p = self.phases[index], self.run.model, self.run.preprocessing
        cached = is_cacheable(self.config, model, groups)
        if phase.solver == "linear_probe" and not head_sees_fixed_features(self.config, model, groups):
            raise RunError(
                f"phase {phase.name!r} (solver: linear_probe) fits the head to features computed once: give it the "
                "head_only policy and no augmentation or mixing (data.random_resized_crop, flip_p, augment, "
                "color_jitter, random_erasing, mixup_alpha, cutmix_alpha)"
            )
        cached = cached or phase.solver == "linear_probe"
        num_classes = len(self.run.data.classes)
        train_step = run_train_step(self.config, graphdef, optimizer, p, num_classes=num_classes, cached=cached,
                                    loss_fn=self.loss_fn, groups=groups)  # fmt: skip
        eval_step = run_eval_step(self.config, graphdef, p, cached=cached)
        features = None
        if cached:
            started = time.perf_counter()
            step = run_features_step(self.config, graphdef, p)
            sharding = data_sharding(self.loaders.both.batch_size)
            train_size = len(self.run.data.train)

            def compute():
                return compute_features(step, model_state, self.loaders.both, sharding, train_size)

            store = self.config.train.feature_cache_dir
            if store is not None and jax.process_count() == 1:
                key = feature_key(model_state, self.loaders.both.source, p, self.compute_dtype, train_size)
                features = load_or_compute(store, key, compute, self.log)
            else:
                features = compute()
            self.loaders.both.close()  # frees its workers; a later cached phase starts new ones
            self.log(
                f"  head-only phase on cached features: backbone run once over {len(self.run.data.train)} + "
                f"{len(self.run.data.val)} images in {time.perf_counter() - started:.1f}s"
            )
        return PhaseContext(
            index=index, phase=phase, groups=groups, graphdef=graphdef, train_step=train_step, eval_step=eval_step,
            features=features, total_steps=phase.epochs * len(self.loaders.train),
            first_loader_epoch=sum(p.epochs or 0 for p in self.phases[:index]),
        )  # fmt: skip

    # -- epochs ---------------------------------------------------------------------------------

    def _run_epoch(self, context: PhaseContext, state: RunState, model_state: ModelState, opt_state):
        """One epoch from ``state.batch`` on, its validation, records and checkpoints; returns the new state."""
        config, phase = self.config, context.phase
        loader_epoch = context.first_loader_epoch + state.epoch_in_phase
        state, model_state, opt_state, train_metrics = self._train_epoch(context, state, model_state, opt_state)
        sums = train_metrics.pop("group_sums", {})
        self.run.model = merge_model(context.graphdef, jax.device_get(model_state))
        val_features = context.features["val"] if context.features is not None else None
        evaluated = context.ema if context.ema is not None else model_state  # train.ema: the average's metrics
        evaluation = evaluate(context.eval_step, evaluated, self.loaders.val, len(self.run.data.classes), val_features,
                              keep_outputs=self.keep_outputs)  # fmt: skip
        val_metrics = evaluation.metrics()
        record = {"phase": phase.name, "epoch": loader_epoch + 1, "step": state.step, **train_metrics, **val_metrics,
                  "val_per_class": evaluation.per_class(self.run.data.classes),
                  "groups": epoch_diagnostics(context.groups, sums, self.run.start, self.run.model,
                                              self.drift_references)}  # fmt: skip
        self.run.directory.append_metrics(record)
        self._report_epoch(context, record, state.epoch_in_phase + 1, state.plateau)
        self.log(
            f"  epoch {loader_epoch + 1} ({phase.name}): train loss {train_metrics['train_loss']:.4f} "
            f"acc {train_metrics['train_acc1']:.3f} | val{' (EMA)' if context.ema is not None else ''} loss "
            f"{val_metrics['val_loss']:.4f} {scores(val_metrics)} | {train_metrics['train_images_per_s']:.1f} img/s"
        )
        key = checkpoint_metric(config)
        improved = state.best.improved_by(val_metrics, key)
        best = Best(val_metrics[key], loader_epoch + 1, val_metrics) if improved else state.best
        watch, stop = watch_epoch(
            state.watch, val_metrics, loader_epoch + 1, phase, config.train.early_stopping, self.log
        )
        done = stop is not None or state.epoch_in_phase + 1 == phase.epochs
        next_phase = len(self.phases) if stop == "run" else context.index + done
        early = stopping_of(phase, config.train.early_stopping)
        if done and early is not None and early.ends == "phase":
            watch = Watch()  # patience counts within a phase
        plateau = Plateau()  # optim.schedule plateau: a phase starts at its configured lrs with a fresh scheduler
        if not done:
            optimizer = context.phase.optimizer or config.optim
            plateau, scales = step_plateau(state.plateau, val_metrics, context.groups, optimizer, self.log)
            if scales is not None:
                opt_state = jax.device_put(set_plateau_scales(opt_state, scales), self.replicated)
        state = RunState(
            phase=next_phase, epoch_in_phase=0 if done else state.epoch_in_phase + 1, step=state.step, best=best,
            watch=watch, plateau=plateau,
        )  # fmt: skip
        arrays = self._arrays(self.run.model, opt_state, context)
        if context.ema is not None:
            self.ema_arrays = arrays["ema"]  # the next phase's average starts from the last epoch's
        self.checkpoints.check_finite(arrays, val_metrics["val_loss"], context.where(loader_epoch))
        meta = self.run.meta(state, record)
        # On cached features an epoch of the head costs little beside the feature pass that any resume of the
        # phase runs again: there the checkpoints are written at the phase's end (a new best is kept until then,
        # or until the run stops inside the phase), and a resume replays the head's epochs, to the same bits.
        held = context.features is not None and not done
        # best before latest: a crash between the two resumes from the previous latest and redoes the epoch.
        if improved:
            self.checkpoints.hold_best(arrays, meta)
            self.best_outputs = evaluation.outputs
            if evaluation.confusion is not None:
                self.run.directory.write_confusion(evaluation.confusion, self.run.data.classes, loader_epoch + 1)
        if not held:
            self.checkpoints.write_pending_best()
            self.checkpoints.save("latest", arrays, meta, like="best" if improved else None)
        for callback in self.callbacks:
            callback.on_epoch_end(record, state)
        return state, model_state, opt_state

    def _train_epoch(self, context: PhaseContext, state: RunState, model_state: ModelState, opt_state):
        """The epoch's batches from ``state.batch`` on; ``state.totals`` are the sums of the batches before it."""
        if context.phase.solver == "linear_probe":
            return self._probe_epoch(context, state, model_state, opt_state)
        loader = self.loaders.train
        loader_epoch = context.first_loader_epoch + state.epoch_in_phase
        every = self.config.train.checkpoint_every_steps
        drain = Drain(
            context.phase.name, loader_epoch, state.totals if state.batch else EpochTotals(), self.callbacks,
            self.events, self.checkpoints.last_good,
        )  # fmt: skip
        started, images_seen = time.perf_counter(), 0
        progress = Progress(
            len(loader) - state.batch, f"epoch {loader_epoch + 1}", log_every_s=self.progress_every_s,
            stream=None if self.run.directory.primary else io.StringIO(),  # the first process shows the progress
        )  # fmt: skip
        drain.progress = progress
        batches = (
            cached_batches(loader, loader_epoch, state.batch, context.features["train"])
            if context.features is not None
            else loader.epoch(loader_epoch, state.batch)
        )
        step, size = state.step, loader.batch_size
        ema_every = self.config.train.ema.every_steps if self.config.train.ema is not None else 0
        for index, batch in enumerate(batches, start=state.batch):
            mask = distributed.put(batch.mask, self.sharding, size)
            # The images of the whole batch; with several processes a collective that every one joins (each holds
            # some rows), so that all take the same branch below.
            images = int(distributed.whole(batch.mask, self.sharding, size).sum())
            if not images:  # every file of the batch skipped (data.skip_bad_files): no statistics to take
                step += 1
                progress.update(1, images=0)
            else:
                inputs = distributed.put(batch.images, self.sharding, size)
                if self.loaders.device is not None:  # the policy, colour jitter and erasing, on the device
                    put = functools.partial(distributed.put, sharding=self.sharding, batch_size=size)
                    inputs = self.loaders.device(inputs, batch.indices, loader_epoch, put)
                labels = distributed.put(batch.labels, self.sharding, size)
                model_state, opt_state, metrics = context.train_step(model_state, opt_state, inputs, labels, mask, step)
                if context.ema is not None and step % ema_every == 0:
                    decay = ema.decay_at(step // ema_every, self.config.train.ema.decay, self.config.train.ema.warmup)
                    context.ema = ema.update(context.ema, model_state, decay)
                step += 1
                drain.pending.append((step, metrics))
                fault_point("train.step")
                images_seen += images
                progress.update(1, images=images)
                if len(drain.pending) >= self.config.train.log_every:
                    drain()
            if every and step % every == 0 and index + 1 < len(loader):
                drain()  # stops at a non-finite loss before it is saved
                position = dataclasses.replace(state, batch=index + 1, step=step, totals=drain.totals)
                self._save_mid_epoch(context, position, model_state, opt_state)
        drain()
        progress.close()
        seconds = time.perf_counter() - started
        totals = drain.totals
        metrics = {"train_loss": totals.mean_loss, "train_acc1": totals.accuracy,
                   "train_images_per_s": images_seen / max(seconds, 1e-9), "group_sums": totals.groups}  # fmt: skip
        return dataclasses.replace(state, batch=0, step=step, totals=EpochTotals()), model_state, opt_state, metrics

    def _probe_epoch(self, context: PhaseContext, state: RunState, model_state: ModelState, opt_state):
        """A linear_probe phase's epoch: the head set to the probe of the cached train features (no optimizer step)."""
        started, train = time.perf_counter(), context.features["train"]
        model = merge_model(context.graphdef, jax.device_get(model_state))
        probe, metrics = probe_head(model, train, len(self.run.data.classes), context.phase.probe_C)
        model_state = jax.device_put(split_model(model, context.groups)[1], self.replicated)
        if context.ema is not None:  # the average starts at the solved head: a solve is no sequence of steps
            context.ema = jax.tree.map(jnp.copy, model_state)
        self.log(
            f"  linear probe (C={context.phase.probe_C:g}): L-BFGS converged in {probe.iterations} iterations, "
            f"objective {probe.objective:.4f}; the head set to it"
        )
        metrics["train_images_per_s"] = int(train.valid.sum()) / max(time.perf_counter() - started, 1e-9)
        return dataclasses.replace(state, batch=0, totals=EpochTotals()), model_state, opt_state, metrics

    def _save_mid_epoch(self, context: PhaseContext, state: RunState, model_state: ModelState, opt_state) -> None:
        """checkpoints/latest before batch ``state.batch`` of the epoch (train.checkpoint_every_steps)."""
        self.checkpoints.write_pending_best()  # the best that latest's position knows of is on disk before it
        model = merge_model(context.graphdef, jax.device_get(model_state))
        arrays = self._arrays(model, opt_state, context)
        self.checkpoints.check_finite(arrays, 0.0, context.where(context.first_loader_epoch + state.epoch_in_phase))
        self.checkpoints.save("latest", arrays, self.run.meta(state, {}))

    def _arrays(self, model: nnx.Module, opt_state, context: PhaseContext) -> dict:
        average = merge_model(context.graphdef, jax.device_get(context.ema)) if context.ema is not None else None
        return checkpoint_arrays(model, opt_state, average)

    # -- records ----------------------------------------------------------------------------------

    def _report_epoch(self, context: PhaseContext, record: dict, epochs_done: int, plateau: Plateau) -> None:
        """TensorBoard scalars of the epoch (metrics; each group's learning rate at its last step, with ``plateau``'s
        reductions) and the curves."""
        scalars = {
            f"{k.split('_', 1)[0]}/{k.split('_', 1)[1]}": v
            for k, v in record.items()
            if k.startswith(("train_", "val_")) and isinstance(v, (int, float))
        }
        optimizer = context.phase.optimizer or self.config.optim
        last = epochs_done * len(self.loaders.train) - 1
        for name, lr in learning_rates(context.groups, optimizer, context.total_steps, last, plateau.scale).items():
            scalars[f"lr/{name}"] = lr
        self.events.scalars({**scalars, **group_scalars(record["groups"])}, record["step"])
        self.run.directory.draw_curves(f"{self.config.model.arch}, {self.run.directory.path.name}")
