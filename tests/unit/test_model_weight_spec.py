"""The weight spec a model carries (``model.weight_spec``): what it says; Flax NNX and jit take it (no torch)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxtl.models
from jaxtl import weights
from jaxtl.models.state_dict import state_dict
from jaxtl.optim import OptimizerConfig, assign, build_optimizer, get_policy
from jaxtl.train.step import make_train_step, merge_model, split_model

# torchvision's ResNet18_Weights.IMAGENET1K_V1.transforms(), EfficientNet_B0_Weights.IMAGENET1K_V1's and
# MobileNet_V3_Large_Weights.IMAGENET1K_V2's (its DEFAULT, which resizes to 232).
RESNET18_DEFAULT = weights.Preprocessing(resize_size=256, crop_size=224, interpolation="bilinear")
EFFICIENTNET_B0_DEFAULT = weights.Preprocessing(resize_size=256, crop_size=224, interpolation="bicubic")
MOBILENET_V3_LARGE_DEFAULT = weights.Preprocessing(resize_size=232, crop_size=224, interpolation="bilinear")


SMALL = weights.Preprocessing(resize_size=72, crop_size=64, interpolation="bicubic", mean=(0.5,) * 3)


def _spec(preprocessing=SMALL):
    return weights.WeightSpec(
        arch="resnet18",
        name="test",
        source="/nowhere/test.pth",
        num_classes=10,
        sha256="ab" * 32,
        preprocessing=preprocessing,
        metrics={"acc@1": 50.0},
    )


@pytest.fixture
def converted(tmp_path):
    model = jaxtl.models.create("resnet18", num_classes=10, seed=123)
    return weights.save_converted_weights(tmp_path / "resnet18-test", state_dict(model), _spec())


def test_a_model_from_converted_weights_carries_their_spec(converted):
    model = jaxtl.models.create("resnet18", num_classes=3, weights=converted)
    assert model.weight_spec == weights.load_weight_spec(converted) == _spec()
    assert model.weight_spec.preprocessing == weights.Preprocessing(72, 64, "bicubic", (0.5, 0.5, 0.5))


def test_weights_that_state_no_preprocessing_get_the_architectures_default(tmp_path):
    model = jaxtl.models.create("resnet18", num_classes=10, seed=1)
    path = weights.save_converted_weights(tmp_path / "plain", state_dict(model), _spec(preprocessing=None))
    assert weights.load_weight_spec(path).preprocessing is None  # the file says nothing ...
    assert jaxtl.models.create("resnet18", weights=path).weight_spec.preprocessing == RESNET18_DEFAULT  # the model does


@pytest.mark.parametrize(
    "arch, default",
    [
        ("resnet18", RESNET18_DEFAULT),
        ("efficientnet_b0", EFFICIENTNET_B0_DEFAULT),
        ("mobilenet_v3_large", MOBILENET_V3_LARGE_DEFAULT),
    ],
)
def test_random_init_and_abstract_models_carry_the_default_weights_preprocessing(arch, default):
    model = jaxtl.models.create(arch, num_classes=5, seed=2)
    assert model.weight_spec.source == "random init (torchvision's initialisation, seed 2)"
    assert model.weight_spec.preprocessing == default
    assert (model.weight_spec.arch, model.weight_spec.num_classes) == (arch, 5)
    abstract = jaxtl.models.abstract_model(arch, num_classes=5)
    assert abstract.weight_spec.preprocessing == default and "abstract" in abstract.weight_spec.source


def test_the_spec_survives_split_merge_clone_and_eval_shape(converted):
    model = jaxtl.models.create("resnet18", num_classes=3, weights=converted)
    graphdef, state = nnx.split(model)
    assert nnx.merge(graphdef, state).weight_spec == _spec()
    assert nnx.clone(model).weight_spec == _spec()
    abstract = nnx.eval_shape(lambda: jaxtl.models.create("resnet18", num_classes=3, weights=converted))
    assert abstract.weight_spec == _spec()
    assert all("weight_spec" not in path for path, _ in nnx.to_flat_state(state))  # static: no leaf of the state


def test_graphdefs_carrying_a_spec_hash_and_compare(converted):
    a = nnx.graphdef(jaxtl.models.create("resnet18", num_classes=3, weights=converted))
    b = nnx.graphdef(jaxtl.models.create("resnet18", num_classes=3, weights=converted, seed=5))
    other = nnx.graphdef(jaxtl.models.create("resnet18", num_classes=3))
    assert hash(a) == hash(b) and a == b
    assert a != other  # another spec, another graphdef


def test_a_jitted_train_step_runs_on_a_model_carrying_its_spec(converted):
    def losses(model):
        groups = assign(model, get_policy("head_only")(model))
        graphdef, state = split_model(model, groups)
        optimizer = build_optimizer(groups, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
        step = make_train_step(graphdef, optimizer, donate=False, seed=7)
        opt_state = optimizer.init(state.trainable)
        images = jax.random.randint(jax.random.key(0), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
        labels = jnp.array([0, 2])
        result = []
        for index in range(2):
            state, opt_state, metrics = step(state, opt_state, images, labels, jnp.ones(2, bool), index)
            result.append(float(metrics["loss"]))
        return merge_model(graphdef, state), result

    trained, with_spec = losses(jaxtl.models.create("resnet18", num_classes=3, weights=converted))
    assert trained.weight_spec == _spec()
    plain = jaxtl.models.create("resnet18", num_classes=3, weights=converted)
    del plain.weight_spec
    _, without_spec = losses(plain)
    assert with_spec == without_spec and with_spec[1] < with_spec[0]  # the spec changes nothing the step computes
    forward = nnx.jit(lambda model, x: model(x))  # the graphdef is a static argument here: hashed and compared
    trained.eval()
    assert forward(trained, jnp.ones((1, 32, 32, 3))).shape == (1, 3)


def test_specs_hash_and_their_json_reads_files_written_before():
    spec = weights.get_weight_spec("resnet50", "IMAGENET1K_V2")
    assert hash(spec) == hash(weights.get_weight_spec("resnet50", "DEFAULT"))
    assert spec.metrics == {"acc@1": 80.858, "acc@5": 95.434} and spec.metrics["acc@1"] == 80.858
    document = json.loads(json.dumps(spec.to_json()))
    assert document["metrics"] == {"acc@1": 80.858, "acc@5": 95.434}
    assert weights.WeightSpec.from_json(document) == spec
    # A spec.json written before specs were hashable: dataclasses.asdict of the spec, metrics a dict.
    written_before = {
        "arch": "resnet18", "name": "IMAGENET1K_V1",
        "source": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "num_classes": 1000, "sha256_prefix": "f37072fd", "sha256": None, "categories": ["tench", "goldfish"],
        "preprocessing": {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "antialias": True},
        "num_params": 11689512, "metrics": {"acc@1": 69.758, "acc@5": 89.078},
    }  # fmt: skip
    read = weights.WeightSpec.from_json(written_before)
    expected = dataclasses.replace(weights.get_weight_spec("resnet18", "DEFAULT"), categories=("tench", "goldfish"))
    assert read == expected and hash(read) == hash(expected)
    assert json.loads(json.dumps(read.to_json())) == written_before
