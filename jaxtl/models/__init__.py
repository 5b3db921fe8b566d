"""Flax NNX image classifiers with torchvision's names, and the registry that builds them."""

from jaxtl.models import resnet
from jaxtl.models.registry import create, list_models, register_model
from jaxtl.models.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from jaxtl.models.state_dict import load_state_dict, state_dict

__all__ = [
    "ResNet",
    "create",
    "list_models",
    "load_state_dict",
    "register_model",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "state_dict",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
