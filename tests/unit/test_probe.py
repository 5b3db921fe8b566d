"""The linear probe against scikit-learn's LogisticRegression, fitted on the same features.

scikit-learn is the reference: ``LogisticRegression(C=C)`` with its default lbfgs solver, run to a tight tolerance
(``tol=1e-10``, ``max_iter=10000``) so that both sides stand at the minimiser rather than wherever a loose stop
left them. Then the objectives agree to 1e-9 (relative), the coefficients to 1e-4 of their largest magnitude,
the probabilities to 1e-5, and the predictions on held-out rows exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import jaxtl.models
from jaxtl.data import generate_synthetic, image_folder_splits
from jaxtl.errors import DataError
from jaxtl.train.probe import Probe, linear_probe, probe_objective

TIGHT = {"tol": 1e-10, "max_iter": 10000}


def blobs(num_classes: int, n: int = 300, dim: int = 20, seed: int = 0):
    """Gaussian blobs around random centres: separable-ish (the classes overlap a little)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 1.5
    labels = rng.integers(0, num_classes, n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def sklearn_parameters(model: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's fit as the probe holds it: ``(D, K)`` weights and ``(K,)`` intercepts (binary: [0, w])."""
    weights, bias = model.coef_.T, model.intercept_
    if len(model.classes_) == 2:
        weights = np.concatenate([np.zeros_like(weights), weights], axis=1)
        bias = np.concatenate([[0.0], bias])
    return weights, bias


def objective_at(weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y_index: np.ndarray, C: float) -> float:  # noqa: N803
    """The probe's objective (mean cross-entropy + ||W||^2 / (2 C n)) at given parameters, in float64."""
    with jax.enable_x64(True):
        params = {"weights": jnp.asarray(weights), "bias": jnp.asarray(bias)}
        return float(probe_objective(params, jnp.asarray(x), jnp.asarray(y_index), 1.0 / (C * len(x))))


def assert_same_fit(probe: Probe, reference, x_train, y_train, x_test, C: float, reference_train=None) -> None:  # noqa: N803
    """``reference``: a LogisticRegression, or a pipeline ending in one (fitted on ``reference_train``, the
    train features as its last step sees them: standardised)."""
    weights, bias = sklearn_parameters(reference[-1] if hasattr(reference, "steps") else reference)
    x_train = x_train if reference_train is None else reference_train
    np.testing.assert_array_equal(probe.classes, reference.classes_)
    classes = reference.classes_
    scale = np.abs(weights).max()
    assert np.abs(probe.weights - weights).max() <= 1e-4 * scale
    assert np.abs(probe.bias - bias).max() <= 1e-4 * max(np.abs(bias).max(), 1.0)
    y_index = np.searchsorted(classes, y_train)
    ours, theirs = (objective_at(w, b, x_train, y_index, C) for w, b in ((probe.weights, probe.bias), (weights, bias)))
    assert probe.objective == pytest.approx(ours, rel=1e-12)
    assert ours == pytest.approx(theirs, rel=1e-9) and ours <= theirs * (1 + 1e-12)
    np.testing.assert_allclose(probe.predict_proba(x_test), reference.predict_proba(x_test), atol=1e-5)
    np.testing.assert_array_equal(probe.predict(x_test), reference.predict(x_test))


@pytest.mark.parametrize("num_classes, C", [(2, 1.0), (4, 0.5), (6, 10.0)])
def test_the_probe_is_scikit_learns_logistic_regression_on_blobs(num_classes, C):  # noqa: N803
    x, y = blobs(num_classes)
    probe = linear_probe(x[:200], y[:200], C=C, **TIGHT)
    reference = LogisticRegression(C=C, **TIGHT).fit(x[:200], y[:200])
    assert probe.converged and probe.gradient_max <= 1e-10
    assert probe.weights.dtype == np.float64 and probe.weights.shape == (20, num_classes)
    assert_same_fit(probe, reference, x[:200], y[:200], x[200:], C)
    assert probe.accuracy(x[200:], y[200:]) == reference.score(x[200:], y[200:])


def test_two_classes_are_scikit_learns_binomial_model_held_as_the_second_column():
    x, y = blobs(2, seed=3)
    probe = linear_probe(x, y, **TIGHT)
    assert np.all(probe.weights[:, 0] == 0) and probe.bias[0] == 0
    reference = LogisticRegression(**TIGHT).fit(x, y)
    np.testing.assert_allclose(
        probe.weights[:, 1], reference.coef_[0], rtol=0, atol=1e-4 * np.abs(reference.coef_).max()
    )


def test_the_defaults_predict_as_scikit_learns_defaults_on_held_out_rows():
    x, y = blobs(3, n=400, seed=1)
    probe = linear_probe(x[:250], y[:250])  # tol=1e-6, max_iter=1000
    reference = LogisticRegression().fit(x[:250], y[:250])  # tol=1e-4, max_iter=100
    assert probe.converged and probe.gradient_max <= 1e-6
    np.testing.assert_array_equal(probe.predict(x[250:]), reference.predict(x[250:]))
    assert probe.accuracy(x[250:], y[250:]) == reference.score(x[250:], y[250:])


def test_labels_keep_their_values_as_scikit_learns_classes():
    x, y = blobs(3, seed=2)
    labels = np.array([3, 7, 11])[y]
    probe = linear_probe(x[:200], labels[:200], **TIGHT)
    reference = LogisticRegression(**TIGHT).fit(x[:200], labels[:200])
    np.testing.assert_array_equal(probe.classes, [3, 7, 11])
    np.testing.assert_array_equal(probe.predict(x[200:]), reference.predict(x[200:]))
    assert probe.accuracy(x[200:], labels[200:]) > 0.8  # the blobs are separable-ish: far above chance (1/3)


@pytest.fixture(scope="module")
def resnet_features(tmp_path_factory):
    """A random-init resnet18's pooled features (512 each) of the generated images at 64x64: (train x, y, val x, y)."""
    root = generate_synthetic(
        tmp_path_factory.mktemp("shapes") / "data", num_classes=3, train_per_class=20, val_per_class=10,
        min_size=64, max_size=96,
    )  # fmt: skip
    model = jaxtl.models.create("resnet18", num_classes=3, seed=0)
    model.eval()
    forward = jax.jit(lambda x: model.forward_features(x))
    out = []
    for split in image_folder_splits(root).values():
        images = [split.load(i) for i in range(len(split))]
        pixels = np.stack([np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR)) for image, _ in images])
        x = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        features = np.asarray(forward(jnp.asarray(x, jnp.float32)), np.float64)  # scikit-learn fits float32 in float32
        out += [features, np.array([label for _, label in images])]
    return tuple(out)


