"""The quick subset's architectures: one of each family (Swin's V1 and V2); a per-architecture test runs the others
in the full suite only (marked slow).

The tests import it as ``archs``: pytest puts tests/ (the folder of tests/conftest.py) on ``sys.path``.
"""

import pytest

QUICK_ARCHS = frozenset({
    "resnet18", "efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "densenet121", "convnext_tiny",
    "vit_b_16", "swin_t", "swin_v2_t",
})  # fmt: skip


def by_family(archs) -> list:
    """``archs`` as pytest parameters, those outside :data:`QUICK_ARCHS` marked slow."""
    return [pytest.param(arch, marks=() if arch in QUICK_ARCHS else pytest.mark.slow, id=arch) for arch in archs]


# Architectures of more than 60M parameters: their parity tests take the `memory_heavy` fixture (tests/conftest.py),
# so that two of them never run at once in the test workers.
LARGE_ARCHS = frozenset({
    "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "efficientnet_b7",
    "efficientnet_v2_l", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf", "regnet_x_32gf", "convnext_base",
    "convnext_large", "vit_l_16", "vit_l_32", "vit_h_14", "swin_b", "swin_v2_b",
})  # fmt: skip


# The quick subset compares float64 gradients of a whole model on ResNet-18 alone: for the other families their
# compile is 55-65% of the parity test (ConvNeXt-T 15 s against 6 s without), and the full suite compares them.
QUICK_GRADIENTS = frozenset({"resnet18"})


def parity_params(cases, *, quick, no_gradients) -> list:
    """pytest parameters ``(*case, gradients)`` of a family's parity test.

    ``cases`` are tuples of the architecture and then its input size, if the test takes one; ``quick`` holds the cases
    of the quick subset, ``no_gradients`` the architectures or cases compared without float64 gradients. A quick case
    of an architecture outside :data:`QUICK_GRADIENTS` runs twice: without gradients in the quick subset, with them
    (id suffix ``-float64-gradients``) in the full suite.
    """
    params = []
    for case in cases:
        name = "-".join(str(part) if not isinstance(part, tuple) else "x".join(map(str, part)) for part in case)
        gradients = case[0] not in no_gradients and case not in no_gradients
        if case in quick and gradients and case[0] not in QUICK_GRADIENTS:
            params.append(pytest.param(*case, False, id=name))
            params.append(pytest.param(*case, True, marks=pytest.mark.slow, id=f"{name}-float64-gradients"))
        else:
            params.append(pytest.param(*case, gradients, marks=() if case in quick else pytest.mark.slow, id=name))
    return params
