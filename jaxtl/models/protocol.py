"""The contract every jaxtl classifier keeps, which the freezing policies and the trainer rely on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import jax

Array = jax.Array

CLASSIFIER_ATTRIBUTES = ("head_name", "num_classes")
CLASSIFIER_METHODS = ("blocks", "forward_features", "__call__")


@runtime_checkable
class Classifier(Protocol):
    """An image classifier with torchvision's parameter names, split into stem, stages and head.

    Inputs ``x`` are float32 NHWC batches (N, H, W, 3), already normalised as the weights expect
    (torchvision's: ImageNet mean and std). ``isinstance(model, Classifier)`` checks that the
    members exist, not their types or shapes; :func:`missing_members` names the absent ones.

    Attributes:
        head_name: torchvision's name of the classifier head module, the first part of its
            parameters' names: ``"fc"`` (ResNet), ``"classifier"`` (EfficientNet, MobileNetV2), or a dotted
            path where the recipe replaces one layer of a larger classifier: ``"classifier.3"``
            (MobileNetV3, whose pretrained ``classifier.0`` stays: ``model.classifier[3] = nn.Linear(...)``).
            The head maps :meth:`forward_features` to logits: ``head_module(model)(features)`` are the logits.
        num_classes: the head's output width.
    """

    head_name: str
    num_classes: int

    def blocks(self) -> Sequence[tuple[str, tuple[str, ...]]]:
        """The network as ordered (block name, dotted parameter-name prefixes) pairs, input to output.

        The first block is ``"stem"``, the last ``"head"`` (its prefixes under ``head_name``), the
        stages between them; e.g. ResNet's ``("stem", ("conv1.", "bn1.")), ("layer1", ("layer1.",)),
        ..., ("head", ("fc.",))``. Each prefix ends in a dot, or is a whole parameter's name where the model
        holds the parameter itself (ViT's ``class_token``), and every parameter's dotted name
        (:func:`jaxtl.models.names.dotted_name`) starts with exactly one of them.
        """
        ...

    def forward_features(self, x: Array) -> Array:
        """Pre-logits features, the head's input: (N, H, W, 3) -> (N, num_features)."""
        ...

    def __call__(self, x: Array) -> Array:
        """Logits: (N, H, W, 3) -> (N, num_classes); the head applied to :meth:`forward_features`."""
        ...


def head_module(model: object) -> object:
    """The module ``model.head_name`` names, a dotted path whose integer parts index a Sequential."""
    module = model
    for part in model.head_name.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def missing_members(model: object, members: Iterable[str] | None = None) -> list[str]:
    """The members of the :class:`Classifier` contract that ``model`` lacks, methods written ``name()``.

    Args:
        model: any object, typically an ``nnx.Module``.
        members: the members to check (names from ``CLASSIFIER_ATTRIBUTES`` and ``CLASSIFIER_METHODS``);
            None for the whole contract.

    Returns:
        The missing ones in the contract's order, e.g. ``["num_classes", "blocks()"]``; empty if none is.
    """
    wanted = set(CLASSIFIER_ATTRIBUTES + CLASSIFIER_METHODS if members is None else members)
    unknown = wanted - set(CLASSIFIER_ATTRIBUTES + CLASSIFIER_METHODS)
    if unknown:
        raise ValueError(f"not members of the Classifier contract: {', '.join(sorted(unknown))}")
    missing = [name for name in CLASSIFIER_ATTRIBUTES if name in wanted and not hasattr(model, name)]
    missing += [
        f"{name}()" for name in CLASSIFIER_METHODS if name in wanted and not callable(getattr(model, name, None))
    ]
    return missing
