"""torchvision's RegNet family (RegNetX and RegNetY, 400MF to 128GF) as Flax NNX modules.

Module and attribute names mirror torchvision.models.regnet: ``stem`` (3x3 stride-2 conv, BatchNorm,
ReLU), ``trunk_output.block1`` .. ``block4`` (one AnyStage each, whose residual blocks torchvision names
``block{stage}-{i}``), a global average pool and ``fc``. So ``trunk_output.block2.block2-0.f.b.0.weight``
is the grouped 3x3 kernel of stage 2's first block. Each block is x + F(x) (a strided 1x1 projection of x
where the shape changes), F the bottleneck transform ``f``: 1x1 ``a``, grouped 3x3 ``b``, RegNetY's
squeeze-excitation ``se`` (ReLU, sigmoid gate), 1x1 ``c`` without activation.

Stage widths, depths and group widths come from the RegNet design space (arXiv:2003.13678) through
:func:`block_params`, a port of torchvision's ``BlockParams.from_init_params``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from jaxtl.models.building_blocks import (
    NamedSequential,
    NormConfig,
    SqueezeExcitation,
    conv_norm_activation,
    make_divisible,
)
from jaxtl.models.initializers import normal_init, zeros_init
from jaxtl.models.layers import Linear, global_avg_pool
from jaxtl.models.registry import register_model

Array = jax.Array

# torchvision's _regnet: nn.BatchNorm2d with eps 1e-5, momentum 0.1 (torch's defaults).
_NORM = NormConfig(eps=1e-5, momentum=0.1)


@dataclasses.dataclass(frozen=True)
class BlockParams:
    """Per-stage settings (torchvision.models.regnet.BlockParams): one entry per stage, input to output."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    group_widths: tuple[int, ...]
    bottleneck_multipliers: tuple[float, ...]
    strides: tuple[int, ...]
    se_ratio: float | None = None


def block_params(
    depth: int,
    w_0: int,
    w_a: float,
    w_m: float,
    group_width: int,
    bottleneck_multiplier: float = 1.0,
    se_ratio: float | None = None,
) -> BlockParams:
    """torchvision's ``BlockParams.from_init_params``: the quantised linear width rule, in its float32 arithmetic.

    Block j's continuous width ``w_0 + j * w_a`` is snapped to ``w_0 * w_m**k`` (k the rounded log base
    ``w_m`` of their ratio) and quantised to a multiple of 8; runs of equal widths are the stages. Then
    each stage width is made divisible by its group width (the group width capped by the width).
    torchvision computes the widths with float32 tensors; so does this port (float64 could round a
    value lying on a half differently), and every registered size's result equals torchvision's.
    """
    quant, stride = 8, 2
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError("Invalid RegNet settings")
    f32 = np.float32
    widths_cont = np.arange(depth).astype(f32) * f32(w_a) + f32(w_0)
    block_capacity = np.round(np.log(widths_cont / f32(w_0)) / f32(math.log(w_m)))
    block_widths = (np.round(f32(w_0) * np.power(f32(w_m), block_capacity) / f32(quant)) * quant).astype(int).tolist()
    # A new stage starts wherever the width changes (and the list ends).
    splits = [w != wp for w, wp in zip(block_widths + [0], [0] + block_widths, strict=True)]
    stage_widths = [w for w, split in zip(block_widths, splits[:-1], strict=True) if split]
    stage_depths = np.diff([d for d, split in enumerate(splits) if split]).astype(int).tolist()
    num_stages = len(stage_widths)
    multipliers = [bottleneck_multiplier] * num_stages
    # torchvision's _adjust_widths_groups_compatibilty.
    bottlenecks = [int(w * b) for w, b in zip(stage_widths, multipliers, strict=True)]
    group_widths = [min(group_width, w_bot) for w_bot in bottlenecks]
    bottlenecks = [make_divisible(w_bot, g) for w_bot, g in zip(bottlenecks, group_widths, strict=True)]
    stage_widths = [int(w_bot / b) for w_bot, b in zip(bottlenecks, multipliers, strict=True)]
    return BlockParams(
        depths=tuple(stage_depths),
        widths=tuple(stage_widths),
        group_widths=tuple(group_widths),
        bottleneck_multipliers=tuple(multipliers),
        strides=(stride,) * num_stages,
        se_ratio=se_ratio,
    )


