"""torchvision's ConvNeXt Tiny, Small, Base and Large as Flax NNX modules.

Module and attribute names mirror torchvision.models.convnext: ``features.0`` is the stem (4x4 stride-4 conv with
bias, LayerNorm2d), then the four stages of CNBlocks at ``features.1``, ``.3``, ``.5``, ``.7`` with a downsample
(LayerNorm2d, 2x2 stride-2 conv) after each of the first three at ``features.2``, ``.4``, ``.6``; a global average
pool; ``classifier`` = LayerNorm2d, Flatten, Linear. Every LayerNorm has eps 1e-6. Activations are NHWC, so
torchvision's channels-first LayerNorm2d and the block's two Permutes are a LayerNorm over the last axis and
identities here (the Permutes and the Flatten keep their index places, so the keys stay torchvision's).
Each CNBlock scales its branch by ``layer_scale`` (torch shape (dim, 1, 1), init 1e-6) before the stochastic
depth (row mode, p growing linearly from 0 on the first block to ``stochastic_depth_prob`` on the last).
Conv and Linear weights are initialised as torchvision does, trunc_normal(std 0.02), with zero biases.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from jaxtl.arrays import to_device
from jaxtl.models.initializers import trunc_normal_init, zeros_init
from jaxtl.models.layers import (
    Activation,
    Conv2d,
    LayerNorm,
    Linear,
    Sequential,
    StochasticDepth,
    gelu,
    global_avg_pool,
)
from jaxtl.models.protocol import head_module
from jaxtl.models.registry import register_model

Array = jax.Array
EPS = 1e-6  # every LayerNorm of torchvision's ConvNeXt
_WEIGHT_INIT = trunc_normal_init(0.02)  # torchvision: trunc_normal_(std=0.02) on every Conv2d and Linear weight


def permute(x: Array) -> Array:
    """torchvision's Permute([0, 2, 3, 1]) and Permute([0, 3, 1, 2]): the identity on channels-last activations."""
    return x


def flatten(x: Array) -> Array:
    """nn.Flatten(1) of the pooled (N, C, 1, 1) features: jaxtl's pooled features are (N, C) already."""
    return x


def _conv(in_channels: int, out_channels: int, kernel_size: int, rngs: nnx.Rngs, **kwargs) -> Conv2d:
    return Conv2d(
        in_channels, out_channels, kernel_size, bias=True, kernel_init=_WEIGHT_INIT, bias_init=zeros_init,
        rngs=rngs, **kwargs,
    )  # fmt: skip


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> Linear:
    return Linear(in_features, out_features, weight_init=_WEIGHT_INIT, bias_init=zeros_init, rngs=rngs)


class CNBlock(nnx.Module):
    """torchvision.models.convnext.CNBlock: depthwise 7x7 conv, LayerNorm, Linear to 4x width, GELU, Linear back,
    scaled per channel by ``layer_scale``, through stochastic depth, plus the input.

    Attributes:
        block: the branch, indexed as torchvision's Sequential: 0 conv, 1 Permute, 2 LayerNorm, 3 Linear, 4 GELU,
            5 Linear, 6 Permute.
        layer_scale: shape (dim, 1, 1), torchvision's own shape (its key loads and exports unchanged); it
            multiplies the channel axis, the last one here.
    """

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float, *, rngs: nnx.Rngs):
        self.block = Sequential(
            [
                _conv(dim, dim, 7, rngs, padding=3, groups=dim),
                Activation(permute),
                LayerNorm(dim, eps=EPS),
                _linear(dim, 4 * dim, rngs),
                Activation(gelu),
                _linear(4 * dim, dim, rngs),
                Activation(permute),
            ]
        )
        # torch.ones(dim, 1, 1) * layer_scale: the float32 product, built in numpy (no XLA compile per shape).
        self.layer_scale = nnx.Param(to_device(np.ones((dim, 1, 1), np.float32) * np.float32(layer_scale)))
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """(N, H, W, dim) -> (N, H, W, dim)."""
        scale = self.layer_scale[...].reshape(-1).astype(x.dtype)
        return self.stochastic_depth(scale * self.block(x)) + x


@dataclasses.dataclass(frozen=True)
class CNBlockConfig:
    """torchvision's CNBlockConfig: a stage of ``num_layers`` blocks at ``input_channels``, then a downsample to
    ``out_channels`` (None: the last stage, no downsample)."""

    input_channels: int
    out_channels: int | None
    num_layers: int


