"""Vision Transformers: structure, torchvision's counts and init, image sizes, interpolation, policies (no torch)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtl.models
from jaxtl.models.layers import LayerNorm, Linear
from jaxtl.models.vit import (
    EncoderBlock,
    MultiheadAttention,
    VisionTransformer,
    _cubic_matrix,
    interpolate_pos_embedding,
)
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata: num_params of the 1000-class models at 224 and at the SWAG end-to-end sizes
# (whose position embeddings are longer); (patch, layers, width, heads, MLP width) as its builders set them.
NUM_PARAMS = {
    ("vit_b_16", 224): 86567656, ("vit_b_16", 384): 86859496, ("vit_b_32", 224): 88224232,
    ("vit_l_16", 224): 304326632, ("vit_l_16", 512): 305174504, ("vit_l_32", 224): 306535400,
    ("vit_h_14", 224): 632045800, ("vit_h_14", 518): 633470440,
}  # fmt: skip
CONFIGS = {
    "vit_b_16": (16, 12, 768, 12, 3072), "vit_b_32": (32, 12, 768, 12, 3072), "vit_l_16": (16, 24, 1024, 16, 4096),
    "vit_l_32": (32, 24, 1024, 16, 4096), "vit_h_14": (14, 32, 1280, 16, 5120),
}  # fmt: skip


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tiny(**kwargs):
    """A small ViT whose head is not torchvision's zeros, so that its logits say something."""
    config = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5)
    model = VisionTransformer(**(config | kwargs), rngs=nnx.Rngs(0))
    head = model.heads.head
    head.weight.set_value(jax.random.normal(jax.random.key(2), head.weight.get_value().shape))
    return model


@pytest.mark.parametrize("arch, image_size", sorted(NUM_PARAMS))
def test_parameter_count_equals_torchvision_at_each_image_size(arch, image_size):
    options = {} if image_size == 224 else {"image_size": image_size}
    model = jaxtl.models.abstract_model(arch, **options)
    assert sum(int(np.prod(shape)) for shape in _shapes(model).values()) == NUM_PARAMS[arch, image_size]
    patch, layers, width, heads, mlp = CONFIGS[arch]
    assert (model.image_size, model.patch_size, model.num_features) == (image_size, patch, width)
    blocks = [getattr(model.encoder.layers, name) for name in model.encoder.layers.child_names]
    assert len(blocks) == layers and all(isinstance(b, EncoderBlock) for b in blocks)
    assert {b.self_attention.num_heads for b in blocks} == {heads}
    assert {m.eps for _, m in nnx.iter_modules(model) if isinstance(m, LayerNorm)} == {1e-6}
    assert _shapes(model)["encoder.layers.encoder_layer_0.mlp.0.weight"] == (width, mlp)


def test_vit_b_16_names_and_shapes_are_torchvisions():
    shapes = _shapes(jaxtl.models.abstract_model("vit_b_16", num_classes=5))
    layer = "encoder.layers.encoder_layer_11."
    assert shapes["conv_proj.weight"] == (16, 16, 3, 768) and shapes["conv_proj.bias"] == (768,)
    assert shapes["class_token"] == (1, 1, 768) and shapes["encoder.pos_embedding"] == (1, 197, 768)
    assert shapes[f"{layer}self_attention.in_proj_weight"] == (768, 3 * 768)  # torch's (2304, 768) transposed
    assert shapes[f"{layer}self_attention.in_proj_bias"] == (2304,)
    assert shapes[f"{layer}self_attention.out_proj.weight"] == (768, 768)
    assert shapes[f"{layer}mlp.3.weight"] == (3072, 768) and shapes[f"{layer}ln_2.bias"] == (768,)
    assert shapes["encoder.ln.weight"] == (768,) and shapes["heads.head.weight"] == (768, 5)
    assert len(shapes) == 4 + 12 * 12 + 2 + 2
    mlp = jaxtl.models.abstract_model("vit_b_16").encoder.layers.encoder_layer_0.mlp
    assert [type(m).__name__ for m in mlp] == ["Linear", "Activation", "Dropout", "Linear", "Dropout"]


