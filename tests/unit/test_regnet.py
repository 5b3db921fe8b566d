"""RegNetX and RegNetY: widths from the design space, names, init, stages and policies (no torch)."""

import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models.layers import BatchNorm2d
from jaxtl.models.regnet import block_params, regnet_params
from jaxtl.optim import assign, get_policy

# torchvision's weights metadata: num_params of the 1000-class model; and the head's input width.
TORCHVISION = {
    "regnet_x_400mf": (5495976, 400), "regnet_x_800mf": (7259656, 672), "regnet_x_1_6gf": (9190136, 912),
    "regnet_x_3_2gf": (15296552, 1008), "regnet_x_8gf": (39572648, 1920), "regnet_x_16gf": (54278536, 2048),
    "regnet_x_32gf": (107811560, 2520), "regnet_y_400mf": (4344144, 440), "regnet_y_800mf": (6432512, 784),
    "regnet_y_1_6gf": (11202430, 888), "regnet_y_3_2gf": (19436338, 1512), "regnet_y_8gf": (39381472, 2016),
    "regnet_y_16gf": (83590140, 3024), "regnet_y_32gf": (145046770, 3712), "regnet_y_128gf": (644812894, 7392),
}  # fmt: skip


def _shapes(model):
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION)))
def test_parameter_count_and_settings_equal_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)  # shapes only: regnet_y_128gf's arrays would take 2.6 GB
    num_params, num_features = TORCHVISION[arch]
    assert sum(int(np.prod(shape)) for shape in _shapes(model).values()) == num_params
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in norms} == {(1e-5, 0.1)}
    assert model.num_features == num_features and model.head_name == "fc"


def test_stage_settings_are_torchvisions():
    # Values of torchvision's BlockParams.from_init_params (tests/parity checks every size against it).
    params = regnet_params("regnet_x_400mf")
    assert (params.depths, params.widths, params.group_widths) == ((1, 2, 7, 12), (32, 64, 160, 400), (16,) * 4)
    assert params.strides == (2,) * 4 and params.se_ratio is None
    # RegNetX-8GF's first stage is narrower (80) than the group width (120): the group width is capped.
    params = regnet_params("regnet_x_8gf")
    assert (params.widths, params.group_widths) == ((80, 240, 720, 1920), (80, 120, 120, 120))
    params = regnet_params("regnet_y_128gf")
    assert (params.depths, params.widths, params.se_ratio) == ((2, 7, 17, 1), (528, 1056, 2904, 7392), 0.25)
    with pytest.raises(ValueError, match="Invalid RegNet settings"):
        block_params(16, 50, 27.89, 2.09, 8)  # w_0 not a multiple of 8


def test_names_and_shapes_are_torchvisions():
    shapes = _shapes(jaxtl.models.abstract_model("regnet_y_400mf", num_classes=7))
    assert shapes["stem.0.weight"] == (3, 3, 3, 32) and shapes["stem.1.weight"] == (32,)
    # Block 1-0: 32 -> 48, stride 2: projected shortcut; bottleneck 48 in groups of 8; SE squeeze round(0.25 * 32).
    block = "trunk_output.block1.block1-0"
    assert shapes[f"{block}.proj.0.weight"] == (1, 1, 32, 48) and shapes[f"{block}.proj.1.bias"] == (48,)
    assert shapes[f"{block}.f.a.0.weight"] == (1, 1, 32, 48)
    assert shapes[f"{block}.f.b.0.weight"] == (3, 3, 8, 48)  # 6 groups of 8 channels
    assert shapes[f"{block}.f.se.fc1.weight"] == (1, 1, 48, 8) and shapes[f"{block}.f.se.fc1.bias"] == (8,)
    assert shapes[f"{block}.f.se.fc2.weight"] == (1, 1, 8, 48) and shapes[f"{block}.f.se.fc2.bias"] == (48,)
    assert shapes[f"{block}.f.c.0.weight"] == (1, 1, 48, 48)
    # Later blocks of a stage keep their width and stride 1: the identity shortcut, no proj.
    assert "trunk_output.block2.block2-1.proj.0.weight" not in shapes
    assert shapes["trunk_output.block2.block2-1.f.se.fc1.weight"] == (1, 1, 104, 26)  # round(0.25 * 104)
    assert shapes["fc.weight"] == (440, 7) and shapes["fc.bias"] == (7,)
    x_shapes = _shapes(jaxtl.models.abstract_model("regnet_x_400mf"))
    assert not any(".se." in key for key in x_shapes)
    assert "trunk_output.block4.block4-11.f.c.1.weight" in x_shapes


