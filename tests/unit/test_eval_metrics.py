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
