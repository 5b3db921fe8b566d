"""Weight specs, the weights resolver, the converted-weights cache and create(weights=...) (no torch)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxtl.errors
import jaxtl.models
import jaxtl.models.registry
from jaxtl import weights
from jaxtl.errors import WeightsError, WeightsMismatchError
from jaxtl.models.state_dict import state_dict


def _spec(arch="resnet18", num_classes=10):
    return weights.WeightSpec(
        arch=arch,
        name="test",
        source="/nowhere/test.pth",
        num_classes=num_classes,
        categories=tuple(f"class{i}" for i in range(num_classes)),
        preprocessing=weights.Preprocessing(resize_size=232, crop_size=224, interpolation="bicubic"),
    )


@pytest.fixture
def converted(tmp_path):
    """A converted-weights directory holding a seeded resnet18 with a 10-way head."""
    model = jaxtl.models.create("resnet18", num_classes=10, seed=123)
    path = weights.save_converted_weights(tmp_path / "resnet18-test", state_dict(model), _spec())
    return path, state_dict(model)


def test_default_and_enum_style_names_resolve():
    assert weights.get_weight_spec("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    assert weights.get_weight_spec("resnet18", "DEFAULT").name == "IMAGENET1K_V1"
    spec = weights.get_weight_spec("resnet50", "ResNet50_Weights.IMAGENET1K_V1")
    assert spec.preprocessing.resize_size == 256 and spec.preprocessing.crop_size == 224
    assert spec.sha256_prefix == "0676ba61" and len(spec.categories) == 1000
    assert spec.categories[0] == "tench"


def test_unknown_weight_name_lists_the_known_ones():
    with pytest.raises(WeightsError, match="known weights for resnet34: DEFAULT, IMAGENET1K_V1"):
        weights.get_weight_spec("resnet34", "IMAGENET1K_V2")


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("resnet50-11ad3fa6.pth", "11ad3fa6"),
        ("wide_resnet50_2-95faca4d.pth", "95faca4d"),
        ("model.pth", None),
        ("my-model.pth", None),
        ("run-3/ckpt.pt", None),
    ],
)
def test_hash_prefix_is_read_from_torchvision_file_names(name, prefix):
    assert weights.sha256_prefix_of(name) == prefix


def test_an_efficientnets_fresh_head_is_initialised_as_the_recipes_new_linear(tmp_path):
    # torchvision's EfficientNet draws its own classifier from U(+-1/sqrt(num_classes)), bias 0: for 5
    # classes 16x wider than the nn.Linear(1280, 5) the recipe puts in its place.
    model = jaxtl.models.create("efficientnet_b0", num_classes=10, seed=1)
    path = weights.save_converted_weights(tmp_path / "b0", state_dict(model), _spec("efficientnet_b0"))
    builders_own = jaxtl.models.create("efficientnet_b0", num_classes=5).classifier[1].weight[...]
    assert np.abs(np.asarray(builders_own)).max() > 0.4
    fresh = state_dict(jaxtl.models.create("efficientnet_b0", num_classes=5, weights=path, seed=2))
    assert_torch_linear_init(fresh["classifier.1.weight"], fresh["classifier.1.bias"], 1280)
    original = state_dict(model)
    for key in original:
        if not key.startswith("classifier."):
            np.testing.assert_array_equal(fresh[key], original[key])


def test_converted_weights_round_trip_with_their_spec(converted):
    path, original = converted
    loaded, spec = weights.load_converted_weights(path)
    assert spec == _spec()
    assert loaded.keys() == original.keys()
    assert all(np.array_equal(loaded[k], original[k]) for k in original)


def test_create_from_converted_weights(converted):
    path, original = converted
    model = jaxtl.models.create("resnet18", weights=path)
    assert all(np.array_equal(v, original[k]) for k, v in state_dict(model).items())


def assert_torch_linear_init(weight: np.ndarray, bias: np.ndarray, in_features: int) -> None:
    """U(-1/sqrt(in), 1/sqrt(in)) for both, as nn.Linear(in_features, n) initialises them."""
    bound = 1 / np.sqrt(in_features)
    for values in (weight, bias):
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.8 * bound
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)  # the uniform's standard deviation


def test_create_with_another_head_width_loads_the_backbone_and_a_fresh_head(converted):
    path, original = converted
    model = jaxtl.models.create("resnet18", num_classes=7, weights=path, seed=5)
    loaded = state_dict(model)
    assert loaded["fc.weight"].shape == (512, 7)
    assert_torch_linear_init(loaded["fc.weight"], loaded["fc.bias"], 512)
    again = state_dict(jaxtl.models.create("resnet18", num_classes=7, weights=path, seed=5))
    other = state_dict(jaxtl.models.create("resnet18", num_classes=7, weights=path, seed=6))
    np.testing.assert_array_equal(loaded["fc.weight"], again["fc.weight"])  # a function of the seed
    assert not np.array_equal(loaded["fc.weight"], other["fc.weight"])
    for key in original:
        if not key.startswith("fc."):
            np.testing.assert_array_equal(loaded[key], original[key])
    model.eval()
    assert model(jnp.ones((1, 64, 64, 3))).shape == (1, 7)


def test_create_refuses_weights_of_another_architecture(converted):
    path, _ = converted
    with pytest.raises(WeightsError, match="are for resnet18, not resnet34"):
        jaxtl.models.create("resnet34", weights=path)


@pytest.fixture
def without_torch(monkeypatch):
    """torch and torchvision as if not installed: importing them fails, find_spec finds neither."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)


