"""Resuming: a checkpoint's arrays into a model and optimizer state, and what a resumed run may change.

A run resumes from ``checkpoints/latest`` (or, when that is damaged, from its newest intact previous
version, said in one line). Before anything is loaded, the resumed run's config is compared with the
checkpoint's: what the checkpoint holds (the architecture, the classes, the dataset, the phases
already run, the optimizer) cannot change, and a change is refused in one line naming the key; what
only concerns the future (later phases, the current phase's length, workers, logging) is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxtl import models
from jaxtl.arrays import to_device
from jaxtl.config import ConfigError, config_from_dict
from jaxtl.models.state_dict import load_state_dict, state_dict
from jaxtl.train import checkpoint as ckpt
from jaxtl.train.run_dir import RunError
from jaxtl.train.state import CheckpointMeta
from jaxtl.weights import WeightSpec, flatten_arrays, nest_arrays

# Keys a resumed run may set to other values: they shape only what is still to come.
CHANGEABLE = (
    "run_dir",
    "model.download_timeout_s",
    "model.allow_random_init_fallback",
    "data.num_workers",
    "data.worker_type",
    "data.skip_bad_files",
    "train.log_every",
    "train.checkpoint_every_steps",
    "train.feature_cache_dir",  # where features are kept, not what they are (jaxtl.train.feature_store)
    "train.group_diagnostics",  # what is recorded, not what is trained
)


def model_arrays(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters and BN statistics, nested by torchvision name (orbax keys hold no dots)."""
    return nest_arrays(state_dict(model))


def load_model_arrays(model: nnx.Module, arrays: Mapping[str, Any], source: str) -> None:
    """Fills ``model`` in place from :func:`model_arrays`' nesting; a mismatch lists the keys."""
    load_state_dict(model, flatten_arrays(dict(arrays)), source=source)


def tree_leaves(tree: Any) -> dict[str, np.ndarray]:
    """The leaves of a pytree (an optimizer state) on the host, keyed by position."""
    return {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(jax.device_get(tree)))}


def unflatten_like(template: Any, leaves: Mapping[str, np.ndarray]) -> Any:
    """:func:`tree_leaves`' output back into ``template``'s structure."""
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        raise RunError(
            f"the checkpoint's optimizer state has {len(leaves)} arrays, the config's optimizer {treedef.num_leaves}; "
            "was the config changed since the run started?"
        )
    return jax.tree.unflatten(treedef, [to_device(leaves[str(i)]) for i in range(treedef.num_leaves)])


def load_checkpoint(checkpoint: str | Path, *, average: bool = True) -> tuple[nnx.Module, CheckpointMeta]:
    """The model a training checkpoint holds, in eval mode, and its meta. Needs neither torch nor the weights.

    A run with ``train.ema`` keeps the moving average of its weights beside them: the model is the average
    (what validation measured and ``best`` was chosen by) unless ``average=False``.
    """
    meta = CheckpointMeta.from_json(ckpt.load_meta(checkpoint), str(checkpoint))
    arrays = ckpt.load_arrays(checkpoint)
    chosen = flatten_arrays(dict(arrays["ema"] if average and "ema" in arrays else arrays["model"]))
    # Built as the weights were (a ViT fine-tuned from SWAG weights holds 384-pixel position embeddings).
    model = models.abstract_model(meta.arch, num_classes=meta.num_classes, **models.model_options(meta.arch, chosen))
    load_state_dict(model, chosen, source=str(checkpoint))
    models.fill_rng_state(model)
    model.eval()
    model.weight_spec = WeightSpec(
        arch=meta.arch, name=meta.weights.get("name", "fine-tuned"), source=f"checkpoint {checkpoint}",
        num_classes=meta.num_classes, categories=meta.classes, preprocessing=meta.preprocessing,
    )  # fmt: skip
    return model, meta


def load_resume_point(run_dir: Path, log: Callable[[str], None]) -> ckpt.GoodCheckpoint:
    """``latest``, or its newest intact previous version if it is damaged (said in one line)."""
    latest = run_dir / "checkpoints" / "latest"
    if not ckpt.has_checkpoint(latest):
        raise RunError(f"{run_dir} has no checkpoint to resume (looked for {latest}); start it without --resume")
    try:
        resumed = ckpt.load_latest_good(latest)
    except ckpt.CheckpointError as error:
        raise RunError(
            f"{run_dir} cannot be resumed: {error}. Start the run again, without --resume, in a new run_dir"
        ) from None
    if resumed.damaged:
        path, reason = resumed.damaged[0]
        log(
            f"checkpoint {path} is damaged ({reason}); resuming from the previous good checkpoint {resumed.path} "
            f"(step {resumed.meta['step']})"
        )
    return resumed


def check_resume_config(saved: Mapping[str, Any], config: Mapping[str, Any], meta: CheckpointMeta) -> None:
    """Raises RunError naming the first key whose new value a resumed run cannot take.

    Args:
        saved: the checkpoint's resolved config (plain values).
        config: the resumed run's (plain values).
        meta: the checkpoint's meta, whose position says which phases have run.

    The saved config is read with today's defaults first, so that a key added to jaxtl since the checkpoint was
    written counts as its default, not as a change.
    """
    saved = _with_defaults(saved)
    for key, old, new in _differences(saved, config):
        if key in CHANGEABLE or key == "phases" or key.startswith("phases."):
            continue
        raise RunError(
            f"{key}: the run was trained with {key}={old!r}; a resumed run cannot change it to {new!r} (its checkpoint "
            "holds what "
            "that value made). Start a new run (another run_dir) instead"
        )
    old_phases, new_phases = list(saved.get("phases", [])), list(config.get("phases", []))
    state = meta.state
    for index in range(min(state.phase + 1, len(old_phases))):
        if index >= len(new_phases):
            raise RunError(
                f"phases: the run has reached phase {index + 1} ({old_phases[index]['name']!r}); a resumed run must "
                "keep "
                f"the phases already run, but gives {len(new_phases)}"
            )
        for key, old, new in _differences(old_phases[index], new_phases[index], f"phases.{index}."):
            current = index == state.phase
            if current and key == f"phases.{index}.epochs" and isinstance(new, int) and new >= state.epoch_in_phase:
                continue  # the current phase may grow or shrink down to what it has run
            what = "is being run" if current else "has run"
            raise RunError(
                f"{key}: phase {old_phases[index]['name']!r} {what} with {key.split('.', 2)[2]}={old!r}; a resumed run "
                f"cannot change it to {new!r}. Change only later phases (or the current one's epochs), or start a "
                "new run"
            )


def _with_defaults(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        return config_from_dict(saved, source="the checkpoint's config").to_dict()
    except ConfigError:  # a key since removed or renamed: compared as it was saved
        return saved


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` of every leaf that differs between two plain configs (lists compared whole
    unless they are the phases)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    if old != new:
        return [(prefix.rstrip("."), old, new)]
    return []
