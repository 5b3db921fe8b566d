"""A parity failure names the first stage where the models part, and the tensor that differs."""

import pytest
import torch

from convert.parity import check_parity
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import from_torchvision


@pytest.fixture(scope="module")
def pair():
    torch_model = randomized_torchvision_model("resnet18", num_classes=10, seed=3)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 10, (2,), generator=generator)
    return torch_model, x, labels


@pytest.mark.slow
def test_a_wrong_running_variance_is_located_in_its_stage(pair):
    torch_model, x, labels = pair
    jax_model = from_torchvision(torch_model, "resnet18")
    bn = jax_model.layer3[1].bn1
    bn.running_var[...] = bn.running_var[...] * 1.5
    report = check_parity(torch_model, jax_model, "resnet18", x, labels)
    assert not report.passed
    # Eval logits go wrong from layer3 on; the export carries the wrong value to torch; the
    # running variance is still wrong after a train-mode update. Nothing else.
    assert [(c.check, c.name) for c in report.failures] == [
        ("eval logits", "logits"),
        ("running stats", "layer3.1.bn1.running_var"),
        ("export logits", "logits"),
    ]
    text = report.format()
    assert "first diverging stage: layer3" in text, text
    assert "layer2" in text and "first diverging stage: layer2" not in text


def test_a_flax_style_momentum_is_caught_in_the_running_statistics(pair):
    # PITFALL 5: torch's momentum 0.1 is flax's 0.9; an eval-only check never sees this.
    torch_model, x, labels = pair
    jax_model = from_torchvision(torch_model, "resnet18")
    jax_model.layer2[0].bn2.momentum = 0.9
    report = check_parity(torch_model, jax_model, "resnet18", x, labels)
    failed = {c.name for c in report.failures}
    assert failed == {"layer2.0.bn2.running_mean", "layer2.0.bn2.running_var"}, report.format()
