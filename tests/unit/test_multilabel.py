"""The multi-label task against its references: the loss against torch.nn.BCEWithLogitsLoss and timm's
BinaryCrossEntropy, the metrics against scikit-learn, and the steps' counts of rows right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from timm.loss import BinaryCrossEntropy as TimmBinaryCrossEntropy

from jaxtl.config import ConfigError, TrainConfig
from jaxtl.errors import DataError
from jaxtl.train.losses import BinaryCrossEntropy, balanced_pos_weight, run_loss
from jaxtl.train.task import THRESHOLDS, correct_rows, eval_loss, multilabel_metrics


def _case(seed=0, rows=12, classes=6):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, classes)) * 3
    targets = (rng.random((rows, classes)) < 0.4).astype(np.uint8)
    mask = np.ones(rows, bool)
    mask[[1, 7]] = False  # padding rows: torch sees only the others
    return rng, logits, targets, mask


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_binary_cross_entropy_and_its_gradient_are_torchs_on_the_unmasked_rows(weighted, pos_weighted):
    rng, logits, targets, mask = _case()
    weight = rng.uniform(0.2, 3.0, 6) if weighted else None
    pos_weight = rng.uniform(0.5, 5.0, 6) if pos_weighted else None
    criterion = torch.nn.BCEWithLogitsLoss(
        weight=None if weight is None else torch.from_numpy(weight),
        pos_weight=None if pos_weight is None else torch.from_numpy(pos_weight),
    )
    torch_logits = torch.from_numpy(logits[mask]).requires_grad_()
    expected = criterion(torch_logits, torch.from_numpy(targets[mask].astype(np.float64)))
    expected.backward()
    loss = BinaryCrossEntropy(0.0, weight, pos_weight)
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(logits, targets, mask)
        np.testing.assert_allclose(float(value), expected.item(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad)[mask], torch_logits.grad.numpy(), rtol=1e-10, atol=1e-15)
        assert not np.asarray(grad)[~mask].any()
        # gradient accumulation: numerator over denominator is the loss
        np.testing.assert_allclose(
            float(loss.numerator(logits, targets, mask) / loss.denominator(targets, mask)), expected.item(), rtol=1e-12
        )
    np.testing.assert_allclose(float(loss(logits.astype(np.float32), targets, mask)), expected.item(), rtol=2e-6)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_timms_binary_cross_entropy_of_a_class_index(smoothing):
    """timm smooths a class index to on = 1 - eps + eps / C, off = eps / C; jaxtl smooths multi-hot targets the same
    way, which for a one-hot row is timm's."""
    rng, logits, _, _ = _case(1)
    labels = rng.integers(0, 6, 12)
    expected = TimmBinaryCrossEntropy(smoothing=smoothing)(torch.from_numpy(logits), torch.from_numpy(labels))
    one_hot = np.eye(6, dtype=np.uint8)[labels]
    with jax.enable_x64(True):
        value = BinaryCrossEntropy(smoothing)(logits, one_hot, np.ones(12, bool))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-12)


def test_balanced_pos_weight_is_negatives_over_positives_and_names_a_class_without_positives():
    targets = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 1]], np.uint8)
    assert balanced_pos_weight(targets[:, [0, 2]], ("a", "c")) == [1.0, 0.0]
    with pytest.raises(DataError, match="b has none in the train split"):
        balanced_pos_weight(targets[:3], ("a", "b", "c"))


class _Source:
    multilabel = True
    classes = ("a", "b")

    def __len__(self):
        return 3

    def labels(self):
        return np.array([[1, 0], [1, 1], [1, 0]], np.uint8)


class _Data:
    multilabel = True
    classes = ("a", "b")
    train = _Source()


def test_run_loss_of_a_multilabel_task(capsys):
    loss = run_loss(TrainConfig(pos_weight="balanced", label_smoothing=0.1), _Data(), print)
    assert isinstance(loss, BinaryCrossEntropy)
    np.testing.assert_allclose(loss.pos_weight, [0.0, 2.0])
    assert "binary cross-entropy, label smoothing 0.1" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="train.pos_weight: balanced"):
        run_loss(TrainConfig(class_weights="balanced"), _Data(), print)
    with pytest.raises(ConfigError, match="train.pos_weight has 3 weights; the data has 2 classes"):
        run_loss(TrainConfig(pos_weight=(1.0, 2.0, 3.0)), _Data(), print)


