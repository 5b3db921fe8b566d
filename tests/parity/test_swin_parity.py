"""Swin Transformers converted from torchvision compute what torchvision computes, and convert back exactly.

Random-init torchvision Swins (convert.random_models: random LayerNorm affine parameters and Linear biases, V2's
key bias included, which V2 ignores; a relative position bias table of order one; V2 logit scales on both sides
of the log(100) clamp; V2's post-norm branch ends small) at input sizes whose feature maps are no multiple of
the window, so that every attention call pads, shifted windows are masked, and later stages (a window larger
than the map) drop the shift, as torchvision decides per call: eval and train logits (stochastic depth off on
both sides), float64 gradients of every parameter, the export round trip with torchvision's buffers
(relative_position_index, V2's relative_coords_table), strict. The keys, shapes and settings of every variant
against torchvision's model built on the meta device; the buffers against torchvision's own; the architecture
inferred from a state_dict; the recipe's progressive unfreezing, 20 AdamW steps in PyTorch and in jaxtl.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from archs import LARGE_ARCHS, by_family, parity_params
from flax import nnx
from torchvision.models import swin_transformer as tv_swin

import jaxtl.models
from convert import from_torchvision, infer_arch, to_torchvision, torchvision_state
from convert.parity import TOLERANCES, check_parity, compare, first_divergence, to_nhwc, torch_intermediates
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import check_torch_buffers, torch_buffers
from convert.train_parity import create_training_pair, run_training_parity, torch_blocks
from jaxtl.errors import WeightsMismatchError
from jaxtl.models.layers import LayerNorm
from jaxtl.models.names import dotted_name
from jaxtl.models.state_dict import torch_permutations
from jaxtl.models.swin import SwinTransformerBlock
from jaxtl.models.swin_attention import relative_coords_table, relative_position_index

SWINS = ["swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"]
# 32x40: maps 8x10, 4x5, 2x3, 1x2. Window 7: stage 1 pads to 14x14 and shifts (masked), the rest fit one window
# (no shift); window 8: stage 1 pads to 8x16, shifting along W only (a zero shift in torchvision's mask slices).
# 64x72: maps 16x18 and 8x9, both padded and shifted, for either window. Patch merging pads every odd side.
QUICK = {("swin_t", (32, 40))}
# Float64 gradients for Swin-T and V2-T at 32x40, where stage 1 pads, shifts and masks its windows: the larger
# members are built of the same blocks (and their float64 copies take 10 GB and more); at 64x72 the same blocks
# pad and shift more windows (check_parity(gradients=False)).
NO_GRADIENTS = {"swin_s", "swin_b", "swin_v2_s", "swin_v2_b", ("swin_t", (64, 72)), ("swin_v2_t", (64, 72))}
SIZES = {arch: [(32, 40)] for arch in SWINS} | {"swin_t": [(32, 40), (64, 72)], "swin_v2_t": [(32, 40), (64, 72)]}
CASES = parity_params(
    [(arch, size) for arch, sizes in SIZES.items() for size in sizes], quick=QUICK, no_gradients=NO_GRADIENTS
)


@pytest.mark.parametrize("arch, size, gradients", CASES)
def test_converted_model_matches_torchvision(arch, size, gradients, request):
    if arch in LARGE_ARCHS:
        request.getfixturevalue("memory_heavy")
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0, calibration_shape=size)
    jax_model = from_torchvision(torch_model, arch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=generator)
    labels = torch.randint(0, 10, (2,), generator=generator)
    report = check_parity(torch_model, jax_model, arch, x, labels, gradients=gradients)
    assert report.passed, report.format()
    if gradients:
        assert report.worst("gradients").rel_l2 < 1e-9, report.format()
        assert sum(c.check == "gradients" for c in report.comparisons) == len(list(torch_model.parameters()))
    assert not report.of("running stats")  # no BatchNorm
    with torch.no_grad():  # the random model is a meaningful test: logits of order one
        assert 0.3 < float(torch_model(x).std()) < 3


@pytest.mark.slow
def test_intermediates_are_torchvisions_activations():
    """forward_intermediates against torchvision's module outputs, read with hooks in their own layout: Swin's
    ``features.i`` and ``norm`` are channels-last in torchvision too, ``permute`` onwards NCHW or pooled."""
    torch_model = randomized_torchvision_model("swin_v2_t", num_classes=10, seed=0).eval()
    model = from_torchvision(torch_model, "swin_v2_t")
    model.eval()
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(3))
    ours = nnx.jit(lambda model, x: model.forward_intermediates(x))(model, jnp.asarray(to_nhwc(x)))
    captured = {}
    hooks = [
        torch_model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output.detach().numpy().copy())
        )
        for name in ours
    ]
    with torch.no_grad():
        torch_model(x)
    for hook in hooks:
        hook.remove()
    for name, value in ours.items():
        expected = captured[name]
        if name in ("permute", "avgpool"):  # NCHW, and (N, C, 1, 1)
            expected = np.transpose(expected, (0, 2, 3, 1)).reshape(np.shape(value))
        result = compare("eval logits", name, expected, np.asarray(value))
        assert result.passed, result
    # convert.parity's divergence locator reads them in the same layouts, as the model's torch_channels_last says.
    located = torch_intermediates(torch_model, x, list(ours), model.torch_channels_last)
    assert first_divergence(located, ours, TOLERANCES["eval logits"])[0].startswith("no stage diverges")


@pytest.mark.parametrize("arch", by_family(SWINS))
def test_keys_shapes_and_settings_equal_torchvision(arch):
    """Every variant as an abstract model against torchvision's on the meta device, buffers included."""
    with torch.device("meta"):
        torch_model = torchvision.models.get_model(arch, weights=None, num_classes=7)
    model = jaxtl.models.abstract_model(arch, num_classes=7)
    permutations = torch_permutations(model)
    ours = {dotted_name(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    buffers = torch_buffers(model)
    theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert not ours.keys() & buffers.keys()  # constants, never nnx Variables
    assert ours.keys() | buffers.keys() == theirs.keys()
    for key, shape in theirs.items():
        if key in buffers:
            assert buffers[key].shape == shape, key
            continue
        expected = tuple(shape[i] for i in permutations[key]) if key in permutations else shape
        assert ours[key] == expected, key
    swin_blocks = (tv_swin.SwinTransformerBlock, tv_swin.SwinTransformerBlockV2)
    torch_blocks_ = [m for m in torch_model.modules() if isinstance(m, swin_blocks)]
    jax_blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, SwinTransformerBlock)]
    assert [b.stochastic_depth.p for b in jax_blocks] == [b.stochastic_depth.p for b in torch_blocks_]
    assert [b.attn.shift_size for b in jax_blocks] == [tuple(b.attn.shift_size) for b in torch_blocks_]
    assert [b.attn.window_size for b in jax_blocks] == [tuple(b.attn.window_size) for b in torch_blocks_]
    assert [type(b).__name__ for b in jax_blocks] == [type(b).__name__ for b in torch_blocks_]
    norms = {dotted_name(p): m.eps for p, m in nnx.iter_modules(model) if isinstance(m, LayerNorm)}
    assert norms == {n: m.eps for n, m in torch_model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    blocks = torch_blocks(torch_model)  # the recipe's head and last block are jaxtl's head and last stage
    assert blocks["head"] == (model.head_name,)
    assert tuple(f"{name}." for name in blocks["last_block"]) == model.blocks()[-2][1]


@pytest.mark.parametrize("window", [(7, 7), (8, 8), (5, 9), (12, 12)])
def test_buffers_equal_torchvisions_bit_for_bit(window):
    v1 = tv_swin.ShiftedWindowAttention(16, list(window), [0, 0], 2)
    v2 = tv_swin.ShiftedWindowAttentionV2(16, list(window), [0, 0], 2)
    index = relative_position_index(window)
    assert index.dtype == np.int64 and np.array_equal(index, v1.relative_position_index.numpy())
    assert np.array_equal(index, v2.relative_position_index.numpy())
    table = relative_coords_table(window)
    assert table.dtype == np.float32 and np.array_equal(table, v2.relative_coords_table.numpy())


@pytest.fixture(scope="module")
def random_swin_t():
    return randomized_torchvision_model("swin_t", num_classes=3, seed=2)


def test_export_round_trip_is_exact_with_torchvisions_buffers(random_swin_t):
    model = from_torchvision(random_swin_t, "swin_t")
    exported = to_torchvision(model)
    assert set(exported) == set(random_swin_t.state_dict())
    assert exported["features.1.0.attn.relative_position_index"].dtype == torch.int64
    fresh = torchvision.models.swin_t(num_classes=3)
    fresh.load_state_dict(exported, strict=True)
    for key, value in random_swin_t.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_buffer_of_another_window_is_refused(random_swin_t):
    state = dict(random_swin_t.state_dict())
    key = "features.3.1.attn.relative_position_index"
    state[key] = torch.flip(state[key], (0,))
    with pytest.raises(WeightsMismatchError, match="1 buffers differ") as info:
        from_torchvision(state, "swin_t")
    assert info.value.mismatched[0].startswith(key)
    del state[key]  # an absent buffer is a constant the model has already
    assert from_torchvision(state, "swin_t").num_classes == 3
    check_torch_buffers(jaxtl.models.abstract_model("swin_t", num_classes=3), random_swin_t.state_dict(), source="-")


@pytest.mark.parametrize("arch", ["swin_t", "swin_v2_t"])
def test_the_swin_variants_are_told_apart(arch, monkeypatch):
    """infer_arch over the Swins alone (the whole registry before them takes ~20 s to build): V1 and V2 keys
    differ (a bias table or cpb_mlp and logit_scale), and T from S and B by depth and width."""
    monkeypatch.setattr(torchvision_state, "list_models", lambda: [a for a in jaxtl.models.list_models() if a in SWINS])
    torch_model = torchvision.models.get_model(arch, num_classes=10)
    assert infer_arch(torch_model.state_dict()) == arch


@pytest.mark.slow
@pytest.mark.parametrize("arch, num_classes", [(a, 10 if a.endswith("_t") else 1000) for a in SWINS])
def test_architecture_is_inferred_from_keys_and_shapes(arch, num_classes):
    torch_model = torchvision.models.get_model(arch, num_classes=num_classes)
    assert infer_arch(torch_model.state_dict()) == arch
    model = from_torchvision(torch_model)
    assert model.num_classes == num_classes and model.head_name == "head"


@pytest.mark.slow
def test_progressive_unfreezing_matches_pytorch_step_for_step():
    """The recipe's progressive unfreezing of Swin-T: head, then + the last stage and the final norm, then all;
    20 AdamW steps on (4, 3, 32, 40) (2 to 4 minutes on 2 shared cores). Measured in float32: losses within
    4e-6, parameters 2e-6, eval logits 6e-6 (relative)."""
    report = run_training_parity("swin_t", "progressive_unfreezing", batch=4, size=(32, 40))
    assert report.passed, report.format()
    assert report.dtype == "float32" and len(report.of("loss")) == 20
    torch_model, _ = create_training_pair("swin_t")
    assert len(report.of("parameters")) == len(list(torch_model.parameters()))
    assert not report.of("running stats")  # no BatchNorm
    frozen_torch = {c.name for c in report.of("frozen torch")}
    assert frozen_torch == {c.name for c in report.of("frozen jaxtl")} and frozen_torch
    assert all(c.passed for c in report.of("frozen torch") + report.of("frozen jaxtl"))
    # Phase 2 holds all but the last stage and the final norm (features.6, the last patch merging, included).
    phase2 = {c.name.removeprefix("phase 2: ") for c in report.of("frozen torch") if c.name.startswith("phase 2: ")}
    assert "features.6.reduction.weight" in phase2 and not any(n.startswith(("features.7.", "norm.")) for n in phase2)
    changed = {c.name for c in report.of("updates")}
    assert {"head.weight", "norm.weight", "features.7.1.attn.relative_position_bias_table"} <= changed
    assert "features.0.0.weight" in changed
    assert np.isfinite([loss for pair in report.losses for loss in pair]).all()
