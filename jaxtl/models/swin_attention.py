"""torchvision's shifted-window attention (Swin V1 and V2) as Flax NNX modules, and its constant tables.

Mirrors torchvision.models.swin_transformer.shifted_window_attention call for call: each call pads the
(N, H, W, C) map with zeros on the bottom and right to a multiple of the window, sets a shift to 0 along an
axis the (padded) window covers, rolls the map, attends within each window (the padded zero tokens take part,
unmasked, as in torchvision), adds the relative position bias and, for shifted windows, torchvision's -100
mask between tokens of different regions, then rolls back and crops. V1 scales dot products by
head_dim ** -0.5 and learns a bias table; V2 attends with cosine similarity times ``exp(min(logit_scale,
log(100)))`` and computes its bias with a small MLP (``cpb_mlp``) from log-spaced relative coordinates,
``16 * sigmoid``; V2 also ignores the key third of the qkv bias.

torchvision keeps ``relative_position_index`` (and V2's ``relative_coords_table``) as persistent buffers:
they are in its state_dict, but they are constants of the window size. Here they are numpy arrays computed
once per window size, never nnx Variables (optimizers and checkpoints never see them); ``TORCH_BUFFERS``
names them for the conversion to and from torchvision state_dicts.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.arrays import to_device
from jaxtl.models.initializers import trunc_normal_init, zeros_init
from jaxtl.models.layers import Activation, Linear, Sequential

Array = jax.Array
Window = tuple[int, int]
WEIGHT_INIT = trunc_normal_init(0.02)  # torchvision: trunc_normal_(std=0.02) on every Linear weight, zero biases
_LOG_100 = math.log(100.0)


def linear(in_features: int, out_features: int, rngs: nnx.Rngs, *, bias: bool = True) -> Linear:
    """An nn.Linear as SwinTransformer's constructor leaves it: weight trunc_normal(std 0.02), bias 0."""
    return Linear(in_features, out_features, bias=bias, weight_init=WEIGHT_INIT, bias_init=zeros_init, rngs=rngs)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)  # cached and shared by every module of this window size
    return array