def test_init_is_torchvisions():
    model = jaxtl.models.create("regnet_y_400mf", num_classes=10, seed=0)
    block = getattr(model.trunk_output.block3, "block3-1")
    # Convs: N(0, 2 / fan_out), fan_out = k * k * out_channels (groups not divided out).
    kernel = np.asarray(block.f.b[0].weight[...])
    assert abs(kernel.std() / np.sqrt(2 / (9 * 208)) - 1) < 0.05 and abs(kernel.mean()) < 3e-3
    kernel = np.asarray(block.f.se.fc1.weight[...])  # 208 -> 52
    assert abs(kernel.std() / np.sqrt(2 / 52) - 1) < 0.05
    # SE biases: RegNet's init leaves them at torch's default U(+-1 / sqrt(fan_in)).
    for conv, fan_in in ((block.f.se.fc1, 208), (block.f.se.fc2, 52)):
        bias = np.asarray(conv.bias[...])
        assert np.abs(bias).max() <= 1 / np.sqrt(fan_in) and np.abs(bias).max() > 0.5 / np.sqrt(fan_in)
    bn = block.f.c[1]
    assert np.all(np.asarray(bn.weight[...]) == 1) and not np.any(np.asarray(bn.bias[...]))
    assert np.all(np.asarray(bn.running_var[...]) == 1) and not np.any(np.asarray(bn.running_mean[...]))
    # fc: N(0, 0.01), bias 0.
    assert abs(float(jnp.std(model.fc.weight[...])) - 0.01) < 5e-4 and not jnp.any(model.fc.bias[...])


def test_stages_and_policies():
    model = jaxtl.models.abstract_model("regnet_x_400mf", num_classes=5)  # stage depths 1, 2, 7, 12
    blocks = dict(model.blocks())
    assert list(blocks) == ["stem", "block1", "block2", "block3", "block4", "head"]
    assert blocks["stem"] == ("stem.",) and blocks["head"] == ("fc.",)
    assert blocks["block2"] == ("trunk_output.block2.block2-0.", "trunk_output.block2.block2-1.")
    assert len(blocks["block4"]) == 12
    groups = assign(model, get_policy("last_n_blocks:1")(model))
    assert {n.split(".")[1] for n in groups.names("blocks")} == {"block4"}
    assert groups.names("head") == ["fc.bias", "fc.weight"]
    # layerwise_lr_decay: one unit per residual block (22), the stem and the head.
    groups = assign(model, get_policy("layerwise_lr_decay:0.5")(model))
    units = list(groups.groups)
    assert units[:3] == ["head", "trunk_output.block4.block4-11", "trunk_output.block4.block4-10"]
    assert units[-2:] == ["block1", "stem"] and len(units) == 24  # a stage of one block is one unit, as named
    assert groups.groups["stem"].lr_mult == 0.5**23
    groups = assign(model, get_policy("surgical:middle")(model))
    assert {n.split(".")[1] for n in groups.names("block")} == {"block2"}
    groups = assign(model, get_policy("surgical:first")(model))
    assert {n.split(".")[0] if n.startswith("stem") else n.split(".")[1] for n in groups.names("block")} == {
        "stem", "block1"
    }  # fmt: skip
    groups = assign(model, get_policy("bitfit")(model))
    assert (
        all(n.endswith(".bias") for n in groups.names("biases")) and len(groups.names("biases")) == 71
    )  # a BatchNorm bias each
    groups = assign(model, get_policy("norm_only")(model))
    assert len(groups.names("norms")) == 2 * 71 and set(groups.batch_norms.values()) == {"train"}
    assign(model, get_policy("head_only")(model))


def test_forward_shapes_and_intermediates():
    model = jaxtl.models.abstract_model("regnet_y_400mf", num_classes=3)
    model.eval()
    x = jnp.ones((2, 33, 41, 3))
    assert nnx.eval_shape(lambda model, x: model(x), model, x).shape == (2, 3)
    features = nnx.eval_shape(lambda model, x: model.forward_features(x), model, x)
    assert features.shape == (2, 440)
    stages = {}
    nnx.eval_shape(lambda model, x: stages.update(model.forward_intermediates(x)), model, x)
    names = ["stem", *(f"trunk_output.block{i}" for i in range(1, 5)), "avgpool", "fc"]
    assert list(stages) == names
    # 33x41 -> stem 17x21 -> 9x11 -> 5x6 -> 3x3 -> 2x2 (every stage strides 2, torch's floor arithmetic).
    assert [stages[n].shape[1:3] for n in names[:5]] == [(17, 21), (9, 11), (5, 6), (3, 3), (2, 2)]
