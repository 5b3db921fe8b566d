"""Cached features on disk (``train.feature_cache_dir``): one backbone pass shared by runs with the same frozen part.

A head-only phase's features depend on the frozen backbone's arrays, the images and their eval preprocessing,
and the compute dtype, never on the head or the seed. Runs that agree on those (the policies and seeds of a
``jaxtl sweep``, a run started again) read the features the first one computed instead of running the backbone
again. The key is a sha256 of exactly those inputs: the floating-point arrays of everything but the head (weights
and BatchNorm statistics, by name), the images' fingerprint (:func:`jaxtl.data.cache.source_fingerprint`: the
files' names, sizes and mtimes), the preprocessing, the dtype and the train/val split point. A file is written
once and atomically; one that cannot be read is computed again and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxtl.data.cache import source_fingerprint
from jaxtl.train.features import CachedFeatures
from jaxtl.train.step import ModelState
from jaxtl.weights import Preprocessing

FORMAT = 1
SPLITS = ("train", "val")
FIELDS = CachedFeatures._fields


def feature_key(state: ModelState, source, preprocessing: Preprocessing, compute_dtype, train_size: int) -> str:
    """The sha256 naming the features of ``source`` through ``state``'s frozen part (the module's docstring)."""
    h = hashlib.sha256()
    settings = {"format": FORMAT, "source": source_fingerprint(source), "train_size": train_size,
                "preprocessing": dataclasses.asdict(preprocessing), "dtype": str(compute_dtype)}  # fmt: skip
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path((state.frozen, state.rest)):
        array = np.asarray(jax.device_get(leaf))
        if not np.issubdtype(array.dtype, np.floating):  # random-number state: it never changes eval features
            continue
        h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def load_or_compute(
    directory: str | os.PathLike, key: str, compute: Callable[[], dict[str, CachedFeatures]],
    log: Callable[[str], None],
) -> dict[str, CachedFeatures]:  # fmt: skip
    """The features stored under ``key`` in ``directory``, or ``compute()``'s, then stored there."""
    path = Path(directory) / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                features = {
                    split: CachedFeatures(*(stored[f"{split}_{field}"] for field in FIELDS)) for split in SPLITS
                }
            log(f"  features read from {path}")
            return features
        except (OSError, ValueError, KeyError) as error:
            log(f"  the stored features {path} cannot be read ({error}); computing them again")
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    arrays = {f"{split}_{field}": getattr(features[split], field) for split in SPLITS for field in FIELDS}
    with open(staging, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
    return features
