"""ConvNeXt converted from torchvision computes what torchvision computes, and converts back exactly.

Random-init torchvision ConvNeXts with randomised LayerNorm affine parameters and layer_scale (convert.random_models:
at torchvision's init of 1e-6 every block would be an identity) at an odd input size, which the stride-4 stem and
stride-2 downsamples floor as torch does: eval and train logits (stochastic depth off on both sides), float64
gradients of every parameter, the export round trip; the keys, shapes and settings of the large variants against
torchvision's model built on the meta device; the architecture inferred from a state_dict; and the recipe's
progressive unfreezing, 20 AdamW steps in PyTorch and in jaxtl.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from archs import LARGE_ARCHS, by_family, parity_params
from flax import nnx

import jaxtl.models
from convert import from_torchvision, infer_arch, to_torchvision
from convert.parity import TOLERANCES, check_parity, first_divergence, to_nhwc, torch_intermediates
from convert.random_models import randomized_torchvision_model
from convert.train_parity import create_training_pair, run_training_parity, torch_blocks
from jaxtl.models.convnext import CNBlock
from jaxtl.models.layers import LayerNorm
from jaxtl.models.names import dotted_name
from jaxtl.models.state_dict import torch_permutations

CONVNEXTS = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]
QUICK = {"convnext_tiny"}
# The largest members: float64 gradients left out (check_parity(gradients=False)); their blocks are those of the
# smaller members whose gradients are compared, and their float64 copies take 10 GB and more.
NO_GRADIENTS = {"convnext_small", "convnext_base", "convnext_large"}


CASES = parity_params([(arch,) for arch in CONVNEXTS], quick={(arch,) for arch in QUICK}, no_gradients=NO_GRADIENTS)


@pytest.mark.parametrize("arch, gradients", CASES)
def test_converted_model_matches_torchvision(arch, gradients, request):
    if arch in LARGE_ARCHS:
        request.getfixturevalue("memory_heavy")
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0)
    jax_model = from_torchvision(torch_model, arch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 35, 45, generator=generator)  # features 8x11, 4x5, 2x2, 1x1: every stride floors
    labels = torch.randint(0, 10, (2,), generator=generator)
    report = check_parity(torch_model, jax_model, arch, x, labels, gradients=gradients)
    assert report.passed, report.format()
    if gradients:
        assert report.worst("gradients").rel_l2 < 1e-9, report.format()
        assert sum(c.check == "gradients" for c in report.comparisons) == len(list(torch_model.parameters()))
    # The random model is a meaningful test: branches of order one, logits of order one.
    with torch.no_grad():
        logits = torch_model(x)
    assert 0.3 < float(logits.std()) < 3
    scales = [m.layer_scale for m in torch_model.modules() if isinstance(m, torchvision.models.convnext.CNBlock)]
    assert min(float(s.detach().min()) for s in scales) >= 0.1


@pytest.mark.parametrize("arch", by_family(CONVNEXTS))
def test_keys_shapes_and_settings_equal_torchvision(arch):
    """Every variant, large ones included, as abstract models against torchvision's on the meta device."""
    with torch.device("meta"):
        torch_model = torchvision.models.get_model(arch, weights=None, num_classes=7)
    model = jaxtl.models.abstract_model(arch, num_classes=7)
    permutations = torch_permutations(model)
    ours = {dotted_name(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert ours.keys() == theirs.keys()
    for key, shape in theirs.items():
        expected = tuple(shape[i] for i in permutations[key]) if key in permutations else shape
        assert ours[key] == expected, key
    assert "features.1.0.layer_scale" in ours and ours["features.1.0.layer_scale"] == theirs["features.1.0.layer_scale"]
    # Stochastic depth per block and LayerNorm eps, module by module.
    ours_sd = [m.stochastic_depth.p for _, m in nnx.iter_modules(model) if isinstance(m, CNBlock)]
    theirs_sd = [
        m.stochastic_depth.p for m in torch_model.modules() if isinstance(m, torchvision.models.convnext.CNBlock)
    ]
    assert ours_sd == theirs_sd
    norms = {dotted_name(p): m.eps for p, m in nnx.iter_modules(model) if isinstance(m, LayerNorm)}
    assert norms == {n: m.eps for n, m in torch_model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    # The recipe's head and last block, read off the torchvision module, are jaxtl's head and last stage.
    blocks = torch_blocks(torch_model)
    assert blocks["head"] == (model.head_name,)
    assert tuple(f"{name}." for name in blocks["last_block"]) == model.blocks()[-2][1]


@pytest.mark.parametrize(
    "arch, num_classes",
    [("convnext_tiny", 10), *(pytest.param(a, 1000, marks=pytest.mark.slow) for a in CONVNEXTS[1:])],
)
def test_architecture_is_inferred_from_keys_and_shapes(arch, num_classes):
    torch_model = torchvision.models.get_model(arch, num_classes=num_classes)
    assert infer_arch(torch_model.state_dict()) == arch
    model = from_torchvision(torch_model)
    assert model.num_classes == num_classes and model.head_name == "classifier.2"


def test_export_round_trip_is_exact():
    torch_model = randomized_torchvision_model("convnext_tiny", num_classes=3, seed=2)
    model = from_torchvision(torch_model, "convnext_tiny")
    exported = to_torchvision(model)
    assert set(exported) == set(torch_model.state_dict())
    fresh = torchvision.models.convnext_tiny(num_classes=3)
    fresh.load_state_dict(exported, strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert exported["features.1.0.layer_scale"].shape == (96, 1, 1)


@pytest.mark.slow
def test_intermediates_are_torchvisions_module_outputs():
    """forward_intermediates names torchvision modules (their hooks locate a divergence) and matches their outputs."""
    torch_model = randomized_torchvision_model("convnext_tiny", num_classes=3, seed=3)
    model = from_torchvision(torch_model, "convnext_tiny")
    model.eval()
    x = torch.randn(2, 3, 33, 41, generator=torch.Generator().manual_seed(4))
    x_nhwc = jnp.asarray(to_nhwc(x))
    names = []  # in forward order (a jitted dict comes back sorted)
    nnx.eval_shape(lambda model, x: names.extend(model.forward_intermediates(x)), model, x_nhwc)
    assert names == [f"features.{i}" for i in range(8)] + ["avgpool", "classifier.0", "classifier"]
    with jax.default_matmul_precision("highest"):
        actual = nnx.jit(lambda model, x: model.forward_intermediates(x))(model, x_nhwc)
    expected = torch_intermediates(torch_model.eval(), x, names)
    assert first_divergence(expected, actual, TOLERANCES["eval logits"])[0].startswith("no stage diverges")


@pytest.mark.slow
def test_progressive_unfreezing_matches_pytorch_step_for_step():
    """The recipe's progressive unfreezing of ConvNeXt-Tiny: head, then + the last stage and classifier.0, then all;
    20 AdamW steps at 32x32 (2-4 minutes on 2 cores). Measured in float32: losses within 2e-6, parameters 2e-5."""
    report = run_training_parity("convnext_tiny", "progressive_unfreezing", batch=2, size=(32, 32))
    assert report.passed, report.format()
    assert report.dtype == "float32" and len(report.of("loss")) == 20
    torch_model, _ = create_training_pair("convnext_tiny")
    assert len(report.of("parameters")) == len(list(torch_model.parameters()))
    assert not report.of("running stats")  # no BatchNorm
    frozen_torch = {c.name for c in report.of("frozen torch")}
    assert frozen_torch == {c.name for c in report.of("frozen jaxtl")} and frozen_torch
    assert all(c.passed for c in report.of("frozen torch") + report.of("frozen jaxtl"))
    # Phase 1 holds the whole backbone, phase 2 all but the last stage and classifier.0.
    phase2 = {c.name.removeprefix("phase 2: ") for c in report.of("frozen torch") if c.name.startswith("phase 2: ")}
    assert "features.5.8.layer_scale" in phase2 and not any(
        n.startswith(("features.7.", "classifier.")) for n in phase2
    )
    changed = {c.name for c in report.of("updates")}
    assert {"classifier.2.weight", "classifier.2.bias", "classifier.0.weight", "features.0.0.weight"} <= changed
    assert np.isfinite([loss for pair in report.losses for loss in pair]).all()
