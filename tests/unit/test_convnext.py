"""ConvNeXt Tiny/Small/Base/Large: structure, settings, init, stages and the policies on them (no torch)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.convnext import CNBlock, CNBlockConfig, ConvNeXt
from jaxtl.models.initializers import trunc_normal_init
from jaxtl.models.layers import Conv2d, LayerNorm, Linear, StochasticDepth
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata (num_params of the 1000-class models), its builders' stochastic_depth_prob,
# the stage widths and depths of its block settings.
TORCHVISION = {
    "convnext_tiny": (28589128, 0.1, (96, 192, 384, 768), (3, 3, 9, 3)),
    "convnext_small": (50223688, 0.4, (96, 192, 384, 768), (3, 3, 27, 3)),
    "convnext_base": (88591464, 0.5, (128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnext_large": (197767336, 0.5, (192, 384, 768, 1536), (3, 3, 27, 3)),
}


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)
    num_params, sd_prob, widths, depths = TORCHVISION[arch]
    assert sum(int(np.prod(shape)) for shape in _shapes(model).values()) == num_params
    assert model.num_features == widths[-1]
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, LayerNorm)]
    assert len(norms) == 1 + sum(depths) + 3 + 1 and {n.eps for n in norms} == {1e-6}
    stages = [list(model.features[i]) for i in (1, 3, 5, 7)]
    assert [len(s) for s in stages] == list(depths)
    assert [s[0].block[0].weight.get_value().shape for s in stages] == [(7, 7, 1, w) for w in widths]
    # torchvision: p = stochastic_depth_prob * block_id / (total - 1), from 0 on the first block to the full
    # probability on the last.
    probabilities = [block.stochastic_depth.p for stage in stages for block in stage]
    total = sum(depths)
    assert probabilities == [sd_prob * i / (total - 1.0) for i in range(total)]
    assert probabilities[0] == 0.0 and probabilities[-1] == pytest.approx(sd_prob)


def test_names_and_shapes_are_torchvisions():
    model = jaxtl.models.abstract_model("convnext_tiny", num_classes=10)
    shapes = _shapes(model)
    assert shapes["features.0.0.weight"] == (4, 4, 3, 96) and shapes["features.0.0.bias"] == (96,)  # stem conv
    assert shapes["features.0.1.weight"] == (96,)  # its LayerNorm2d
    # CNBlock: depthwise 7x7 at block.0, LayerNorm block.2, Linear block.3 / block.5 ((in, out) layout).
    assert shapes["features.1.0.block.0.weight"] == (7, 7, 1, 96) and shapes["features.1.0.block.0.bias"] == (96,)
    assert shapes["features.1.0.block.2.weight"] == (96,) and shapes["features.1.0.block.2.bias"] == (96,)
    assert shapes["features.1.0.block.3.weight"] == (96, 384) and shapes["features.1.0.block.5.weight"] == (384, 96)
    assert shapes["features.1.0.layer_scale"] == (96, 1, 1)  # torchvision's own shape
    assert shapes["features.2.0.weight"] == (96,) and shapes["features.2.1.weight"] == (2, 2, 96, 192)
    assert shapes["features.6.1.weight"] == (2, 2, 384, 768) and shapes["features.6.1.bias"] == (768,)
    assert shapes["classifier.0.weight"] == (768,) and shapes["classifier.2.weight"] == (768, 10)
    assert len(model.features) == 8 and not any(k.startswith("features.8") for k in shapes)
    block = model.features[5][8]
    assert isinstance(block, CNBlock)
    assert [type(m).__name__ for m in block.block] == [
        "Conv2d", "Activation", "LayerNorm", "Linear", "Activation", "Linear", "Activation"
    ]  # fmt: skip
    assert [type(m).__name__ for m in model.classifier] == ["LayerNorm", "Activation", "Linear"]
    assert model.head_name == "classifier.2"


def _small(num_classes: int = 4) -> ConvNeXt:
    """torchvision's ConvNeXt class with a small block setting: the builders' code at a fraction of the compile."""
    setting = tuple(CNBlockConfig(*row) for row in ((32, 64, 1), (64, 128, 1), (128, 256, 2), (256, None, 1)))
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes, rngs=nnx.Rngs(0))


def test_init_is_torchvisions():
    """trunc_normal(std 0.02) for every conv and linear weight, zero biases; LayerNorm ones and zeros; layer_scale
    1e-6 (torchvision.models.ConvNeXt.__init__ and CNBlock)."""
    model = _small(num_classes=10)
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, (Conv2d, Linear))]
    assert len(layers) == 1 + 3 + 3 * 5 + 1  # stem, downsamples, each block's conv and two Linears, head
    weights = np.concatenate([np.asarray(m.weight[...]).ravel() for m in layers])
    assert weights.size > 800_000 and abs(weights.std() - 0.02) < 1e-4 and abs(weights.mean()) < 1e-4
    assert all(not np.any(np.asarray(m.bias[...])) for m in layers)
    for _, norm in nnx.iter_modules(model):
        if isinstance(norm, LayerNorm):
            assert np.all(np.asarray(norm.weight[...]) == 1) and not np.any(np.asarray(norm.bias[...]))
    scales = {
        float(v) for _, m in nnx.iter_modules(model) if isinstance(m, CNBlock) for v in m.layer_scale[...].ravel()
    }
    assert scales == {float(np.float32(1e-6))}


def test_trunc_normal_init_draws_torchs_truncated_normal():
    """torch's trunc_normal_(std, a, b): a normal of that std, restricted to the absolute bounds [a, b]."""
    std, a, b = 1.0, -0.5, 1.5
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    z = cdf(b) - cdf(a)
    mean = (phi(a) - phi(b)) / z
    var = 1 + (a * phi(a) - b * phi(b)) / z - mean**2
    init = trunc_normal_init(std, a, b)
    eager = np.asarray(init(jax.random.key(0), (200_000,), jnp.float32))
    traced = np.asarray(jax.jit(lambda key: init(key, (200_000,), jnp.float32))(jax.random.key(1)))
    for values in (eager, traced):
        assert values.dtype == np.float32 and values.min() >= a and values.max() <= b
        assert abs(values.mean() - mean) < 0.01 and abs(values.var() - var) < 0.01
    # torch's default bounds (+-2) are absolute: at std 0.02 they never bind, a plain N(0, 0.02^2).
    values = np.asarray(trunc_normal_init(0.02)(jax.random.key(2), (100_000,), jnp.float32))
    assert abs(values.std() - 0.02) < 2e-4