def test_init_is_torchvisions():
    model = jaxtl.models.vit_b_32(num_classes=5, rngs=nnx.Rngs(0))
    params = {k: np.asarray(v) for k, v in jaxtl.models.state_dict(model).items()}
    layer = "encoder.layers.encoder_layer_3."
    # conv_proj: trunc_normal(std sqrt(1 / fan_in)), fan_in 3 * 32 * 32; zero bias.
    assert params["conv_proj.weight"].std() == pytest.approx(math.sqrt(1 / 3072), rel=0.01)
    assert params["encoder.pos_embedding"].std() == pytest.approx(0.02, rel=0.01)
    # MultiheadAttention: xavier_uniform packed weight (fan_in 768, fan_out 2304), zero biases; out_proj
    # keeps Linear's default U(+-1/sqrt(768)) weight.
    bound = math.sqrt(6 / (768 + 2304))
    weight = params[f"{layer}self_attention.in_proj_weight"]
    assert np.abs(weight).max() <= bound and weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    out_proj = params[f"{layer}self_attention.out_proj.weight"]
    assert out_proj.std() == pytest.approx(1 / math.sqrt(768) / math.sqrt(3), rel=0.01)
    # MLPBlock: xavier_uniform weights, N(0, 1e-6) biases.
    assert params[f"{layer}mlp.0.weight"].std() == pytest.approx(math.sqrt(6 / (768 + 3072)) / math.sqrt(3), rel=0.01)
    assert params[f"{layer}mlp.3.bias"].std() == pytest.approx(1e-6, rel=0.2)
    attention = f"{layer}self_attention."
    zeros = ["class_token", "conv_proj.bias", f"{attention}in_proj_bias", f"{attention}out_proj.bias",
             "heads.head.weight", "heads.head.bias", f"{layer}ln_1.bias"]  # fmt: skip
    assert all(not params[name].any() for name in zeros)
    assert (params["encoder.ln.weight"] == 1).all()


def test_blocks_and_policies_follow_the_encoder_layers():
    model = jaxtl.models.abstract_model("vit_b_16", num_classes=5)
    blocks = list(model.blocks())
    assert blocks[0] == ("stem", ("conv_proj.", "class_token", "encoder.pos_embedding"))
    assert [name for name, _ in blocks[1:-1]] == [f"encoder_layer_{i}" for i in range(12)]
    assert blocks[-2][1] == ("encoder.layers.encoder_layer_11.", "encoder.ln.")
    assert blocks[-1] == ("head", ("heads.head.",))
    # layerwise_lr_decay: one unit per encoder layer, the multiplier shrinking towards the input.
    groups = assign(model, get_policy("layerwise_lr_decay:0.5")(model))
    names = list(groups.groups)
    assert names[:3] == ["head", "encoder.ln", "encoder.layers.encoder_layer_11"]
    assert names[-2:] == ["encoder_layer_0", "stem"] and len(names) == 15
    multipliers = [groups.groups[name].lr_mult for name in names]
    assert multipliers == [0.5**depth for depth in range(15)]
    last = assign(model, get_policy("last_n_blocks:1")(model))
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in last.names("blocks")} == {
        "encoder.layers", "encoder.ln"
    }  # fmt: skip
    assert all("encoder_layer_11" in n or n.startswith("encoder.ln.") for n in last.names("blocks"))
    # BitFit trains the packed query/key/value biases too; norm_only every LayerNorm.
    biases = assign(model, get_policy("bitfit")(model)).names("biases")
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_bias" in biases and len(biases) == 12 * 6 + 2
    norms = assign(model, get_policy("norm_only")(model)).names("norms")
    assert len(norms) == 2 * (12 * 2 + 1)
    middle = assign(model, get_policy("surgical:middle")(model)).names("block")
    assert {n.split(".")[2] for n in middle} == {"encoder_layer_5"}


def test_representation_size_adds_pre_logits_before_the_head():
    model = _tiny(representation_size=16)
    shapes = _shapes(model)
    assert shapes["heads.pre_logits.weight"] == (32, 16) and shapes["heads.head.weight"] == (16, 5)
    assert model.num_features == 16 and model.head_name == "heads.head"
    assert list(model.blocks())[-2][1] == ("encoder.layers.encoder_layer_1.", "encoder.ln.", "heads.pre_logits.")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    features = model.forward_features(x)
    assert features.shape == (2, 16) and float(jnp.abs(features).max()) <= 1.0  # tanh
    np.testing.assert_array_equal(model(x), model.heads.head(features))


def test_model_options_read_the_image_size_off_the_position_embeddings():
    swag = {"encoder.pos_embedding": np.zeros((1, 577, 768))}
    assert jaxtl.models.model_options("vit_b_16", swag) == {"image_size": 384}
    assert jaxtl.models.model_options("vit_h_14", {"encoder.pos_embedding": np.zeros((1, 1370, 1280))}) == {
        "image_size": 518
    }
    assert jaxtl.models.model_options("vit_b_16", {"encoder.pos_embedding": np.zeros((1, 197, 768))}) == {}
    assert jaxtl.models.model_options("vit_b_16", {"encoder.pos_embedding": np.zeros((1, 11, 768))}) == {}
    assert jaxtl.models.model_options("vit_b_16", {}) == {}
    assert jaxtl.models.model_options("resnet18", swag) == {}


