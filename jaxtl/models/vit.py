"""torchvision's Vision Transformers (ViT-B/16, B/32, L/16, L/32, H/14) as Flax NNX modules.

Module and attribute names mirror torchvision.models.vision_transformer: ``conv_proj`` cuts the image into
patches (a conv whose kernel and stride are the patch size), ``class_token`` is prepended to the patch
tokens, ``encoder`` adds ``pos_embedding`` and runs ``encoder.layers.encoder_layer_{i}`` (pre-norm blocks:
``ln_1``, ``self_attention``, ``ln_2``, ``mlp``) and ``encoder.ln``; the class token's output goes through
``heads`` (``heads.head``, with ``heads.pre_logits`` and tanh before it when ``representation_size`` is set).
Every LayerNorm has eps 1e-6; the MLP's GELU is the exact (erf) one.

torchvision builds a ViT for one image size, the length of its position embeddings; the SWAG end-to-end weights
are at 384 (B/16), 512 (L/16) and 518 (H/14). Here the builders take ``image_size`` too, and a model given
an input whose patch grid differs from its embeddings' grid interpolates them as torchvision's
``interpolate_embeddings`` does (bicubic, align_corners, the class token's embedding kept).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.models.building_blocks import NamedSequential
from jaxtl.models.initializers import normal_init, trunc_normal_init, uniform_init, zeros_init
from jaxtl.models.layers import Activation, Conv2d, LayerNorm, Linear, Sequential, gelu
from jaxtl.models.registry import register_model

Array = jax.Array
_EPS = 1e-6  # torchvision's norm_layer: partial(nn.LayerNorm, eps=1e-6)


def xavier_uniform(fan_in: int, fan_out: int):
    """torch ``nn.init.xavier_uniform_``: U(-b, b), b = sqrt(6 / (fan_in + fan_out)), in either layout."""
    return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))


def _cubic_matrix(in_size: int, out_size: int, dtype) -> np.ndarray:
    """torch's ``F.interpolate(mode="bicubic", align_corners=True)`` along one axis, as an (out, in) matrix.

    ATen's upsample_bicubic2d: source position ``i * (in - 1) / (out - 1)``, cubic convolution with A = -0.75
    over 4 taps clamped to the edge, coefficients computed in the input's precision (float32 for float32).
    """
    real = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    a = real(-0.75)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    scale = real(in_size - 1) / real(out_size - 1) if out_size > 1 else real(0)
    matrix = np.zeros((out_size, in_size), real)
    for i in range(out_size):
        source = scale * real(i)
        index = min(int(np.floor(source)), in_size - 1)
        t = min(max(source - real(index), real(0)), real(1))
        for j, coefficient in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[i, min(max(index - 1 + j, 0), in_size - 1)] += coefficient
    return matrix


def interpolate_pos_embedding(pos_embedding: Array, grid: tuple[int, int]) -> Array:
    """Position embeddings (1, 1 + g * g, D) for a patch grid of ``grid`` = (rows, columns) instead of (g, g).

    torchvision.models.vision_transformer.interpolate_embeddings: the class token's embedding is kept, the
    patches' are interpolated on their square grid, bicubic with align_corners=True; for a grid that is not
    square, the same per axis (``F.interpolate(size=(rows, columns))``).
    """
    _, length, dim = pos_embedding.shape
    side = math.isqrt(length - 1)
    if side * side != length - 1:
        raise ValueError(f"pos_embedding holds {length - 1} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embedding
    rows = _cubic_matrix(side, grid[0], pos_embedding.dtype)
    columns = _cubic_matrix(side, grid[1], pos_embedding.dtype)
    patches = pos_embedding[0, 1:].reshape(side, side, dim)
    patches = jnp.einsum("ah,hwd,bw->abd", rows, patches, columns).reshape(1, grid[0] * grid[1], dim)
    return jnp.concatenate([pos_embedding[:, :1], patches], axis=1)


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention(batch_first=True) as ViT uses it: self-attention, no mask, bias on.

    The packed projection holds q, k and v in that order (torch's rows of in_proj_weight); the attention is
    ``jax.nn.dot_product_attention`` (the product of q and k scaled by 1 / sqrt(head_dim), the softmax in float32
    at least), as torch's is its fused ``scaled_dot_product_attention``. ``attention_dropout`` drops attention
    weights in train mode, as torch's does; the fused op has no dropout and takes its softmax in float32 even for
    float64 inputs, so those two cases are written out.

    Attributes:
        in_proj_weight: shape (D, 3D) (torch stores (3D, D)).
        in_proj_bias: shape (3D,).
        out_proj: Linear(D, D).
    """

    TORCH_LAYOUT: ClassVar[dict[str, tuple[int, ...]]] = {"in_proj_weight": (1, 0)}

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must divide by num_heads={num_heads}")
        self.num_heads = num_heads
        # torch's _reset_parameters: xavier_uniform packed weight, zero biases; out_proj.weight keeps Linear's init.
        init = xavier_uniform(embed_dim, 3 * embed_dim)
        self.in_proj_weight = nnx.Param(init(rngs.params(), (embed_dim, 3 * embed_dim), jnp.float32))
        self.in_proj_bias = nnx.Param(zeros_init(rngs.params(), (3 * embed_dim,), jnp.float32))
        self.out_proj = Linear(embed_dim, embed_dim, bias_init=zeros_init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """(N, S, D) -> (N, S, D)."""
        n, s, d = x.shape
        head_dim = d // self.num_heads
        qkv = x @ self.in_proj_weight[...].astype(x.dtype) + self.in_proj_bias[...].astype(x.dtype)
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(n, s, self.num_heads, head_dim) for i in range(3))
        scale = 1.0 / math.sqrt(head_dim)
        if (self.dropout.deterministic or self.dropout.rate == 0) and x.dtype != jnp.float64:
            # jax's fused attention op: XLA's implementation by default, which backends may replace with a kernel.
            out = jax.nn.dot_product_attention(q, k, v, scale=scale)
        else:  # attention dropout, or float64 (the fused op's softmax is float32 always): written out
            scores = jnp.einsum("nqhc,nkhc->nhqk", q, k, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
            weights = jax.nn.softmax(scores * scale, axis=-1).astype(x.dtype)
            out = jnp.einsum("nhqk,nkhc->nqhc", self.dropout(weights), v)
        return self.out_proj(out.reshape(n, s, d))


def _mlp_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> Linear:
    """MLPBlock's Linear: xavier_uniform weight, N(0, 1e-6) bias."""
    init = xavier_uniform(in_features, out_features)
    return Linear(in_features, out_features, weight_init=init, bias_init=normal_init(1e-6), rngs=rngs)


class EncoderBlock(nnx.Module):
    """torchvision's EncoderBlock: x + dropout(attention(ln_1(x))), then that + mlp(ln_2(that)).

    ``mlp`` is torchvision's MLPBlock: Linear, GELU, Dropout, Linear, Dropout (indices 0-4).
    """

    def __init__(
        self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float, rngs: nnx.Rngs
    ):
        self.ln_1 = LayerNorm(hidden_dim, eps=_EPS)
        self.self_attention = MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.ln_2 = LayerNorm(hidden_dim, eps=_EPS)
        self.mlp = Sequential(
            [
                _mlp_linear(hidden_dim, mlp_dim, rngs),
                Activation(gelu),
                nnx.Dropout(dropout, rngs=rngs),
                _mlp_linear(mlp_dim, hidden_dim, rngs),
                nnx.Dropout(dropout, rngs=rngs),
            ]
        )

    def __call__(self, x: Array) -> Array:
        """(N, S, D) -> (N, S, D)."""
        x = self.dropout(self.self_attention(self.ln_1(x))) + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nnx.Module):
    """torchvision's Encoder: + pos_embedding (N(0, 0.02) at init), dropout, the blocks, ``ln``."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
        rngs: nnx.Rngs,
    ):
        self.pos_embedding = nnx.Param(normal_init(0.02)(rngs.params(), (1, seq_length, hidden_dim), jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        blocks = {
            f"encoder_layer_{i}": EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, rngs)
            for i in range(num_layers)
        }
        self.layers = NamedSequential(blocks)
        self.ln = LayerNorm(hidden_dim, eps=_EPS)

    def embed(self, x: Array, grid: tuple[int, int]) -> Array:
        """The tokens (N, 1 + rows * columns, D) plus the position embeddings of that grid, through dropout."""
        position = interpolate_pos_embedding(self.pos_embedding[...], grid)
        return self.dropout(x + position.astype(x.dtype))

    def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
        """(N, 1 + rows * columns, D) -> (N, 1 + rows * columns, D)."""
        return self.ln(self.layers(self.embed(x, grid)))


class Heads(nnx.Module):
    """torchvision's ``heads``: ``head`` (zeros at init), after ``pre_logits`` and tanh ``act`` if
    ``representation_size`` is set (pre_logits: trunc_normal(sqrt(1 / fan_in)), zero bias)."""

    def __init__(self, hidden_dim: int, num_classes: int, representation_size: int | None, rngs: nnx.Rngs):
        pre_logits = act = None
        if representation_size is not None:
            init = trunc_normal_init(math.sqrt(1 / hidden_dim))
            pre_logits = Linear(hidden_dim, representation_size, weight_init=init, bias_init=zeros_init, rngs=rngs)
            act = Activation(jnp.tanh)
        self.pre_logits, self.act = nnx.data(pre_logits), nnx.data(act)
        width = hidden_dim if representation_size is None else representation_size
        self.head = Linear(width, num_classes, weight_init=zeros_init, bias_init=zeros_init, rngs=rngs)

    def features(self, x: Array) -> Array:
        """The head's input: ``x`` itself, or tanh(pre_logits(x))."""
        return x if self.pre_logits is None else self.act(self.pre_logits(x))

    def __call__(self, x: Array) -> Array:
        return self.head(self.features(x))


