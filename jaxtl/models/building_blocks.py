"""torchvision.ops' Conv2dNormActivation and SqueezeExcitation, and torch's Sequential of named children."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

from jaxtl.models.initializers import Initializer, kaiming_normal_fan_out, zeros_init
from jaxtl.models.layers import Activation, BatchNorm2d, Conv2d, Sequential, global_avg_pool

Array = jax.Array
ActivationFunction = Callable[[Array], Array]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision.models._utils._make_divisible: round to a multiple of ``divisor``, never 10% down."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """BatchNorm eps and momentum (torch's convention), as each torchvision builder sets them."""

    eps: float = 1e-5
    momentum: float = 0.1


def conv_norm_activation(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    norm: NormConfig,
    activation: ActivationFunction | None,
    stride: int = 1,
    groups: int = 1,
    rngs: nnx.Rngs,
) -> Sequential:
    """torchvision.ops.Conv2dNormActivation: conv (no bias, padding (k - 1) // 2), BatchNorm, ``activation``.

    The activation sits at index 2, as torch's module does; None leaves it out (a projection).
    """
    layers = [
        Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            kernel_init=kaiming_normal_fan_out,
            rngs=rngs,
        ),
        BatchNorm2d(out_channels, eps=norm.eps, momentum=norm.momentum),
    ]
    if activation is not None:
        layers.append(Activation(activation))
    return Sequential(layers)


class SqueezeExcitation(nnx.Module):
    """torchvision.ops.SqueezeExcitation: pool, 1x1 conv ``fc1``, ``activation``, 1x1 conv ``fc2``,
    ``scale_activation``, and the input scaled by the result. (N, H, W, C) -> (N, H, W, C).

    EfficientNet gates with SiLU and sigmoid, MobileNetV3 with ReLU and hardsigmoid.
    """

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        *,
        activation: ActivationFunction,
        scale_activation: ActivationFunction,
        bias_init: Initializer | None = zeros_init,
        rngs: nnx.Rngs,
    ):
        # EfficientNet's and MobileNet's init zeroes conv biases; RegNet's leaves them at torch's default
        # (bias_init=None: U(+-1/sqrt(fan_in))).
        common = dict(kernel_init=kaiming_normal_fan_out, bias_init=bias_init, bias=True, rngs=rngs)
        self.fc1 = Conv2d(input_channels, squeeze_channels, 1, **common)
        self.fc2 = Conv2d(squeeze_channels, input_channels, 1, **common)
        self.activation = activation
        self.scale_activation = scale_activation

    def __call__(self, x: Array) -> Array:
        scale = global_avg_pool(x)[:, None, None, :]
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return scale * x


class NamedSequential(nnx.Module):
    """torch.nn.Sequential built from an OrderedDict (or a ModuleDict run in order): children by name.

    Names are torchvision's, hyphens included (RegNet's ``block1-0``), so paths read
    ``trunk_output.block1.block1-0.f.a.0.weight``; the children run in the order given.
    """

    def __init__(self, children: dict[str, nnx.Module]):
        self.child_names = tuple(children)
        for name, child in children.items():
            setattr(self, name, child)

    def __call__(self, x: Array) -> Array:
        for name in self.child_names:
            x = getattr(self, name)(x)
        return x
