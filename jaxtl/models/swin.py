"""torchvision's Swin Transformer V1 (T, S, B) and V2 (T, S, B) as Flax NNX modules.

Module and attribute names mirror torchvision.models.swin_transformer: ``features.0`` is the patch embedding
(4x4 stride-4 conv with bias, Permute, LayerNorm), ``features.1``, ``.3``, ``.5``, ``.7`` the four stages of
SwinTransformerBlocks (``norm1``, ``attn``, ``stochastic_depth``, ``norm2``, ``mlp``: Linear, GELU, Dropout,
Linear, Dropout), every second block with windows shifted by half a window; ``features.2``, ``.4``, ``.6`` the
PatchMerging layers between them (2x2 neighbours concatenated, ``norm`` and ``reduction`` 4C -> 2C: V1 normalises
before the reduction, V2 after); then ``norm``, a global average pool and ``head``. V1 blocks are pre-norm
(x + attn(norm1(x))), V2 blocks post-norm (x + norm1(attn(x))). The attention is in
:mod:`jaxtl.models.swin_attention`. Activations are NHWC, as torchvision's Swin keeps them too after its first
Permute, so the Permutes and the Flatten are identities here (the stem's keeps its index place).
Every LayerNorm has eps 1e-5; every Linear is initialised trunc_normal(std 0.02) with a zero bias (torchvision's
constructor overrides the MLP's own xavier init), the patch conv with torch's default.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtl.models.layers import Activation, Conv2d, LayerNorm, Sequential, StochasticDepth, gelu, global_avg_pool
from jaxtl.models.registry import register_model
from jaxtl.models.swin_attention import ShiftedWindowAttention, ShiftedWindowAttentionV2, Window, linear

Array = jax.Array


def permute(x: Array) -> Array:
    """torchvision's Permute([0, 2, 3, 1]) after the patch conv: the identity on channels-last activations."""
    return x


def patch_merging_pad(x: Array) -> Array:
    """torchvision's ``_patch_merging_pad``: an odd H or W padded by one zero row or column, then the four
    pixels of each 2x2 cell concatenated in torchvision's order, (0, 0), (1, 0), (0, 1), (1, 1).
    (N, H, W, C) -> (N, ceil(H / 2), ceil(W / 2), 4C)."""
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


class PatchMerging(nnx.Module):
    """torchvision's PatchMerging: ``norm`` (LayerNorm over 4C), then ``reduction`` (Linear 4C -> 2C, no bias)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.reduction = linear(4 * dim, 2 * dim, rngs, bias=False)
        self.norm = LayerNorm(4 * dim)

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, ceil(H / 2), ceil(W / 2), 2C)."""
        return self.reduction(self.norm(patch_merging_pad(x)))


class PatchMergingV2(nnx.Module):
    """torchvision's PatchMergingV2: ``reduction`` (Linear 4C -> 2C, no bias), then ``norm`` (LayerNorm over 2C)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.reduction = linear(4 * dim, 2 * dim, rngs, bias=False)
        self.norm = LayerNorm(2 * dim)

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, ceil(H / 2), ceil(W / 2), 2C)."""
        return self.norm(self.reduction(patch_merging_pad(x)))


class SwinTransformerBlock(nnx.Module):
    """torchvision's SwinTransformerBlock (pre-norm): x + sd(attn(norm1(x))), then x + sd(mlp(norm2(x))).

    One StochasticDepth module (row mode) serves both residuals, each call drawing its own mask, as in torch.
    """

    attention: ClassVar[type[ShiftedWindowAttention]] = ShiftedWindowAttention

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Window,
        shift_size: Window,
        *,
        stochastic_depth_prob: float,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim)
        self.attn = self.attention(dim, window_size, shift_size, num_heads, rngs=rngs)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        hidden = int(dim * 4.0)  # torchvision's mlp_ratio
        self.mlp = Sequential(
            [
                linear(dim, hidden, rngs),
                Activation(gelu),
                nnx.Dropout(0.0, rngs=rngs),
                linear(hidden, dim, rngs),
                nnx.Dropout(0.0, rngs=rngs),
            ]
        )

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H, W, C)."""
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class SwinTransformerBlockV2(SwinTransformerBlock):
    """torchvision's SwinTransformerBlockV2 (post-norm): x + sd(norm1(attn(x))), then x + sd(norm2(mlp(x)))."""

    attention: ClassVar[type[ShiftedWindowAttention]] = ShiftedWindowAttentionV2

    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H, W, C)."""
        x = x + self.stochastic_depth(self.norm1(self.attn(x)))
        return x + self.stochastic_depth(self.norm2(self.mlp(x)))


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """What torchvision's builders pass to SwinTransformer (patch size 4x4 in all six)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: Window
    v2: bool


