"""The ResNet family: names, shapes, parameter counts, modes and the registry (no torch)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.errors import UnknownModelError
from jaxtl.models.state_dict import state_dict

# torchvision's weights metadata (num_params of the 1000-class models).
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11689512,
    "resnet34": 21797672,
    "resnet50": 25557032,
    "resnet101": 44549160,
    "resnet152": 60192808,
    "resnext50_32x4d": 25028904,
    "resnext101_32x8d": 88791336,
    "resnext101_64x4d": 83455272,
    "wide_resnet50_2": 68883240,
    "wide_resnet101_2": 126886696,
}


def test_registry_lists_the_whole_resnet_family():
    assert set(TORCHVISION_NUM_PARAMS) <= set(jaxtl.models.list_models())


@pytest.mark.parametrize("arch", by_family(sorted(TORCHVISION_NUM_PARAMS)))
def test_parameter_count_equals_torchvision(arch):
    model = jaxtl.models.abstract_model(arch)
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == TORCHVISION_NUM_PARAMS[arch]


def test_parameter_paths_are_torchvision_state_dict_keys():
    model = jaxtl.models.abstract_model("resnet18")
    shapes = {".".join(map(str, path)): v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(model))}
    assert shapes["conv1.weight"] == (7, 7, 3, 64)  # HWIO
    assert shapes["layer4.1.conv2.weight"] == (3, 3, 512, 512)
    assert shapes["layer2.0.downsample.0.weight"] == (1, 1, 64, 128)
    assert shapes["layer2.0.downsample.1.running_var"] == (128,)
    assert shapes["fc.weight"] == (512, 1000)  # (in, out)
    assert not any(k.startswith("layer1.0.downsample") for k in shapes)
    # torchvision's resnet18 state_dict has 122 keys, 20 of them num_batches_tracked.
    assert len(shapes) == 102


def test_each_abstract_model_is_its_own_copy():
    # Built once per (arch, num_classes) and copied: filling one copy leaves the next abstract.
    first = jaxtl.models.abstract_model("resnet18", num_classes=3)
    first.fc.bias.set_value(jnp.arange(3.0))
    second = jaxtl.models.abstract_model("resnet18", num_classes=3)
    assert isinstance(second.fc.bias.get_value(), jax.ShapeDtypeStruct)
    assert second.fc.bias.get_value().shape == (3,) and second.fc.weight.get_value().shape == (512, 3)
    assert jaxtl.models.abstract_model("resnet18", num_classes=4).fc.bias.get_value().shape == (4,)


def test_resnet50_is_v1_5_with_the_stride_on_the_3x3_conv():
    model = jaxtl.models.abstract_model("resnet50")
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_resnext_uses_grouped_3x3_convs():
    model = jaxtl.models.abstract_model("resnext50_32x4d")
    assert model.layer1[0].conv2.groups == 32
    assert model.layer1[0].conv2.weight.shape == (3, 3, 4, 128)


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 47)])
def test_forward_shapes_at_odd_sizes(size):
    model = jaxtl.models.create("resnet18", num_classes=7)
    model.eval()
    x = jnp.ones((2, *size, 3))
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 512)
    stages = model.forward_intermediates(x)
    assert list(stages) == ["conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    np.testing.assert_allclose(stages["fc"], model(x), rtol=1e-6)


def test_train_and_eval_switch_every_batch_norm():
    model = jaxtl.models.create("resnet18")
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, jaxtl.models.layers.BatchNorm2d)]
    assert len(norms) == 20 and not any(bn.use_running_average for bn in norms)
    model.eval()
    assert all(bn.use_running_average for bn in norms)
    model.train()
    assert not any(bn.use_running_average for bn in norms)


def test_per_module_batch_norm_mode():
    model = jaxtl.models.create("resnet18", num_classes=3)
    model.train()
    model.layer4.eval()  # e.g. a frozen block whose statistics must not move
    before = state_dict(model)
    model(jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32))
    after = state_dict(model)
    for key in before:
        if key.endswith("running_mean"):
            moved = not np.array_equal(before[key], after[key])
            assert moved == (not key.startswith("layer4.")), key


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
    model = jaxtl.models.resnet50(rngs=nnx.Rngs(0), zero_init_residual=True)
    assert float(jnp.abs(model.layer3[2].bn3.weight[...]).max()) == 0.0
    assert float(jnp.abs(model.layer3[2].bn2.weight[...]).min()) == 1.0


def test_create_is_deterministic_in_the_seed():
    a, b, c = (state_dict(jaxtl.models.create("resnet18", num_classes=4, seed=s)) for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc.weight"], c["fc.weight"])


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(UnknownModelError, match="Did you mean resnet50"):
        jaxtl.models.create("resnet05")


def test_importing_jaxtl_and_running_a_forward_never_loads_torch():
    code = (
        "import sys, jax.numpy as jnp\n"
        "import jaxtl, jaxtl.models, jaxtl.weights, jaxtl.cli, jaxtl.artifacts.loading, jaxtl.demo\n"
        "m = jaxtl.models.create('resnet18', num_classes=3)\n"
        "m.eval(); m(jnp.ones((1, 64, 64, 3))).block_until_ready()\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'torchvision', 'tensorflow', 'convert'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
