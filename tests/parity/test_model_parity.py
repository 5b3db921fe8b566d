"""Every converted model computes what torchvision computes (the numerics contract, docs/numerics.md).

Random-init torchvision models with randomised BN affine parameters and running statistics, at a
square and an odd non-square input size: eval logits, train-mode logits and BN running-stat
updates (dropout and stochastic depth off on both sides), gradients of every parameter, and the
export round trip.
"""

import pytest
import torch
import torchvision
from archs import LARGE_ARCHS, by_family, parity_params
from flax import nnx

import jaxtl.models
from convert.parity import check_parity
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import from_torchvision
from jaxtl.models.layers import BatchNorm2d

RESNETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip
EFFICIENTNETS = [f"efficientnet_b{i}" for i in range(8)] + [f"efficientnet_v2_{s}" for s in "sml"]
MOBILENETS = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
# Every ResNet at a square size, and one of each block kind (basic: resnet18, bottleneck v1.5:
# resnet50) also at an odd non-square one: the stem, pool and strided convs and downsamples that
# odd sizes exercise are the same layers in every ResNet. (The deep and grouped ones at 97x131 cost
# 2-20 minutes each on 2 cores, where XLA's grouped convolutions are slow.) Every EfficientNet at
# one small odd size. V2-S and V2-L run at 57x71: at 33x41 their last stages normalise over 8
# values per channel in train mode, where float32 rounding alone moves V2-L's logits by ~1e-5.
# MobileNetV3 at 33x41 too; MobileNetV2 at 57x71: at 33x41 torch's own float32 train-mode logits are
# 4e-6 (relative) from its float64 ones, and jaxtl's from torch's as much, too near the bound.
QUICK = {("resnet18", (97, 131)), ("efficientnet_b0", (57, 71)), ("mobilenet_v3_large", (33, 41))}
SIZES = {arch: [(64, 64)] for arch in RESNETS}
SIZES |= {arch: [(97, 131), (64, 64)] for arch in ("resnet18", "resnet50")}
SIZES |= {arch: [(33, 41)] for arch in EFFICIENTNETS}
SIZES |= {arch: [(57, 71)] for arch in ("efficientnet_b0", "efficientnet_v2_s", "efficientnet_v2_l")}
SIZES |= {"mobilenet_v2": [(57, 71)], "mobilenet_v3_large": [(33, 41)], "mobilenet_v3_small": [(33, 41)]}
# Float64 gradients are compared on one member of each block kind: ResNet-18 (basic blocks, at both sizes), ResNet-50
# at its odd size (bottleneck v1.5), ResNeXt-50 (grouped), EfficientNet-B0 (MBConv), V2-S (FusedMBConv) and every
# MobileNet. The others are built of the same blocks at other widths and depths: they compare logits in both modes,
# running statistics and export. The largest members' float64 copies took most of the suite's memory and a fifth
# of its time; a gradient's compile is 55-65% of such a test.
NO_GRADIENTS = {
    "resnet34", ("resnet50", (64, 64)), "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l",
}  # fmt: skip
CASES = parity_params(
    [(arch, size) for arch, sizes in SIZES.items() for size in sizes], quick=QUICK, no_gradients=NO_GRADIENTS
)


@pytest.mark.parametrize("arch, size, gradients", CASES)
def test_converted_model_matches_torchvision(arch, size, gradients, request):
    if arch in LARGE_ARCHS:
        request.getfixturevalue("memory_heavy")
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0)
    jax_model = from_torchvision(torch_model, arch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=generator)
    labels = torch.randint(0, 10, (2,), generator=generator)
    report = check_parity(torch_model, jax_model, arch, x, labels, gradients=gradients)
    assert report.passed, report.format()
    if gradients:
        # Gradients are compared in float64 (see check_parity): far inside the contract's 1e-4.
        assert report.worst("gradients").rel_l2 < 1e-9, report.format()
        # Every parameter took part.
        assert sum(c.check == "gradients" for c in report.comparisons) == len(list(torch_model.parameters()))
    # Every BN statistic took part.
    bn_count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
    assert sum(c.check == "running stats" for c in report.comparisons) == 2 * bn_count


@pytest.mark.parametrize("arch", by_family(RESNETS + EFFICIENTNETS + MOBILENETS))
def test_batch_norm_eps_and_momentum_are_torchvisions(arch):
    torch_model = torchvision.models.get_model(arch, weights=None)
    jax_model = jaxtl.models.abstract_model(arch)
    jax_norms = {".".join(map(str, path)): m for path, m in nnx.iter_modules(jax_model) if isinstance(m, BatchNorm2d)}
    torch_norms = {n: m for n, m in torch_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert jax_norms.keys() == torch_norms.keys()
    for name, bn in torch_norms.items():
        assert (jax_norms[name].eps, jax_norms[name].momentum) == (bn.eps, bn.momentum), name