class SwinTransformer(nnx.Module):
    """torchvision.models.SwinTransformer: ``features`` (patch embedding, stages and patch mergings), ``norm``,
    global average pool, ``head``.

    Input: float32 (N, H, W, 3), normalised. Output: logits (N, num_classes). Any size from 4x4 runs: each
    attention call pads its map to whole windows (and a window larger than the map stays that size, as in
    torchvision), each patch merging pads an odd side. Stochastic depth (row mode, p growing linearly from 0
    on the first block to ``stochastic_depth_prob`` on the last) draws from the ``dropout`` RNG stream in
    train mode and is off in eval mode.
    """

    head_name: ClassVar[str] = "head"

    def __init__(self, config: SwinConfig, *, stochastic_depth_prob: float, num_classes: int = 1000, rngs: nnx.Rngs):
        embed_dim, depths = config.embed_dim, config.depths
        block = SwinTransformerBlockV2 if config.v2 else SwinTransformerBlock
        merging = PatchMergingV2 if config.v2 else PatchMerging
        patch = Conv2d(3, embed_dim, 4, stride=4, bias=True, rngs=rngs)  # torch's default init: not a Linear
        layers = [Sequential([patch, Activation(permute), LayerNorm(embed_dim)])]
        total_stage_blocks = sum(depths)
        stage_block_id = 0
        for i_stage, depth in enumerate(depths):
            dim = embed_dim * 2**i_stage
            stage = []
            for i_layer in range(depth):
                # torchvision's expression, so that the probabilities are the same floats.
                sd_prob = stochastic_depth_prob * float(stage_block_id) / (total_stage_blocks - 1)
                shift = (0, 0) if i_layer % 2 == 0 else tuple(w // 2 for w in config.window_size)
                stage.append(
                    block(
                        dim,
                        config.num_heads[i_stage],
                        config.window_size,
                        shift,
                        stochastic_depth_prob=sd_prob,
                        rngs=rngs,
                    )  # fmt: skip
                )
                stage_block_id += 1
            layers.append(Sequential(stage))
            if i_stage < len(depths) - 1:
                layers.append(merging(dim, rngs=rngs))
        self.features = Sequential(layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.num_classes = num_classes
        self.norm = LayerNorm(self.num_features)
        self.head = linear(self.num_features, num_classes, rngs)

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The network as (block name, parameter-name prefixes), input to output: stem, stages, head.

        A stage is named by its blocks' Sequential (``features.1``, ``.3``, ``.5``, ``.7``) and ends with the
        patch merging that follows it (``features.2.`` in ``features.1``), as EfficientNet's last stage ends
        with its 1x1 conv: so layerwise_lr_decay gets one unit per Swin block, then the patch merging, in
        forward order. The last stage ends with the final ``norm``.
        """
        last = len(self.features) - 1
        stages = [(f"features.{i}", (f"features.{i}.", f"features.{i + 1}.")) for i in range(1, last, 2)]
        stages.append((f"features.{last}", (f"features.{last}.", "norm.")))
        return (("stem", ("features.0.",)), *stages, ("head", (f"{self.head_name}.",)))

    # The intermediates that torchvision's Swin computes channels-last too (convert.parity compares them as they are).
    torch_channels_last: ClassVar[tuple[str, ...]] = ("features.", "norm")

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every ``features.i`` output and ``norm``'s (N, H, W, C, the layout torchvision's Swin has there too),
        ``permute`` (torchvision's is NCHW, the same values), the pooled features (``avgpool``, ``flatten``) and
        the logits (``head``)."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            out[f"features.{i}"] = x
        out["norm"] = out["permute"] = self.norm(x)
        out["avgpool"] = out["flatten"] = global_avg_pool(out["norm"])
        out["head"] = self.head(out["flatten"])
        return out

    def forward_features(self, x: Array) -> Array:
        """The head's input: the normalised, pooled features. (N, H, W, 3) -> (N, num_features)."""
        return global_avg_pool(self.norm(self.features(x)))

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.head(self.forward_features(x))


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


def _v1(size: dict) -> SwinConfig:
    return SwinConfig(**size, window_size=(7, 7), v2=False)


def _v2(size: dict) -> SwinConfig:
    return SwinConfig(**size, window_size=(8, 8), v2=True)


@register_model
def swin_t(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.2, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin-T (arXiv:2103.14030): width 96, depths 2-2-6-2, 7x7 windows."""
    return SwinTransformer(_v1(_T), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def swin_s(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.3, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin-S (arXiv:2103.14030): width 96, depths 2-2-18-2, 7x7 windows."""
    return SwinTransformer(_v1(_S), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def swin_b(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.5, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin-B (arXiv:2103.14030): width 128, depths 2-2-18-2, 7x7 windows."""
    return SwinTransformer(_v1(_B), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def swin_v2_t(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.2, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin V2-T (arXiv:2111.09883): width 96, depths 2-2-6-2, 8x8 windows."""
    return SwinTransformer(_v2(_T), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def swin_v2_s(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.3, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin V2-S (arXiv:2111.09883): width 96, depths 2-2-18-2, 8x8 windows."""
    return SwinTransformer(_v2(_S), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)


@register_model
def swin_v2_b(*, num_classes: int = 1000, stochastic_depth_prob: float = 0.5, rngs: nnx.Rngs) -> SwinTransformer:
    """Swin V2-B (arXiv:2111.09883): width 128, depths 2-2-18-2, 8x8 windows."""
    return SwinTransformer(_v2(_B), stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, rngs=rngs)
