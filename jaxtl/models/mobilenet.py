"""torchvision's MobileNetV2 and MobileNetV3 Large/Small as Flax NNX modules.

Module and attribute names mirror torchvision.models.mobilenetv2 and mobilenetv3: ``features.0`` is the
stem conv, ``features.1`` .. ``features.N-1`` one inverted residual block each (its layers under ``conv``
in V2, ``block`` in V3), ``features.N`` the last 1x1 conv, ``classifier`` the head: Dropout-Linear (V2),
Linear-Hardswish-Dropout-Linear (V3). V2 uses ReLU6 and BatchNorm eps 1e-5, momentum 0.1; V3 ReLU or
hardswish per block, squeeze-excitation gated by hardsigmoid, and BatchNorm eps 1e-3, momentum 0.01.
Both as torchvision's builders make them by default: width 1.0, no dilation, no reduced tail.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.models.building_blocks import NormConfig, SqueezeExcitation, conv_norm_activation, make_divisible
from jaxtl.models.initializers import kaiming_normal_fan_out, normal_init, zeros_init
from jaxtl.models.layers import Activation, BatchNorm2d, Conv2d, Linear, Sequential, global_avg_pool
from jaxtl.models.protocol import head_module
from jaxtl.models.registry import register_model

Array = jax.Array


# ATen's hardsigmoid backward multiplies by (1.0f / 6.0f), a float32 constant, in every dtype.
_ONE_SIXTH_FLOAT32 = float(np.float32(1.0) / np.float32(6.0))


@jax.custom_jvp
def hardsigmoid(x: Array) -> Array:
    """torch.nn.functional.hardsigmoid: relu6(x + 3) / 6; its gradient is torch's (see below)."""
    return jax.nn.relu6(x + 3.0) / 6.0


@hardsigmoid.defjvp
def _hardsigmoid_jvp(primals, tangents):
    # torch: float32(1/6) on -3 < x < 3, 0 elsewhere. In float64 it is 3e-8 from 1/6, which the
    # float64 gradient comparison (1e-9) sees.
    (x,), (tangent,) = primals, tangents
    inside = (x > -3.0) & (x < 3.0)
    return hardsigmoid(x), tangent * jnp.where(inside, jnp.asarray(_ONE_SIXTH_FLOAT32, x.dtype), 0.0)


@jax.custom_jvp
def hardswish(x: Array) -> Array:
    """torch.nn.functional.hardswish: x * relu6(x + 3) / 6, the product first, in torch's order.

    XLA turns a division by 6 into a product with the rounded 1/6, so about a quarter of the float32
    values lie one ulp from torch's, which divides (docs/numerics.md). The gradient is torch's.
    """
    return x * jax.nn.relu6(x + 3.0) / 6.0