def test_metrics_are_scikit_learns_per_class_and_macro():
    rng = np.random.default_rng(3)
    truth = (rng.random((200, 5)) < 0.3).astype(np.uint8)
    # informative scores with ties (rounded): ties are where AP and AUROC implementations differ
    scores = np.round(np.clip(0.35 * truth + rng.random((200, 5)) * 0.7, 0, 1), 2)
    metrics = multilabel_metrics(scores, truth, threshold=0.5)
    for c in range(5):
        assert metrics.average_precision[c] == pytest.approx(average_precision_score(truth[:, c], scores[:, c]), 1e-12)
        assert metrics.auroc[c] == pytest.approx(roc_auc_score(truth[:, c], scores[:, c]), 1e-12)
    predicted = (scores >= 0.5).astype(int)
    np.testing.assert_allclose(metrics.f1, f1_score(truth, predicted, average=None, zero_division=0), rtol=1e-12)
    assert metrics.mean_average_precision == pytest.approx(average_precision_score(truth, scores, average="macro"))
    assert metrics.macro_auroc == pytest.approx(roc_auc_score(truth, scores, average="macro"))
    assert metrics.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    np.testing.assert_array_equal(metrics.support, truth.sum(0))


def test_the_threshold_is_the_one_with_the_highest_macro_f1_and_undefined_classes_are_left_out():
    rng = np.random.default_rng(4)
    truth = (rng.random((80, 4)) < 0.4).astype(np.uint8)
    truth[:, 3] = 0  # no positives: AP and AUROC undefined, left out of the means (scikit-learn warns and gives 0)
    scores = np.clip(0.3 * truth + rng.random((80, 4)) * 0.8, 0, 1)
    metrics = multilabel_metrics(scores, truth)
    f1s = [f1_score(truth, (scores >= t).astype(int), average="macro", zero_division=0) for t in THRESHOLDS]
    assert metrics.threshold == THRESHOLDS[int(np.argmax(f1s))]
    assert np.isnan(metrics.average_precision[3]) and np.isnan(metrics.auroc[3])
    assert metrics.mean_average_precision == pytest.approx(average_precision_score(truth[:, :3], scores[:, :3]))
    assert metrics.per_class(("a", "b", "c", "d"))["d"] == {"ap": None, "auroc": None, "f1": 0.0, "support": 0}


def test_the_steps_count_rows_with_every_class_right_as_scikit_learns_subset_accuracy():
    _, logits, targets, mask = _case(5, rows=40, classes=3)
    expected = accuracy_score(targets[mask], (logits[mask] > 0).astype(np.uint8)) * mask.sum()
    assert int(correct_rows(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))) == round(expected)
    with jax.enable_x64(True):
        reference = torch.nn.BCEWithLogitsLoss()(
            torch.from_numpy(logits[mask]), torch.from_numpy(targets[mask].astype(np.float64))
        )
        assert float(eval_loss(logits, targets, mask)) == pytest.approx(reference.item(), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_and_cutmix_mix_multi_hot_targets_as_they_mix_class_indices(seed):
    """A multi-hot row with one class mixes as its class index does (the index path is timm's: test_mixing.py);
    rows with several classes mix each class with the same weights."""
    from jaxtl.data.augment import mixing as mixing_ops
    from jaxtl.data.augment.mixing import Mixing

    params = mixing_ops.draw(Mixing(mixup_alpha=0.4, cutmix_alpha=1.0), jax.random.key(seed), 8, 8)
    images, mask = jnp.zeros((4, 8, 8, 3)), jnp.ones(4, bool)
    labels = np.array([0, 2, 1, 2])
    _, from_indices = mixing_ops.apply(params, images, jnp.asarray(labels), mask, 3)
    _, from_one_hot = mixing_ops.apply(params, images, jnp.asarray(np.eye(3, dtype=np.uint8)[labels]), mask, 3)
    np.testing.assert_array_equal(from_one_hot, from_indices)
    multi_hot = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]], np.uint8)
    _, mixed = mixing_ops.apply(params, images, jnp.asarray(multi_hot), mask, 3)
    lam, pair = float(params.lam), np.asarray(mixing_ops.partners(mask))  # the batch's weight and partners
    np.testing.assert_allclose(mixed, lam * multi_hot + (1.0 - lam) * multi_hot[pair], rtol=1e-6)
