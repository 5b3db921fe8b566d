"""Torch-faithful layers: Conv2d, BatchNorm2d, LayerNorm, Linear, Sequential, Activation, StochasticDepth and pooling.

Every layer stores its parameters under torch's attribute names (``weight``, ``bias``,
``running_mean``, ``running_var``) so that the dotted path of a parameter is the torchvision
state_dict key. Layout is NHWC for activations, HWIO for conv kernels and (in, out) for linear
weights; ``TORCH_LAYOUT`` on each layer says how a torch tensor is permuted into that layout.
The ops behind them are in :mod:`jaxtl.models.conv_ops` and :mod:`jaxtl.models.batch_norm_ops`,
their default initialisers in :mod:`jaxtl.models.initializers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.arrays import to_device
from jaxtl.models.batch_norm_ops import batch_norm_train, current_batch_mask, current_batch_norm_groups
from jaxtl.models.conv_ops import cpu_conv2d, xla_conv2d
from jaxtl.models.initializers import Initializer, torch_default_uniform

Array = jax.Array


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input with explicit, symmetric padding (never 'SAME').

    Attributes:
        weight: kernel, shape (kh, kw, in_channels // groups, out_channels).
        bias: shape (out_channels,), or None.
    """

    TORCH_LAYOUT: ClassVar[dict[str, tuple[int, ...]]] = {"weight": (2, 3, 1, 0)}  # OIHW -> HWIO

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must divide by groups={groups}"
            )
        kh, kw = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        fan_in = in_channels // groups * kh * kw
        kernel_init = kernel_init or torch_default_uniform(fan_in)
        bias_init = bias_init or torch_default_uniform(fan_in)
        self.weight = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_channels // groups, out_channels), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C_in) -> (N, H', W', C_out)."""
        kernel = self.weight[...].astype(x.dtype)
        if jax.default_backend() == "cpu":
            y = cpu_conv2d(x, kernel, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = xla_conv2d(x, kernel, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis, with torch's conventions.

    - momentum is torch's: running = (1 - momentum) * running + momentum * batch_statistic.
    - The batch is normalised with the biased variance, but running_var stores the unbiased one
      (n / (n - 1), n = N * H * W), as torch does (BatchNorm2d docs).
    - Mean and variance are computed in shifted, two-pass form, never as E[x^2] - E[x]^2.
    - Statistics are computed in float32 at least, whatever the activation dtype.
    - Inside :func:`batch_mask`, the statistics are those of the unmasked rows (padding excluded).

    ``use_running_average`` is the mode: ``model.eval()`` sets it True, ``model.train()`` False,
    on this layer or on any enclosing module (per-module BN mode).
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, use_running_average: bool = False
    ):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm2d momentum must be in [0, 1] (torch convention), got {momentum}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average
        ones, zeros = np.ones((num_features,), np.float32), np.zeros((num_features,), np.float32)
        self.weight = nnx.Param(to_device(ones))
        self.bias = nnx.Param(to_device(zeros))
        self.running_mean = nnx.BatchStat(to_device(zeros))
        self.running_var = nnx.BatchStat(to_device(ones))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H, W, C); in train mode also updates running_mean / running_var."""
        if self.use_running_average:
            x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
            return ((x32 - self.running_mean[...]) * scale + self.bias[...]).astype(x.dtype)
        count = math.prod(x.shape[:-1]) // current_batch_norm_groups()  # per device with train.bn_sync false
        if count < 2:
            raise ValueError(
                f"BatchNorm2d in train mode needs more than 1 value per channel, got input shape {x.shape}"
                f"{' per device' if current_batch_norm_groups() > 1 else ''}; use a larger batch or put this module "
                "in eval mode (module.eval())"
            )
        y, batch_mean, var, count = batch_norm_train(
            x, self.weight[...], self.bias[...], current_batch_mask(), self.eps
        )
        m = self.momentum
        if isinstance(count, int):  # no padding rows: the shape check above holds
            unbiased_var = var * (count / (count - 1))
            new_mean = (1.0 - m) * self.running_mean[...] + m * batch_mean
            new_var = (1.0 - m) * self.running_var[...] + m * unbiased_var
        else:
            # A batch whose real rows hold one value per channel (the last, padded batch of an epoch, or
            # a micro-batch of it) has no unbiased variance, and torch refuses such a batch: the running
            # statistics stay as they were.
            enough = count >= 2
            unbiased_var = var * (count / jnp.maximum(count - 1, 1))
            new_mean = jnp.where(enough, (1.0 - m) * self.running_mean[...] + m * batch_mean, self.running_mean[...])
            new_var = jnp.where(enough, (1.0 - m) * self.running_var[...] + m * unbiased_var, self.running_var[...])
        # set_value, not `[...] =`: the indexed form compares the shardings of old and new value,
        # which on a tracer builds a provenance message (half the trace time of an EfficientNet).
        self.running_mean.set_value(new_mean)
        self.running_var.set_value(new_var)
        return y


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (torchvision's channels-last LayerNorm2d too, as activations are NHWC).

    Normalised with the biased variance, in shifted two-pass form, in float32 at least whatever the
    activation dtype, as torch computes it.

    Attributes:
        weight, bias: shape (normalized_shape,), torch's ones and zeros at init.
    """

    def __init__(self, normalized_shape: int, *, eps: float = 1e-5):
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = nnx.Param(to_device(np.ones((normalized_shape,), np.float32)))
        self.bias = nnx.Param(to_device(np.zeros((normalized_shape,), np.float32)))

    def __call__(self, x: Array) -> Array:
        """(..., C) -> (..., C)."""
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)


