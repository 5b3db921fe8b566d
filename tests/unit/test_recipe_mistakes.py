"""The recipe's common mistakes (docs/recipe.md, "Common mistakes") that no other test answers.

The others are answered elsewhere: everything frozen (tests/unit/test_optim.py
test_everything_frozen_is_an_error), frozen parameters trained by accident (test_optim.py: no
optimizer state, no backward; tests/parity/test_training_parity.py: bit-identical in both
frameworks), the head replaced with the data's width (tests/unit/test_weights.py), class order
travelling with the checkpoint (tests/e2e/test_train.py), the eval transform equal to the weights'
own (tests/parity/test_data_parity.py).
"""

from pathlib import Path

import pytest

import jaxtl.models
from jaxtl.config import ConfigError, load_config
from jaxtl.optim import Rule, assign

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("override", ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]", "data.normalize=false"])
def test_normalisation_comes_from_the_weights_and_cannot_be_set_apart(override):
    # Wrong normalisation: there is no key for it; the preprocessing travels with the weights.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) {key}"):
        load_config(QUICKSTART, [override])


def test_batch_norm_policy_of_every_group_is_in_the_summary():
    # Ignoring BatchNorm behaviour: each group's policy is explicit and printed, including a
    # trainable block whose BatchNorm is held in eval mode.
    model = jaxtl.models.abstract_model("resnet18", num_classes=5)
    rules = [
        Rule("fc.*", group="head"),
        Rule("layer4.*", group="blocks", lr=3e-5, bn="frozen"),
        Rule("layer3.*", group="layer3", lr=1e-5),
        Rule("*", group="rest", frozen=True),
    ]
    lines = {line.split()[0]: line.split() for line in assign(model, rules).summary().splitlines()[2:]}
    # columns: group, tensors, params, lr, wd, bn, parameters
    assert {name: columns[5] for name, columns in lines.items()} == {
        "head": "-",  # no BatchNorm in the head
        "blocks": "frozen",
        "layer3": "train",
        "rest": "frozen",
    }
