"""ClassBalancedSampler against torch's WeightedRandomSampler recipe, hand-computed multi-label weights, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jaxtl.data import EvalTransform, Loader
from jaxtl.data.samplers import ClassBalancedSampler
from jaxtl.weights import Preprocessing

# 200 examples in classes of 120, 50, 20, 8 and 2; class 2 has none.
COUNTS = {0: 120, 1: 50, 3: 20, 4: 8, 5: 2}
LABELS = np.random.default_rng(0).permutation(np.repeat(list(COUNTS), list(COUNTS.values())))


class LabelledSquares:
    """A tiny in-memory source: example i is a 40x40 image of gray level i, with ``labels[i]``."""

    def __init__(self, labels):
        self._labels = np.asarray(labels, np.int64)
        self.classes = tuple(f"class{c}" for c in range(self._labels.max() + 1))

    def __len__(self) -> int:
        return len(self._labels)

    def load(self, index):
        return Image.new("RGB", (40, 40), (index, index, index)), int(self._labels[index])

    def describe(self, index):
        return f"square {index}"

    def labels(self):
        return self._labels


def torch_recipe_weights(labels: np.ndarray) -> np.ndarray:
    """The weights of torch's class-balancing recipe for WeightedRandomSampler, normalised."""
    labels = torch.as_tensor(labels)
    weights = (1.0 / torch.bincount(labels)[labels]).double().numpy()
    return weights / weights.sum()


def test_single_label_weights_are_the_torch_recipes():
    sampler = ClassBalancedSampler(LABELS)
    assert sampler.weights.dtype == np.float64 and sampler.weights.shape == (200,)
    np.testing.assert_allclose(sampler.weights, torch_recipe_weights(LABELS), rtol=1e-6)
    assert sampler.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert sampler.counts.tolist() == [120, 50, 0, 20, 8, 2]
    shares = [sampler.weights[LABELS == c].sum() for c in COUNTS]
    np.testing.assert_allclose(shares, 1 / len(COUNTS), rtol=1e-12)  # every present class the same share


def test_class_frequencies_match_torchs_weighted_random_sampler_over_many_epochs():
    epochs, per_epoch = 100, len(LABELS)
    sampler = ClassBalancedSampler(LABELS)
    ours = np.concatenate([sampler.order(seed=0, epoch=e) for e in range(epochs)])
    torch_sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(torch_recipe_weights(LABELS)),
        num_samples=epochs * per_epoch,
        replacement=True,
        generator=torch.Generator().manual_seed(0),
    )
    theirs = np.fromiter(iter(torch_sampler), np.int64)
    draws = epochs * per_epoch
    ours_per_class = np.array([(LABELS[ours] == c).sum() for c in COUNTS])
    theirs_per_class = np.array([(LABELS[theirs] == c).sum() for c in COUNTS])
    p = 1 / len(COUNTS)
    sigma = np.sqrt(draws * p * (1 - p))  # binomial standard deviation of one class's count
    # Uniform sampling would give class 5 1% of the draws (200 of 20000); balanced gives 20% +- 4 sigma (226).
    difference = np.abs(ours_per_class - theirs_per_class)
    assert np.all(difference <= 4 * np.sqrt(2) * sigma), (ours_per_class, theirs_per_class)
    assert np.all(np.abs(theirs_per_class - draws * p) <= 4 * sigma), theirs_per_class
    assert np.all(np.abs(ours_per_class - draws * p) <= 4 * sigma), ours_per_class
    assert not np.isin(ours, np.flatnonzero(LABELS == 2)).any()


def test_the_order_is_a_function_of_seed_and_epoch():
    sampler = ClassBalancedSampler(LABELS, num_samples=64)
    first = sampler.order(3, 5)
    assert first.shape == (64,) and first.dtype == np.int64
    np.testing.assert_array_equal(ClassBalancedSampler(LABELS, num_samples=64).order(3, 5), first)
    assert not np.array_equal(sampler.order(3, 6), first)
    assert not np.array_equal(sampler.order(4, 5), first)


def test_without_replacement_an_epoch_has_distinct_examples():
    sampler = ClassBalancedSampler(LABELS, num_samples=150, replacement=False)
    order = sampler.order(0, 0)
    assert len(order) == 150 and len(np.unique(order)) == 150
    # The 30 examples left out are mostly of the big class 0, whose examples weigh least.
    left_out = np.setdiff1d(np.arange(200), order)
    assert (LABELS[left_out] == 0).mean() > 0.8
    with pytest.raises(ValueError, match="num_samples=201 exceeds the 200 examples"):
        ClassBalancedSampler(LABELS, num_samples=201, replacement=False)


def test_multilabel_weights_take_the_rarest_positive_class_and_a_group_for_none():
    labels = np.array(
        [
            [1, 0, 0],  # class 0 (3 positives): 1/3
            [1, 1, 0],  # classes 0 and 1 (1 positive): max(1/3, 1) = 1
            [1, 0, 0],  # 1/3
            [0, 0, 1],  # class 2 (1 positive): 1
            [0, 0, 0],  # none (2 examples): 1/2
            [0, 0, 0],  # 1/2
        ],
        np.uint8,
    )
    sampler = ClassBalancedSampler(labels)
    # Unnormalised 1/3, 1, 1/3, 1, 1/2, 1/2 sum to 11/3; times 6: 2, 6, 2, 6, 3, 3 over 22.
    np.testing.assert_allclose(sampler.weights, np.array([2, 6, 2, 6, 3, 3]) / 22, rtol=1e-12)
    assert sampler.counts.tolist() == [3, 1, 1]
    assert "multi-label" in repr(sampler)


def test_a_loader_with_the_sampler_yields_its_order():
    source = LabelledSquares(LABELS[:30])
    sampler = ClassBalancedSampler.from_source(source, num_samples=10)
    np.testing.assert_allclose(sampler.weights, ClassBalancedSampler(LABELS[:30]).weights, rtol=1e-12)
    loader = Loader(
        source,
        EvalTransform(Preprocessing(resize_size=40, crop_size=32)),
        batch_size=4,
        shuffle=True,
        seed=7,
        sampler=sampler,
        num_workers=1,
        worker_type="thread",
    )
    assert len(loader) == 3  # ceil(10 / 4)
    for epoch in (0, 1):
        batches = list(loader.epoch(epoch))
        indices = np.concatenate([b.indices[b.mask] for b in batches])
        np.testing.assert_array_equal(indices, sampler.order(7, epoch))
        labels = np.concatenate([b.labels[b.mask] for b in batches])
        np.testing.assert_array_equal(labels, LABELS[:30][indices])
        assert sum(int((b.indices == -1).sum()) for b in batches) == 2  # the last batch's padding
    loader.close()


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (np.zeros((0,), np.int64), {}, "labels is empty"),
        (np.zeros((2, 3, 4), np.uint8), {}, r"labels of shape \(2, 3, 4\)"),
        ([0, 1, 1], {"num_samples": 0}, "num_samples=0 must be an integer of at least 1"),
        ([0, 1, 1], {"num_samples": 2.5}, "num_samples=2.5 must be an integer"),
        ([0, -1, 1], {}, r"labels\[1\] = -1: class indices must be >= 0"),
        ([0.0, 1.0], {}, "must be integer class indices, got dtype float64"),
        ([[0, 2], [1, 0]], {}, "must be 0/1 multi-hot"),
    ],
)
def test_bad_inputs_are_clear_errors(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedSampler(labels, **kwargs)
