"""A ``solver: linear_probe`` phase: the head set to the converged linear probe of the backbone's cached features.

The first half of LP-FT (Kumar et al., ICLR 2022, arXiv:2202.10054): fine-tuning from a random head distorts the
pretrained features while the head is still wrong; starting it from the optimal linear head does not. The probe
is scikit-learn's ``LogisticRegression(C=probe_C)`` (:func:`jaxtl.train.probe.linear_probe`) on the features the
head sees, so the head's logits are the probe's: ``features @ weight + bias``. With two classes the probe's
first column is zero and its second the binomial weights, which give the same softmax.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxtl.arrays import to_device
from jaxtl.models.layers import Linear
from jaxtl.models.protocol import head_module
from jaxtl.train.features import CachedFeatures
from jaxtl.train.probe import Probe, linear_probe
from jaxtl.train.run_dir import RunError


def head_linear(model: nnx.Module) -> Linear:
    """The one :class:`Linear` layer of ``model``'s head (``fc``, or ``classifier.1`` behind EfficientNet's dropout)."""
    head = head_module(model)
    layers = [module for _, module in nnx.iter_modules(head) if isinstance(module, Linear)]
    if len(layers) != 1 or layers[0].bias is None:
        raise RunError(
            f"a linear_probe phase sets a head of one Linear layer with a bias; "
            f"{type(model).__name__}.{model.head_name} has {len(layers)} Linear layer(s): fit it with solver: optimizer"
        )
    return layers[0]


def fit_probe(features: CachedFeatures, num_classes: int, C: float) -> Probe:  # noqa: N803 (scikit-learn's name)
    """The converged probe of the train split's valid rows, every class seen (else a RunError naming the missing)."""
    x, y = features.features[features.valid], features.labels[features.valid]
    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise RunError(
            f"a linear_probe phase needs every class in the train split; label(s) {missing} have no image: "
            "add images of them or fit the head with solver: optimizer"
        )
    probe = linear_probe(x, y, C=C)
    if not probe.converged:
        raise RunError(
            f"the linear probe did not converge in {probe.iterations} L-BFGS iterations (largest gradient component "
            f"{probe.gradient_max:.2e}): lower probe_C (a stronger penalty) for this phase"
        )
    return probe


def set_head(model: nnx.Module, probe: Probe) -> None:
    """Writes ``probe``'s weights ``(D, K)`` and bias ``(K,)`` into the model's head, in the head's dtype."""
    layer = head_linear(model)
    weight, bias = layer.weight[...], layer.bias[...]
    if weight.shape != probe.weights.shape:
        raise RunError(f"the probe's weights {probe.weights.shape} do not fit the head's {weight.shape}")
    layer.weight.set_value(to_device(probe.weights, weight.dtype))
    layer.bias.set_value(to_device(probe.bias, bias.dtype))


def probe_head(model: nnx.Module, train: CachedFeatures, num_classes: int, C: float) -> tuple[Probe, dict[str, float]]:  # noqa: N803
    """Sets ``model``'s head to the converged probe of ``train``; returns the probe and its train loss and accuracy
    (the mean cross-entropy without the penalty, the fraction of rows right), as an epoch's ``train_`` metrics."""
    probe = fit_probe(train, num_classes, C)
    set_head(model, probe)
    x, y = train.features[train.valid], train.labels[train.valid]
    probabilities = probe.predict_proba(x)
    picked = np.maximum(probabilities[np.arange(len(y)), y], np.finfo(np.float64).tiny)
    return probe, {"train_loss": float(-np.mean(np.log(picked))),
                   "train_acc1": float(np.mean(np.argmax(probabilities, axis=1) == y))}  # fmt: skip