def test_cubic_matrix_is_torchs_align_corners_bicubic():
    matrix = _cubic_matrix(4, 7, np.float64)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-15)  # an interpolation: rows sum to one
    np.testing.assert_allclose(matrix[0], [1, 0, 0, 0], atol=1e-15)  # align_corners keeps the corners
    np.testing.assert_allclose(matrix[-1], [0, 0, 0, 1], atol=1e-15)
    # Output 2 sits at source 1.0 exactly: the input value there.
    np.testing.assert_allclose(matrix[2], [0, 1, 0, 0], atol=1e-15)
    # Output 1 at source 0.5: cubic convolution with A = -0.75 at distances 1.5, 0.5, 0.5, 1.5, the tap left of
    # the edge clamped onto it.
    near, far = 1 - 2.25 * 0.25 + 1.25 * 0.125, -0.75 * (1.5**3 - 5 * 1.5**2 + 8 * 1.5 - 4)
    np.testing.assert_allclose(matrix[1], [far + near, near, far, 0], atol=1e-15)
    assert _cubic_matrix(4, 4, np.float32).dtype == np.float32
    np.testing.assert_array_equal(_cubic_matrix(4, 4, np.float64), np.eye(4))


def test_inputs_of_another_grid_get_interpolated_position_embeddings():
    model = _tiny()
    model.eval()
    pos = model.encoder.pos_embedding[...]
    assert interpolate_pos_embedding(pos, (4, 4)) is pos  # its own grid: unchanged
    wider = interpolate_pos_embedding(pos, (3, 6))
    assert wider.shape == (1, 19, 32)
    np.testing.assert_array_equal(wider[:, 0], pos[:, 0])  # the class token's embedding is kept
    grid = pos[0, 1:].reshape(4, 4, 32)
    for corner, (r, c) in {(0, 0): (0, 0), (2, 5): (3, 3)}.items():
        np.testing.assert_allclose(wider[0, 1 + corner[0] * 6 + corner[1]], grid[r, c], atol=1e-6)
    for size in [(16, 16), (24, 48), (48, 40)]:
        assert model(jnp.zeros((1, *size, 3))).shape == (1, 5)
    with pytest.raises(ValueError, match="not a whole number of 8-pixel patches"):
        model(jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _tiny(image_size=30)


def test_attention_is_softmax_of_scaled_products():
    attention = MultiheadAttention(8, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    weight, bias = np.asarray(attention.in_proj_weight[...]), np.asarray(attention.in_proj_bias[...])
    q, k, v = np.split(np.asarray(x) @ weight + bias, 3, axis=-1)
    heads = []
    for h in range(2):
        columns = slice(4 * h, 4 * h + 4)
        scores = q[..., columns] @ np.swapaxes(k[..., columns], 1, 2) / 2.0
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(probabilities / probabilities.sum(-1, keepdims=True) @ v[..., columns])
    expected = attention.out_proj(jnp.asarray(np.concatenate(heads, axis=-1)))
    np.testing.assert_allclose(attention(x), expected, rtol=1e-5, atol=1e-6)  # jax.nn.dot_product_attention
    assert isinstance(attention.out_proj, Linear)
    # With attention dropout in train mode the computation is written out; at a rate that drops nothing it is the same.
    attention.dropout.rate = 1e-12
    attention.train()
    np.testing.assert_allclose(attention(x), expected, rtol=1e-5, atol=1e-6)


def test_dropout_rates_and_bfloat16():
    model = jaxtl.models.abstract_model("vit_b_32")
    rates = {m.rate for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)}
    assert rates == {0.0}  # torchvision's builders: dropout and attention_dropout 0
    model = _tiny(dropout=0.1, attention_dropout=0.2)
    assert {m.rate for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)} == {0.1, 0.2}
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model.train()
    assert not np.allclose(model(x), model(x))  # fresh masks each call
    model.eval()
    logits = model(x)
    low = model(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), logits, atol=0.05 * float(jnp.abs(logits).max()) + 1e-3)


def test_patch_embedding_is_conv_projs_convolution():
    model = _tiny()
    x = jax.random.normal(jax.random.key(3), (2, 24, 40, 3))
    np.testing.assert_allclose(model._patch_embed(x), model.conv_proj(x), rtol=1e-5, atol=1e-5)
