"""Every converted ResNet computes what torchvision computes (DESIGN.md numerics contract).

Random-init torchvision models with randomised BN affine parameters and running statistics, at a
square and an odd non-square input size: eval logits, train-mode logits and BN running-stat
updates, gradients of every parameter, and the export round trip.
"""

import pytest
import torch

from convert.parity import check_parity
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import from_torchvision

QUICK = {("resnet18", (97, 131)), ("resnet18", (64, 64)), ("resnet50", (97, 131))}
ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
CASES = [
    pytest.param(arch, size, marks=() if (arch, size) in QUICK else pytest.mark.slow, id=f"{arch}-{size[0]}x{size[1]}")
    for arch in ARCHS
    for size in [(97, 131), (64, 64)]
]


@pytest.mark.parametrize("arch, size", CASES)
def test_converted_model_matches_torchvision(arch, size):
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0)
    jax_model = from_torchvision(torch_model, arch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=generator)
    labels = torch.randint(0, 10, (2,), generator=generator)
    report = check_parity(torch_model, jax_model, arch, x, labels)
    assert report.passed, report.format()
    # Gradients are compared in float64 (see check_parity): far inside the contract's 1e-4.
    assert report.worst("gradients").rel_l2 < 1e-9, report.format()
    # Every parameter and every BN statistic took part.
    assert sum(c.check == "gradients" for c in report.comparisons) == len(list(torch_model.parameters()))
    bn_count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
    assert sum(c.check == "running stats" for c in report.comparisons) == 2 * bn_count
