"""RegNet and DenseNet compute what torchvision's compute; their widths, keys, shapes and init are torchvision's.

Parity as tests/parity/test_model_parity.py checks it (random-init torchvision models with randomised BatchNorm
statistics; eval and train logits, running statistics, float64 gradients, export), at one small odd size per
family: RegNets at 33x41 (a 2x2 map in the last stage), DenseNets at 97x105. At 35x41 DenseNet's last block
runs on a 1x1 map, where train-mode BatchNorm normalises 2 values per channel (the batch): the logits then
hang on float32 rounding (torch's and jaxtl's differ by 1e-1). At 67x75 (2x2) DenseNet-161's train-mode logits
still differ by 7e-6 (relative), too near the bound of 1e-5; at 97x105 (3x3) by 3.5e-6.
regnet_y_128gf (2.6 GB of float32 parameters) is only ever built with shapes.
"""

from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from archs import LARGE_ARCHS, by_family, parity_params
from flax import nnx
from torchvision.models.regnet import BlockParams

import jaxtl.models
from convert import from_torchvision, infer_arch, to_torchvision
from convert.parity import check_parity
from convert.random_models import randomized_torchvision_model
from jaxtl.models.layers import BatchNorm2d
from jaxtl.models.names import dotted_name
from jaxtl.models.regnet import regnet_params
from jaxtl.models.state_dict import torch_permutations

REGNETS = [f"regnet_x_{size}" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")]
REGNETS += [f"regnet_y_{size}" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")]
DENSENETS = ["densenet121", "densenet161", "densenet169", "densenet201"]
SHAPES_ONLY = {"regnet_y_128gf"}
# RegNetY-400MF: the squeeze-excitation path too, and faster than RegNetX-400MF (16 blocks, not 22).
QUICK = {("regnet_y_400mf", (33, 41)), ("densenet121", (97, 105))}
SIZES = {arch: (33, 41) for arch in REGNETS if arch not in SHAPES_ONLY} | {arch: (97, 105) for arch in DENSENETS}
# Float64 gradients on one member of each block kind (RegNetX-400MF, RegNetY-400MF with squeeze-excitation,
# DenseNet-121): the others are built of the same blocks at other widths, group widths and depths, and compare
# logits, running statistics and export (check_parity(gradients=False)).
NO_GRADIENTS = {arch for arch in REGNETS + DENSENETS if arch not in ("regnet_x_400mf", "regnet_y_400mf", "densenet121")}
CASES = parity_params(SIZES.items(), quick=QUICK, no_gradients=NO_GRADIENTS)


def torchvision_meta_model(arch: str, num_classes: int = 1000) -> torch.nn.Module:
    """torchvision's ``arch`` on the meta device: parameter shapes without memory or init.

    RegNet's builders compute the stage widths with tensors and read them back (``.tolist()``), which meta
    tensors cannot do: that step runs on the CPU.
    """
    original = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    with mock.patch.object(BlockParams, "from_init_params", classmethod(on_cpu)), torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


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
        assert report.worst("gradients").rel_l2 < 1e-9, report.format()
        assert sum(c.check == "gradients" for c in report.comparisons) == len(list(torch_model.parameters()))
    bn_count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
    assert sum(c.check == "running stats" for c in report.comparisons) == 2 * bn_count


@pytest.mark.parametrize("arch", REGNETS)
def test_stage_settings_are_torchvisions(arch):
    # The builder's arguments, read off torchvision's own call.
    with mock.patch.object(BlockParams, "from_init_params", side_effect=RuntimeError) as spy:
        with pytest.raises(RuntimeError):
            torchvision.models.get_model(arch, weights=None)
    expected = BlockParams.from_init_params(**spy.call_args.kwargs)
    params = regnet_params(arch)
    assert list(params.depths) == expected.depths and list(params.widths) == expected.widths
    assert list(params.group_widths) == expected.group_widths and list(params.strides) == expected.strides
    assert list(params.bottleneck_multipliers) == expected.bottleneck_multipliers
    assert params.se_ratio == expected.se_ratio


@pytest.mark.parametrize("arch", by_family(REGNETS + DENSENETS))
def test_keys_shapes_and_batch_norms_are_torchvisions(arch):
    torch_model = torchvision_meta_model(arch, num_classes=7)
    model = jaxtl.models.abstract_model(arch, num_classes=7)
    permutations = torch_permutations(model)
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        key, shape = dotted_name(path), variable.get_value().shape
        shapes[key] = tuple(shape[i] for i in np.argsort(permutations[key])) if key in permutations else shape
    expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == expected
    jax_norms = {dotted_name(path): m for path, m in nnx.iter_modules(model) if isinstance(m, BatchNorm2d)}
    torch_norms = {n: m for n, m in torch_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert jax_norms.keys() == torch_norms.keys()
    assert all((jax_norms[n].eps, jax_norms[n].momentum) == (bn.eps, bn.momentum) for n, bn in torch_norms.items())


@pytest.mark.parametrize("arch", ["regnet_y_400mf", "densenet121"])
def test_random_init_is_torchvisions(arch):
    torch.manual_seed(0)
    reference = {k: v.numpy() for k, v in torchvision.models.get_model(arch, num_classes=10).state_dict().items()}
    model = jaxtl.models.create(arch, num_classes=10, seed=0)
    permutations = torch_permutations(model)
    compared = 0
    for key, value in jaxtl.models.state_dict(model).items():
        expected = reference[key]
        value = np.transpose(value, np.argsort(permutations[key])) if key in permutations else value
        if np.all(expected == expected.flat[0]):  # ones and zeros: BatchNorm, biases set to 0
            np.testing.assert_array_equal(value, expected, err_msg=key)
        elif expected.size >= 2000:  # a random draw: the same spread and centre
            assert abs(value.std() / expected.std() - 1) < 0.1, key
            assert abs(value.mean()) < 0.1 * expected.std() + 3 * expected.std() / np.sqrt(expected.size), key
            assert abs(np.abs(value).max() / np.abs(expected).max() - 1) < 0.5, key  # uniform vs normal
            compared += 1
        else:  # small random tensors (RegNetY's squeeze-excitation biases): within torch's bound
            assert np.abs(value).max() <= np.abs(expected).max() * 1.5 and np.any(value), key
    assert compared > 50


@pytest.mark.parametrize(
    "arch, num_classes",
    [("densenet121", 10)] + [pytest.param(arch, 5, marks=pytest.mark.slow) for arch in REGNETS + DENSENETS[1:]],
)
def test_architecture_is_inferred_from_keys_and_shapes(arch, num_classes):
    # Only shapes matter: uninitialised CPU tensors of the meta model's shapes (no init, no page touched).
    state = {
        k: torch.empty(v.shape, dtype=v.dtype)
        for k, v in torchvision_meta_model(arch, num_classes).state_dict().items()
    }
    assert infer_arch(state) == arch


@pytest.mark.parametrize(
    "arch", ["regnet_y_400mf", "densenet121", pytest.param("regnet_x_800mf", marks=pytest.mark.slow)]
)
def test_export_round_trip_is_exact(arch):
    torch_model = randomized_torchvision_model(arch, num_classes=3, seed=2, calibration_shape=(35, 35))
    model = from_torchvision(torch_model, arch)
    assert model.num_classes == 3
    fresh = torchvision.models.get_model(arch, num_classes=3)
    fresh.load_state_dict(to_torchvision(model), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value) or key.endswith("num_batches_tracked"), key
