"""The torchvision ResNet family (ResNet, ResNeXt, Wide ResNet) as Flax NNX modules.

Module and attribute names mirror torchvision.models.resnet, so ``layer4.1.conv2.weight`` is the
kernel of ``model.layer4[1].conv2``. ResNet V1.5: the Bottleneck's stride sits on its 3x3 conv.
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from jaxtl.models.initializers import kaiming_normal_fan_out
from jaxtl.models.layers import BatchNorm2d, Conv2d, Linear, Sequential, global_avg_pool, max_pool2d
from jaxtl.models.registry import register_model

Array = jax.Array

# torchvision.models.resnet uses nn.BatchNorm2d's defaults.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def _conv(in_channels, out_channels, kernel_size, *, stride=1, groups=1, dilation=1, rngs):
    padding = dilation * (kernel_size - 1) // 2
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        kernel_init=kaiming_normal_fan_out,
        rngs=rngs,
    )


def _batch_norm(num_features: int) -> BatchNorm2d:
    return BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nnx.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion: ClassVar[int] = 1

    def __init__(self, inplanes, planes, *, stride=1, downsample=None, groups=1, base_width=64, dilation=1, rngs):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64 (as torchvision)")
        if dilation > 1:
            raise ValueError("Dilation > 1 not supported in BasicBlock (as torchvision)")
        self.conv1 = _conv(inplanes, planes, 3, stride=stride, rngs=rngs)
        self.bn1 = _batch_norm(planes)
        self.conv2 = _conv(planes, planes, 3, rngs=rngs)
        self.bn2 = _batch_norm(planes)
        self.downsample = downsample

    def last_norm(self) -> BatchNorm2d:
        return self.bn2

    def __call__(self, x: Array) -> Array:
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided: V1.5), 1x1 expand, with a residual connection."""

    expansion: ClassVar[int] = 4

    def __init__(self, inplanes, planes, *, stride=1, downsample=None, groups=1, base_width=64, dilation=1, rngs):
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(inplanes, width, 1, rngs=rngs)
        self.bn1 = _batch_norm(width)
        self.conv2 = _conv(width, width, 3, stride=stride, groups=groups, dilation=dilation, rngs=rngs)
        self.bn2 = _batch_norm(width)
        self.conv3 = _conv(width, planes * self.expansion, 1, rngs=rngs)
        self.bn3 = _batch_norm(planes * self.expansion)
        self.downsample = downsample

    def last_norm(self) -> BatchNorm2d:
        return self.bn3

    def __call__(self, x: Array) -> Array:
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
    """torchvision.models.ResNet: stem, four stages ``layer1``..``layer4``, global pool, ``fc``.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes).
    """

    head_name: ClassVar[str] = "fc"
    stage_names: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
        rngs: nnx.Rngs,
    ):
        self._inplanes = 64
        self._dilation = 1
        self._groups = groups
        self._base_width = width_per_group
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, kernel_init=kaiming_normal_fan_out, rngs=rngs)
        self.bn1 = _batch_norm(64)
        self.layer1 = self._make_layer(block, 64, layers[0], rngs=rngs)
        self.layer2 = self._make_layer(
            block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0], rngs=rngs
        )
        self.layer3 = self._make_layer(
            block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1], rngs=rngs
        )
        self.layer4 = self._make_layer(
            block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2], rngs=rngs
        )
        self.num_features = 512 * block.expansion
        self.num_classes = num_classes
        self.fc = Linear(self.num_features, num_classes, rngs=rngs)
        if zero_init_residual:
            # torchvision: each residual branch starts as identity (arXiv:1706.02677).
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                for residual_block in stage:
                    residual_block.last_norm().weight[...] = residual_block.last_norm().weight[...] * 0.0

    def _make_layer(self, block, planes, blocks, *, stride=1, dilate=False, rngs) -> Sequential:
        downsample = None
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = Sequential(
                [
                    _conv(self._inplanes, planes * block.expansion, 1, stride=stride, rngs=rngs),
                    _batch_norm(planes * block.expansion),
                ]
            )
        common = dict(groups=self._groups, base_width=self._base_width, rngs=rngs)
        layers = [
            block(self._inplanes, planes, stride=stride, downsample=downsample, dilation=previous_dilation, **common)
        ]
        self._inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self._inplanes, planes, dilation=self._dilation, **common))
        return Sequential(layers)

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: stem, stages, head.

        What freezing policies count in (``last_n_blocks(1)`` trains ``layer4`` and ``fc``).
        """
        return (("stem", ("conv1.", "bn1.")), *((name, (f"{name}.",)) for name in self.stage_names), ("head", ("fc.",)))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every top-level stage's output, in order: stem, layer1..layer4, pooled features, logits.

        Keys follow torchvision's module names (``maxpool`` is the stem's output).
        """
        out = {}
        x = self.conv1(x)
        out["conv1"] = x
        x = self.bn1(x)
        out["bn1"] = x
        x = jax.nn.relu(x)
        x = max_pool2d(x, kernel_size=3, stride=2, padding=1)
        out["maxpool"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            out[name] = x
        out["avgpool"] = global_avg_pool(x)
        out["fc"] = self.fc(out["avgpool"])
        return out

    def forward_features(self, x: Array) -> Array:
        """Pooled pre-logits features. (N, H, W, 3) -> (N, num_features)."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return global_avg_pool(x)

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.fc(self.forward_features(x))


def _resnet(block, layers, *, num_classes: int, rngs: nnx.Rngs, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnet18(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-18 (arXiv:1512.03385)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnet34(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-34 (arXiv:1512.03385)."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnet50(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-50 V1.5 (arXiv:1512.03385)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnet101(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-101 V1.5 (arXiv:1512.03385)."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnet152(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-152 V1.5 (arXiv:1512.03385)."""
    return _resnet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnext50_32x4d(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d (arXiv:1611.05431)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def resnext101_32x8d(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNeXt-101 32x8d (arXiv:1611.05431)."""
    return _resnet(
        Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8, num_classes=num_classes, rngs=rngs, **kwargs
    )


@register_model
def resnext101_64x4d(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNeXt-101 64x4d (arXiv:1611.05431)."""
    return _resnet(
        Bottleneck, (3, 4, 23, 3), groups=64, width_per_group=4, num_classes=num_classes, rngs=rngs, **kwargs
    )


@register_model
def wide_resnet50_2(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """Wide ResNet-50-2 (arXiv:1605.07146): bottleneck width doubled."""
    return _resnet(Bottleneck, (3, 4, 6, 3), width_per_group=128, num_classes=num_classes, rngs=rngs, **kwargs)


@register_model
def wide_resnet101_2(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """Wide ResNet-101-2 (arXiv:1605.07146): bottleneck width doubled."""
    return _resnet(Bottleneck, (3, 4, 23, 3), width_per_group=128, num_classes=num_classes, rngs=rngs, **kwargs)