class BottleneckTransform(NamedSequential):
    """F of a block: 1x1 ``a``, grouped 3x3 ``b`` (the block's stride), ``se`` (RegNetY), 1x1 ``c``.

    The bottleneck width is ``round(width_out * bottleneck_multiplier)`` in groups of ``group_width``; the
    squeeze width is ``round(se_ratio * width_in)``, relative to the block's input, as torchvision has it.
    """

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
        *,
        rngs: nnx.Rngs,
    ):
        w_b = int(round(width_out * bottleneck_multiplier))
        groups = w_b // group_width
        relu = jax.nn.relu
        layers = {
            "a": conv_norm_activation(width_in, w_b, 1, norm=_NORM, activation=relu, rngs=rngs),
            "b": conv_norm_activation(
                w_b, w_b, 3, stride=stride, groups=groups, norm=_NORM, activation=relu, rngs=rngs
            ),
        }
        if se_ratio:
            # RegNet's init draws the SE kernels like every conv's, but leaves their biases at torch's default.
            squeeze = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(
                w_b, squeeze, activation=relu, scale_activation=jax.nn.sigmoid, bias_init=None, rngs=rngs
            )
        layers["c"] = conv_norm_activation(w_b, width_out, 1, norm=_NORM, activation=None, rngs=rngs)
        super().__init__(layers)


class ResBottleneckBlock(nnx.Module):
    """relu(x + f(x)), or relu(proj(x) + f(x)) where the width or the resolution changes (torchvision's)."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
        *,
        rngs: nnx.Rngs,
    ):
        needs_projection = width_in != width_out or stride != 1
        self.proj = (
            conv_norm_activation(width_in, width_out, 1, stride=stride, norm=_NORM, activation=None, rngs=rngs)
            if needs_projection
            else None
        )
        self.f = BottleneckTransform(
            width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio, rngs=rngs
        )

    def __call__(self, x: Array) -> Array:
        """(N, H, W, width_in) -> (N, H', W', width_out)."""
        shortcut = x if self.proj is None else self.proj(x)
        return jax.nn.relu(shortcut + self.f(x))


class AnyStage(NamedSequential):
    """A stage (torchvision.models.regnet.AnyStage): ``depth`` blocks named ``block{stage_index}-{i}``, the
    first one strided and changing the width."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        depth: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
        stage_index: int,
        *,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            {
                f"block{stage_index}-{i}": ResBottleneckBlock(
                    width_in if i == 0 else width_out,
                    width_out,
                    stride if i == 0 else 1,
                    group_width,
                    bottleneck_multiplier,
                    se_ratio,
                    rngs=rngs,
                )
                for i in range(depth)
            }
        )