@hardswish.defjvp
def _hardswish_jvp(primals, tangents):
    # torch: 0 for x <= -3, x / 3 + 1/2 for -3 < x < 3, 1 from 3 on (at x = 3 itself too).
    (x,), (tangent,) = primals, tangents
    slope = jnp.where(x <= -3.0, 0.0, jnp.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    return hardswish(x), tangent * slope.astype(x.dtype)


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> Linear:
    """A classifier Linear as torchvision's MobileNets initialise it: weight N(0, 0.01), bias 0."""
    return Linear(in_features, out_features, weight_init=normal_init(0.01), bias_init=zeros_init, rngs=rngs)


class InvertedResidualV2(nnx.Module):
    """MobileNetV2's block (torchvision.models.mobilenetv2.InvertedResidual), layers under ``conv``:
    1x1 expand with ReLU6 (unless the ratio is 1), depthwise 3x3 with ReLU6, 1x1 linear projection
    (conv and BatchNorm), plus the input on stride-1 blocks whose width does not change."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, *, norm: NormConfig, rngs: nnx.Rngs
    ):
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(conv_norm_activation(in_channels, hidden, 1, norm=norm, activation=jax.nn.relu6, rngs=rngs))
        layers += [
            conv_norm_activation(
                hidden, hidden, 3, stride=stride, groups=hidden, norm=norm, activation=jax.nn.relu6, rngs=rngs
            ),
            Conv2d(hidden, out_channels, 1, kernel_init=kaiming_normal_fan_out, rngs=rngs),
            BatchNorm2d(out_channels, eps=norm.eps, momentum=norm.momentum),
        ]
        self.conv = Sequential(layers)
        self.out_channels = out_channels

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H', W', C_out)."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One row of torchvision's MobileNetV3 table (mobilenetv3.InvertedResidualConfig at width 1.0).

    ``activation`` is ``"RE"`` (ReLU) or ``"HS"`` (hardswish), as torchvision writes it.
    """

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int


class InvertedResidualV3(nnx.Module):
    """MobileNetV3's block (torchvision.models.mobilenetv3.InvertedResidual), layers under ``block``:
    1x1 expand (unless the widths agree), depthwise kxk, squeeze-excitation (ReLU, hardsigmoid gate;
    squeeze width ``_make_divisible(expanded // 4, 8)``) where the table says so, 1x1 linear projection,
    plus the input on stride-1 blocks whose width does not change."""

    def __init__(self, config: BlockConfig, *, norm: NormConfig, rngs: nnx.Rngs):
        self.use_res_connect = config.stride == 1 and config.input_channels == config.out_channels
        activation = hardswish if config.activation == "HS" else jax.nn.relu
        expanded = config.expanded_channels
        common = dict(norm=norm, activation=activation, rngs=rngs)
        layers = []
        if expanded != config.input_channels:
            layers.append(conv_norm_activation(config.input_channels, expanded, 1, **common))
        layers.append(
            conv_norm_activation(expanded, expanded, config.kernel, stride=config.stride, groups=expanded, **common)
        )
        if config.use_se:
            squeeze = make_divisible(expanded // 4, 8)
            layers.append(
                SqueezeExcitation(expanded, squeeze, activation=jax.nn.relu, scale_activation=hardsigmoid, rngs=rngs)
            )
        layers.append(conv_norm_activation(expanded, config.out_channels, 1, norm=norm, activation=None, rngs=rngs))
        self.block = Sequential(layers)
        self.out_channels = config.out_channels

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H', W', C_out)."""
        result = self.block(x)
        return result + x if self.use_res_connect else result


class MobileNet(nnx.Module):
    """What MobileNetV2 and V3 share: ``features``, a global average pool, ``classifier``.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes). The classifier's
    dropout draws from the ``dropout`` RNG stream in train mode and is off in eval mode.
    """

    head_name: ClassVar[str] = "classifier"
    # torchvision's MobileNetV3 pools in a module named avgpool; V2 calls a function.
    pool_module: ClassVar[str | None] = None
    _pre_logits: ClassVar[tuple[str, ...]] = ()  # parameter prefixes between the pooling and the head

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: stem, stages, head.

        torchvision's ``features`` are flat (one inverted residual per index), so a stage is a run of
        consecutive blocks of the same output width: a row of MobileNetV2's table, and the same runs in
        MobileNetV3 (``features.2-3`` holds ``features.2.`` and ``features.3.``).
        """
        last = len(self.features) - 1
        runs: list[list[int]] = []
        for index in range(1, last):
            if runs and self.features[runs[-1][-1]].out_channels == self.features[index].out_channels:
                runs[-1].append(index)
            else:
                runs.append([index])
        stages = []
        for run in runs:
            name = f"features.{run[0]}" if len(run) == 1 else f"features.{run[0]}-{run[-1]}"
            stages.append((name, tuple(f"features.{i}." for i in run)))
        # The last stage also holds the last 1x1 conv (as EfficientNet's does) and, in MobileNetV3, the pretrained
        # classifier.0 before the head.
        stages[-1] = (stages[-1][0], (*stages[-1][1], f"features.{last}.", *self._pre_logits))
        return (("stem", ("features.0.",)), *stages, ("head", (f"{self.head_name}.",)))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every ``features.i`` output in order, the pooled features (as ``avgpool`` where torchvision has that
        module), and the logits (``classifier``)."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            out[f"features.{i}"] = x
        pooled = global_avg_pool(x)
        if self.pool_module is not None:
            out[self.pool_module] = pooled
        out["classifier"] = self.classifier(pooled)
        return out

    def forward_features(self, x: Array) -> Array:
        """Pooled pre-logits features. (N, H, W, 3) -> (N, num_features)."""
        return global_avg_pool(self.features(x))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return head_module(self)(self.forward_features(x))


# torchvision's MobileNetV2 table: (expand ratio t, output channels c, blocks n, first stride s).
_V2_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip


