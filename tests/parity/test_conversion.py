"""Conversion both ways: strict key accounting, layouts by layer type, the export round trip, and copies."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from convert import from_torchvision, infer_arch, to_torchvision
from convert.artifacts import torchvision_module
from convert.parity import eval_logits
from convert.random_models import randomized_torchvision_model
from jaxtl import weights
from jaxtl.errors import WeightsMismatchError
from jaxtl.models.state_dict import state_dict


def test_from_a_module_and_from_its_state_dict_agree():
    torch_model = randomized_torchvision_model("resnet18", num_classes=5, seed=1)
    a = state_dict(from_torchvision(torch_model, "resnet18"))
    b = state_dict(from_torchvision(torch_model.state_dict(), "resnet18"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_layouts_follow_torch_conventions():
    torch_model = randomized_torchvision_model("resnet18", num_classes=5, seed=1)
    converted = state_dict(from_torchvision(torch_model, "resnet18"))
    source = torch_model.state_dict()
    np.testing.assert_array_equal(converted["conv1.weight"], source["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted["fc.weight"], source["fc.weight"].numpy().T)
    np.testing.assert_array_equal(converted["layer1.0.bn1.running_var"], source["layer1.0.bn1.running_var"].numpy())
    assert not any(k.endswith("num_batches_tracked") for k in converted)


def test_a_square_head_is_transposed_by_type_not_by_shape():
    # resnet18's fc with 512 classes is 512x512: a shape-based rule could not tell the layouts apart.
    torch_model = randomized_torchvision_model("resnet18", num_classes=512, seed=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    actual = eval_logits(from_torchvision(torch_model, "resnet18"), x)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_export_is_loadable_strictly_with_every_torchvision_key():
    torch_model = randomized_torchvision_model("resnext50_32x4d", num_classes=3, seed=1)
    exported = to_torchvision(from_torchvision(torch_model, "resnext50_32x4d"))
    assert list(exported) == list(torch_model.state_dict()) or set(exported) == set(torch_model.state_dict())
    fresh = torchvision.models.resnext50_32x4d(num_classes=3)
    fresh.load_state_dict(exported, strict=True)
    for key, value in torch_model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key
    assert exported["bn1.num_batches_tracked"].dtype == torch.long


@pytest.mark.parametrize(
    "arch, num_classes",
    [
        ("resnet18", 10),
        ("resnet50", 1000),
        pytest.param("wide_resnet50_2", 3, marks=pytest.mark.slow),
        pytest.param("efficientnet_b1", 7, marks=pytest.mark.slow),
        pytest.param("efficientnet_v2_s", 5, marks=pytest.mark.slow),
        # the width of classifier.3, not of the hidden classifier.0 (1280)
        pytest.param("mobilenet_v3_large", 7, marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", 1000, marks=pytest.mark.slow),
        pytest.param("mobilenet_v3_small", 3, marks=pytest.mark.slow),
    ],
)
def test_architecture_is_inferred_from_keys_and_shapes(arch, num_classes):
    torch_model = torchvision.models.get_model(arch, num_classes=num_classes)
    assert infer_arch(torch_model.state_dict()) == arch
    model = from_torchvision(torch_model)
    assert model.num_classes == num_classes


def test_efficientnet_export_round_trip_is_exact():
    torch_model = randomized_torchvision_model("efficientnet_b0", num_classes=3, seed=2)
    fresh = torchvision.models.efficientnet_b0(num_classes=3)
    fresh.load_state_dict(to_torchvision(from_torchvision(torch_model, "efficientnet_b0")), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value) or key.endswith("num_batches_tracked"), key


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_mobilenet_export_round_trip_is_exact(arch):
    torch_model = randomized_torchvision_model(arch, num_classes=3, seed=2)
    model = from_torchvision(torch_model, arch)
    assert model.num_classes == 3
    fresh = torchvision.models.get_model(arch, num_classes=3)
    fresh.load_state_dict(to_torchvision(model), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value) or key.endswith("num_batches_tracked"), key


def test_a_converted_efficientnet_trains_with_dropout_and_stochastic_depth():
    # from_torchvision fills an abstract model: its RNG streams need keys before a train-mode forward.
    model = from_torchvision(randomized_torchvision_model("efficientnet_b0", num_classes=3, seed=2))
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    keys = {tuple(np.asarray(jax.random.key_data(s.key.get_value())).tolist()) for s in streams}
    assert len(streams) == len(keys) == 17  # 16 stochastic depths and the classifier's dropout, each its own key
    forward = nnx.jit(lambda model, x: model(x))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    model.train()
    assert not np.allclose(forward(model, x), forward(model, x))  # new masks on every call
    model.eval()
    np.testing.assert_array_equal(forward(model, x), forward(model, x))


def test_weights_of_another_architecture_list_the_keys():
    resnet34_state = torchvision.models.resnet34(num_classes=10).state_dict()
    with pytest.raises(WeightsMismatchError) as info:
        from_torchvision(resnet34_state, "resnet18")
    assert "layer1.2.conv1.weight" in info.value.unexpected
    assert "80 unexpected keys" in str(info.value) and "\n    layer3.5.* (10 keys)\n" in str(info.value)

    resnet18_state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(WeightsMismatchError) as info:
        from_torchvision(resnet18_state, "resnet50")
    message = str(info.value)
    assert "layer1.0.conv3.weight" in info.value.missing
    assert "layer1.0.conv1.weight: weights (3, 3, 64, 64), model (1, 1, 64, 64)" in message
    assert "fc.weight: weights (512, 10), model (2048, 10)" in message


def test_a_state_dict_of_no_known_architecture_is_refused():
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    state.pop("layer4.1.bn2.running_var")
    with pytest.raises(WeightsMismatchError, match="fits none of jaxtl's architectures"):
        infer_arch(state)


def _train_one_sgd_step(torch_model: torch.nn.Module, seed: int) -> None:
    """One real training step, in train mode: BatchNorm updates its running statistics, SGD the parameters."""
    generator = torch.Generator().manual_seed(seed)
    x, labels = torch.randn(4, 3, 64, 64, generator=generator), torch.randint(0, 5, (4,), generator=generator)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.5, momentum=0.9)
    torch_model.train()
    torch.nn.functional.cross_entropy(torch_model(x), labels).backward()
    optimizer.step()
    torch_model.eval()


@pytest.mark.parametrize(
    "arch, bn, head",
    [
        ("resnet18", "bn1", "fc"),
        pytest.param("efficientnet_b0", "features.0.1", "classifier.1", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("given", ["module", "state_dict"])
def test_a_converted_model_shares_no_memory_with_the_torch_module(arch, bn, head, given):
    torch_model = randomized_torchvision_model(arch, num_classes=5, seed=3)
    before = copy.deepcopy(torch_model)
    jax_model = from_torchvision(torch_model if given == "module" else torch_model.state_dict(), arch)
    snapshot = {key: value.copy() for key, value in state_dict(jax_model).items()}

    _train_one_sgd_step(torch_model, seed=4)
    bn_module = torch_model.get_submodule(bn)
    with torch.no_grad():
        bn_module.running_mean.add_(1)
        bn_module.weight.add_(1)
        torch_model.get_submodule(head).bias.add_(1)
    changed = {k for k, v in torch_model.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert {f"{bn}.running_mean", f"{bn}.weight", f"{head}.bias", f"{head}.weight"} <= changed  # it did train

    after = state_dict(jax_model)
    assert after.keys() == snapshot.keys()
    moved = [key for key in snapshot if not np.array_equal(after[key], snapshot[key])]
    assert not moved, f"{len(moved)} of {len(snapshot)} arrays followed the torch module, e.g. {moved[:3]}"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = before.eval()(x).numpy()
    np.testing.assert_allclose(eval_logits(jax_model, x), expected, atol=1e-4, rtol=1e-4)


def test_an_exported_state_dict_shares_no_memory_with_the_jaxtl_model():
    jax_model = from_torchvision(randomized_torchvision_model("resnet18", num_classes=5, seed=3), "resnet18")
    snapshot = {key: value.copy() for key, value in state_dict(jax_model).items()}
    exported = to_torchvision(jax_model)
    with torch.no_grad():
        for tensor in exported.values():
            tensor.add_(1)
    after = state_dict(jax_model)
    assert all(np.array_equal(after[key], snapshot[key]) for key in snapshot)


def test_a_converted_model_carries_a_weight_spec():
    torch_model = randomized_torchvision_model("efficientnet_b0", num_classes=5, seed=3)
    spec = from_torchvision(torch_model, "efficientnet_b0", source="my module").weight_spec
    default = torchvision.models.EfficientNet_B0_Weights.DEFAULT.transforms()
    assert (spec.arch, spec.source, spec.num_classes) == ("efficientnet_b0", "my module", 5)
    pre = spec.preprocessing  # unknown weights: the preprocessing of the architecture's DEFAULT weights
    assert ([pre.resize_size], [pre.crop_size], pre.interpolation) == (
        list(default.resize_size),
        list(default.crop_size),
        default.interpolation.value,
    )
    assert list(pre.mean) == list(default.mean) and list(pre.std) == list(default.std)
    known = weights.get_weight_spec("resnet18", "IMAGENET1K_V1")
    model = from_torchvision(randomized_torchvision_model("resnet18", num_classes=1000), "resnet18", spec=known)
    assert model.weight_spec == known


# One architecture of each family: RegNet computes its widths and Swin its relative position index with torch ops
# while it builds, ViT and Swin fill parameters outside torch.nn.init.
ONE_OF_EACH = [
    pytest.param(arch, options, marks=() if arch in {"regnet_y_400mf", "swin_v2_t"} else pytest.mark.slow, id=arch)
    for arch, options in [
        ("resnet18", {}), ("efficientnet_b0", {}), ("mobilenet_v3_small", {}), ("regnet_y_400mf", {}),
        ("densenet121", {}), ("convnext_tiny", {}), ("vit_b_32", {"image_size": 64}), ("swin_t", {}), ("swin_v2_t", {}),
    ]
]  # fmt: skip


@pytest.mark.parametrize("arch, options", ONE_OF_EACH)
def test_the_export_module_built_without_random_init_computes_what_a_loaded_torchvision_model_does(arch, options):
    init = dict(vars(torch.nn.init))
    torch.manual_seed(2)
    state = torchvision.models.get_model(arch, weights=None, num_classes=7, **options).state_dict()
    module = torchvision_module(arch, state, 7)
    assert dict(vars(torch.nn.init)) == init  # torch's init functions are its own again
    assert not module.training
    loaded = torchvision.models.get_model(arch, weights=None, num_classes=7, **options)
    loaded.load_state_dict(state, strict=True)
    assert module.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in loaded.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), loaded.buffers(), strict=True))  # computed too
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(module(x), loaded.eval()(x))


def test_the_export_module_takes_float16_weights_as_float32_and_restores_init_when_the_load_fails():
    init = dict(vars(torch.nn.init))
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    module = torchvision_module("resnet18", half, 3)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert torch.equal(module.fc.weight, half["fc.weight"].float())
    state.pop("fc.bias")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"fc.bias\""):
        torchvision_module("resnet18", state, 3)
    assert dict(vars(torch.nn.init)) == init