@functools.cache
def relative_position_index(window: Window) -> np.ndarray:
    """torchvision's ``relative_position_index`` buffer: int64 (Wh*Ww*Wh*Ww,), the bias table row of each
    (query, key) pair of a window."""
    coords = np.stack(np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    relative[:, :, 0] += window[0] - 1
    relative[:, :, 1] += window[1] - 1
    relative[:, :, 0] *= 2 * window[1] - 1
    return _read_only(relative.sum(-1).reshape(-1).astype(np.int64))


@functools.cache
def relative_coords_table(window: Window) -> np.ndarray:
    """torchvision's V2 ``relative_coords_table`` buffer: float32 (1, 2*Wh-1, 2*Ww-1, 2), relative offsets scaled
    to [-8, 8] and log-spaced: sign(t) * log2(|t| + 1) / 3.

    Each step is float32 as in torch; the log2 is taken in float64 and rounded once, which is torch's
    (correctly rounded) float32 value: the buffer equals torch's bit for bit.
    """
    h = np.arange(-(window[0] - 1), window[0], dtype=np.float32)
    w = np.arange(-(window[1] - 1), window[1], dtype=np.float32)
    table = np.stack(np.meshgrid(h, w, indexing="ij")).transpose(1, 2, 0)[None].copy()
    table[..., 0] /= np.float32(window[0] - 1)
    table[..., 1] /= np.float32(window[1] - 1)
    table *= np.float32(8)
    log2 = np.log2((np.abs(table) + np.float32(1)).astype(np.float64)).astype(np.float32)
    return _read_only((np.sign(table) * log2) / np.float32(3))


@functools.cache
def shift_mask(padded: tuple[int, int], window: Window, shift: tuple[int, int]) -> np.ndarray:
    """torchvision's attention mask of shifted windows: float32 (num_windows, N, N), -100 between tokens of
    different regions of the rolled map, 0 within one; built with torchvision's slices (a zero shift included)."""
    regions = np.zeros(padded, np.float32)
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            regions[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    regions = regions.reshape(padded[0] // window[0], window[0], padded[1] // window[1], window[1])
    regions = regions.transpose(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    difference = regions[:, None, :] - regions[:, :, None]
    return _read_only(np.where(difference != 0, np.float32(-100.0), np.float32(0.0)))


def _normalize(x: Array, eps: float = 1e-12) -> Array:
    """F.normalize(x, dim=-1): x / max(||x||, eps); like torch's, no gradient through the norm of a (near) zero
    vector (the zero-padded tokens' keys in V2), where a plain sqrt would give NaN."""
    squares = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = squares > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)


def _windows(x: Array, window: Window) -> Array:
    """(B, H, W, C), H and W multiples of the window -> (B * num_windows, Wh * Ww, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def _merge_windows(x: Array, window: Window, shape: tuple[int, int, int, int]) -> Array:
    """The inverse of :func:`_windows`: (B * num_windows, Wh * Ww, C) -> ``shape`` (B, H, W, C)."""
    b, h, w, c = shape
    x = x.reshape(b, h // window[0], w // window[1], window[0], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(shape)


def shifted_window_attention(
    x: Array,
    qkv: Linear,
    proj: Linear,
    position_bias: Array,
    window: Window,
    num_heads: int,
    shift: tuple[int, int],
    logit_scale: Array | None = None,
) -> Array:
    """torchvision's ``shifted_window_attention`` (attention and output dropout 0, torchvision's default).

    Args:
        x: (B, H, W, C).
        qkv, proj: the block's Linears (C -> 3C, C -> C).
        position_bias: (1, num_heads, N, N), N = Wh * Ww.
        window, num_heads, shift: as the module holds them.
        logit_scale: V2's (num_heads, 1, 1): cosine attention, and the key bias ignored. None: V1.

    Returns:
        (B, H, W, C).
    """
    b, h, w, c = x.shape
    pad_b, pad_r = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    padded = (h + pad_b, w + pad_r)
    # torchvision: no shift along an axis that one window covers, decided per call from the padded size.
    shift = tuple(0 if window[i] >= padded[i] else shift[i] for i in range(2))
    shifted = sum(shift) > 0
    if shifted:
        x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    tokens = _windows(x, window)
    weight = qkv.weight[...].astype(x.dtype)
    bias = qkv.bias[...].astype(x.dtype)
    if logit_scale is not None:  # V2 zeroes the key bias in every call: it gets no gradient either
        bias = jnp.concatenate([bias[:c], jnp.zeros_like(bias[c : 2 * c]), bias[2 * c :]])
    n = tokens.shape[1]
    qkv_out = (tokens @ weight + bias).reshape(-1, n, 3, num_heads, c // num_heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv_out[0], qkv_out[1], qkv_out[2]
    if logit_scale is not None:
        attn = _normalize(q) @ jnp.swapaxes(_normalize(k), -2, -1)
        scale = logit_scale.astype(x.dtype)
        # torch.clamp(max=log(100)): gradient where the scale is not above the bound, none above it.
        attn = attn * jnp.exp(jnp.where(scale > _LOG_100, jnp.asarray(_LOG_100, x.dtype), scale))
    else:
        attn = (q * (c // num_heads) ** -0.5) @ jnp.swapaxes(k, -2, -1)
    attn = attn + position_bias.astype(x.dtype)
    if shifted:
        mask = jnp.asarray(shift_mask(padded, window, shift), x.dtype)
        attn = (attn.reshape(b, -1, num_heads, n, n) + mask[None, :, None]).reshape(-1, num_heads, n, n)
    attn = jax.nn.softmax(attn, axis=-1)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(-1, n, c)
    out = _merge_windows(proj(out), window, (b, *padded, c))
    if shifted:
        out = jnp.roll(out, shift, axis=(1, 2))
    return out[:, :h, :w, :]


def _gather_bias(table: Array, window: Window) -> Array:
    """(rows, num_heads) table -> (1, num_heads, N, N) bias, through ``relative_position_index``."""
    n = window[0] * window[1]
    bias = table[relative_position_index(window)].reshape(n, n, -1)
    return bias.transpose(2, 0, 1)[None]


class ShiftedWindowAttention(nnx.Module):
    """torchvision.models.swin_transformer.ShiftedWindowAttention: ``qkv``, ``proj`` and the learnt
    ``relative_position_bias_table`` ((2*Wh-1) * (2*Ww-1), num_heads), trunc_normal(std 0.02).

    Attributes:
        relative_position_index: torchvision's buffer, a numpy constant of the window size (``TORCH_BUFFERS``).
    """

    TORCH_BUFFERS: ClassVar[tuple[str, ...]] = ("relative_position_index",)

    def __init__(self, dim: int, window_size: Window, shift_size: Window, num_heads: int, *, rngs: nnx.Rngs):
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, rngs)
        self.proj = linear(dim, dim, rngs)
        self._define_bias(rngs)

    def _define_bias(self, rngs: nnx.Rngs) -> None:
        rows = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nnx.Param(WEIGHT_INIT(rngs.params(), (rows, self.num_heads), jnp.float32))

    @property
    def relative_position_index(self) -> np.ndarray:
        return relative_position_index(self.window_size)

    def position_bias(self, dtype) -> Array:
        """(1, num_heads, N, N): the table's rows for every (query, key) pair."""
        return _gather_bias(self.relative_position_bias_table[...].astype(dtype), self.window_size)

    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        return shifted_window_attention(
            x, self.qkv, self.proj, self.position_bias(x.dtype), self.window_size, self.num_heads, self.shift_size
        )


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttentionV2: cosine attention with a learnt per-head ``logit_scale``
    ((num_heads, 1, 1), log(10) at init) and the continuous position bias ``cpb_mlp`` (Linear 2 -> 512, ReLU,
    Linear 512 -> num_heads without bias) evaluated on ``relative_coords_table``, then ``16 * sigmoid``.

    Attributes:
        relative_coords_table, relative_position_index: torchvision's buffers, numpy constants of the window size.
    """

    TORCH_BUFFERS: ClassVar[tuple[str, ...]] = ("relative_coords_table", "relative_position_index")

    def __init__(self, dim: int, window_size: Window, shift_size: Window, num_heads: int, *, rngs: nnx.Rngs):
        super().__init__(dim, window_size, shift_size, num_heads, rngs=rngs)
        # torch.log(10 * torch.ones(...)): float32 log of float32 10, in numpy (no XLA compile per shape).
        self.logit_scale = nnx.Param(to_device(np.full((num_heads, 1, 1), np.log(np.float32(10)), np.float32)))
        self.cpb_mlp = Sequential(
            [linear(2, 512, rngs), Activation(jax.nn.relu), linear(512, num_heads, rngs, bias=False)]
        )

    def _define_bias(self, rngs: nnx.Rngs) -> None:
        """V2 has no bias table: the MLP computes it."""

    @property
    def relative_coords_table(self) -> np.ndarray:
        return relative_coords_table(self.window_size)

    def position_bias(self, dtype) -> Array:
        table = self.cpb_mlp(jnp.asarray(self.relative_coords_table, dtype)).reshape(-1, self.num_heads)
        return 16 * jax.nn.sigmoid(_gather_bias(table, self.window_size))

    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        return shifted_window_attention(
            x,
            self.qkv,
            self.proj,
            self.position_bias(x.dtype),
            self.window_size,
            self.num_heads,
            self.shift_size,
            logit_scale=self.logit_scale[...],
        )
