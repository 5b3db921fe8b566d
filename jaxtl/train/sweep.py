"""``sweep``: a study comparing freezing strategies, each policy and seed a normal run directory, and their table.

    from jaxtl.train.sweep import sweep
    result = sweep("configs/quickstart.yaml", ["head_only", "full", "lp_ft"], seeds=2, overrides=["model.weights=null"])
    print(result.table())  # best val accuracy (mean and spread over seeds), trainable parameters, FLOPs, times

Every policy gets the same budget of E epochs (the sum of the config's phases' epochs, or ``epochs=``) and the same
base learning rate: each group trains at ``optim.lr`` times its rule's ``lr_mult``, no phase sets ``lrs``. A run
is a :func:`jaxtl.train.fit` run in ``OUT/<policy>/seed<k>``; once it has finished, its numbers are written to
``sweep-result.json`` there. A sweep started again reads the finished runs back, resumes an interrupted one from
its latest checkpoint and starts the others, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxtl import models
from jaxtl.config import ConfigError, RunConfig, config_from_dict, read_config_file
from jaxtl.optim import ParamGroupError, Phase
from jaxtl.optim.policies import POLICIES, get_policy
from jaxtl.train import checkpoint as ckpt
from jaxtl.train.callbacks import Callback
from jaxtl.train.features import is_cacheable
from jaxtl.train.fit import fit, resolve_config
from jaxtl.train.inputs import config_preprocessing, load_data
from jaxtl.train.losses import run_loss
from jaxtl.train.resume import CHANGEABLE
from jaxtl.train.run_dir import RunError
from jaxtl.train.run_steps import run_train_step
from jaxtl.train.step import merge_model, split_model
from jaxtl.train.sweep_table import SweepResult, SweepRun, summarize, write_json

RESULT_FILE = "sweep-result.json"  # a finished run's numbers, in its run directory
TIMING_FILE = "sweep-timing.json"  # its training time and step times so far, kept at each epoch's end
# Li, Grandvalet and Davoine (ICML 2018, arXiv:1802.01483) choose alpha per target dataset by cross-validation
# rather than prescribing one value: a default to start from, which `l2sp:ALPHA` replaces.
L2SP_ALPHA = 0.01
VOCABULARY = (
    "head_only, last_n_blocks:N, full[:BACKBONE_LR_MULT], discriminative[:FACTOR], layerwise_lr_decay[:DECAY], "
    "bitfit, norm_only, surgical:first|middle|last, l2sp[:ALPHA], lp_ft, gradual, config"
)


def sweep_epochs(config: RunConfig, epochs: int | None = None) -> int:
    """The budget E of every policy: ``epochs``, or the sum of the config's phases' epochs."""
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"epochs={epochs}: a sweep's budget must be at least 1 epoch")
        return epochs
    return sum(phase.epochs or 0 for phase in config.phases) or 1


def policy_phases(spec: str, config: RunConfig, *, epochs: int | None = None) -> tuple[Phase, ...]:
    """What the sweep's policy ``spec`` trains, within the budget of E epochs (:func:`sweep_epochs`).

    A built-in policy (:func:`jaxtl.optim.policies.get_policy`: ``head_only``, ``last_n_blocks:1``, ``full``,
    ``surgical:first`` ...) is one phase of E epochs. Composites: ``l2sp[:ALPHA]`` is ``full`` with
    ``optim.l2sp_alpha`` (:func:`l2sp_alpha`); ``lp_ft`` is a linear probe of the head (one epoch that solves it,
    Kumar et al., ICLR 2022, arXiv:2202.10054) then ``full`` for E epochs; ``gradual`` is ``head_only``, then
    ``last_n_blocks:1``, then ``full``, E // 3, E // 3 and the rest of the E epochs, the first two ending early once
    the validation loss has not improved for 2 epochs (``until: plateau``); ``config`` is the config's own phases.

    Raises:
        ConfigError: an unknown spec (listing the vocabulary), a bad argument, or ``gradual`` with E < 3.
    """
    budget = sweep_epochs(config, epochs)
    name, colon, _ = spec.partition(":")
    if name in ("lp_ft", "gradual", "config") and colon:
        raise ConfigError(f"sweep policy {spec!r}: {name} takes no argument")
    if name == "config":
        return tuple(config.phases)
    if name == "l2sp":
        l2sp_alpha(spec)
        return (Phase(spec, "full", epochs=budget),)
    if name == "lp_ft":
        return (Phase("probe", "head_only", epochs=1, solver="linear_probe"), Phase("finetune", "full", epochs=budget))
    if name == "gradual":
        if budget < 3:
            raise ConfigError(f"sweep policy gradual unfreezes in 3 phases: give at least 3 epochs (got {budget})")
        third = budget // 3
        return (
            Phase("head", "head_only", epochs=third, until="plateau"),
            Phase("last_block", "last_n_blocks:1", epochs=third, until="plateau"),
            Phase("full", "full", epochs=budget - 2 * third),
        )
    if name not in POLICIES:
        raise ConfigError(f"unknown sweep policy {spec!r}; known: {VOCABULARY}")
    try:
        get_policy(spec)
    except ParamGroupError as error:
        message = str(error)
        raise ConfigError(message if repr(spec) in message else f"sweep policy {spec!r}: {message}") from None
    return (Phase(spec, spec, epochs=budget),)


def l2sp_alpha(spec: str) -> float | None:
    """``optim.l2sp_alpha`` of a sweep policy: ALPHA of ``l2sp:ALPHA`` (:data:`L2SP_ALPHA` for ``l2sp``), else None."""
    name, colon, argument = spec.partition(":")
    if name != "l2sp":
        return None
    if not colon:
        return L2SP_ALPHA
    try:
        alpha = float(argument)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"sweep policy {spec!r}: ALPHA must be a number > 0 (as l2sp:0.01)")
    return alpha


def run_name(spec: str) -> str:
    """The folder of a policy's runs: its spec with ``:`` as ``-`` (``last_n_blocks-1``), other odd characters ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec.replace(":", "-"))


