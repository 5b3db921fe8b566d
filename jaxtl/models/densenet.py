"""torchvision's DenseNet-BC family (DenseNet-121, -161, -169, -201) as Flax NNX modules.

Module and attribute names mirror torchvision.models.densenet: ``features`` holds the stem (``conv0``
7x7 stride 2, ``norm0``, ``relu0``, ``pool0`` 3x3 max pool), ``denseblock1`` .. ``denseblock4`` (dense
layers ``denselayer1`` .. ``denselayerN``), ``transition1`` .. ``transition3`` between them and the final
BatchNorm ``norm5``; ``classifier`` is the head, after a ReLU and a global average pool. So
``features.denseblock2.denselayer3.conv1.weight`` is the 1x1 kernel of block 2's third layer. Every
dense layer (BatchNorm, ReLU, 1x1 conv to ``bn_size * growth_rate``, BatchNorm, ReLU, 3x3 conv to
``growth_rate``) reads the concatenation of its block's input and every earlier layer's output, and
its output is concatenated to them. A transition halves the width (BatchNorm, ReLU, 1x1 conv) and the
resolution (2x2 average pool).

torchvision's ``memory_efficient`` (checkpointing) computes the same function and is not needed here; its
legacy weight files' ``norm.1``-style keys are renamed when they are read, not here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.models.building_blocks import NamedSequential
from jaxtl.models.initializers import normal_init, zeros_init
from jaxtl.models.layers import BatchNorm2d, Conv2d, Linear, global_avg_pool, max_pool2d
from jaxtl.models.registry import register_model

Array = jax.Array


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, rngs: nnx.Rngs) -> Conv2d:
    """A bias-free conv as torchvision's DenseNet initialises it: ``nn.init.kaiming_normal_(w)`` with its defaults,
    mode fan_in (in_channels * k * k) and leaky_relu with slope 0 (ReLU's gain, sqrt(2)): N(0, 2 / fan_in)."""
    std = math.sqrt(2.0 / (in_channels * kernel_size * kernel_size))
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        kernel_init=normal_init(std),
        rngs=rngs,
    )


def _batch_norm(num_features: int) -> BatchNorm2d:
    # torchvision's DenseNet uses nn.BatchNorm2d's defaults.
    return BatchNorm2d(num_features, eps=1e-5, momentum=0.1)


def avg_pool2d(x: Array, *, kernel_size: int, stride: int) -> Array:
    """torch.nn.AvgPool2d(kernel_size, stride) without padding on NHWC: the window's sum over its size;
    a remainder row or column that no window covers is dropped (floor mode), as in torch."""
    summed = jax.lax.reduce_window(
        x,
        np.array(0, x.dtype),
        jax.lax.add,
        window_dimensions=(1, kernel_size, kernel_size, 1),
        window_strides=(1, stride, stride, 1),
        padding="VALID",
    )
    return summed / (kernel_size * kernel_size)


class DenseLayer(nnx.Module):
    """torchvision.models.densenet._DenseLayer: conv2(relu(norm2(conv1(relu(norm1(x)))))), ``growth_rate`` new
    channels from a ``bn_size * growth_rate`` wide bottleneck; dropout of ``drop_rate`` on them (off by
    default, as in torchvision's builders)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float, *, rngs: nnx.Rngs):
        width = bn_size * growth_rate
        self.norm1 = _batch_norm(num_input_features)
        self.conv1 = _conv(num_input_features, width, 1, rngs=rngs)
        self.norm2 = _batch_norm(width)
        self.conv2 = _conv(width, growth_rate, 3, rngs=rngs)
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H, W, growth_rate): the new features only."""
        x = self.conv1(jax.nn.relu(self.norm1(x)))
        x = self.conv2(jax.nn.relu(self.norm2(x)))
        return x if self.dropout is None else self.dropout(x)


class DenseBlock(NamedSequential):
    """torchvision.models.densenet._DenseBlock: layers ``denselayer1`` .. ``denselayer{num_layers}``, each fed
    the concatenation of the block's input and every earlier layer's output; the block returns them all."""

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float, *, rngs
    ):
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(
                    num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, rngs=rngs
                )
                for i in range(num_layers)
            }
        )

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H, W, C_in + num_layers * growth_rate)."""
        features = [x]
        for name in self.child_names:
            features.append(getattr(self, name)(jnp.concatenate(features, axis=-1)))
        return jnp.concatenate(features, axis=-1)


class Transition(nnx.Module):
    """torchvision.models.densenet._Transition: BatchNorm ``norm``, ReLU, 1x1 ``conv``, 2x2 average ``pool``."""

    def __init__(self, num_input_features: int, num_output_features: int, *, rngs: nnx.Rngs):
        self.norm = _batch_norm(num_input_features)
        self.conv = _conv(num_input_features, num_output_features, 1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H // 2, W // 2, C_out)."""
        return avg_pool2d(self.conv(jax.nn.relu(self.norm(x))), kernel_size=2, stride=2)


