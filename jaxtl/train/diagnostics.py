"""Per-group training diagnostics: gradient and update norms, distance from the starting weights, BatchNorm drift.

For researchers comparing freezing strategies, each parameter group (:class:`jaxtl.optim.ParamGroups`) gets:

- in the train step, on the device: the L2 norms of its gradient (of the optimizer step, summed over the
  accumulated micro-batches), of the update the optimizer applied and of its weights before the update
  (:func:`step_norms`);
- over an epoch, on the host: the mean gradient norm and the mean update-to-weight ratio of its steps
  (:func:`add_step`, :func:`step_means`);
- at an epoch's end: its relative L2 distance from the weights the run started from, and the relative L2
  change of the running mean and variance of its BatchNorm layers (:func:`drift`).

The loop writes them into each epoch's record of ``metrics.jsonl`` (``record["groups"]``) and to TensorBoard
(``groups/NAME/KEY``); ``jaxtl inspect RUN_DIR`` prints them as a table (:func:`diagnostics_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl import models
from jaxtl.config import RunConfig
from jaxtl.errors import JaxtlError
from jaxtl.models.names import key_path_name
from jaxtl.models.state_dict import state_dict
from jaxtl.optim.groups import ParamGroups

KEYS = ("grad_norm", "update_ratio", "distance", "bn_mean_drift", "bn_var_drift")

# -- in the step (jitted) ---------------------------------------------------------------------------


def group_norms(tree: Any, labels: Mapping[str, str]) -> dict[str, jax.Array]:
    """The L2 norm of each group's leaves of ``tree``, in at least float32.

    Args:
        tree: a tree of the trainable parameters' shape (the parameters, their gradient or an update) whose key
            paths read as dotted parameter names (an ``nnx.State``).
        labels: the group of every parameter by dotted name (:attr:`ParamGroups.labels`).

    Returns:
        ``{group: ()-shaped norm}`` for the groups with a leaf in ``tree``.
    """
    squares: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        group = labels[key_path_name(path)]
        total = jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
        squares[group] = squares[group] + total if group in squares else total
    return {group: jnp.sqrt(total) for group, total in squares.items()}


def step_norms(labels: Mapping[str, str], grads: Any, updates: Any, weights: Any) -> dict[str, dict[str, jax.Array]]:
    """``{group: {"grad_norm", "update_norm", "weight_norm"}}`` of one optimizer step, for its trainable groups.

    Args:
        labels: the group of every parameter by dotted name.
        grads: the gradient the optimizer was given; ``updates``: what it returned (added to the weights);
            ``weights``: the trainable parameters before the update. All three of one structure.
    """
    norms = [group_norms(tree, labels) for tree in (grads, updates, weights)]
    return {
        group: {"grad_norm": norms[0][group], "update_norm": norms[1][group], "weight_norm": norms[2][group]}
        for group in norms[0]
    }


# -- over an epoch's steps (host) -------------------------------------------------------------------


def add_step(sums: Mapping[str, Mapping[str, float]], groups: Mapping[str, Mapping[str, Any]]) -> dict:
    """``sums`` with one step's :func:`step_norms` (on the host) added.

    The sums per group: ``steps``, ``grad_norm`` (the sum of the steps' norms), ``ratio_steps`` and
    ``update_ratio`` (the sum of update_norm / weight_norm over the steps whose weights are not all zero, where
    the ratio has no value). Plain floats, so that a mid-epoch checkpoint's meta.json holds them exactly.
    """
    new = {name: dict(values) for name, values in sums.items()}
    for name, step in groups.items():
        entry = new.setdefault(name, {"steps": 0, "grad_norm": 0.0, "ratio_steps": 0, "update_ratio": 0.0})
        entry["steps"] += 1
        entry["grad_norm"] += float(step["grad_norm"])
        weight = float(step["weight_norm"])
        if weight > 0:
            entry["ratio_steps"] += 1
            entry["update_ratio"] += float(step["update_norm"]) / weight
    return new


def step_means(sums: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """``{group: {"grad_norm": mean, "update_ratio": mean or None}}`` of :func:`add_step`'s sums."""
    return {
        name: {
            "grad_norm": s["grad_norm"] / s["steps"],
            "update_ratio": s["update_ratio"] / s["ratio_steps"] if s["ratio_steps"] else None,
        }
        for name, s in sums.items()
        if s["steps"]
    }


# -- at an epoch's end (host) ---------------------------------------------------------------------


def weight_snapshot(model: nnx.Module) -> dict[str, np.ndarray]:
    """Copies of the model's parameters and BatchNorm statistics on the host, by dotted name (the run's start)."""
    return {name: np.array(array, copy=True) for name, array in state_dict(model).items()}


def starting_weights(
    model: nnx.Module,
    config: RunConfig,
    num_classes: int,
    resumed_weights: Mapping[str, Any] | None,
    log: Callable[[str], None],
) -> dict[str, np.ndarray] | None:
    """The weights a run started from (:func:`weight_snapshot`), for its distances and BatchNorm drift.

    Taken before a resume checkpoint is loaded into ``model``: a fresh run's model (or a caller's) holds them.
    A resumed run built from ``config.model`` starts from torchvision's random init with the run's seed, which
    is its starting point when it had no pretrained weights; otherwise the weights are loaded again, as at
    the run's start. When they can no longer be loaded or are not those the run started from (their sha256),
    a line says so and the run goes on without distances and drift: they are diagnostics, not the run.

    Args:
        model: the run's model, before a checkpoint is loaded into it.
        config: the run config (``model.arch``, ``model.weights``, ``train.seed``).
        num_classes: the head's width.
        resumed_weights: on a resume of a model built from ``config.model``, the checkpoint's ``weights`` entry
            (``source``, ``sha256``); None when ``model`` holds the starting weights.
        log: where the line goes.
    """
    if resumed_weights is None or str(resumed_weights.get("source", "")).startswith("random init"):
        return weight_snapshot(model)
    m = config.model
    try:
        start = models.load_pretrained(
            m.arch, num_classes=num_classes, weights=m.weights, seed=config.train.seed,
            download_timeout_s=m.download_timeout_s, log=log,
        )  # fmt: skip
    except JaxtlError as error:
        log(f"per-group distance and BatchNorm drift are not recorded: the starting weights cannot be loaded ({error})")
        return None
    expected, found = resumed_weights.get("sha256"), start.weight_spec.sha256
    if expected is not None and found != expected:
        log(
            f"per-group distance and BatchNorm drift are not recorded: the weights {m.weights!r} (sha256 {found}) "
            f"are not those the run started from (sha256 {expected})"
        )
        return None
    return weight_snapshot(start)


def relative_change(
    current: Sequence[np.ndarray], start: Sequence[np.ndarray], reference: float | None = None
) -> float | None:
    """``||current - start|| / ||start||`` over the arrays taken together, in float64; None where ``start`` is 0.

    ``reference``: ``||start||**2`` where the caller has it (:func:`drift` keeps it across epochs). An array equal
    to its start adds nothing to the change and is not converted (a frozen group costs one comparison).
    """
    change = sum(
        float(np.sum(np.square(np.asarray(a, np.float64) - b)))
        for a, b in zip(current, start, strict=True)
        if not np.array_equal(a, b)
    )
    if reference is None:
        reference = squared_norm(start)
    return math.sqrt(change / reference) if reference > 0 else None


def squared_norm(arrays: Sequence[np.ndarray]) -> float:
    """The arrays' squared Euclidean norm taken together, in float64."""
    return sum(float(np.sum(np.square(np.asarray(b, np.float64)))) for b in arrays)


def drift(
    groups: ParamGroups,
    start: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    references: dict[tuple[str, ...], float] | None = None,
) -> dict:
    """Per group: ``distance``, and for a group holding BatchNorm weights ``bn_mean_drift`` and ``bn_var_drift``.

    Args:
        groups: the phase's groups: every group, frozen ones included (a frozen group whose BatchNorm runs in
            train mode changes its statistics; one trained in an earlier phase has moved).
        start, current: the model's arrays by dotted name (:func:`weight_snapshot`): at the run's start, now.
        references: the squared norms of ``start``'s arrays by tuple of names, computed here on first use and
            kept by a caller that passes the same dict every epoch.

    Returns:
        ``{group: {"distance": float | None, ...}}``: :func:`relative_change` of the group's parameters, and of
        the ``running_mean`` and ``running_var`` of the BatchNorm layers whose ``weight`` is in the group.
    """
    references = {} if references is None else references

    def change(names: Sequence[str]) -> float | None:
        key = tuple(names)
        if key not in references:
            references[key] = squared_norm([start[n] for n in names])
        return relative_change([current[n] for n in names], [start[n] for n in names], references[key])

    result = {}
    for name in groups.groups:
        entry = {"distance": change(groups.names(name))}
        norms = [module for module in groups.batch_norms if groups.labels[f"{module}.weight"] == name]
        if norms:
            for key, statistic in (("bn_mean_drift", "running_mean"), ("bn_var_drift", "running_var")):
                entry[key] = change([f"{module}.{statistic}" for module in norms])
        result[name] = entry
    return result


def epoch_diagnostics(
    groups: ParamGroups,
    sums: Mapping[str, Mapping[str, float]],
    start: Mapping[str, np.ndarray] | None,
    model: nnx.Module,
    references: dict[tuple[str, ...], float] | None = None,
) -> dict[str, dict[str, float | None]]:
    """An epoch's ``record["groups"]``, for every group of the phase, keys in :data:`KEYS`' order.

    Args:
        groups: the phase's groups.
        sums: :func:`add_step`'s sums of the epoch's steps (none for a frozen group, nor a phase without steps).
        start: the arrays the run started from (:func:`starting_weights`); None: no :func:`drift` entries.
        model: the model at the epoch's end, on the host.
        references: :func:`drift`'s cache of the starting norms, the same dict every epoch.
    """
    means = step_means(sums)
    drifts = drift(groups, start, state_dict(model), references) if start is not None else {}
    result = {}
    for name in groups.groups:
        entry = {**means.get(name, {}), **drifts.get(name, {})}
        result[name] = {key: entry[key] for key in KEYS if key in entry}
    return result


def group_scalars(diagnostics: Mapping[str, Mapping[str, float | None]], suffix: str = "") -> dict[str, float]:
    """TensorBoard scalars ``groups/NAME/KEY{suffix}`` of the values that are not None."""
    return {
        f"groups/{name}/{key}{suffix}": value
        for name, entry in diagnostics.items()
        for key, value in entry.items()
        if value is not None
    }


# -- jaxtl inspect RUN_DIR --------------------------------------------------------------------------


def diagnostics_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines of a table: one row per epoch and group of ``metrics.jsonl``'s records, ``-`` for no value.

    Epochs written twice (a resumed run redoes an epoch whose checkpoint was lost) show their last record.
    """
    by_epoch = {record["epoch"]: record for record in records if record.get("groups")}
    if not by_epoch:
        return ["no per-group diagnostics in metrics.jsonl (a run without them, or no epoch finished yet)"]
    width = max(len("group"), *(len(name) for record in by_epoch.values() for name in record["groups"]))
    phase_width = max(len("phase"), *(len(str(record.get("phase", ""))) for record in by_epoch.values()))
    titles = ("grad_norm", "update/weight", "distance", "bn_mean_drift", "bn_var_drift")
    lines = [f"{'epoch':>5}  {'phase':<{phase_width}}  {'group':<{width}}  " + "  ".join(f"{t:>13}" for t in titles)]
    for epoch in sorted(by_epoch):
        record = by_epoch[epoch]
        for name, entry in record["groups"].items():
            cells = "  ".join(_cell(entry.get(key)) for key in KEYS)
            lines.append(f"{epoch:>5}  {str(record.get('phase', '')):<{phase_width}}  {name:<{width}}  {cells}")
    return lines


def _cell(value: float | None) -> str:
    return f"{'-':>13}" if value is None else f"{value:>13.4g}"