class Linear(nnx.Module):
    """torch.nn.Linear with torch's default init.

    Attributes:
        weight: shape (in_features, out_features) (torch stores (out, in)).
        bias: shape (out_features,), or None.
    """

    TORCH_LAYOUT: ClassVar[dict[str, tuple[int, ...]]] = {"weight": (1, 0)}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        weight_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        weight_init = weight_init or torch_default_uniform(in_features)
        bias_init = bias_init or torch_default_uniform(in_features)
        self.weight = nnx.Param(weight_init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        """(..., in_features) -> (..., out_features)."""
        y = x @ self.weight[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Sequential(nnx.List):
    """torch.nn.Sequential: children are addressed by index, so paths read ``layer1.0.conv1.weight``."""

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x


class Activation(nnx.Module):
    """A parameter-free activation that holds a place in a Sequential, as torch's nn.SiLU / nn.ReLU do."""

    def __init__(self, function: Callable[[Array], Array]):
        self.function = function

    def __call__(self, x: Array) -> Array:
        return self.function(x)


def gelu(x: Array) -> Array:
    """torch.nn.GELU(): the exact, erf-based GELU (``jax.nn.gelu`` defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


class StochasticDepth(nnx.Dropout):
    """torchvision.ops.StochasticDepth in "row" mode: drops a whole sample's residual branch.

    In train mode each sample is kept with probability 1 - p and then scaled by 1 / (1 - p); in
    eval mode (``deterministic=True``) the input passes unchanged. The mask comes from the
    ``dropout`` RNG stream the module was built with, or from ``rngs`` passed at call time.
    """

    def __init__(self, p: float, *, rngs: nnx.Rngs):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
        super().__init__(p, broadcast_dims=(1, 2, 3), rngs=rngs)  # one Bernoulli per sample (NHWC)

    @property
    def p(self) -> float:
        return self.rate


def max_pool2d(x: Array, *, kernel_size: int, stride: int, padding: int) -> Array:
    """torch.nn.functional.max_pool2d on NHWC: padding counts as -inf, never as zeros."""
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # a concrete value, so JAX picks the differentiable max reducer
        jax.lax.max,
        window_dimensions=(1, kernel_size, kernel_size, 1),
        window_strides=(1, stride, stride, 1),
        padding=((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


def global_avg_pool(x: Array) -> Array:
    """AdaptiveAvgPool2d(1) + flatten: the mean over H and W. (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
