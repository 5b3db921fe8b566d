"""Swin Transformer V1 and V2: structure, settings, constant tables, masks, stages and policies (no torch)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.layers import LayerNorm, Linear
from jaxtl.models.swin import SwinTransformerBlock, SwinTransformerBlockV2, patch_merging_pad
from jaxtl.models.swin_attention import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    relative_coords_table,
    relative_position_index,
    shift_mask,
)
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata: num_params of the 1000-class models; and (depths, window) of its builders.
TORCHVISION = {
    "swin_t": (28288354, (2, 2, 6, 2), 7, 0.2),
    "swin_s": (49606258, (2, 2, 18, 2), 7, 0.3),
    "swin_b": (87768224, (2, 2, 18, 2), 7, 0.5),
    "swin_v2_t": (28351570, (2, 2, 6, 2), 8, 0.2),
    "swin_v2_s": (49737442, (2, 2, 18, 2), 8, 0.3),
    "swin_v2_b": (87930848, (2, 2, 18, 2), 8, 0.5),
}


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)
    num_params, depths, window, sd_prob = TORCHVISION[arch]
    assert sum(int(np.prod(shape)) for shape in _shapes(model).values()) == num_params
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, SwinTransformerBlock)]
    assert len(blocks) == sum(depths)
    assert all(isinstance(b, SwinTransformerBlockV2) == arch.startswith("swin_v2") for b in blocks)
    # Stochastic depth from 0 to the builder's probability, linearly over the blocks; every second one shifted.
    assert [b.stochastic_depth.p for b in blocks] == [sd_prob * i / (len(blocks) - 1) for i in range(len(blocks))]
    shifts = [b.attn.shift_size for stage in (1, 3, 5, 7) for b in model.features[stage]]
    assert shifts == [(0, 0) if i % 2 == 0 else (window // 2,) * 2 for d in depths for i in range(d)]
    assert {b.attn.window_size for b in blocks} == {(window, window)}
    assert {m.eps for _, m in nnx.iter_modules(model) if isinstance(m, LayerNorm)} == {1e-5}


def test_names_and_shapes_are_torchvisions():
    shapes = _shapes(jaxtl.models.abstract_model("swin_t", num_classes=5))
    assert shapes["features.0.0.weight"] == (4, 4, 3, 96) and shapes["features.0.2.weight"] == (96,)
    assert shapes["features.1.0.attn.relative_position_bias_table"] == (169, 3)
    assert shapes["features.1.0.attn.qkv.weight"] == (96, 288) and shapes["features.1.0.attn.qkv.bias"] == (288,)
    assert shapes["features.1.0.mlp.0.weight"] == (96, 384) and shapes["features.1.0.mlp.3.weight"] == (384, 96)
    assert shapes["features.2.norm.weight"] == (384,) and shapes["features.2.reduction.weight"] == (384, 192)
    assert "features.2.reduction.bias" not in shapes
    assert shapes["norm.weight"] == (768,) and shapes["head.weight"] == (768, 5)
    v2 = _shapes(jaxtl.models.abstract_model("swin_v2_t", num_classes=5))
    assert v2["features.1.0.attn.logit_scale"] == (3, 1, 1)
    assert v2["features.1.0.attn.cpb_mlp.0.weight"] == (2, 512) and v2["features.1.0.attn.cpb_mlp.2.weight"] == (512, 3)
    assert "features.1.0.attn.cpb_mlp.2.bias" not in v2 and "features.1.0.attn.relative_position_bias_table" not in v2
    assert v2["features.2.norm.weight"] == (192,)  # V2 normalises after the reduction


def test_the_buffers_are_constants_not_state():
    model = jaxtl.models.abstract_model("swin_v2_t", num_classes=5)
    attn = model.features[1][0].attn
    assert ShiftedWindowAttentionV2.TORCH_BUFFERS == ("relative_coords_table", "relative_position_index")
    assert attn.relative_position_index.shape == (64 * 64,) and attn.relative_coords_table.shape == (1, 15, 15, 2)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert not any("relative_position_index" in n or "relative_coords_table" in n for n in names)


def test_relative_position_index_and_coords_table_values():
    # A 2x2 window: offsets (dh, dw) in {-1, 0, 1}^2, row (dh + 1) * 3 + (dw + 1) of the 3x3 table.
    expected = [[(qh - kh + 1) * 3 + (qw - kw + 1) for kh in (0, 1) for kw in (0, 1)] for qh in (0, 1) for qw in (0, 1)]
    assert relative_position_index((2, 2)).tolist() == [v for row in expected for v in row]
    table = relative_coords_table((8, 8))
    assert table[0, 7, 7].tolist() == [0.0, 0.0]  # no offset
    # The largest offset, 7 / 7 * 8 = 8: log2(9) / 3.
    assert table[0, 0, 14].tolist() == pytest.approx([-math.log2(9) / 3, math.log2(9) / 3], rel=1e-7)
    with pytest.raises(ValueError):
        relative_position_index((2, 2))[0] = 1  # cached and shared: read-only


def test_shift_mask_follows_torchvisions_slices():
    # 14x14 map, 7x7 windows, shift 3: four windows; the regions split rows and columns 0-6 | 7-10 | 11-13.
    mask = shift_mask((14, 14), (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49) and set(np.unique(mask)) == {-100.0, 0.0}
    assert not mask[0].any()  # the top-left window lies in one region
    region = lambda i: (i // 7 >= 4) * 2 + (i % 7 >= 4)  # noqa: E731 (window 3: rows and columns 7-10 | 11-13)
    assert all((mask[3, q, k] == 0) == (region(q) == region(k)) for q in range(49) for k in range(49))
    # A zero shift along H (the window covers the padded height) with a shift along W: torchvision's slice
    # (-0, None) covers every row, so the rows form one region and only the columns split.
    mask = shift_mask((8, 16), (8, 8), (0, 4))
    assert not mask[0].any()
    assert all((mask[1, q, k] == 0) == ((q % 8 >= 4) == (k % 8 >= 4)) for q in range(64) for k in range(64))


def test_patch_merging_pads_odd_sides_and_orders_the_cell_as_torchvision():
    x = jnp.arange(3 * 5, dtype=jnp.float32).reshape(1, 3, 5, 1)
    merged = patch_merging_pad(x)
    assert merged.shape == (1, 2, 3, 4)
    # Cell (0, 0): pixels (0, 0), (1, 0), (0, 1), (1, 1); the last column and row are padding zeros.
    assert merged[0, 0, 0].tolist() == [0, 5, 1, 6] and merged[0, 1, 2].tolist() == [14, 0, 0, 0]


def test_attention_init_is_torchvisions():
    attn = ShiftedWindowAttentionV2(32, (8, 8), (0, 0), 4, rngs=nnx.Rngs(0))
    assert attn.logit_scale[...].shape == (4, 1, 1)
    np.testing.assert_array_equal(attn.logit_scale[...], np.log(np.float32(10)))
    for layer in (attn.qkv, attn.proj, attn.cpb_mlp[0], attn.cpb_mlp[2]):
        assert isinstance(layer, Linear) and (layer.bias is None or not jnp.any(layer.bias[...]))
    assert abs(float(jnp.std(attn.cpb_mlp[0].weight[...])) - 0.02) < 0.003
    v1 = ShiftedWindowAttention(96, (7, 7), (3, 3), 3, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(v1.relative_position_bias_table[...])) - 0.02) < 0.003
    assert abs(float(jnp.std(v1.qkv.weight[...])) - 0.02) < 0.001  # not torch's default U(+-1/sqrt(96))


@pytest.mark.slow
def test_attention_on_a_map_smaller_than_the_window_is_finite_with_gradients():
    # A 3x2 map in one 8x8 window: 58 zero tokens of padding take part, unmasked; V2 normalises their zero keys.
    attn = ShiftedWindowAttentionV2(8, (8, 8), (4, 4), 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 8)), jnp.float32)
    y = attn(x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(attn)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert not grads["qkv"]["bias"][...][8:16].any()  # V2 ignores the key bias: no gradient reaches it


def test_stages_end_with_their_patch_merging_and_the_last_with_the_norm():
    model = jaxtl.models.abstract_model("swin_t", num_classes=5)
    assert [name for name, _ in model.blocks()] == ["stem", "features.1", "features.3", "features.5", "features.7",
                                                    "head"]  # fmt: skip
    assert dict(model.blocks())["features.1"] == ("features.1.", "features.2.")
    assert dict(model.blocks())["features.7"] == ("features.7.", "norm.")
    groups = assign(model, get_policy("last_n_blocks:1")(model))
    stage = {".".join(n.split(".")[:3]) for n in groups.names("blocks") if n.startswith("features.")}
    assert stage == {"features.7.0", "features.7.1"}
    assert {"norm.weight", "norm.bias"} <= set(groups.names("blocks"))
    # layerwise_lr_decay: one unit per Swin block in forward order, each patch merging after its stage.
    groups = assign(model, get_policy("layerwise_lr_decay:0.5")(model))
    units = list(groups.groups)
    assert units[:5] == ["head", "norm", "features.7.1", "features.7.0", "features.6"]
    assert units[-4:] == ["features.2", "features.1.1", "features.1.0", "stem"]
    assert len(units) == 1 + 12 + 3 + 1 + 1  # stem, the 12 blocks, 3 patch mergings, norm, head
    multipliers = [groups.groups[u].lr_mult for u in units]
    assert multipliers == sorted(multipliers, reverse=True) and groups.groups["stem"].lr_mult == 0.5**17


@pytest.mark.parametrize("policy", ["head_only", "surgical:first", "surgical:middle", "surgical:last", "bitfit",
                                    "norm_only", "full:0.1", "discriminative:0.5"])  # fmt: skip
def test_every_policy_assigns_every_parameter(policy):
    model = jaxtl.models.abstract_model("swin_v2_t", num_classes=5)
    groups = assign(model, get_policy(policy)(model))
    assert sum(len(groups.names(g)) for g in groups.groups) == len(_shapes(model))
    assert groups.names("head") == ["head.bias", "head.weight"]
    if policy == "norm_only":
        assert "features.1.0.norm1.weight" in groups.names("norms") and "norm.bias" in groups.names("norms")
    if policy == "surgical:middle":
        assert {n.split(".")[1] for n in groups.names("block")} == {"3", "4"}


def test_forward_shapes_and_intermediates():
    model = jaxtl.models.abstract_model("swin_t", num_classes=3)
    x = jnp.ones((2, 32, 40, 3))
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    features = nnx.eval_shape(lambda model, x: model.forward_features(x), model, x)
    assert features.shape == (2, model.num_features) == (2, 768)
    stages = {}
    nnx.eval_shape(lambda model, x: stages.update(model.forward_intermediates(x)), model, x)
    assert list(stages) == [f"features.{i}" for i in range(8)] + ["norm", "permute", "avgpool", "flatten", "head"]
    # 32x40 -> 8x10 patches, then the patch mergings round odd sides up: 4x5, 2x3, 1x2.
    assert [stages[f"features.{i}"].shape[1:3] for i in (0, 2, 4, 6)] == [(8, 10), (4, 5), (2, 3), (1, 2)]