class RegNet(nnx.Module):
    """torchvision.models.RegNet with its default stem (SimpleStemIN, 32 wide), blocks and BatchNorm.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes). Init as torchvision's:
    convs N(0, 2 / fan_out) (fan_out = k * k * out_channels), BatchNorm 1 and 0, ``fc`` N(0, 0.01) and 0.
    """

    head_name: ClassVar[str] = "fc"

    def __init__(self, params: BlockParams, *, num_classes: int = 1000, stem_width: int = 32, rngs: nnx.Rngs):
        self.stem = conv_norm_activation(3, stem_width, 3, stride=2, norm=_NORM, activation=jax.nn.relu, rngs=rngs)
        stages, width = {}, stem_width
        settings = zip(
            params.widths,
            params.strides,
            params.depths,
            params.group_widths,
            params.bottleneck_multipliers,
            strict=True,
        )
        for i, (width_out, stride, depth, group_width, multiplier) in enumerate(settings):
            stages[f"block{i + 1}"] = AnyStage(
                width, width_out, stride, depth, group_width, multiplier, params.se_ratio, i + 1, rngs=rngs
            )
            width = width_out
        self.trunk_output = NamedSequential(stages)
        self.num_features = width
        self.num_classes = num_classes
        self.fc = Linear(width, num_classes, weight_init=normal_init(0.01), bias_init=zeros_init, rngs=rngs)

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: ``stem``, the stages
        ``block1`` .. ``block4``, ``head``.

        A stage lists each of its residual blocks as a prefix of its own
        (``trunk_output.block1.block1-0.``, ...), so that layerwise LR decay steps once per residual block.
        """
        stages = tuple(
            (name, tuple(f"trunk_output.{name}.{block}." for block in getattr(self.trunk_output, name).child_names))
            for name in self.trunk_output.child_names
        )
        return (("stem", ("stem.",)), *stages, ("head", ("fc.",)))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """The stem's and every stage's output, the pooled features (``avgpool``) and the logits (``fc``)."""
        out = {"stem": self.stem(x)}
        x = out["stem"]
        for name in self.trunk_output.child_names:
            x = getattr(self.trunk_output, name)(x)
            out[f"trunk_output.{name}"] = x
        out["avgpool"] = global_avg_pool(x)
        out["fc"] = self.fc(out["avgpool"])
        return out

    def forward_features(self, x: Array) -> Array:
        """Pooled pre-logits features. (N, H, W, 3) -> (N, num_features)."""
        return global_avg_pool(self.trunk_output(self.stem(x)))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.fc(self.forward_features(x))


# torchvision's builders: (depth, w_0, w_a, w_m, group_width); RegNetY adds squeeze-excitation (se_ratio 0.25).
_REGNET_X = {
    "400mf": (22, 24, 24.48, 2.54, 16),
    "800mf": (16, 56, 35.73, 2.28, 16),
    "1_6gf": (18, 80, 34.01, 2.25, 24),
    "3_2gf": (25, 88, 26.31, 2.25, 48),
    "8gf": (23, 80, 49.56, 2.88, 120),
    "16gf": (22, 216, 55.59, 2.1, 128),
    "32gf": (23, 320, 69.86, 2.0, 168),
}
_REGNET_Y = {
    "400mf": (16, 48, 27.89, 2.09, 8),
    "800mf": (14, 56, 38.84, 2.4, 16),
    "1_6gf": (27, 48, 20.71, 2.65, 24),
    "3_2gf": (21, 80, 42.63, 2.66, 24),
    "8gf": (17, 192, 76.82, 2.19, 56),
    "16gf": (18, 200, 106.23, 2.48, 112),
    "32gf": (20, 232, 115.89, 2.53, 232),
    "128gf": (27, 456, 160.83, 2.52, 264),
}


def regnet_params(arch: str) -> BlockParams:
    """The stage settings of a torchvision RegNet builder name, e.g. ``regnet_y_400mf``."""
    family, size = arch.removeprefix("regnet_").split("_", 1)
    table, se_ratio = {"x": (_REGNET_X, None), "y": (_REGNET_Y, 0.25)}[family]
    depth, w_0, w_a, w_m, group_width = table[size]
    return block_params(depth, w_0, w_a, w_m, group_width, se_ratio=se_ratio)


def _regnet(arch: str, num_classes: int, rngs: nnx.Rngs, **kwargs) -> RegNet:
    return RegNet(regnet_params(arch), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def regnet_x_400mf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-400MF (arXiv:2003.13678)."""
    return _regnet("regnet_x_400mf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_800mf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-800MF (arXiv:2003.13678)."""
    return _regnet("regnet_x_800mf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_1_6gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-1.6GF (arXiv:2003.13678)."""
    return _regnet("regnet_x_1_6gf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_3_2gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-3.2GF (arXiv:2003.13678)."""
    return _regnet("regnet_x_3_2gf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_8gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-8GF (arXiv:2003.13678)."""
    return _regnet("regnet_x_8gf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_16gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-16GF (arXiv:2003.13678)."""
    return _regnet("regnet_x_16gf", num_classes, rngs, **kwargs)


@register_model
def regnet_x_32gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetX-32GF (arXiv:2003.13678)."""
    return _regnet("regnet_x_32gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_400mf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-400MF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_400mf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_800mf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-800MF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_800mf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_1_6gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-1.6GF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_1_6gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_3_2gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-3.2GF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_3_2gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_8gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-8GF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_8gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_16gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-16GF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_16gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_32gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-32GF (arXiv:2003.13678): RegNetX with squeeze-excitation."""
    return _regnet("regnet_y_32gf", num_classes, rngs, **kwargs)


@register_model
def regnet_y_128gf(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> RegNet:
    """RegNetY-128GF (arXiv:2003.13678; SWAG weights, arXiv:2201.08371): 2.6 GB of float32 parameters."""
    return _regnet("regnet_y_128gf", num_classes, rngs, **kwargs)