class Features(NamedSequential):
    """DenseNet's ``features``: ``conv0``, ``norm0``, ReLU (``relu0``), 3x3 stride-2 max pool (``pool0``), then the
    dense blocks and transitions, and ``norm5``. ReLU and pool hold no parameters, so they are not children."""

    def intermediates(self, x: Array) -> dict[str, Array]:
        """Every module's output in order, by torchvision's name (``features.relu0``, ``features.pool0`` too)."""
        out = {}
        for name in self.child_names:
            x = getattr(self, name)(x)
            out[f"features.{name}"] = x
            if name == "norm0":
                x = jax.nn.relu(x)
                out["features.relu0"] = x
                x = max_pool2d(x, kernel_size=3, stride=2, padding=1)
                out["features.pool0"] = x
        return out

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> (N, H', W', num_features), before the final ReLU."""
        for name in self.child_names:
            x = getattr(self, name)(x)
            if name == "norm0":
                x = max_pool2d(jax.nn.relu(x), kernel_size=3, stride=2, padding=1)
        return x


class DenseNet(nnx.Module):
    """torchvision.models.DenseNet (DenseNet-BC): ``features``, ReLU, global average pool, ``classifier``.

    Input: float32 (N, H, W, 3), normalised, at least 29x29 (torchvision's ``min_size``). Output: logits
    (N, num_classes). Init as torchvision's: convs N(0, 2 / fan_in), BatchNorm 1 and 0, ``classifier``
    torch's default Linear weight and a zero bias.
    """

    head_name: ClassVar[str] = "classifier"

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, int, int, int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        *,
        num_classes: int = 1000,
        rngs: nnx.Rngs,
    ):
        layers: dict[str, nnx.Module] = {
            "conv0": _conv(3, num_init_features, 7, stride=2, rngs=rngs),
            "norm0": _batch_norm(num_init_features),
        }
        width = num_init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, width, bn_size, growth_rate, drop_rate, rngs=rngs)
            width += num_layers * growth_rate
            if i != len(block_config) - 1:
                layers[f"transition{i + 1}"] = Transition(width, width // 2, rngs=rngs)
                width //= 2
        layers["norm5"] = _batch_norm(width)
        self.features = Features(layers)
        self.num_features = width
        self.num_classes = num_classes
        self.classifier = Linear(width, num_classes, bias_init=zeros_init, rngs=rngs)

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output.

        ``stem`` (conv0, norm0); then one stage per dense block, ``denseblock1`` .. ``denseblock4``, holding its
        dense layers, each a prefix of its own (so that layerwise LR decay steps once per dense layer, DenseNet's
        counterpart of a residual block), and after them the transition that follows the block (the last stage:
        the final ``norm5``); ``head``.
        """
        stages, current = [], None
        for name in self.features.child_names:
            if name.startswith("denseblock"):
                block = getattr(self.features, name)
                current = [name, [f"features.{name}.{layer}." for layer in block.child_names]]
                stages.append(current)
            elif current is not None:  # transition{i} and norm5 close the stage before them
                current[1].append(f"features.{name}.")
        return (
            ("stem", ("features.conv0.", "features.norm0.")),
            *((name, tuple(prefixes)) for name, prefixes in stages),
            ("head", ("classifier.",)),
        )

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every module of ``features`` in order (torchvision's names) and the logits (``classifier``); torchvision
        pools with a function, not a module, so the pooled features have no name of their own."""
        out = self.features.intermediates(x)
        out["classifier"] = self.classifier(global_avg_pool(jax.nn.relu(out["features.norm5"])))
        return out

    def forward_features(self, x: Array) -> Array:
        """Pooled pre-logits features, relu(features) averaged. (N, H, W, 3) -> (N, num_features)."""
        x = self.features(x)
        return global_avg_pool(jax.nn.relu(x))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


@register_model
def densenet121(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> DenseNet:
    """DenseNet-121 (arXiv:1608.06993): growth rate 32, blocks (6, 12, 24, 16), 64 initial features."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def densenet161(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> DenseNet:
    """DenseNet-161 (arXiv:1608.06993): growth rate 48, blocks (6, 12, 36, 24), 96 initial features."""
    return DenseNet(48, (6, 12, 36, 24), 96, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def densenet169(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> DenseNet:
    """DenseNet-169 (arXiv:1608.06993): growth rate 32, blocks (6, 12, 32, 32), 64 initial features."""
    return DenseNet(32, (6, 12, 32, 32), 64, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def densenet201(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> DenseNet:
    """DenseNet-201 (arXiv:1608.06993): growth rate 32, blocks (6, 12, 48, 32), 64 initial features."""
    return DenseNet(32, (6, 12, 48, 32), 64, num_classes=num_classes, rngs=rngs, **kwargs)