def test_named_weights_not_converted_yet_say_how_to_convert_without_torch(without_torch):
    with pytest.raises(WeightsError) as info:
        jaxtl.models.create("resnet50", weights="IMAGENET1K_V2")
    message = str(info.value)
    assert "pip install 'jaxtl[torch]'" in message
    assert "jaxtl convert resnet50 --weights IMAGENET1K_V2 --out DIR" in message


def test_a_pth_file_needs_torch_to_be_converted(tmp_path, without_torch):
    file = tmp_path / "resnet18-abcdef12.pth"
    file.write_bytes(b"not read")
    with pytest.raises(WeightsError, match=f"the state_dict file {file} for resnet18 must be converted once"):
        jaxtl.models.create("resnet18", weights=file)


def test_the_resolver_tells_the_three_kinds_apart(converted, tmp_path):
    path, _ = converted
    resolved = weights.resolve_weights("resnet18", path)
    assert (resolved.kind, resolved.path, resolved.converted, resolved.spec) == ("converted", path, True, _spec())

    file = tmp_path / "resnet18-abcdef12.pth"
    file.write_bytes(b"not read")
    resolved = weights.resolve_weights("resnet18", str(file))
    assert (resolved.kind, resolved.path, resolved.converted, resolved.spec) == ("file", file, False, None)

    resolved = weights.resolve_weights("resnet50", "DEFAULT")
    assert (resolved.kind, resolved.spec.name, resolved.converted, resolved.given) == (
        "named",
        "IMAGENET1K_V2",
        False,
        "DEFAULT",
    )
    assert resolved.path == weights.cache_dir() / "weights" / "resnet50" / "IMAGENET1K_V2"
    weights.save_converted_weights(resolved.path, {"fc.bias": np.zeros(1000)}, resolved.spec)  # in the cache now
    assert weights.resolve_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2").converted


@pytest.mark.parametrize(
    "arch, argument, message",
    [
        (
            "resnet18",
            "IMAGENET22K",
            "unknown weights 'IMAGENET22K' for resnet18; known weights for resnet18: DEFAULT, "
            "IMAGENET1K_V1; or give a converted-weights directory or a .pth state_dict file",
        ),
        (
            "resnet18",
            "/missing/file.pth",
            "weights file /missing/file.pth does not exist; give the path of a "
            "torchvision state_dict file, or a weight name of resnet18 (DEFAULT, IMAGENET1K_V1)",
        ),
        ("resnet18", "runs/missing", "weights path runs/missing does not exist; give a converted-weights directory"),
        ("resnet05", "DEFAULT", "unknown architecture 'resnet05'. Did you mean resnet50"),
    ],
)
def test_the_resolver_names_what_is_wrong(arch, argument, message):
    with pytest.raises(jaxtl.errors.JaxtlError) as info:
        weights.resolve_weights(arch, argument)
    assert message in str(info.value)


def test_a_directory_that_is_not_converted_weights_is_refused(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path} is not a jaxtl converted-weights directory .*jaxtl convert"):
        jaxtl.models.create("resnet18", weights=tmp_path)