class VisionTransformer(nnx.Module):
    """torchvision.models.VisionTransformer (patch stem, no conv stem).

    Input: float32 (N, H, W, 3), normalised, H and W multiples of ``patch_size``; an input whose patch
    grid is not the embeddings' (``image_size // patch_size`` square) gets interpolated position
    embeddings (see :func:`interpolate_pos_embedding`). Output: logits (N, num_classes). Dropout and
    attention dropout (0 in torchvision's builders) draw from the ``dropout`` RNG stream in train mode.
    """

    # The recipe replaces the last Linear (``model.heads.head = nn.Linear(...)``); with representation_size,
    # the pretrained heads.pre_logits stays, part of the backbone.
    head_name: ClassVar[str] = "heads.head"

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        num_classes: int = 1000,
        representation_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        fan_in = 3 * patch_size * patch_size
        self.conv_proj = Conv2d(
            3,
            hidden_dim,
            patch_size,
            stride=patch_size,
            bias=True,
            kernel_init=trunc_normal_init(math.sqrt(1 / fan_in)),
            bias_init=zeros_init,
            rngs=rngs,
        )
        self.class_token = nnx.Param(zeros_init(rngs.params(), (1, 1, hidden_dim), jnp.float32))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, rngs)
        self.heads = Heads(hidden_dim, num_classes, representation_size, rngs)
        self.num_classes = num_classes
        self.num_features = hidden_dim if representation_size is None else representation_size

    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Stem (conv_proj, class_token, encoder.pos_embedding), one stage per encoder layer, head.

        The last stage also holds ``encoder.ln`` (and ``heads.pre_logits`` where there is one): what lies
        between the last block and the head.
        """
        layers = [(name, (f"encoder.layers.{name}.",)) for name in self.encoder.layers.child_names]
        extra = ("encoder.ln.",) + (() if self.heads.pre_logits is None else ("heads.pre_logits.",))
        layers[-1] = (layers[-1][0], (*layers[-1][1], *extra))
        stem = ("stem", ("conv_proj.", "class_token", "encoder.pos_embedding"))
        return (stem, *layers, ("head", (f"{self.head_name}.",)))

    def _patch_embed(self, x: Array) -> Array:
        """``conv_proj``: (N, H, W, 3) -> (N, H/p, W/p, D). A conv whose kernel is its stride is one matrix product
        per patch, computed as that: the kernel's taps as convolutions cost XLA:CPU hundreds of small products."""
        self._check_size(x)
        n, height, width, channels = x.shape
        p = self.patch_size
        patches = x.reshape(n, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, height // p, width // p, p * p * channels)  # (kh, kw, c): HWIO's order
        kernel = self.conv_proj.weight[...].astype(x.dtype).reshape(p * p * channels, self.hidden_dim)
        return patches @ kernel + self.conv_proj.bias[...].astype(x.dtype)

    def _tokens(self, x: Array) -> tuple[Array, tuple[int, int]]:
        """Patch embeddings (N, H/p, W/p, D) -> tokens (N, 1 + rows * columns, D), the class token first."""
        n, rows, columns, d = x.shape
        x = x.reshape(n, rows * columns, d)  # row-major over the grid, as torch's reshape + permute
        token = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (n, 1, d))
        return jnp.concatenate([token, x], axis=1), (rows, columns)

    def _check_size(self, x: Array) -> None:
        if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ValueError(
                f"input of {x.shape[1]}x{x.shape[2]} pixels is not a whole number of {self.patch_size}-pixel patches"
            )

    def forward_features(self, x: Array) -> Array:
        """The class token's output (through pre_logits and tanh where there are). (N, H, W, 3) -> (N, num_features)."""
        tokens, grid = self._tokens(self._patch_embed(x))
        return self.heads.features(self.encoder(tokens, grid)[:, 0])

    def __call__(self, x: Array) -> Array:
        """(N, H, W, 3) -> logits (N, num_classes)."""
        return self.heads.head(self.forward_features(x))

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """``conv_proj``'s output (NHWC), each encoder layer's and ``encoder.ln``'s (N, S, D), logits (``heads``)."""
        out = {"conv_proj": self._patch_embed(x)}
        tokens, grid = self._tokens(out["conv_proj"])
        x = self.encoder.embed(tokens, grid)
        for name in self.encoder.layers.child_names:
            x = getattr(self.encoder.layers, name)(x)
            out[f"encoder.layers.{name}"] = x
        out["encoder.ln"] = x = self.encoder.ln(x)
        out["heads"] = self.heads(x[:, 0])
        return out


