"""The training loop: phases, epochs, evaluation, metrics, checkpoints, resume, feature caching.

All I/O lives here; the steps it calls are pure (:mod:`jaxtl.train.step`). The run is a function
of its config: the loader order and the random transforms are functions of (seed, epoch, index),
dropout keys of (seed, step), so a run resumed from ``latest`` ends with the parameters an
uninterrupted run ends with.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one record per
epoch), ``checkpoints/latest`` and ``checkpoints/best`` (links to versioned directories, see
:mod:`jaxtl.train.checkpoint`), ``tensorboard/`` (event files: per-step training loss, per-epoch
metrics and learning rates), ``curves.png``, and ``confusion.json`` / ``confusion.png`` (the
validation confusion matrix of the best checkpoint), and ``.lock`` (held while a process runs it).
The two figures are redrawn at most every ``figures_every_s`` seconds (30) and at the end of every
phase: on small data an epoch is shorter than drawing them.

Crashes: at the end of an epoch ``best`` (when improved) is saved before ``latest``, so the epoch a
resume starts from always has its ``best`` on disk; a run killed at any instant resumes from
``latest`` (or, if that is damaged, from the previous version, with a line saying so) and ends with
the parameters of an uninterrupted run. With ``train.checkpoint_every_steps`` ``latest`` is also
saved inside epochs, with the position of the next batch and the epoch's loss and accuracy sums so
far. A non-finite loss or parameter stops the run before any checkpoint of it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.config import RunConfig, save_config
from jaxtl.data import (
    ConcatSource,
    EvalTransform,
    Loader,
    TfdsSource,
    TrainTransform,
    data_sharding,
    even_batch_size,
    generate_synthetic,
    image_folder_splits,
)
from jaxtl.errors import JaxtlError
from jaxtl.optim import OptimizerConfig, Phase, carry_optimizer_state, group_lr, schedule
from jaxtl.optim.groups import ParamGroups
from jaxtl.train import checkpoint as ckpt
from jaxtl.train import distributed
from jaxtl.train.faults import fault_point
from jaxtl.train.reporting import (
    EventWriter,
    Figures,
    Progress,
    confusion_matrix,
    load_metrics,
    plot_confusion,
    plot_curves,
)
from jaxtl.train.step import (
    ModelState,
    full_model,
    head_of,
    make_eval_step,
    make_features_step,
    make_train_step,
    merge_model,
    split_model,
)
from jaxtl.weights import Preprocessing


class RunError(JaxtlError):
    """A run that cannot start or continue: names the run directory and what to do."""


@dataclasses.dataclass
class RunData:
    train: Any
    val: Any
    classes: tuple[str, ...]
    class_to_idx: dict[str, int]


def load_data(config: RunConfig) -> RunData:
    d = config.data
    if d.source == "tfds":
        train = TfdsSource(d.tfds_name, d.train_split, data_dir=d.tfds_data_dir)
        val = TfdsSource(d.tfds_name, d.val_split, data_dir=d.tfds_data_dir)
        classes = train.classes
    else:
        if d.source == "synthetic":
            s = d.synthetic
            root = generate_synthetic(
                seed=s.seed, num_classes=s.num_classes, train_per_class=s.train_per_class, val_per_class=s.val_per_class
            )
        else:
            root = Path(d.root).expanduser()
        splits = image_folder_splits(root, (d.train_split, d.val_split), max_pixels=d.max_image_pixels)
        train, val = splits[d.train_split], splits[d.val_split]
        classes = train.classes
    return RunData(train, val, tuple(classes), {name: i for i, name in enumerate(classes)})


def _optimizer_config(config: RunConfig) -> OptimizerConfig:
    o = config.optim
    return OptimizerConfig(
        name=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, momentum=o.momentum,
        nesterov=o.nesterov, schedule=o.schedule, warmup_steps=o.warmup_steps, final_lr_fraction=o.final_lr_fraction,
        no_weight_decay=o.no_weight_decay, clip_grad_norm=o.clip_grad_norm,
    )  # fmt: skip


def phases_of(config: RunConfig) -> list[Phase]:
    optimizer = _optimizer_config(config)
    return [
        Phase(
            p.name, p.policy, epochs=p.epochs, optimizer=optimizer, lrs=dict(p.lrs), carry_state=p.carry_state, bn=p.bn
        )
        for p in config.phases
    ]


def _is_cacheable(config: RunConfig, model: nnx.Module, groups: ParamGroups) -> bool:
    """A phase trains on cached features when only the head trains and the input is never augmented."""
    if not config.train.feature_cache or config.data.random_resized_crop or config.data.flip_p > 0:
        return False
    head = f"{model.head_name}."
    return all(name.startswith(head) for name in groups.trainable_names) and all(
        policy == "frozen" for policy in groups.batch_norms.values()
    )


class CachedFeatures(NamedTuple):
    """A frozen backbone's output for one split, by source index; ``valid`` is False for a skipped file."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int32
    valid: np.ndarray  # (N,) bool


