"""torchvision's EfficientNet B0-B7 and EfficientNetV2 S/M/L as Flax NNX modules.

Module and attribute names mirror torchvision.models.efficientnet: ``features.0`` is the stem,
``features.1`` .. ``features.N-2`` the stages of (Fused)MBConv blocks, ``features.N-1`` the head
conv, ``classifier.1`` the linear head. Per variant as torchvision builds it: widths
``_make_divisible(c * width, 8)``, depths ``ceil(n * depth)``, BatchNorm eps/momentum
(B5-B7: 1e-3 / 0.01; V2: 1e-3 / 0.1), classifier dropout, and stochastic depth
p = 0.2 * block_index / total_blocks on blocks with a residual connection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
from flax import nnx

from jaxtl.models.building_blocks import NormConfig, SqueezeExcitation, conv_norm_activation, make_divisible
from jaxtl.models.initializers import uniform_init, zeros_init
from jaxtl.models.layers import Linear, Sequential, StochasticDepth, global_avg_pool
from jaxtl.models.registry import register_model

Array = jax.Array
SILU = jax.nn.silu  # every activation of EfficientNet but the squeeze-excitation gate (sigmoid)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage: ``num_layers`` blocks of ``kind`` ("mbconv" or "fused"), already width/depth scaled."""

    kind: str
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand (if ratio != 1), depthwise kxk, squeeze-excitation, 1x1 project."""

    def __init__(self, config: StageConfig, stochastic_depth_prob: float, norm: NormConfig, *, rngs: nnx.Rngs):
        self.use_res_connect = config.stride == 1 and config.input_channels == config.out_channels
        expanded = make_divisible(config.input_channels * config.expand_ratio)
        layers = []
        if expanded != config.input_channels:
            expand = conv_norm_activation(config.input_channels, expanded, 1, norm=norm, activation=SILU, rngs=rngs)
            layers.append(expand)
        layers.append(
            conv_norm_activation(
                expanded,
                expanded,
                config.kernel,
                stride=config.stride,
                groups=expanded,
                norm=norm,
                activation=SILU,
                rngs=rngs,
            )
        )
        # The squeeze width comes from the block's input channels, not the expanded ones (torchvision).
        layers.append(
            SqueezeExcitation(
                expanded,
                max(1, config.input_channels // 4),
                activation=SILU,
                scale_activation=jax.nn.sigmoid,
                rngs=rngs,
            )
        )
        layers.append(conv_norm_activation(expanded, config.out_channels, 1, norm=norm, activation=None, rngs=rngs))
        self.block = Sequential(layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, rngs=rngs)
        self.out_channels = config.out_channels

    def __call__(self, x: Array) -> Array:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class FusedMBConv(nnx.Module):
    """EfficientNetV2's fused block: one kxk conv that expands (if ratio != 1), then 1x1 project; no SE."""

    def __init__(self, config: StageConfig, stochastic_depth_prob: float, norm: NormConfig, *, rngs: nnx.Rngs):
        self.use_res_connect = config.stride == 1 and config.input_channels == config.out_channels
        expanded = make_divisible(config.input_channels * config.expand_ratio)
        common = dict(stride=config.stride, norm=norm, activation=SILU, rngs=rngs)
        if expanded != config.input_channels:
            layers = [
                conv_norm_activation(config.input_channels, expanded, config.kernel, **common),
                conv_norm_activation(expanded, config.out_channels, 1, norm=norm, activation=None, rngs=rngs),
            ]
        else:
            layers = [conv_norm_activation(config.input_channels, config.out_channels, config.kernel, **common)]
        self.block = Sequential(layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, rngs=rngs)
        self.out_channels = config.out_channels

    def __call__(self, x: Array) -> Array:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class EfficientNet(nnx.Module):
    """torchvision.models.EfficientNet (V1 and V2): ``features``, global pool, ``classifier``.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes). Dropout and
    stochastic depth draw from the ``dropout`` RNG stream in train mode and are off in eval mode.
    """

    head_name: ClassVar[str] = "classifier"

    def __init__(
        self,
        stages: list[StageConfig],
        *,
        dropout: float,
        norm: NormConfig,
        last_channel: int | None = None,
        stochastic_depth_prob: float = 0.2,
        num_classes: int = 1000,
        rngs: nnx.Rngs,
    ):
        layers = [conv_norm_activation(3, stages[0].input_channels, 3, stride=2, norm=norm, activation=SILU, rngs=rngs)]
        total_blocks = sum(stage.num_layers for stage in stages)
        block_index = 0
        for stage in stages:
            blocks = []
            for i in range(stage.num_layers):
                config = stage if i == 0 else dataclasses.replace(stage, input_channels=stage.out_channels, stride=1)
                block = MBConv if stage.kind == "mbconv" else FusedMBConv
                blocks.append(block(config, stochastic_depth_prob * block_index / total_blocks, norm, rngs=rngs))
                block_index += 1
            layers.append(Sequential(blocks))
        self.num_features = last_channel if last_channel is not None else 4 * stages[-1].out_channels
        layers.append(
            conv_norm_activation(stages[-1].out_channels, self.num_features, 1, norm=norm, activation=SILU, rngs=rngs)
        )
        self.features = Sequential(layers)
        self.num_classes = num_classes
        bound = 1.0 / math.sqrt(num_classes)  # torchvision's EfficientNet head init
        self.classifier = Sequential(
            [
                nnx.Dropout(dropout, rngs=rngs),
                Linear(
                    self.num_features, num_classes, weight_init=uniform_init(bound), bias_init=zeros_init, rngs=rngs
                ),
            ]
        )

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"features.{i}" for i in range(1, len(self.features) - 1))

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: stem, stages, head.

        The stem is ``features.0``; each MBConv / FusedMBConv stage is a block, and the last one
        also holds the final 1x1 conv (``features.N``), as ``layer4`` ends a ResNet's features.
        """
        last = len(self.features) - 1
        stages = [(f"features.{i}", (f"features.{i}.",)) for i in range(1, last - 1)]
        stages.append((f"features.{last - 1}", (f"features.{last - 1}.", f"features.{last}.")))
        return (("stem", ("features.0.",)), *stages, ("head", ("classifier.",)))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every top-level stage's output, in order: ``features.0`` .. ``features.N``, pooled features, logits."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            out[f"features.{i}"] = x
        out["avgpool"] = global_avg_pool(x)
        out["classifier"] = self.classifier(out["avgpool"])
        return out

    def forward_features(self, x: Array) -> Array:
        """Pooled pre-logits features. (N, H, W, 3) -> (N, num_features)."""
        return global_avg_pool(self.features(x))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


def _v1_stages(width_mult: float, depth_mult: float) -> list[StageConfig]:
    rows = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]  # fmt: skip
    return [
        StageConfig(
            "mbconv",
            expand,
            kernel,
            stride,
            make_divisible(cin * width_mult),
            make_divisible(cout * width_mult),
            int(math.ceil(layers * depth_mult)),
        )
        for expand, kernel, stride, cin, cout, layers in rows
    ]


_V2_STAGES = {
    "s": [("fused", 1, 3, 1, 24, 24, 2), ("fused", 4, 3, 2, 24, 48, 4), ("fused", 4, 3, 2, 48, 64, 4),
          ("mbconv", 4, 3, 2, 64, 128, 6), ("mbconv", 6, 3, 1, 128, 160, 9), ("mbconv", 6, 3, 2, 160, 256, 15)],
    "m": [("fused", 1, 3, 1, 24, 24, 3), ("fused", 4, 3, 2, 24, 48, 5), ("fused", 4, 3, 2, 48, 80, 5),
          ("mbconv", 4, 3, 2, 80, 160, 7), ("mbconv", 6, 3, 1, 160, 176, 14), ("mbconv", 6, 3, 2, 176, 304, 18),
          ("mbconv", 6, 3, 1, 304, 512, 5)],
    "l": [("fused", 1, 3, 1, 32, 32, 4), ("fused", 4, 3, 2, 32, 64, 7), ("fused", 4, 3, 2, 64, 96, 7),
          ("mbconv", 4, 3, 2, 96, 192, 10), ("mbconv", 6, 3, 1, 192, 224, 19), ("mbconv", 6, 3, 2, 224, 384, 25),
          ("mbconv", 6, 3, 1, 384, 640, 7)],
}  # fmt: skip


_DEFAULT_NORM = NormConfig()


def _efficientnet_v1(width_mult, depth_mult, dropout, norm=_DEFAULT_NORM, *, num_classes, rngs, **kwargs):
    stages = _v1_stages(width_mult, depth_mult)
    return EfficientNet(stages, dropout=dropout, norm=norm, num_classes=num_classes, rngs=rngs, **kwargs)


def _efficientnet_v2(size, dropout, *, num_classes, rngs, **kwargs):
    stages = [StageConfig(*row) for row in _V2_STAGES[size]]
    return EfficientNet(
        stages,
        dropout=dropout,
        norm=NormConfig(eps=1e-3),
        last_channel=1280,
        num_classes=num_classes,
        rngs=rngs,
        **kwargs,
    )


_B5_B7_NORM = NormConfig(eps=1e-3, momentum=0.01)


@register_model
def efficientnet_b0(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B0 (arXiv:1905.11946)."""
    return _efficientnet_v1(1.0, 1.0, kwargs.pop("dropout", 0.2), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b1(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B1 (arXiv:1905.11946)."""
    return _efficientnet_v1(1.0, 1.1, kwargs.pop("dropout", 0.2), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b2(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B2 (arXiv:1905.11946)."""
    return _efficientnet_v1(1.1, 1.2, kwargs.pop("dropout", 0.3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b3(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B3 (arXiv:1905.11946)."""
    return _efficientnet_v1(1.2, 1.4, kwargs.pop("dropout", 0.3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b4(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B4 (arXiv:1905.11946)."""
    return _efficientnet_v1(1.4, 1.8, kwargs.pop("dropout", 0.4), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b5(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B5 (arXiv:1905.11946); BatchNorm eps 1e-3, momentum 0.01."""
    dropout = kwargs.pop("dropout", 0.4)
    return _efficientnet_v1(1.6, 2.2, dropout, _B5_B7_NORM, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b6(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B6 (arXiv:1905.11946); BatchNorm eps 1e-3, momentum 0.01."""
    dropout = kwargs.pop("dropout", 0.5)
    return _efficientnet_v1(1.8, 2.6, dropout, _B5_B7_NORM, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_b7(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNet-B7 (arXiv:1905.11946); BatchNorm eps 1e-3, momentum 0.01."""
    dropout = kwargs.pop("dropout", 0.5)
    return _efficientnet_v1(2.0, 3.1, dropout, _B5_B7_NORM, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_v2_s(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNetV2-S (arXiv:2104.00298); BatchNorm eps 1e-3."""
    return _efficientnet_v2("s", kwargs.pop("dropout", 0.2), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_v2_m(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNetV2-M (arXiv:2104.00298); BatchNorm eps 1e-3."""
    return _efficientnet_v2("m", kwargs.pop("dropout", 0.3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def efficientnet_v2_l(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> EfficientNet:
    """EfficientNetV2-L (arXiv:2104.00298); BatchNorm eps 1e-3."""
    return _efficientnet_v2("l", kwargs.pop("dropout", 0.4), num_classes=num_classes, rngs=rngs, **kwargs)
