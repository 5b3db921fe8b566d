"""Per-class precision, recall, F1 and balanced accuracy from the confusion matrix, against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from jaxtl.train.evaluate import Evaluation, balanced_accuracy, per_class_metrics
from jaxtl.train.figures import confusion_matrix


@pytest.mark.parametrize("seed", range(4))
def test_per_class_metrics_and_balanced_accuracy_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    classes = 6
    labels = rng.choice(classes, size=200, p=[0.4, 0.2, 0.2, 0.1, 0.1, 0.0])  # class 5: no example
    predictions = np.where(rng.random(200) < 0.6, labels, rng.choice(5, size=200))  # class 5 never predicted
    predictions[:3] = 5 if seed % 2 else predictions[:3]  # ... or predicted without an example
    confusion = confusion_matrix(labels, predictions, classes)
    table = per_class_metrics(confusion)
    expected = precision_recall_fscore_support(
        labels, predictions, labels=np.arange(classes), zero_division=0
    )  # fmt: skip
    for key, want in zip(("precision", "recall", "f1", "support"), expected, strict=True):
        np.testing.assert_allclose(table[key], want, rtol=1e-12, err_msg=key)
    assert balanced_accuracy(confusion) == pytest.approx(balanced_accuracy_score(labels, predictions), rel=1e-12)


def test_an_evaluation_gives_them_by_class_name_and_in_its_metrics():
    confusion = np.array([[3, 1], [0, 2]])
    evaluation = Evaluation(loss=0.5, acc1=5 / 6, acc5=1.0, count=6, confusion=confusion)
    assert evaluation.metrics()["val_balanced_acc"] == pytest.approx((3 / 4 + 1) / 2)
    assert evaluation.per_class(("cat", "dog")) == {
        "cat": {"precision": 1.0, "recall": 0.75, "f1": pytest.approx(6 / 7), "support": 4},
        "dog": {"precision": 2 / 3, "recall": 1.0, "f1": pytest.approx(0.8), "support": 2},
    }


def test_flip_tta_averages_the_class_probabilities_of_an_image_and_its_mirror_as_torch_computes_them():
    import jax
    import torch

    from convert.random_models import randomized_torchvision_model
    from convert.torchvision_state import from_torchvision
    from jaxtl.train.evaluate import eval_model_state
    from jaxtl.train.step import make_eval_step

    torch_model = randomized_torchvision_model("resnet18", num_classes=4, seed=0).eval()
    graphdef, state = eval_model_state(from_torchvision(torch_model, "resnet18"))
    x = torch.randn(6, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        probabilities = (torch.softmax(torch_model(x), -1) + torch.softmax(torch_model(x.flip(-1)), -1)) / 2
    expected_loss = torch.nn.functional.nll_loss(probabilities.log(), labels).item()

    images = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))  # NHWC float32: not normalised again
    mask = np.ones(6, bool)
    with pytest.raises(ValueError, match="tta='rotate' is not one of"):
        make_eval_step(graphdef, tta="rotate")
    logits, metrics = make_eval_step(graphdef, tta="flip")(state, images, labels.numpy(), mask)
    np.testing.assert_allclose(np.exp(np.asarray(logits)), probabilities.numpy(), rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    expected_correct = int((probabilities.argmax(-1) == labels).sum())
    assert int(metrics["correct"]) == expected_correct and int(jax.device_get(metrics["count"])) == 6
