"""torchvision's affine sampling grid with its multiply-adds fused, on every CPU, for the nearest-neighbour tests.

torchvision's ``_affine_grid`` is a float32 ``bmm`` of the base coordinates (x, y, 1) with the inverse matrix,
which goes to the BLAS. MKL's kernels on some CPUs fuse the products into multiply-adds, fl(fl(fl(x * a) +
y * b) + c), as jaxtl.data.augment.geometry computes the grid; on others (seen on AMD EPYC with AVX-512) they
round each product and then sum. The two grids differ in the last bit here and there, which moves a source
coordinate lying exactly on a pixel boundary to the other pixel. Where torch's grid is not fused, the
``fused_torch_grid`` fixture gives torchvision the fused grid, computed exactly (float64 holds each product and
sum exactly, then one rounding to float32); the sampling itself stays ATen's ``grid_sample``.
"""

from functools import cache

import numpy as np
import pytest
import torch
from torchvision.transforms.v2.functional import _geometry


@cache
def torch_grid_is_fused() -> bool:
    """Whether torch's float32 bmm of (x, y, 1) rows computes the fused fl(fl(fl(x * a) + y * b) + c)."""
    theta = torch.tensor([[[1.0, -0.2, 13.1], [0.0, 1.0, 0.0]]])
    computed = _geometry._affine_grid(theta.clone(), w=97, h=131, ow=97, oh=131)
    return bool(torch.equal(computed, fused_affine_grid(theta.clone(), w=97, h=131, ow=97, oh=131)))


def fused_affine_grid(theta: torch.Tensor, w: int, h: int, ow: int, oh: int) -> torch.Tensor:
    """torchvision's ``_affine_grid`` with the bmm's multiply-adds fused, in its order (x, then y, then 1)."""
    f32 = np.float32
    xs = torch.linspace((1.0 - ow) * 0.5, (ow - 1.0) * 0.5, steps=ow).numpy().astype(np.float64)[None, :]
    ys = torch.linspace((1.0 - oh) * 0.5, (oh - 1.0) * 0.5, steps=oh).numpy().astype(np.float64)[:, None]
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype))[0]
    m = rescaled.numpy().astype(np.float64)  # rows: the x, y and constant coefficients of both outputs
    axes = []
    for j in range(2):
        product = (xs * m[0, j]).astype(f32).astype(np.float64)
        partial = (ys * m[1, j] + product).astype(f32).astype(np.float64)
        axes.append((partial + m[2, j]).astype(f32))
    return torch.from_numpy(np.stack(axes, axis=-1)).reshape(1, oh, ow, 2)


@pytest.fixture(autouse=True)
def fused_torch_grid(monkeypatch):
    """torchvision's affine ops sample through the fused grid (see the module), where torch's is not fused."""
    if not torch_grid_is_fused():
        monkeypatch.setattr(_geometry, "_affine_grid", fused_affine_grid)