class MobileNetV2(MobileNet):
    """torchvision.models.MobileNetV2 at width 1.0: 32-wide stem, 17 blocks, 1280 features."""

    def __init__(self, *, num_classes: int = 1000, dropout: float = 0.2, rngs: nnx.Rngs):
        norm = NormConfig()
        layers = [conv_norm_activation(3, 32, 3, stride=2, norm=norm, activation=jax.nn.relu6, rngs=rngs)]
        in_channels = 32
        for expand_ratio, out_channels, num_blocks, stride in _V2_SETTING:
            for i in range(num_blocks):
                block_stride = stride if i == 0 else 1
                layers.append(
                    InvertedResidualV2(in_channels, out_channels, block_stride, expand_ratio, norm=norm, rngs=rngs)
                )
                in_channels = out_channels
        self.num_features = 1280
        layers.append(
            conv_norm_activation(in_channels, self.num_features, 1, norm=norm, activation=jax.nn.relu6, rngs=rngs)
        )
        self.features = Sequential(layers)
        self.num_classes = num_classes
        self.classifier = Sequential([nnx.Dropout(dropout, rngs=rngs), _linear(self.num_features, num_classes, rngs)])


_V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
)  # fmt: skip
_V3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
)  # fmt: skip


class MobileNetV3(MobileNet):
    """torchvision.models.MobileNetV3: hardswish stem, the table's blocks, a 1x1 conv to 6x the last width,
    and a two-layer classifier through ``last_channel`` (1280 Large, 1024 Small)."""

    pool_module: ClassVar[str | None] = "avgpool"
    # The recipe replaces the last Linear only (``model.classifier[3] = nn.Linear(1280, num_classes)``): the
    # pretrained classifier.0 (960 -> 1280, hardswish) is part of the backbone, and the head's input is its output.
    head_name: ClassVar[str] = "classifier.3"
    _pre_logits: ClassVar[tuple[str, ...]] = ("classifier.0.",)

    def forward_features(self, x: Array) -> Array:
        """The head's input: the pooled features through classifier.0, hardswish and dropout. (N, H, W, 3) ->
        (N, last_channel)."""
        x = super().forward_features(x)
        for layer in list(self.classifier)[:3]:
            x = layer(x)
        return x

    def __init__(
        self,
        setting: tuple[BlockConfig, ...],
        *,
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        rngs: nnx.Rngs,
    ):
        norm = NormConfig(eps=1e-3, momentum=0.01)
        stem_width, last_width = setting[0].input_channels, setting[-1].out_channels
        layers = [conv_norm_activation(3, stem_width, 3, stride=2, norm=norm, activation=hardswish, rngs=rngs)]
        layers += [InvertedResidualV3(config, norm=norm, rngs=rngs) for config in setting]
        conv_width = 6 * last_width
        last_conv = conv_norm_activation(last_width, conv_width, 1, norm=norm, activation=hardswish, rngs=rngs)
        layers.append(last_conv)
        self.features = Sequential(layers)
        self.num_classes = num_classes
        self.num_features = last_channel  # the head's input (forward_features)
        self.classifier = Sequential(
            [
                _linear(conv_width, last_channel, rngs),
                Activation(hardswish),
                nnx.Dropout(dropout, rngs=rngs),
                _linear(last_channel, num_classes, rngs),
            ]
        )


@register_model
def mobilenet_v2(*, num_classes: int = 1000, dropout: float = 0.2, rngs: nnx.Rngs) -> MobileNetV2:
    """MobileNetV2 (arXiv:1801.04381)."""
    return MobileNetV2(num_classes=num_classes, dropout=dropout, rngs=rngs)


@register_model
def mobilenet_v3_large(*, num_classes: int = 1000, dropout: float = 0.2, rngs: nnx.Rngs) -> MobileNetV3:
    """MobileNetV3-Large (arXiv:1905.02244); BatchNorm eps 1e-3, momentum 0.01."""
    setting = tuple(BlockConfig(*row) for row in _V3_LARGE)
    return MobileNetV3(setting, last_channel=1280, num_classes=num_classes, dropout=dropout, rngs=rngs)


@register_model
def mobilenet_v3_small(*, num_classes: int = 1000, dropout: float = 0.2, rngs: nnx.Rngs) -> MobileNetV3:
    """MobileNetV3-Small (arXiv:1905.02244); BatchNorm eps 1e-3, momentum 0.01."""
    setting = tuple(BlockConfig(*row) for row in _V3_SMALL)
    return MobileNetV3(setting, last_channel=1024, num_classes=num_classes, dropout=dropout, rngs=rngs)
