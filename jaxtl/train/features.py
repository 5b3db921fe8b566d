"""The feature cache: a frozen backbone's pooled features computed once, and batches of them for the head.

A phase trains on cached features when only the head trains, every BatchNorm is frozen and the
input is never augmented: the backbone then computes the same features for an image in every
epoch, so it runs once, in eval mode, over the train and val splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from flax import nnx

from jaxtl.config import RunConfig
from jaxtl.data import Batch, Loader
from jaxtl.optim import ParamGroups
from jaxtl.train import distributed


class CachedFeatures(NamedTuple):
    """A frozen backbone's output for one split, by source index; ``valid`` is False for a skipped file."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int32 class indices, or (N, C) uint8 multi-hot (a multi-label task)
    valid: np.ndarray  # (N,) bool


def is_cacheable(config: RunConfig, model: nnx.Module, groups: ParamGroups) -> bool:
    """Whether a phase trains on cached features (``train.feature_cache`` and :func:`head_sees_fixed_features`)."""
    return config.train.feature_cache and head_sees_fixed_features(config, model, groups)


def head_sees_fixed_features(config: RunConfig, model: nnx.Module, groups: ParamGroups) -> bool:
    """Whether the head's input is the same every epoch: only the head trains, every BatchNorm is frozen, and the
    input is never augmented (nor mixed)."""
    d = config.data
    augmented = d.random_resized_crop or d.flip_p > 0 or d.augment != "none" or d.color_jitter or d.random_erasing > 0
    if augmented or d.mixup_alpha > 0 or d.cutmix_alpha > 0:
        return False
    head = f"{model.head_name}."
    return all(name.startswith(head) for name in groups.trainable_names) and all(
        policy == "frozen" for policy in groups.batch_norms.values()
    )


def compute_features(features_step, state, loader: Loader, sharding, train_size: int) -> dict[str, CachedFeatures]:
    """The pooled features of every example of ``loader`` (train then val), split at ``train_size``.

    ``features_step(state, images) -> (batch, D)`` is :func:`jaxtl.train.step.make_features_step`'s.
    Each process computes its rows; every process keeps all features (later epochs' batches mix rows).
    """
    n, size = len(loader.source), loader.batch_size
    out, labels, valid = None, None, np.zeros((n,), bool)
    for b, batch in enumerate(loader.epoch(0)):
        f = distributed.gather(features_step(state, distributed.put(batch.images, sharding, size)))
        mask = distributed.whole(batch.mask, sharding, size)
        batch_labels = distributed.whole(batch.labels, sharding, size)
        if out is None:
            out = np.zeros((n, f.shape[-1]), np.float32)
            labels = np.zeros((n, *batch_labels.shape[1:]), batch_labels.dtype)
        rows = loader.batch_indices(0, b)[mask]  # not the padding, nor a file skipped (data.skip_bad_files)
        out[rows], labels[rows], valid[rows] = f[mask], batch_labels[mask], True
    return {
        "train": CachedFeatures(out[:train_size], labels[:train_size], valid[:train_size]),
        "val": CachedFeatures(out[train_size:], labels[train_size:], valid[train_size:]),
    }


def cached_batches(loader: Loader, epoch: int, first_batch: int, cached: CachedFeatures) -> Iterator[Batch]:
    """The loader's batches of ``epoch`` (same order, same padding) with cached features as images.

    A file skipped in the feature pass is masked out, as the loader masks it.
    """
    for b in range(first_batch, len(loader)):
        indices = loader.batch_indices(epoch, b)[loader.rows]
        safe = np.where(indices >= 0, indices, 0)
        rows = (indices >= 0) & cached.valid[safe]
        yield Batch(
            images=np.where(rows[:, None], cached.features[safe], 0.0).astype(np.float32),
            labels=np.where(rows.reshape(-1, *[1] * (cached.labels.ndim - 1)), cached.labels[safe], 0).astype(
                cached.labels.dtype
            ),
            mask=rows,
            indices=indices,
        )