def _options_from_state(patch_size: int, state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``image_size`` whose grid ``state``'s position embeddings (1, 1 + g * g, D) have: g * patch_size.

    Empty where it is the builders' default (224) or the state has no such embeddings (the key check then
    says what is wrong).
    """
    pos_embedding = state.get("encoder.pos_embedding")
    if pos_embedding is None or len(np.shape(pos_embedding)) != 3:
        return {}
    side = math.isqrt(max(np.shape(pos_embedding)[1] - 1, 0))
    if side * side != np.shape(pos_embedding)[1] - 1 or side * patch_size == 224:
        return {}
    return {"image_size": side * patch_size}


_CONFIGS: dict[str, dict[str, int]] = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_l_32": dict(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_h_14": dict(patch_size=14, num_layers=32, num_heads=16, hidden_dim=1280, mlp_dim=5120),
}


def _build(arch: str, num_classes: int, image_size: int, dropout: float, attention_dropout: float, rngs: nnx.Rngs):
    return VisionTransformer(
        image_size=image_size,
        **_CONFIGS[arch],
        dropout=dropout,
        attention_dropout=attention_dropout,
        num_classes=num_classes,
        rngs=rngs,
    )


@register_model
def vit_b_16(
    *, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0, attention_dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> VisionTransformer:  # fmt: skip
    """ViT-B/16 (arXiv:2010.11929): 16-pixel patches, 12 layers of width 768, 12 heads, MLP 3072."""
    return _build("vit_b_16", num_classes, image_size, dropout, attention_dropout, rngs)


@register_model
def vit_b_32(
    *, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0, attention_dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> VisionTransformer:  # fmt: skip
    """ViT-B/32: 32-pixel patches, 12 layers of width 768, 12 heads, MLP 3072."""
    return _build("vit_b_32", num_classes, image_size, dropout, attention_dropout, rngs)


@register_model
def vit_l_16(
    *, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0, attention_dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> VisionTransformer:  # fmt: skip
    """ViT-L/16: 16-pixel patches, 24 layers of width 1024, 16 heads, MLP 4096."""
    return _build("vit_l_16", num_classes, image_size, dropout, attention_dropout, rngs)


@register_model
def vit_l_32(
    *, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0, attention_dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> VisionTransformer:  # fmt: skip
    """ViT-L/32: 32-pixel patches, 24 layers of width 1024, 16 heads, MLP 4096."""
    return _build("vit_l_32", num_classes, image_size, dropout, attention_dropout, rngs)


@register_model
def vit_h_14(
    *, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0, attention_dropout: float = 0.0,
    rngs: nnx.Rngs,
) -> VisionTransformer:  # fmt: skip
    """ViT-H/14: 14-pixel patches, 32 layers of width 1280, 16 heads, MLP 5120."""
    return _build("vit_h_14", num_classes, image_size, dropout, attention_dropout, rngs)


# What jaxtl.models.registry.model_options asks a builder: the image_size a state_dict was made for.
for _builder in (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14):
    _builder.options_from_state = functools.partial(_options_from_state, _CONFIGS[_builder.__name__]["patch_size"])