def test_the_probe_is_scikit_learns_on_a_random_resnet18s_features(resnet_features):
    """Real features: 60 rows of 512 (more features than rows, so the penalty alone bounds the solution),
    unscaled as scikit-learn takes them by default."""
    x_train, y_train, x_val, _ = resnet_features
    assert x_train.shape == (60, 512)
    probe = linear_probe(x_train, y_train, **TIGHT)
    reference = LogisticRegression(**TIGHT).fit(x_train, y_train)
    assert probe.converged
    assert_same_fit(probe, reference, x_train, y_train, x_val, 1.0)


def test_standardised_features_are_a_standard_scaler_then_logistic_regression(resnet_features):
    x_train, y_train, x_val, y_val = resnet_features
    probe = linear_probe(x_train, y_train, C=0.1, standardize=True, **TIGHT)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, **TIGHT)).fit(x_train, y_train)
    scaler = reference[0]
    np.testing.assert_allclose(probe.mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(probe.scale, scaler.scale_, rtol=1e-12)
    # The probe standardises the features it is given, as the pipeline does.
    assert_same_fit(probe, reference, x_train, y_train, x_val, 0.1, reference_train=scaler.transform(x_train))
    assert probe.accuracy(x_val, y_val) == reference.score(x_val, y_val)


def test_the_solve_runs_in_float64_and_leaves_jax_in_float32():
    x, y = blobs(3, n=60)
    probe = linear_probe(x.astype(np.float32), y)
    assert probe.weights.dtype == np.float64 and probe.objective > 0
    assert jnp.zeros(1).dtype == jnp.float32  # jax.enable_x64 was a context, not a global switch


def test_a_probe_that_runs_out_of_iterations_says_so():
    x, y = blobs(4)
    probe = linear_probe(x, y, max_iter=2)
    assert probe.iterations == 2 and not probe.converged and probe.gradient_max > 1e-6


@pytest.mark.parametrize(
    "features, labels, error, message",
    [
        (
            np.zeros((4, 3)),
            np.array([0, 1, 0]),
            DataError,
            r"\(N, D\) features and \(N,\) labels; got \(4, 3\) and \(3,\)",
        ),
        (np.zeros((3, 2)), np.zeros(3, int), DataError, r"at least two classes in its train labels; got \[0\]"),
        (np.array([[0.0], [np.nan]]), np.array([0, 1]), DataError, "1 feature values are not finite"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), DataError, "probe labels must be integers"),
    ],
)
def test_bad_features_or_labels_are_refused_with_what_is_wrong(features, labels, error, message):
    with pytest.raises(error, match=message):
        linear_probe(features, labels)


@pytest.mark.parametrize("kwargs, message", [({"C": 0.0}, "C=0.0 must be a finite number > 0"),
                                             ({"max_iter": 0}, "max_iter=0 must be an integer >= 1"),
                                             ({"tol": -1.0}, "tol=-1.0 must be a number >= 0")])  # fmt: skip
def test_bad_solver_settings_are_refused(kwargs, message):
    x, y = blobs(2, n=10)
    with pytest.raises(ValueError, match=message):
        linear_probe(x, y, **kwargs)


def test_accuracy_on_no_rows_is_an_error():
    x, y = blobs(2, n=20)
    with pytest.raises(DataError, match="accuracy of a probe on no rows"):
        linear_probe(x, y).accuracy(np.zeros((0, 20)), np.zeros(0, int))