def test_stages_end_with_their_downsample_and_the_policies_see_one_unit_per_block():
    model = jaxtl.models.abstract_model("convnext_tiny", num_classes=5)
    blocks = dict(model.blocks())
    assert list(blocks) == ["stem", "features.1", "features.3", "features.5", "features.7", "head"]
    assert blocks["features.1"] == ("features.1.", "features.2.")  # the downsample that follows the stage
    assert blocks["features.7"] == ("features.7.", "classifier.0.")  # the pretrained LayerNorm before the head
    assert blocks["head"] == ("classifier.2.",)

    groups = assign(model, get_policy("head_only")(model))
    assert groups.names("head") == ["classifier.2.bias", "classifier.2.weight"]
    groups = assign(model, get_policy("last_n_blocks:1")(model))
    assert {n.split(".")[1] for n in groups.names("blocks") if n.startswith("features.")} == {"7"}
    assert {n for n in groups.names("blocks") if not n.startswith("features.")} == {
        "classifier.0.weight", "classifier.0.bias"
    }  # fmt: skip
    assert len(groups.names("blocks")) == 3 * 9 + 2 and len(groups.names("head")) == 2

    # layerwise_lr_decay: a unit per CNBlock in forward order, each downsample and classifier.0 one after its stage.
    groups = assign(model, get_policy("layerwise_lr_decay:0.5")(model))
    order = list(groups.groups)
    assert order[:6] == ["head", "classifier.0", "features.7.2", "features.7.1", "features.7.0", "features.6"]
    assert order[-5:] == ["features.2", "features.1.2", "features.1.1", "features.1.0", "stem"]
    assert len(order) == 1 + 1 + 18 + 3 + 1  # head, classifier.0, blocks, downsamples, stem
    assert [groups.groups[name].lr_mult for name in order] == [0.5**i for i in range(len(order))]
    assert len(groups.names("features.5.8")) == 9  # conv, LayerNorm, two Linears (weight and bias), layer_scale

    groups = assign(model, get_policy("surgical:middle")(model))
    assert {".".join(n.split(".")[:2]) for n in groups.names("block")} == {"features.3", "features.4"}
    groups = assign(model, get_policy("surgical:first")(model))
    assert {".".join(n.split(".")[:2]) for n in groups.names("block")} == {"features.0", "features.1", "features.2"}
    groups = assign(model, get_policy("bitfit")(model))
    assert all(n.endswith(".bias") for n in groups.names("biases"))
    # conv and Linear biases (stem, downsamples, 3 per block) and every LayerNorm bias; the head's are its own
    assert len(groups.names("biases")) == (1 + 3 + 3 * 18) + (1 + 18 + 3 + 1)
    assert "features.1.0.layer_scale" in groups.names("frozen")
    groups = assign(model, get_policy("norm_only")(model))
    assert len(groups.names("norms")) == 2 * (1 + 18 + 3 + 1)  # every LayerNorm, classifier.0 included
    assert set(groups.names("frozen")) >= {"features.1.0.layer_scale", "features.1.0.block.3.weight"}


