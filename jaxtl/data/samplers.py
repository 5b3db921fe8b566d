"""Epoch orders for a shuffled loader: ClassBalancedSampler draws every class equally often."""

from __future__ import annotations

import numpy as np

from jaxtl.data.sources import Source, labels_of


class ClassBalancedSampler:
    """Draws examples with probability inversely proportional to the size of their class.

    Single-label (``labels`` of shape (N,), class indices): example ``i`` has weight ``1 / count[labels[i]]``,
    normalised to sum to 1, which is what ``torch.utils.data.WeightedRandomSampler`` is given in its
    documented class-balancing recipe (``weights = 1.0 / torch.bincount(labels)[labels]``). Every class then
    has the same expected share of an epoch, however few examples it has.

    Multi-label (``labels`` of shape (N, C), 0/1 multi-hot): an example counts towards all of its positive
    classes, so no weight makes every class equal. As LVIS's repeat-factor sampling does (Gupta et al. 2019;
    detectron2's ``RepeatFactorTrainingSampler``: an image is repeated by the largest factor of its
    categories), an example takes the weight of its rarest positive class, ``max over c with labels[i, c] of
    1 / count[c]``. Examples with no positive class form one more group, "none", with its own count.

    Use it as ``Loader(source, transform, batch_size=..., shuffle=True, sampler=ClassBalancedSampler.from_source(
    source))``. A class with no examples is simply never drawn.

    Args:
        labels: (N,) integer class indices, or (N, C) 0/1 multi-hot labels.
        num_samples: examples per epoch (default N).
        replacement: draw with replacement (rare-class examples repeat within an epoch; the default, as
            WeightedRandomSampler's); without it an epoch has ``num_samples <= N`` distinct examples.

    Attributes:
        weights: (N,) float64, each example's probability of being drawn; they sum to 1.
        counts: (C,) int64 examples per class (positives per class, multi-label).
        num_samples: examples per epoch.
    """

    def __init__(self, labels, num_samples: int | None = None, *, replacement: bool = True):
        labels = np.asarray(labels)
        if labels.ndim not in (1, 2):
            raise ValueError(f"labels of shape {labels.shape}: expected (N,) class indices or (N, C) multi-hot labels")
        if len(labels) == 0:
            raise ValueError("labels is empty: a sampler needs at least one example")
        num_samples = len(labels) if num_samples is None else num_samples
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be an integer of at least 1")
        if not replacement and num_samples > len(labels):
            raise ValueError(
                f"num_samples={num_samples} exceeds the {len(labels)} examples: without replacement an epoch "
                "draws each example at most once; use replacement=True or a smaller num_samples"
            )
        self.multilabel = labels.ndim == 2
        self.counts, group_weights = (_multilabel_weights if self.multilabel else _single_label_weights)(labels)
        self.weights = group_weights / group_weights.sum()
        self.num_samples = int(num_samples)
        self.replacement = replacement

    @classmethod
    def from_source(cls, source: Source, **kwargs) -> ClassBalancedSampler:
        """A sampler over ``source``'s labels (``jaxtl.data.sources.labels_of``: read without decoding where the
        source has ``labels()``); ``kwargs`` as the constructor's."""
        return cls(labels_of(source), **kwargs)

    def __len__(self) -> int:
        return self.num_samples

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """(num_samples,) int64 source indices of ``epoch``, a function of (seed, epoch) alone."""
        rng = np.random.default_rng([seed, epoch])
        return rng.choice(len(self.weights), size=self.num_samples, replace=self.replacement, p=self.weights)

    def __repr__(self) -> str:
        kind = "multi-label " if self.multilabel else ""
        return (
            f"ClassBalancedSampler({len(self.weights)} examples, {len(self.counts)} {kind}classes, "
            f"{self.num_samples} per epoch, replacement={self.replacement})"
        )


def _single_label_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C,) class counts and (N,) unnormalised weights ``1 / count[label]``."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"single-label labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0:
        at = int(np.argmin(labels))
        raise ValueError(f"labels[{at}] = {labels[at]}: class indices must be >= 0")
    counts = np.bincount(labels).astype(np.int64)
    return counts, 1.0 / counts[labels]


def _multilabel_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C,) positives per class and (N,) unnormalised weights: 1 / the count of each example's rarest
    positive class, or 1 / the number of examples without any."""
    if labels.shape[1] == 0 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"multi-label labels of shape {labels.shape} must be 0/1 multi-hot, with at least one class")
    positive = labels.astype(bool)
    counts = positive.sum(axis=0).astype(np.int64)
    inverse = np.divide(1.0, counts, out=np.zeros(len(counts)), where=counts > 0)
    weights = (positive * inverse).max(axis=1)
    none = ~positive.any(axis=1)
    if none.any():
        weights[none] = 1.0 / none.sum()
    return counts, weights
