"""The training loss against torch.nn.CrossEntropyLoss, and balanced class weights against scikit-learn."""

import jax
import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from jaxtl.config import ConfigError, TrainConfig
from jaxtl.errors import DataError
from jaxtl.train.inputs import RunData
from jaxtl.train.losses import balanced_class_weights, cross_entropy, run_loss

CASES = [(0.0, None), (0.1, None), (0.0, "weights"), (0.1, "weights"), (0.35, "weights"), (1.0, "weights")]


@pytest.mark.parametrize("smoothing, weighted", CASES)
def test_cross_entropy_and_its_gradient_are_torchs_on_the_unmasked_rows(smoothing, weighted):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 7)) * 3
    labels = rng.integers(0, 7, 12)
    mask = np.ones(12, bool)
    mask[[2, 5, 11]] = False  # padding rows: torch sees only the others
    weights = rng.uniform(0.2, 3.0, 7) if weighted else None
    criterion = torch.nn.CrossEntropyLoss(
        weight=None if weights is None else torch.from_numpy(weights), label_smoothing=smoothing
    )
    torch_logits = torch.from_numpy(logits[mask]).requires_grad_()
    expected = criterion(torch_logits, torch.from_numpy(labels[mask]))
    expected.backward()

    loss = cross_entropy(smoothing, weights)
    with jax.enable_x64(True):  # float64 on both sides: the formula, not float32 rounding, is compared
        value, grad = jax.value_and_grad(loss)(logits, labels, mask)
        np.testing.assert_allclose(float(value), expected.item(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad)[mask], torch_logits.grad.numpy(), rtol=1e-10, atol=1e-15)
        assert not np.asarray(grad)[~mask].any()
    # float32, as a run computes it
    value32 = loss(logits.astype(np.float32), labels, mask)
    np.testing.assert_allclose(float(value32), expected.item(), rtol=2e-6)


def test_no_unmasked_row_gives_a_zero_loss():
    loss = cross_entropy(0.1, [1.0, 2.0])
    assert float(loss(np.zeros((3, 2), np.float32), np.zeros(3, np.int32), np.zeros(3, bool))) == 0.0


def test_balanced_weights_are_scikit_learns():
    labels = np.random.default_rng(1).choice(5, size=97, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    expected = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    np.testing.assert_allclose(balanced_class_weights(labels, 5), expected, rtol=1e-15)
    with pytest.raises(DataError, match=r"class index 3 has none in the train split"):
        balanced_class_weights([0, 1, 2, 2], 4)


class Labelled:
    def __init__(self, labels, classes):
        self._labels, self.classes = list(labels), classes

    def __len__(self):
        return len(self._labels)

    def labels(self):
        return self._labels


def test_a_run_loss_takes_its_weights_from_the_config_or_the_train_split():
    classes = ("a", "b", "c")
    data = RunData(train=Labelled([0, 0, 0, 1, 2, 2], classes), val=Labelled([0, 1, 2], classes), classes=classes)
    lines = []
    loss = run_loss(TrainConfig(class_weights="balanced", label_smoothing=0.1), data, lines.append)
    assert lines == ["loss: cross-entropy, label smoothing 0.1, class weights: a 0.6667, b 2, c 1"]
    logits, labels, mask = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], np.array([0, 1, 2, 1]), np.ones(4, bool)
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor([2 / 3, 2.0, 1.0]), label_smoothing=0.1)(
        torch.from_numpy(logits), torch.from_numpy(labels)
    )
    np.testing.assert_allclose(float(loss(logits, labels, mask)), expected.item(), rtol=1e-6)
    lines.clear()
    run_loss(TrainConfig(), data, lines.append)
    assert lines == []  # plain cross-entropy says nothing
    with pytest.raises(ConfigError, match=r"train.class_weights has 2 weights; the data has 3 classes \(a, b, c\)"):
        run_loss(TrainConfig(class_weights=(1.0, 2.0)), data, lines.append)


def test_the_config_keys_parse_and_a_wrong_value_is_named():
    from jaxtl.config import config_from_dict

    config = config_from_dict({"train": {"class_weights": "balanced", "label_smoothing": 0.1}}, (), "run.yaml")
    assert (config.train.class_weights, config.train.label_smoothing) == ("balanced", 0.1)
    assert config_from_dict({"train": {"class_weights": [1, 2.5]}}, (), "run.yaml").train.class_weights == (1.0, 2.5)
    for train, message in (
        ({"class_weights": "even"}, "run.yaml: train.class_weights is 'even'; expected one of 'balanced'"),
        ({"class_weights": [1, -2]}, "run.yaml: train.class_weights.1 = -2.0 is out of range [0, inf]"),
        ({"label_smoothing": 1.5}, "run.yaml: train.label_smoothing = 1.5 is out of range [0, 1]"),
    ):
        with pytest.raises(ConfigError) as error:
            config_from_dict({"train": train}, (), "run.yaml")
        assert str(error.value) == message
