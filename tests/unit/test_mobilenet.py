"""MobileNetV2 and V3 Large/Small: structure, settings, hardswish and hardsigmoid, stages (no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.layers import BatchNorm2d, Linear
from jaxtl.models.mobilenet import InvertedResidualV2, InvertedResidualV3, hardsigmoid, hardswish
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata (num_params of the 1000-class models), and (eps, momentum, num_features: the head's
# input, which in MobileNetV3 is classifier.0's output: the recipe replaces classifier[3] only).
TORCHVISION = {
    "mobilenet_v2": (3504872, 1e-5, 0.1, 1280),
    "mobilenet_v3_large": (5483032, 1e-3, 0.01, 1280),
    "mobilenet_v3_small": (2542856, 1e-3, 0.01, 1024),
}


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)
    num_params, eps, momentum, num_features = TORCHVISION[arch]
    assert sum(int(np.prod(shape)) for shape in _shapes(model).values()) == num_params
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in norms} == {(eps, momentum)}
    assert model.num_features == num_features
    dropouts = [m for _, m in nnx.iter_modules(model.classifier) if isinstance(m, nnx.Dropout)]
    assert [d.rate for d in dropouts] == [0.2]


def test_mobilenet_v2_names_and_shapes_are_torchvisions():
    model = jaxtl.models.abstract_model("mobilenet_v2")
    shapes = _shapes(model)
    assert shapes["features.0.0.weight"] == (3, 3, 3, 32)
    # Expand ratio 1: the depthwise conv comes first, then the projection conv and its BatchNorm.
    assert shapes["features.1.conv.0.0.weight"] == (3, 3, 1, 32)
    assert shapes["features.1.conv.1.weight"] == (1, 1, 32, 16) and shapes["features.1.conv.2.weight"] == (16,)
    assert shapes["features.2.conv.0.0.weight"] == (1, 1, 16, 96)  # expand 6x
    assert shapes["features.2.conv.3.bias"] == (24,)
    assert shapes["features.18.0.weight"] == (1, 1, 320, 1280)
    assert shapes["classifier.1.weight"] == (1280, 1000)
    blocks = list(model.features)[1:-1]
    assert len(blocks) == 17 and all(isinstance(b, InvertedResidualV2) for b in blocks)
    assert [b.use_res_connect for b in blocks[:4]] == [False, False, True, False]


def test_mobilenet_v3_names_squeeze_widths_and_two_layer_head():
    model = jaxtl.models.abstract_model("mobilenet_v3_large")
    shapes = _shapes(model)
    assert shapes["features.1.block.0.0.weight"] == (3, 3, 1, 16)  # no expand: 16 -> 16
    assert "features.2.block.2.fc1.weight" not in shapes  # no squeeze-excitation in block 2
    # Block 4 expands 24 -> 72 (5x5), squeezes to _make_divisible(72 // 4, 8) = 24, not 72 // 4 = 18.
    assert shapes["features.4.block.1.0.weight"] == (5, 5, 1, 72)
    assert shapes["features.4.block.2.fc1.weight"] == (1, 1, 72, 24) and shapes["features.4.block.2.fc1.bias"] == (24,)
    assert shapes["features.16.0.weight"] == (1, 1, 160, 960)
    assert shapes["classifier.0.weight"] == (960, 1280) and shapes["classifier.3.weight"] == (1280, 1000)
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "Activation", "Dropout", "Linear"]
    small = jaxtl.models.abstract_model("mobilenet_v3_small")
    assert _shapes(small)["features.1.block.1.fc1.weight"] == (1, 1, 16, 8)  # stride-2 first block with SE
    assert all(isinstance(b, InvertedResidualV3) for b in list(small.features)[1:-1])


def test_hardswish_and_hardsigmoid_values_and_torchs_gradients():
    x = jnp.array([-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(hardsigmoid(x), [0, 0, 0.25, 0.5, 0.75, 1, 1], rtol=1e-7)
    np.testing.assert_allclose(hardswish(x), [0, 0, -0.375, 0, 1.125, 3, 4], rtol=1e-7)
    # torch's backward: hardswish' is 0 up to -3, x / 3 + 1/2 inside, 1 from 3 on; hardsigmoid's is
    # float32(1/6) strictly inside (-3, 3), even in float64 (ATen's constant).
    np.testing.assert_allclose(jax.vmap(jax.grad(hardswish))(x), [0, 0, 0, 0.5, 1, 1, 1], rtol=1e-7)
    with jax.enable_x64():
        slopes = jax.vmap(jax.grad(hardsigmoid))(jnp.array([-3.0, 0.0, 2.9, 3.0], jnp.float64))
        assert slopes.dtype == jnp.float64
        assert slopes.tolist() == [0.0, float(np.float32(1) / np.float32(6)), float(np.float32(1) / np.float32(6)), 0.0]


def test_stages_group_consecutive_blocks_of_one_width_and_end_with_the_last_conv():
    model = jaxtl.models.abstract_model("mobilenet_v2", num_classes=5)
    names = [name for name, _ in model.blocks()]  # the rows of MobileNetV2's table
    assert names == ["stem", "features.1", "features.2-3", "features.4-6", "features.7-10", "features.11-13",
                     "features.14-16", "features.17", "head"]  # fmt: skip
    assert dict(model.blocks())["features.17"] == ("features.17.", "features.18.")
    large = jaxtl.models.abstract_model("mobilenet_v3_large", num_classes=5)
    assert [name for name, _ in large.blocks()][-2:] == ["features.13-15", "head"]
    groups = assign(large, get_policy("last_n_blocks:1")(large))
    assert {n.split(".")[1] for n in groups.names("blocks") if n.startswith("features.")} == {"13", "14", "15", "16"}
    # the pretrained classifier.0 before the head belongs to the last stage (the recipe keeps it)
    assert {n for n in groups.names("blocks") if not n.startswith("features.")} == {
        "classifier.0.weight", "classifier.0.bias"
    }  # fmt: skip
    # layerwise_lr_decay: each inverted residual its own group; after the head classifier.0, then the last conv.
    groups = assign(large, get_policy("layerwise_lr_decay:0.5")(large))
    assert list(groups.groups)[:5] == ["head", "classifier.0", "features.16", "features.15", "features.14"]
    assert len(groups.groups) == 19 and groups.groups["stem"].lr_mult == 0.5**18


@pytest.mark.parametrize("arch, pool", [("mobilenet_v2", []), ("mobilenet_v3_small", ["avgpool"])])
def test_forward_shapes_and_intermediates(arch, pool):
    model = jaxtl.models.create(arch, num_classes=3)
    model.eval()
    x = jnp.ones((2, 33, 41, 3))
    # Traced, not run: shapes and the order of the stages (a jitted dict comes back sorted).
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    features = nnx.eval_shape(lambda model, x: model.forward_features(x), model, x)
    assert features.shape == (2, model.num_features)
    stages = []
    nnx.eval_shape(lambda model, x: stages.extend(model.forward_intermediates(x)), model, x)
    # torchvision's MobileNetV3 pools in a module (avgpool), V2 in a function: the names its hooks can find.
    assert stages == [f"features.{i}" for i in range(len(model.features))] + pool + ["classifier"]


@pytest.mark.slow
def test_classifier_init_is_torchvisions_and_a_fresh_head_resets_the_last_linear_only():
    """The recipe's new head: ``model.classifier[3] = nn.Linear(1280, num_classes)``; classifier.0 is kept."""
    model = jaxtl.models.create("mobilenet_v3_small", num_classes=10, seed=0)
    assert model.head_name == "classifier.3"
    for layer in (model.classifier[0], model.classifier[3]):  # torchvision: weight N(0, 0.01), bias 0
        assert abs(float(jnp.std(layer.weight[...])) - 0.01) < 5e-4 and not jnp.any(layer.bias[...])
    hidden = np.asarray(model.classifier[0].weight[...])
    jaxtl.models.reset_head(model, seed=1)
    np.testing.assert_array_equal(model.classifier[0].weight[...], hidden)
    layer = model.classifier[3]  # nn.Linear: U(+-1/sqrt(in_features)), bias too
    assert isinstance(layer, Linear)
    bound = 1 / np.sqrt(layer.in_features)
    assert abs(float(jnp.std(layer.weight[...])) - bound / np.sqrt(3)) < 0.05 * bound
    assert float(jnp.max(jnp.abs(layer.bias[...]))) <= bound and jnp.any(layer.bias[...])
    features = jnp.ones((2, 1024))
    model.eval()
    whole, pieces = nnx.jit(lambda m, x: (m(x), m.classifier[3](m.forward_features(x))))(
        model, jnp.ones((2, 33, 41, 3))
    )
    np.testing.assert_array_equal(whole, pieces)
    assert model.classifier[3](features).shape == (2, 10)
