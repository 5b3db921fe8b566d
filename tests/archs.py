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