def test_forward_shapes_and_intermediates():
    model = jaxtl.models.abstract_model("convnext_tiny", num_classes=3)
    x = jnp.ones((2, 35, 45, 3))  # any size from 32: the strided convs floor, as torch's do
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    features = nnx.eval_shape(lambda model, x: model.forward_features(x), model, x)
    assert features.shape == (2, 768) == (2, model.num_features)
    out = {}
    nnx.eval_shape(lambda model, x: out.update(model.forward_intermediates(x)), model, x)
    assert list(out) == [f"features.{i}" for i in range(8)] + ["avgpool", "classifier.0", "classifier"]
    assert out["features.0"].shape == (2, 8, 11, 96) and out["features.2"].shape == (2, 4, 5, 192)
    assert out["features.7"].shape == (2, 1, 1, 768) and out["classifier"].shape == (2, 3)


def test_the_head_maps_forward_features_to_the_logits_and_stochastic_depth_drops_rows():
    model = _small()
    rng = np.random.default_rng(0)
    for _, block in nnx.iter_modules(model):  # non-trivial branches: torchvision's 1e-6 makes each an identity
        if isinstance(block, CNBlock):
            block.layer_scale.set_value(
                jnp.asarray(rng.uniform(0.1, 0.3, (block.layer_scale.shape[0], 1, 1)), jnp.float32)
            )
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    model.eval()
    forward = nnx.jit(lambda model, x: (model(x), model.classifier[2](model.forward_features(x))))
    logits, from_features = forward(model, x)
    np.testing.assert_array_equal(logits, from_features)
    # Stochastic depth in train mode (the last block: p = 0.1): whole rows of its branch kept or dropped.
    block = model.features[7][0]
    assert isinstance(block.stochastic_depth, StochasticDepth) and block.stochastic_depth.p == pytest.approx(0.1)
    block.stochastic_depth.rate = 0.5
    h = jnp.asarray(rng.standard_normal((64, 1, 1, 256)), jnp.float32)
    block.train()
    out = np.asarray(nnx.jit(lambda block, h: block(h))(block, h))
    block.eval()
    branch = np.asarray(nnx.jit(lambda block, h: block(h))(block, h)) - np.asarray(h)
    residual = out - np.asarray(h)
    dropped = np.all(residual == 0, axis=(1, 2, 3))
    kept = np.all(np.isclose(residual, 2 * branch, rtol=1e-5, atol=1e-6), axis=(1, 2, 3))
    assert np.all(dropped | kept) and 10 < dropped.sum() < 54