class _Discard:
    """Stands in for the event writer and the figures on the processes that do not write the run directory."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *exc) -> None:
        pass


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


class Trainer:
    """Runs ``config`` on a model made by ``make_model(num_classes) -> (model, weights_info)``.

    ``weights_info`` is a dict with at least ``source`` and ``preprocessing`` (a Preprocessing).
    """

    def __init__(
        self,
        config: RunConfig,
        make_model: Callable[[int], tuple[nnx.Module, dict]],
        *,
        log: Callable[[str], None] = print,
        progress_every_s: float = 10.0,
        figures_every_s: float = 30.0,
    ):
        self.config = config
        self.make_model = make_model
        self.log = log
        self.progress_every_s = progress_every_s
        self.figures_every_s = figures_every_s
        self.run_dir = Path(config.run_dir)

    # -- set-up ---------------------------------------------------------------------------------

    def _loaders(self, preprocessing: Preprocessing, num_devices: int):
        """The train, val and feature-pass loaders; each decodes the rows of its batches this process's devices hold."""
        d, seed = self.config.data, self.config.train.seed
        for name, size in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
            if size % num_devices:
                raise RunError(f"{name}={size} does not split across {num_devices} devices; use a multiple of {num_devices}")
        augment = TrainTransform(preprocessing, random_resized_crop=d.random_resized_crop, flip_p=d.flip_p)
        common = {"num_workers": d.num_workers, "skip_bad_files": d.skip_bad_files, "worker_type": d.worker_type}

        def loader(source, transform, batch_size, **kwargs):
            rows = distributed.local_rows(data_sharding(batch_size), batch_size)
            return Loader(source, transform, batch_size=batch_size, rows=rows, **common, **kwargs)

        train = loader(self.data.train, augment, d.batch_size, shuffle=True, seed=seed)
        val = loader(self.data.val, EvalTransform(preprocessing), d.eval_batch_size, shuffle=False)
        # train then val, unaugmented and in order, for computing a frozen backbone's features in one
        # pass: one compiled shape, in batches as even as data.eval_batch_size allows (least padding).
        both = ConcatSource(self.data.train, self.data.val)
        size = even_batch_size(len(both), d.eval_batch_size, multiple=num_devices)
        plain = loader(both, EvalTransform(preprocessing), size, shuffle=False)
        return train, val, plain

    def run(self, resume: bool = False) -> dict[str, Any]:
        # In a multi-process run the first process writes the run directory and the log; the others train.
        self.primary = distributed.is_primary()
        if not self.primary:
            self.log = lambda message: None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir) if self.primary else contextlib.nullcontext():
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        config = self.config
        latest = self.run_dir / "checkpoints" / "latest"
        meta = resumed = None
        if resume:
            resumed = self._load_resume_point(latest)
            meta = resumed.meta
        elif ckpt.has_checkpoint(latest):
            raise RunError(
                f"{self.run_dir} already holds a run (checkpoint {latest}); continue it with --resume, or choose another "
                "run_dir (--set run_dir=...)"
            )
        try:
            if self.primary:
                save_config(config, self.run_dir / "config.yaml")
        except OSError as error:
            raise RunError(
                f"cannot write {self.run_dir / 'config.yaml'}: {error.strerror or error}; free disk space or make "
                f"{self.run_dir} writable"
            ) from None
        self.data = load_data(config)
        num_classes = len(self.data.classes)
        model, self.weights_info = self.make_model(num_classes)
        p: Preprocessing = _with_size(self.weights_info["preprocessing"], config.data.crop_size, config.data.resize_size)
        self.weights_info = {**self.weights_info, "preprocessing": p}
        self.mean, self.std = p.mean, p.std
        devices = jax.device_count()
        train_loader, val_loader, plain_loader = self._loaders(p, devices)
        self.sharding = data_sharding(config.data.batch_size)
        self.eval_sharding = data_sharding(config.data.eval_batch_size)
        replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        phases = phases_of(config)
        self.log(
            f"run {self.run_dir}: {config.model.arch}, {num_classes} classes, {len(self.data.train)} train / "
            f"{len(self.data.val)} val images, batch {config.data.batch_size} on {devices} device(s)"
            + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
            + f", {len(phases)} phase(s)"
        )

        start_phase, start_epoch, start_batch, step = 0, 0, 0, 0
        start_totals = None
        best = {"metric": None, "epoch": None}
        opt_leaves = None
        previous_resumed = None
        if resumed is not None:
            arrays = resumed.arrays
            _load_model_arrays(model, arrays["model"], source=str(resumed.path))
            start_phase, start_epoch, start_batch = meta["phase"], meta["epoch_in_phase"], meta["batch"]
            start_totals = meta.get("epoch_totals")  # of the epoch's batches before start_batch
            step, best = meta["step"], meta["best"]
            opt_leaves = arrays["opt_state"]
            if start_epoch == 0 and start_batch == 0 and start_phase > 0:
                # Saved at the end of the previous phase: its optimizer state seeds this one's carry-over.
                prev = phases[start_phase - 1]
                prev_groups = prev.groups(model)
                _, prev_state = split_model(model, prev_groups)
                prev_opt = prev.optax(prev_groups, prev.epochs * len(train_loader)).init(prev_state.trainable)
                previous_resumed = (prev_groups, _unflatten_like(prev_opt, opt_leaves))
                opt_leaves = None
            where = phases[start_phase].name if start_phase < len(phases) else "(all phases done)"
            self.log(
                f"resumed from {resumed.path}: phase {where}, epoch {start_epoch + 1}, batch {start_batch}, step {step}"
            )

        metrics_path = self.run_dir / "metrics.jsonl"
        # A resumed run hides, in TensorBoard, what the interrupted one logged after its checkpoint.
        self.figures = Figures(self.figures_every_s) if self.primary else _Discard()
        loaders = (train_loader, val_loader, plain_loader)
        purge_step = step + 1 if meta is not None else None
        events = EventWriter(self.run_dir / "tensorboard", purge_step=purge_step) if self.primary else _Discard()
        with (
            events as self.events,
            contextlib.ExitStack() as stack,
        ):
            for loader in loaders:
                stack.callback(loader.close)  # worker processes and their shared memory
            try:
                result = self._phases(
                    model, phases, (start_phase, start_epoch, start_batch, start_totals), step, best, opt_leaves,
                    previous_resumed, loaders, replicated, metrics_path,
                )  # fmt: skip
            except BaseException:
                # A run that stops (a non-finite loss, Ctrl-C) leaves the figures of its last epoch too,
                # but a figure that cannot be drawn must not hide why it stopped.
                with contextlib.suppress(Exception):
                    self.figures.flush()
                raise
            self.figures.flush()
            return result

    def _load_resume_point(self, latest: Path) -> ckpt.GoodCheckpoint:
        """``latest``, or its newest intact previous version if it is damaged (said in one line)."""
        if not ckpt.has_checkpoint(latest):
            raise RunError(
                f"{self.run_dir} has no checkpoint to resume (looked for {latest}); start it without --resume"
            )
        try:
            resumed = ckpt.load_latest_good(latest)
        except ckpt.CheckpointError as error:
            raise RunError(
                f"{self.run_dir} cannot be resumed: {error}. Start the run again, without --resume, in a new run_dir"
            ) from None
        if resumed.damaged:
            path, reason = resumed.damaged[0]
            self.log(
                f"checkpoint {path} is damaged ({reason}); resuming from the previous good checkpoint {resumed.path} "
                f"(step {resumed.meta['step']})"
            )
        return resumed

    def _phases(
        self, model, phases, start, step, best, opt_leaves, previous, loaders, replicated, metrics_path,
    ) -> dict[str, Any]:  # fmt: skip
        """The phases from ``start`` on; ``previous`` seeds the optimizer carry-over.

        ``start`` is (phase, epoch in phase, batch, the epoch's metric totals before that batch or None).
        """
        config = self.config
        start_phase, start_epoch, start_batch, start_totals = start
        train_loader, val_loader, plain_loader = loaders
        epoch_base = sum(p.epochs for p in phases[:start_phase])
        for phase_index in range(start_phase, len(phases)):
            phase = phases[phase_index]
            groups = phase.groups(model)
            self.log(f"phase {phase_index + 1}/{len(phases)} {phase.name!r} ({phase.policy}, {phase.epochs} epochs):")
            self.log(groups.summary(base_lr=phase.optimizer.lr, default_weight_decay=phase.optimizer.weight_decay))
            graphdef, state = split_model(model, groups)
            state = jax.device_put(state, replicated)
            total_steps = phase.epochs * len(train_loader)
            optimizer = phase.optax(groups, total_steps)
            opt_state = optimizer.init(state.trainable)
            if opt_leaves is not None:  # resuming inside this phase
                opt_state = _unflatten_like(opt_state, opt_leaves)
                opt_leaves = None
            elif previous is not None and phase.carry_state:
                opt_state, carried = carry_optimizer_state(previous[0], previous[1], groups, opt_state)
                if carried:
                    self.log(f"  optimizer state carried over for group(s) {', '.join(carried)}")
            # Committed like the step's outputs: an uncommitted leaf (a fresh count) would compile the step twice.
            opt_state = jax.device_put(opt_state, replicated)
            cached = _is_cacheable(config, model, groups)
            compute_dtype = jnp.bfloat16 if config.train.precision == "bf16" else None
            train_step = make_train_step(
                graphdef, optimizer, mean=self.mean, std=self.std, forward=head_of if cached else full_model,
                compute_dtype=compute_dtype, seed=config.train.seed,
            )  # fmt: skip
            eval_step = make_eval_step(
                graphdef, mean=self.mean, std=self.std, forward=head_of if cached else full_model,
                compute_dtype=compute_dtype,
            )  # fmt: skip
            features = None
            if cached:
                started = time.perf_counter()
                features = self._features(graphdef, state, plain_loader, compute_dtype)
                plain_loader.close()  # frees its workers; a later cached phase starts new ones
                self.log(
                    f"  head-only phase on cached features: backbone run once over {len(self.data.train)} + "
                    f"{len(self.data.val)} images in {time.perf_counter() - started:.1f}s"
                )
            for epoch in range(start_epoch if phase_index == start_phase else 0, phase.epochs):
                loader_epoch = epoch_base + epoch
                resuming = phase_index == start_phase and epoch == start_epoch
                first_batch = start_batch if resuming else 0

                save_mid_epoch = functools.partial(
                    self._save_mid_epoch, graphdef, best, phase, phase_index, epoch, loader_epoch
                )
                state, opt_state, step, train_metrics = self._train_epoch(
                    train_step, state, opt_state, train_loader, loader_epoch, first_batch, step, features, phase.name,
                    totals=start_totals if resuming and first_batch else None, checkpoint=save_mid_epoch,
                )  # fmt: skip
                val_metrics, confusion = self._evaluate(eval_step, state, val_loader, features)
                record = {"phase": phase.name, "epoch": loader_epoch + 1, "step": step, **train_metrics, **val_metrics}
                if self.primary:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                self._report_epoch(record, groups, phase, total_steps, (epoch + 1) * len(train_loader), metrics_path)
                self.log(
                    f"  epoch {loader_epoch + 1} ({phase.name}): train loss {train_metrics['train_loss']:.4f} "
                    f"acc {train_metrics['train_acc1']:.3f} | val loss {val_metrics['val_loss']:.4f} "
                    f"acc@1 {val_metrics['val_acc1']:.3f}"
                    + (f" acc@5 {val_metrics['val_acc5']:.3f}" if "val_acc5" in val_metrics else "")
                    + f" | {train_metrics['train_images_per_s']:.1f} img/s"
                )
                model = merge_model(graphdef, jax.device_get(state))
                improved = self._is_better(val_metrics, best)
                position = {"phase": phase_index, "epoch_in_phase": epoch + 1, "batch": 0, "step": step}
                if epoch + 1 == phase.epochs:
                    position.update(phase=phase_index + 1, epoch_in_phase=0)
                if improved:
                    best = {"metric": val_metrics[config.train.checkpoint_metric], "epoch": loader_epoch + 1, **val_metrics}
                meta_out = self._meta(position, best, record)
                arrays = {"model": _model_arrays(model), "opt_state": _leaves(opt_state)}
                self._check_finite_arrays(arrays, val_metrics["val_loss"], step, phase.name, loader_epoch)
                # best before latest: a crash between the two resumes from the previous latest and redoes the epoch.
                if improved:
                    self._save("best", arrays, meta_out, keep_previous=False)
                    self._write_confusion(confusion, loader_epoch + 1)
                self._save("latest", arrays, meta_out)
            self.figures.flush()
            epoch_base += phase.epochs
            previous = (groups, opt_state)
            start_batch = 0
        for loader in (train_loader, val_loader, plain_loader):
            loader.close()
        skipped = sorted(set(train_loader.skipped + val_loader.skipped + plain_loader.skipped))
        count = round(distributed.total(len(skipped)))  # each process skips the files of its rows
        if count:
            self.log(f"skipped {count} unreadable file(s) (data.skip_bad_files): {', '.join(skipped[:5])}")
        return {"best": best, "run_dir": str(self.run_dir), "skipped": count, "model": model}

    # -- epochs ---------------------------------------------------------------------------------

    def _features(self, graphdef, state: ModelState, loader: Loader, compute_dtype) -> dict[str, CachedFeatures]:
        """The eval-mode backbone's pooled features of every train and val example, by source index.

        ``loader`` runs over the train split then the val split (see ``_loaders``).
        """
        features = make_features_step(graphdef, mean=self.mean, std=self.std, compute_dtype=compute_dtype)

        n, size = len(loader.source), loader.batch_size
        out, labels, valid = None, np.zeros((n,), np.int32), np.zeros((n,), bool)
        for b, batch in enumerate(loader.epoch(0)):
            # Each process computes its rows; every process keeps all features (the batches of later
            # epochs mix rows).
            f = distributed.gather(features(state, distributed.put(batch.images, self.eval_sharding, size)))
            mask = distributed.whole(batch.mask, self.eval_sharding, size)
            batch_labels = distributed.whole(batch.labels, self.eval_sharding, size)
            if out is None:
                out = np.zeros((n, f.shape[-1]), np.float32)
            rows = loader.batch_indices(0, b)[mask]  # not the padding, nor a file skipped (data.skip_bad_files)
            out[rows], labels[rows], valid[rows] = f[mask], batch_labels[mask], True
        split = len(self.data.train)
        return {
            "train": CachedFeatures(out[:split], labels[:split], valid[:split]),
            "val": CachedFeatures(out[split:], labels[split:], valid[split:]),
        }

    def _train_epoch(
        self, train_step, state, opt_state, loader: Loader, epoch: int, first_batch: int, step: int, features,
        phase: str, *, totals: dict | None = None, checkpoint=None,
    ):  # fmt: skip
        """The epoch's batches from ``first_batch`` on; ``totals`` are the sums of the batches before it.

        ``checkpoint(state, opt_state, step, next_batch, totals)`` is called every
        ``train.checkpoint_every_steps`` steps that leave batches in the epoch.
        """
        totals = dict(totals or {"loss": 0.0, "correct": 0.0, "count": 0.0})
        every = self.config.train.checkpoint_every_steps
        pending = []  # (step number, metrics on the device)
        started = time.perf_counter()
        images_seen = 0

        progress = Progress(
            len(loader) - first_batch, f"epoch {epoch + 1}", log_every_s=self.progress_every_s,
            stream=None if self.primary else io.StringIO(),  # the first process shows the progress
        )  # fmt: skip

        def drain():
            if not pending:
                return
            loss = count = 0.0
            steps, values = zip(*pending)
            for number, m in zip(steps, jax.device_get(values)):
                if not math.isfinite(float(m["loss"])):
                    raise RunError(
                        f"non-finite training loss ({float(m['loss'])}) at step {number} (phase {phase!r}, epoch "
                        f"{epoch + 1}); stopped without writing a checkpoint of it. {self._last_good()} Lower the "
                        "learning rate (optim.lr, phases.N.lrs) or set optim.clip_grad_norm"
                    )
                loss += float(m["loss"]) * float(m["count"])
                count += float(m["count"])
                totals["correct"] += float(m["correct"])
            totals["loss"] += loss
            totals["count"] += count
            pending.clear()
            if count:
                self.events.scalar("train/loss_step", loss / count, step)
                progress.update(0, loss=totals["loss"] / max(totals["count"], 1.0))

        batches = (
            self._cached_batches(loader, epoch, first_batch, features["train"])
            if features is not None
            else loader.epoch(epoch, first_batch)
        )
        size = loader.batch_size
        for index, batch in enumerate(batches, start=first_batch):
            mask = distributed.put(batch.mask, self.sharding, size)
            # The images of the whole batch; with several processes a collective that every one joins
            # (each holds some rows), so that all take the same branch below.
            images = int(distributed.whole(batch.mask, self.sharding, size).sum())
            if not images:  # every file of the batch skipped (data.skip_bad_files): no statistics to take
                step += 1
                progress.update(1, images=0)
            else:
                inputs = distributed.put(batch.images, self.sharding, size)
                labels = distributed.put(batch.labels, self.sharding, size)
                state, opt_state, metrics = train_step(state, opt_state, inputs, labels, mask, step)
                step += 1
                pending.append((step, metrics))
                fault_point("train.step")
                images_seen += images
                progress.update(1, images=images)
                if len(pending) >= self.config.train.log_every:
                    drain()
            if every and checkpoint is not None and step % every == 0 and index + 1 < len(loader):
                drain()  # stops at a non-finite loss before it is saved
                checkpoint(state, opt_state, step, index + 1, dict(totals))
        drain()
        progress.close()
        seconds = time.perf_counter() - started
        n = max(totals["count"], 1.0)
        return state, opt_state, step, {
            "train_loss": totals["loss"] / n,
            "train_acc1": totals["correct"] / n,
            "train_images_per_s": images_seen / max(seconds, 1e-9),
        }

    def _save_mid_epoch(
        self, graphdef, best: dict, phase: Phase, phase_index: int, epoch: int, loader_epoch: int, state, opt_state,
        step: int, batch: int, totals: dict,
    ) -> None:  # fmt: skip
        """checkpoints/latest before ``batch`` of epoch ``epoch`` of a phase (train.checkpoint_every_steps)."""
        arrays = {"model": _model_arrays(merge_model(graphdef, jax.device_get(state))), "opt_state": _leaves(opt_state)}
        self._check_finite_arrays(arrays, 0.0, step, phase.name, loader_epoch)
        position = {"phase": phase_index, "epoch_in_phase": epoch, "batch": batch, "step": step, "epoch_totals": totals}
        self._save("latest", arrays, self._meta(position, best, {}))

    def _check_finite_arrays(self, arrays: dict, val_loss: float, step: int, phase: str, epoch: int) -> None:
        """Stops the run before a checkpoint with a non-finite parameter, statistic or optimizer state is written."""
        bad = [
            ".".join(str(getattr(k, "key", k)) for k in path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(arrays)
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.isfinite(leaf).all()
        ]
        if bad or not math.isfinite(val_loss):
            what = f"non-finite values in {', '.join(bad[:3])}" if bad else f"a non-finite validation loss ({val_loss})"
            raise RunError(
                f"{what} after step {step} (phase {phase!r}, epoch {epoch + 1}); stopped without writing a checkpoint "
                f"of it. {self._last_good()} Lower the learning rate (optim.lr, phases.N.lrs) or set "
                "optim.clip_grad_norm"
            )

    def _save(self, name: str, arrays: dict, meta: dict, *, keep_previous: bool = True) -> None:
        if not self.primary:
            return
        try:
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, arrays, meta, keep_previous=keep_previous)
        except ckpt.CheckpointError as error:
            raise RunError(f"{error}, then continue the run: jaxtl train --resume {self.run_dir}") from None

    def _last_good(self) -> str:
        latest = self.run_dir / "checkpoints" / "latest"
        if not latest.exists():
            return "No checkpoint was written before."
        try:
            return f"The last good checkpoint is {latest} (step {ckpt.load_meta(latest)['step']})."
        except ckpt.CheckpointError as error:
            return f"The last checkpoint is damaged: {error}."

    @staticmethod
    def _cached_batches(loader: Loader, epoch: int, first_batch: int, cached: CachedFeatures):
        """The loader's batches of ``epoch`` (same order, same padding) with cached features as images.

        A file skipped in the feature pass is masked out, as the loader masks it.
        """
        from jaxtl.data import Batch

        for b in range(first_batch, len(loader)):
            indices = loader.batch_indices(epoch, b)[loader.rows]
            safe = np.where(indices >= 0, indices, 0)
            rows = (indices >= 0) & cached.valid[safe]
            yield Batch(
                images=np.where(rows[:, None], cached.features[safe], 0.0).astype(np.float32),
                labels=np.where(rows, cached.labels[safe], 0).astype(np.int32),
                mask=rows,
                indices=indices,
            )

    def _evaluate(self, eval_step, state, loader: Loader, features) -> tuple[dict[str, float], np.ndarray]:
        """Validation metrics and the confusion matrix (rows: true class, columns: predicted)."""
        totals = {"loss": 0.0, "correct": 0.0, "correct5": 0.0, "count": 0.0}
        batches = self._cached_batches(loader, 0, 0, features["val"]) if features is not None else loader.epoch(0)
        num_classes = len(self.data.classes)
        confusion = np.zeros((num_classes, num_classes), np.int64)
        size = loader.batch_size
        for index, batch in enumerate(batches):
            labels = distributed.put(batch.labels, self.eval_sharding, size)
            mask = distributed.put(batch.mask, self.eval_sharding, size)
            logits, m = eval_step(state, distributed.put(batch.images, self.eval_sharding, size), labels, mask)
            if index == 0:
                fault_point("train.eval")
            predictions = distributed.gather(jnp.argmax(logits, -1))  # every process's rows
            m = jax.device_get(m)
            rows = distributed.whole(batch.mask, self.eval_sharding, size)
            labels = distributed.whole(batch.labels, self.eval_sharding, size)
            confusion += confusion_matrix(labels[rows], predictions[rows], num_classes)
            totals["loss"] += float(m["loss"]) * float(m["count"])
            totals["correct"] += float(m["correct"])
            totals["correct5"] += float(m["correct5"])
            totals["count"] += float(m["count"])
        n = max(totals["count"], 1.0)
        out = {"val_loss": totals["loss"] / n, "val_acc1": totals["correct"] / n}
        if num_classes > 5:
            out["val_acc5"] = totals["correct5"] / n
        return out, confusion

    def _write_confusion(self, confusion: np.ndarray, epoch: int) -> None:
        """confusion.json (counts, rows the true class) and confusion.png of the best checkpoint's epoch."""
        if not self.primary:
            return
        data = {"epoch": epoch, "classes": list(self.data.classes), "matrix": confusion.tolist()}
        tmp = self.run_dir / "confusion.json.tmp"
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(self.run_dir / "confusion.json")
        self.figures.update("confusion", lambda: plot_confusion(confusion, self.data.classes, self.run_dir / "confusion.png"))

    def _report_epoch(
        self, record: dict, groups: ParamGroups, phase: Phase, total_steps: int, phase_steps: int, metrics_path: Path
    ) -> None:
        """TensorBoard scalars of the epoch (metrics; each group's learning rate at its last step) and the curves figure."""
        scalars = {f"{k.split('_', 1)[0]}/{k.split('_', 1)[1]}": v for k, v in record.items() if k.startswith(("train_", "val_"))}
        optimizer = phase.optimizer
        for name, group in groups.groups.items():
            if not group.frozen:
                lr = schedule(optimizer, group_lr(groups, name, optimizer), total_steps)
                scalars[f"lr/{name}"] = float(lr(phase_steps - 1) if callable(lr) else lr)
        self.events.scalars(scalars, record["step"])
        title = f"{self.config.model.arch}, {self.run_dir.name}"
        self.figures.update("curves", lambda: plot_curves(load_metrics(metrics_path), self.run_dir / "curves.png", title=title))

    def _is_better(self, metrics: dict[str, float], best: dict) -> bool:
        key = self.config.train.checkpoint_metric
        if best["metric"] is None:
            return True
        return metrics[key] > best["metric"] if key == "val_acc1" else metrics[key] < best["metric"]

    def _meta(self, position: dict, best: dict, record: dict) -> dict:
        info = self.weights_info
        return {
            **position,
            "best": best,
            "metrics": record,
            "arch": self.config.model.arch,
            "num_classes": len(self.data.classes),
            "classes": list(self.data.classes),
            "class_to_idx": self.data.class_to_idx,
            "weights": {k: v for k, v in info.items() if k != "preprocessing"},
            "preprocessing": dataclasses.asdict(info["preprocessing"]),
            "config": self.config.to_dict(),
        }