class ConvNeXt(nnx.Module):
    """torchvision.models.ConvNeXt: ``features`` (stem, stages and downsamples), global pool, ``classifier``.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes). Any size from 32x32 runs: the
    stride-4 stem and the stride-2 downsamples floor odd sizes, as torch's convs do. Stochastic depth draws
    from the ``dropout`` RNG stream in train mode and is off in eval mode.
    """

    # The recipe replaces the last Linear only (``model.classifier[2] = nn.Linear(...)``): the pretrained
    # classifier.0 LayerNorm stays, the end of the last stage, and the head's input is its output.
    head_name: ClassVar[str] = "classifier.2"

    def __init__(
        self,
        block_setting: tuple[CNBlockConfig, ...],
        *,
        stochastic_depth_prob: float = 0.0,
        layer_scale: float = 1e-6,
        num_classes: int = 1000,
        rngs: nnx.Rngs,
    ):
        if not block_setting:
            raise ValueError("The block_setting should not be empty")
        stem_width = block_setting[0].input_channels
        layers = [Sequential([_conv(3, stem_width, 4, rngs, stride=4), LayerNorm(stem_width, eps=EPS)])]
        total_stage_blocks = sum(config.num_layers for config in block_setting)
        stage_block_id = 0
        for config in block_setting:
            stage = []
            for _ in range(config.num_layers):
                # torchvision's expression, so that the probabilities are the same floats.
                sd_prob = stochastic_depth_prob * stage_block_id / (total_stage_blocks - 1.0)
                stage.append(CNBlock(config.input_channels, layer_scale, sd_prob, rngs=rngs))
                stage_block_id += 1
            layers.append(Sequential(stage))
            if config.out_channels is not None:
                downsample = [
                    LayerNorm(config.input_channels, eps=EPS),
                    _conv(config.input_channels, config.out_channels, 2, rngs, stride=2),
                ]
                layers.append(Sequential(downsample))
        self.features = Sequential(layers)
        last = block_setting[-1]
        self.num_features = last.out_channels if last.out_channels is not None else last.input_channels
        self.num_classes = num_classes
        self.classifier = Sequential(
            [
                LayerNorm(self.num_features, eps=EPS),
                Activation(flatten),
                _linear(self.num_features, num_classes, rngs),
            ]
        )

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: stem, stages, head.

        A stage is named by its CNBlocks' Sequential (``features.1``, ``.3``, ``.5``, ``.7``) and ends with the
        downsample that follows it (``features.2.`` in ``features.1``), as EfficientNet's last stage ends with
        its 1x1 conv: so layerwise_lr_decay gets one unit per CNBlock, then the downsample, in forward order.
        The last stage ends with the pretrained ``classifier.0`` LayerNorm before the head.
        """
        last = len(self.features) - 1
        stages = [(f"features.{i}", (f"features.{i}.", f"features.{i + 1}.")) for i in range(1, last, 2)]
        stages.append((f"features.{last}", (f"features.{last}.", "classifier.0.")))
        return (("stem", ("features.0.",)), *stages, ("head", (f"{self.head_name}.",)))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every ``features.i`` output in order, the pooled features (``avgpool``), the normalised ones
        (``classifier.0``) and the logits (``classifier``)."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            out[f"features.{i}"] = x
        out["avgpool"] = global_avg_pool(x)
        out["classifier.0"] = self.classifier[0](out["avgpool"])
        out["classifier"] = self.classifier[2](self.classifier[1](out["classifier.0"]))
        return out

    def forward_features(self, x: Array) -> Array:
        """The head's input: pooled features through classifier.0 (LayerNorm) and the Flatten.
        (N, H, W, 3) -> (N, num_features)."""
        x = global_avg_pool(self.features(x))
        return self.classifier[1](self.classifier[0](x))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return head_module(self)(self.forward_features(x))


def _setting(widths: tuple[int, int, int, int], depths: tuple[int, int, int, int]) -> tuple[CNBlockConfig, ...]:
    outs = (*widths[1:], None)
    return tuple(CNBlockConfig(w, o, d) for w, o, d in zip(widths, outs, depths, strict=True))


@register_model
def convnext_tiny(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.1, rngs: nnx.Rngs) -> ConvNeXt:
    """ConvNeXt-Tiny (arXiv:2201.03545): widths 96-768, depths 3-3-9-3."""
    setting = _setting((96, 192, 384, 768), (3, 3, 9, 3))
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def convnext_small(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.4, rngs: nnx.Rngs) -> ConvNeXt:
    """ConvNeXt-Small (arXiv:2201.03545): widths 96-768, depths 3-3-27-3."""
    setting = _setting((96, 192, 384, 768), (3, 3, 27, 3))
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def convnext_base(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.5, rngs: nnx.Rngs) -> ConvNeXt:
    """ConvNeXt-Base (arXiv:2201.03545): widths 128-1024, depths 3-3-27-3."""
    setting = _setting((128, 256, 512, 1024), (3, 3, 27, 3))
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def convnext_large(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.5, rngs: nnx.Rngs) -> ConvNeXt:
    """ConvNeXt-Large (arXiv:2201.03545): widths 192-1536, depths 3-3-27-3."""
    setting = _setting((192, 384, 768, 1536), (3, 3, 27, 3))
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)