def run_config(
    config: RunConfig, spec: str, seed: int, run_dir: str | os.PathLike, *, epochs: int | None = None,
    features_dir: str | os.PathLike | None = None,
) -> RunConfig:  # fmt: skip
    """The RunConfig of one sweep run: ``config`` with the policy's phases, ``train.seed=seed`` and ``run_dir``.

    Steps are timed one by one (``train.log_every=1``: each step's metrics are fetched when it ends).
    ``features_dir``: ``train.feature_cache_dir`` unless the config sets one, so that the runs whose head-only
    phases see the same frozen backbone compute its features once (:mod:`jaxtl.train.feature_store`).
    """
    optim = config.optim
    alpha = l2sp_alpha(spec)
    if alpha is not None:
        optim = dataclasses.replace(optim, l2sp_alpha=alpha)
    store = config.train.feature_cache_dir or (str(features_dir) if features_dir is not None else None)
    train = dataclasses.replace(config.train, seed=seed, log_every=1, feature_cache_dir=store)
    phases = policy_phases(spec, config, epochs=epochs)
    return dataclasses.replace(config, run_dir=str(run_dir), phases=phases, optim=optim, train=train)


def default_out_dir(config: RunConfig) -> Path:
    """``<run_dir>-sweep``, without the run_dir's ``{time}`` (a sweep's directory must be the same when continued)."""
    base = config.run_dir.replace("{time}", "").rstrip("-_/") or "runs/run"
    return Path(f"{base}-sweep")