def _model_arrays(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters and BN statistics, nested by torchvision name (orbax keys hold no dots)."""
    from jaxtl.models.state_dict import state_dict
    from jaxtl.weights import _nest

    return _nest(state_dict(model))


def _load_model_arrays(model: nnx.Module, arrays: dict[str, Any], source: str = "checkpoint") -> None:
    from jaxtl.models.state_dict import load_state_dict
    from jaxtl.weights import _flatten

    load_state_dict(model, _flatten(arrays), source=source)


def _leaves(tree: Any) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(jax.device_get(tree)))}


def _unflatten_like(template: Any, leaves: dict[str, np.ndarray]) -> Any:
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        raise RunError(
            f"the checkpoint's optimizer state has {len(leaves)} arrays, the config's optimizer {treedef.num_leaves}; "
            "was the config changed since the run started?"
        )
    return jax.tree.unflatten(treedef, [jnp.asarray(leaves[str(i)]) for i in range(treedef.num_leaves)])


def _with_size(p: Preprocessing, crop_size: int | None, resize_size: int | None) -> Preprocessing:
    """The weights' preprocessing at another resolution; mean, std and interpolation stay the weights'."""
    if crop_size is None and resize_size is None:
        return p
    crop = crop_size or p.crop_size
    resize = resize_size or max(crop, round(crop * p.resize_size / p.crop_size))
    return dataclasses.replace(p, crop_size=crop, resize_size=resize)