def test_load_pretrained_falls_back_to_random_init_only_when_allowed(without_torch):
    logged = []
    model = jaxtl.models.registry.load_pretrained(
        "resnet18", num_classes=4, weights="DEFAULT", seed=3, allow_random_init_fallback=True, log=logged.append
    )
    assert len(logged) == 1 and "Pretrained weights 'DEFAULT' for resnet18 could not be had" in logged[0]
    assert "pip install 'jaxtl[torch]'" in logged[0] and "jaxtl convert resnet18 --weights DEFAULT" in logged[0]
    assert "resnet18-f37072fd.pth" in logged[0]  # the file to copy into torch.hub's cache
    assert model.weight_spec.source == "random init (fallback: DEFAULT unavailable)"
    assert model.weight_spec.preprocessing == weights.get_weight_spec("resnet18", "DEFAULT").preprocessing
    expected = state_dict(jaxtl.models.create("resnet18", num_classes=4, seed=3))  # torchvision's random init
    assert all(np.array_equal(v, expected[k]) for k, v in state_dict(model).items())

    with pytest.raises(WeightsError) as info:
        jaxtl.models.registry.load_pretrained("resnet18", num_classes=4, weights="DEFAULT", log=logged.append)
    assert "resnet18 needs weights 'DEFAULT': convert them once with `jaxtl convert resnet18 --weights DEFAULT`" in str(
        info.value
    )
    assert len(logged) == 1


def test_load_pretrained_never_falls_back_on_a_mistake(without_torch):
    for weights_argument in ("IMAGENET1K_V9", "/missing/file.pth"):
        with pytest.raises(WeightsError):
            jaxtl.models.registry.load_pretrained(
                "resnet18", num_classes=4, weights=weights_argument, allow_random_init_fallback=True, log=pytest.fail
            )


def test_converted_and_cached_weights_load_without_importing_torch(converted):
    path, original = converted
    named = weights.converted_weights_path("resnet18", "DEFAULT")
    weights.save_converted_weights(named, original, weights.get_weight_spec("resnet18", "DEFAULT"))
    code = (
        "import sys, numpy as np, jaxtl.models\n"
        "from jaxtl.models.registry import load_pretrained\n"
        f"a = jaxtl.models.create('resnet18', weights={str(path)!r})\n"
        "b = jaxtl.models.create('resnet18', num_classes=3, weights='IMAGENET1K_V1')\n"
        "c = load_pretrained('resnet18', num_classes=3, weights='DEFAULT', allow_random_init_fallback=True)\n"
        "assert a.weight_spec.name == 'test' and b.weight_spec.name == c.weight_spec.name == 'IMAGENET1K_V1'\n"
        "assert 'torch' not in sys.modules and 'convert' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not be had" not in result.stdout


def test_mismatched_state_lists_missing_unexpected_and_mis_shaped_keys():
    model = jaxtl.models.create("resnet18", num_classes=10)
    state = state_dict(model)
    state.pop("layer1.0.conv1.weight")
    state["layer9.0.conv1.weight"] = np.zeros(3)
    state["fc.bias"] = np.zeros(11)
    with pytest.raises(WeightsMismatchError) as info:
        jaxtl.models.load_state_dict(model, state, source="test.pth")
    message = str(info.value)
    assert "missing" in message and "layer1.0.conv1.weight" in message
    assert "unexpected" in message and "layer9.0.conv1.weight" in message
    assert "fc.bias: weights (11,), model (10,)" in message
    assert info.value.missing == ("layer1.0.conv1.weight",)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model = jaxtl.models.create("resnet18", num_classes=10)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", fail)  # fails after the arrays were written
    with pytest.raises(OSError, match="disk full"):
        weights.save_converted_weights(tmp_path / "entry", state_dict(model), _spec())
    assert os.listdir(tmp_path) == []


def test_a_failed_overwrite_keeps_the_previous_entry(converted, monkeypatch):
    path, original = converted
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        weights.save_converted_weights(path, {k: v * 0 for k, v in original.items()}, _spec())
    monkeypatch.undo()
    loaded, _ = weights.load_converted_weights(path)
    assert np.array_equal(loaded["conv1.weight"], original["conv1.weight"])
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_corrupt_spec_is_reported_with_its_path(converted):
    path, _ = converted
    (path / "spec.json").write_text("{not json")
    with pytest.raises(WeightsError, match="spec.json is corrupt"):
        weights.load_converted_weights(path)


def test_damaged_arrays_are_reported(converted):
    path, _ = converted
    for root, _, files in os.walk(path / "state"):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                os.remove(os.path.join(root, name))
    with pytest.raises(WeightsError, match="cannot read the arrays"):
        weights.load_converted_weights(path)