# -- one run -----------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """A run's training seconds and step times, written to ``TIMING_FILE`` at each epoch's end, so that a resumed
    run adds to what the interrupted one measured (the part of an epoch that a kill loses is measured again).

    A step's time is the wall time between the ends of two consecutive steps of an epoch (data loading included);
    the first step of each epoch (the compile, the loader's start) is not counted.
    """

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "step_s": []}
        self.wall_s, self.step_s = float(saved["wall_s"]), list(saved["step_s"])  # as of the last epoch's end
        self.wall_before, self.started, self.last, self.pending = self.wall_s, time.perf_counter(), None, []

    def on_phase_start(self, phase, groups, state) -> None:
        self.last = None

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.pending.append(now - self.last)
        self.last = now

    def on_epoch_end(self, record: Mapping[str, Any], state) -> None:
        self.step_s += self.pending
        self.pending, self.last = [], None
        self.wall_s = self.wall_before + time.perf_counter() - self.started
        write_json(self.path, {"wall_s": self.wall_s, "step_s": self.step_s})


def config_changes(saved: str | os.PathLike, config: RunConfig) -> list[str]:
    """The dotted keys where the config a run saved (its ``config.yaml``) differs from ``config``.

    The saved config is read with today's defaults, so that a key jaxtl added since is no change; the keys that
    only shape what is still to come (a resumed run's changeable ones: ``run_dir``, workers, logging) are not
    compared.
    """
    try:
        old = config_from_dict(read_config_file(saved), source=str(saved)).to_dict()
    except ConfigError as error:
        return [f"(unreadable: {error})"]

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, Mapping):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): value}

    before, after = flat(old), flat(config.to_dict())
    keys = [k for k in before if k not in after] + list(after)
    return [k for k in keys if k not in CHANGEABLE and before.get(k, ...) != after.get(k, ...)]


def run_once(config: RunConfig, spec: str, out_dir: Path, measure, log: Callable[[str], None]) -> SweepRun:
    """One sweep run: read back if finished, resumed if it has a checkpoint, started otherwise.

    ``measure(config, history) -> (trainable_params, flops_per_step)`` counts what its phases train and compute.
    """
    directory = Path(config.run_dir)
    record = directory / RESULT_FILE
    if record.is_file():
        run = SweepRun.read(record)
        changed = config_changes(directory / "config.yaml", config)
        if changed:
            raise RunError(
                f"{directory} holds a finished run of another config than this sweep's (policy {spec}, seed "
                f"{config.train.seed}; it differs at {', '.join(changed[:3])}); give the sweep another --out, or "
                f"delete {directory}"
            )
        log(f"sweep: {spec} seed {config.train.seed} finished before ({record}); read back")
        return run
    resume = ckpt.has_checkpoint(directory / "checkpoints" / "latest")
    if not resume:  # a fresh start measures from zero
        (directory / TIMING_FILE).unlink(missing_ok=True)
    log(f"sweep: {spec} seed {config.train.seed}: {'resuming' if resume else 'starting'} {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    timer = StepTimer(directory / TIMING_FILE)
    result = fit(config, resume=resume, callbacks=[timer], log=log)
    history = result.history
    accuracies = [float(r["val_acc1"]) for r in history]
    trainable, flops = measure(config, history)
    run = SweepRun(
        policy=spec, seed=config.train.seed, run_dir=os.path.relpath(directory, out_dir),
        best_val_acc1=max(accuracies), best_val_loss=min(float(r["val_loss"]) for r in history),
        best_epoch=int(history[accuracies.index(max(accuracies))]["epoch"]), epochs=len(history),
        steps=int(history[-1]["step"]), trainable_params=trainable, flops_per_step=flops,
        step_s=statistics.median(timer.step_s) if timer.step_s else None, wall_s=timer.wall_s,
    )  # fmt: skip
    write_json(record, dataclasses.asdict(run))
    return run


# -- what a policy trains and computes --------------------------------------------------------------------


class PolicyCost:
    """Trainable parameters and compiled train-step FLOPs of a sweep's phases, counted on the abstract model.

    A phase's step is the trainer's (:func:`jaxtl.train.run_steps.run_train_step`: through the head alone on cached
    features, mixing, accumulation, precision), lowered on one batch's shapes, compiled once per sweep, and counted
    by XLA (``cost_analysis()["flops"]``).
    """

    def __init__(self, config: RunConfig, num_classes: int, loss_fn):
        self.arch, self.num_classes, self.loss_fn = config.model.arch, num_classes, loss_fn
        self._flops: dict[str, float] = {}

    def model(self):
        return models.abstract_model(self.arch, num_classes=self.num_classes)

    def trainable(self, phase: Phase) -> int:
        groups = phase.groups(self.model())
        return sum(groups.sizes[name] for name in groups.trainable_names)

    def __call__(self, config: RunConfig, history: Sequence[Mapping[str, Any]]) -> tuple[int, float]:
        """(the most parameters a phase trains, FLOPs per step averaged over the steps ``history`` ran)."""
        steps, per_epoch, previous = {}, 1, 0
        for record in history:  # a record's step counts the run's steps up to its epoch's end
            ran = int(record["step"]) - previous
            steps[record["phase"]], per_epoch = steps.get(record["phase"], 0) + ran, max(per_epoch, ran)
            previous = int(record["step"])
        trainable = max(self.trainable(phase) for phase in config.phases)
        total = sum(steps.values())
        flops = sum(
            self.step_flops(config, phase, phase.epochs * per_epoch) * steps[phase.name]
            for phase in config.phases
            if steps.get(phase.name)
        )
        return trainable, flops / total if total else 0.0

    def step_flops(self, config: RunConfig, phase: Phase, total_steps: int) -> float:
        key = repr((phase, config.optim, config.data, dataclasses.replace(config.train, seed=0)))  # seeds: same FLOPs
        if key not in self._flops:
            self._flops[key] = self._count(config, phase, total_steps)
        return self._flops[key]

    def _count(self, config: RunConfig, phase: Phase, total_steps: int) -> float:
        model, d, p = self.model(), config.data, config_preprocessing(config)
        groups = phase.groups(model)
        graphdef, state = split_model(model, groups)
        optimizer = phase.optax(groups, total_steps, config.optim)
        batch = d.batch_size * config.train.accumulate_steps
        images = jax.ShapeDtypeStruct((batch, p.crop_size, p.crop_size, 3), jnp.uint8)
        cached = is_cacheable(config, model, groups)
        if cached:  # the head's step on the backbone's pooled features, as the trainer runs it
            pixels = jax.ShapeDtypeStruct(images.shape, jnp.float32)
            features = jax.eval_shape(lambda s, x: merge_model(graphdef, s).forward_features(x), state, pixels)
            images = jax.ShapeDtypeStruct((batch, features.shape[-1]), jnp.float32)
        step = run_train_step(
            config,
            graphdef,
            optimizer,
            p,
            num_classes=self.num_classes,
            cached=cached,
            loss_fn=self.loss_fn,
            groups=groups,
        )
        labels, mask = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_)
        args = (state, jax.eval_shape(optimizer.init, state.trainable), images, labels, mask, 0)
        return float(step.lower(*args).compile().cost_analysis()["flops"])


# -- the sweep ----------------------------------------------------------------------------------------------


def sweep(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike,
    policies: Sequence[str],
    seeds: int | Sequence[int],
    out_dir: str | os.PathLike | None = None,
    *,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Runs every policy with every seed (``OUT/<policy>/seed<k>``) and writes their comparison into ``out_dir``.

    Args:
        config: a RunConfig, a mapping as YAML holds it, or a YAML path; its phases set the budget E.
        policies: sweep policy specs (:func:`policy_phases`), each once.
        seeds: N (seeds 0 to N-1) or the seeds themselves; each run sets ``train.seed``.
        out_dir: where the runs and ``sweep.csv``, ``sweep.json``, ``sweep.png`` go; default
            :func:`default_out_dir`.
        epochs: the budget E of every policy instead of the sum of the config's phases' epochs.
        overrides: dotted ``key=value`` settings applied to ``config`` first (``"optim.lr=3e-4"``).
        log: where progress lines (the runs' too) go.

    Returns:
        The :class:`SweepResult`, its files written. A finished run is read back, an interrupted one resumed.

    Raises:
        ConfigError: a bad policy or seed (before any run starts); RunError and others from the runs.
    """
    base = resolve_config(config, overrides=overrides)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ConfigError(f"seeds {seeds!r}: give a count >= 1 or distinct seeds >= 0")
    policies = [p.strip() for p in policies if p.strip()]
    names = [run_name(p) for p in policies]
    if not policies or len(set(names)) != len(names):
        raise ConfigError(f"policies {','.join(policies)}: give at least one, each once (known: {VOCABULARY})")
    out = Path(out_dir) if out_dir is not None else default_out_dir(base)
    configs = {
        (spec, seed): run_config(
            base, spec, seed, out / run_name(spec) / f"seed{seed}", epochs=epochs, features_dir=out / "features"
        )
        for spec in policies
        for seed in seed_list
    }
    data = load_data(base.data)
    cost = PolicyCost(base, len(data.classes), run_loss(base.train, data, log=lambda message: None))
    for spec in policies:  # a policy the model cannot take (last_n_blocks:9) fails before any run starts
        for phase in configs[spec, seed_list[0]].phases:
            try:
                cost.trainable(phase)
            except ParamGroupError as error:
                raise ConfigError(f"sweep policy {spec!r} on {base.model.arch}: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for index, ((spec, seed), run) in enumerate(configs.items(), start=1):
        log(f"sweep {index}/{len(configs)}: {spec}, seed {seed}")
        runs.append(run_once(run, spec, out, cost, log))
    result = SweepResult(out, tuple(summarize(runs)), tuple(runs))
    weights = base.model.weights or "random init"
    title = f"{base.model.arch} ({weights}), {base.data.source} data, {sweep_epochs(base, epochs)} epochs, seeds "
    result.write(title=title + ", ".join(map(str, seed_list)))
    return result
