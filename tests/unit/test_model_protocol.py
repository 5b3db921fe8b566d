"""The Classifier contract (every architecture keeps it, policies name what a model lacks) and dotted names."""

import pytest
from archs import by_family
from flax import nnx

import jaxtl.models
from jaxtl.models import Classifier
from jaxtl.models.layers import Linear
from jaxtl.models.names import collapse_names, dotted_name
from jaxtl.models.protocol import missing_members
from jaxtl.optim import ParamGroupError, get_policy


@pytest.mark.parametrize("arch", by_family(jaxtl.models.list_models()))
def test_every_architecture_keeps_the_contract(arch):
    model = jaxtl.models.abstract_model(arch, num_classes=7)
    assert isinstance(model, Classifier)
    assert missing_members(model) == []
    assert model.num_classes == 7
    blocks = list(model.blocks())
    assert [name for name, _ in blocks][0] == "stem" and blocks[-1][0] == "head"
    assert len({name for name, _ in blocks}) == len(blocks)
    assert all(prefix.startswith(f"{model.head_name}.") for prefix in blocks[-1][1])
    prefixes = [prefix for _, group in blocks for prefix in group]
    names = [dotted_name(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    # A module's prefix ends in a dot; a parameter held directly by the model (ViT's class_token) is its whole name.
    assert all(prefix.endswith(".") or prefix in names for prefix in prefixes)
    covering = {name: [p for p in prefixes if name.startswith(p)] for name in names}
    assert {name: found for name, found in covering.items() if len(found) != 1} == {}
    assert all(any(name.startswith(p) for name in names) for p in prefixes)  # no prefix matches nothing


class Headless(nnx.Module):
    """A linear model with a head but no blocks()."""

    head_name = "fc"

    def __init__(self):
        self.fc = Linear(3, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.fc(x)


def test_a_model_without_blocks_is_one_error_naming_it():
    model = Headless()
    assert not isinstance(model, Classifier)
    assert missing_members(model) == ["num_classes", "blocks()", "forward_features()"]
    message = r"Headless lacks blocks\(\) of the jaxtl.models.Classifier contract"
    policies = ("head_only", "last_n_blocks:1", "full", "discriminative", "layerwise_lr_decay", "bitfit", "norm_only")
    for policy in policies:
        with pytest.raises(ParamGroupError, match=message):
            get_policy(policy)(model)


def test_missing_members_names_attributes_and_methods():
    assert missing_members(object(), ("head_name", "blocks")) == ["head_name", "blocks()"]
    with pytest.raises(ValueError, match="not members of the Classifier contract: stem"):
        missing_members(object(), ("stem",))


def test_dotted_names_and_their_collapse():
    assert dotted_name(("layer4", 1, "conv2", "weight")) == "layer4.1.conv2.weight"
    assert dotted_name(()) == ""
    universe = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "fc.weight"]
    chosen = ["layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "fc.weight"]
    assert collapse_names(chosen, universe) == ["layer1.* (3 keys)", "fc.weight"]
    assert collapse_names(["layer1.0.bn1.weight"], universe) == ["layer1.0.bn1.weight"]
