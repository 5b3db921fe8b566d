"""DenseNet-121/161/169/201: names, widths, init, the transitions' pooling, stages and policies (no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.densenet import avg_pool2d, densenet121
from jaxtl.models.layers import BatchNorm2d
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata: num_params of the 1000-class model; the head's input width; dense layers.
TORCHVISION = {
    "densenet121": (7978856, 1024, 58),
    "densenet161": (28681000, 2208, 78),
    "densenet169": (14149480, 1664, 82),
    "densenet201": (20013928, 1920, 98),
}


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)
    num_params, num_features, num_layers = TORCHVISION[arch]
    shapes = _shapes(model)
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == num_params
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in norms} == {(1e-5, 0.1)}
    assert len(norms) == 2 * num_layers + 3 + 2  # two per dense layer, the transitions', norm0 and norm5
    assert model.num_features == num_features and model.head_name == "classifier"
    assert shapes["features.norm5.weight"] == (num_features,)


def test_names_and_shapes_are_torchvisions():
    shapes = _shapes(jaxtl.models.abstract_model("densenet121", num_classes=7))
    assert shapes["features.conv0.weight"] == (7, 7, 3, 64) and shapes["features.norm0.bias"] == (64,)
    layer = "features.denseblock1.denselayer2"  # reads 64 + 32 channels, bottleneck 4 * 32
    assert shapes[f"{layer}.norm1.weight"] == (96,) and shapes[f"{layer}.conv1.weight"] == (1, 1, 96, 128)
    assert shapes[f"{layer}.norm2.weight"] == (128,) and shapes[f"{layer}.conv2.weight"] == (3, 3, 128, 32)
    assert shapes["features.transition1.norm.weight"] == (256,)  # 64 + 6 * 32
    assert shapes["features.transition1.conv.weight"] == (1, 1, 256, 128)
    assert shapes["features.transition3.conv.weight"] == (1, 1, 1024, 512)
    assert shapes["features.denseblock4.denselayer16.conv2.weight"] == (3, 3, 128, 32)
    assert shapes["classifier.weight"] == (1024, 7) and shapes["classifier.bias"] == (7,)
    assert not any(".conv" in key and key.endswith(".bias") for key in shapes)  # convs without bias
    wide = _shapes(jaxtl.models.abstract_model("densenet161"))
    assert wide["features.conv0.weight"] == (7, 7, 3, 96)
    assert wide["features.denseblock1.denselayer1.conv2.weight"] == (3, 3, 192, 48)


def test_init_is_torchvisions():
    model = jaxtl.models.create("densenet121", num_classes=10, seed=0)
    layer = model.features.denseblock3.denselayer5  # reads 256 + 4 * 32 = 384 channels
    # Convs: nn.init.kaiming_normal_ with its default mode, fan_in: N(0, 2 / (in_channels * k * k)).
    for conv, fan_in in ((layer.conv1, 384), (layer.conv2, 128 * 9), (model.features.conv0, 3 * 49)):
        kernel = np.asarray(conv.weight[...])
        assert abs(kernel.std() / np.sqrt(2 / fan_in) - 1) < 0.05, fan_in
    bn = layer.norm1
    assert np.all(np.asarray(bn.weight[...]) == 1) and not np.any(np.asarray(bn.bias[...]))
    # The classifier: torch's default Linear weight, U(+-1 / sqrt(1024)), and a zero bias.
    weight = np.asarray(model.classifier.weight[...])
    assert np.abs(weight).max() <= 1 / 32 and abs(weight.std() - 1 / 32 / np.sqrt(3)) < 1e-3
    assert not np.any(np.asarray(model.classifier.bias[...]))


def test_transition_pooling_is_torchs_avg_pool_in_floor_mode():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    # torch.nn.AvgPool2d(2, 2): windows at rows 0-1, 2-3 and columns 0-1, 2-3, 4-5; the last row and column dropped.
    expected = x[:, :4, :6].reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(avg_pool2d(jnp.asarray(x), kernel_size=2, stride=2), expected, rtol=1e-6)


def test_stages_and_policies():
    model = jaxtl.models.abstract_model("densenet121", num_classes=5)
    blocks = dict(model.blocks())
    assert list(blocks) == ["stem", "denseblock1", "denseblock2", "denseblock3", "denseblock4", "head"]
    assert blocks["stem"] == ("features.conv0.", "features.norm0.") and blocks["head"] == ("classifier.",)
    assert blocks["denseblock1"][0] == "features.denseblock1.denselayer1."
    assert blocks["denseblock1"][-2:] == ("features.denseblock1.denselayer6.", "features.transition1.")
    assert blocks["denseblock4"][-2:] == ("features.denseblock4.denselayer16.", "features.norm5.")
    groups = assign(model, get_policy("last_n_blocks:1")(model))
    trained = {".".join(n.split(".")[:2]) for n in groups.names("blocks")}
    assert trained == {"features.denseblock4", "features.norm5"}
    # layerwise_lr_decay: one unit per dense layer (58), per transition (3), norm5, the stem and the head.
    groups = assign(model, get_policy("layerwise_lr_decay:0.5")(model))
    units = list(groups.groups)
    assert units[:3] == ["head", "features.norm5", "features.denseblock4.denselayer16"]
    assert units[-3:] == ["features.denseblock1.denselayer2", "features.denseblock1.denselayer1", "stem"]
    assert "features.transition2" in units and len(units) == 58 + 3 + 1 + 2
    groups = assign(model, get_policy("surgical:middle")(model))
    assert {n.split(".")[1] for n in groups.names("block")} == {"denseblock2", "transition2"}
    groups = assign(model, get_policy("norm_only")(model))
    assert len(groups.names("norms")) == 2 * 121 and set(groups.batch_norms.values()) == {"train"}
    groups = assign(model, get_policy("bitfit")(model))
    assert len(groups.names("biases")) == 121
    assign(model, get_policy("head_only")(model))


@pytest.mark.slow
def test_forward_shapes_intermediates_and_dropout():
    model = jaxtl.models.abstract_model("densenet121", num_classes=3)
    model.eval()
    x = jnp.ones((2, 35, 41, 3))
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    assert nnx.eval_shape(lambda model, x: model.forward_features(x), model, x).shape == (2, 1024)
    stages = {}
    nnx.eval_shape(lambda model, x: stages.update(model.forward_intermediates(x)), model, x)
    names = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
             "denseblock3", "transition3", "denseblock4", "norm5"]  # fmt: skip
    assert list(stages) == [f"features.{name}" for name in names] + ["classifier"]
    assert stages["features.pool0"].shape == (2, 9, 11, 64)
    assert stages["features.transition1"].shape == (2, 4, 5, 128)  # 2x2 average pool, floor
    assert stages["features.norm5"].shape == (2, 1, 1, 1024)
    # torchvision's drop_rate: dropout on each dense layer's new features, from the dropout stream, in train mode.
    model = densenet121(num_classes=3, drop_rate=0.5, rngs=nnx.Rngs(0))
    layer = model.features.denseblock1.denselayer1
    assert isinstance(layer.dropout, nnx.Dropout) and layer.dropout.rate == 0.5
    assert jaxtl.models.abstract_model("densenet121").features.denseblock1.denselayer1.dropout is None
    model.train()
    features = jax.random.normal(jax.random.key(0), (1, 4, 4, 64))
    out = layer(features)
    assert out.shape == (1, 4, 4, 32) and 0 < float(jnp.mean(out == 0)) < 1
