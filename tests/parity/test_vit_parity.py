"""Vision Transformers compute what torchvision's compute: converted models, other image sizes, training.

torchvision builds a ViT for one image size. The registered architectures are compared at small sizes
(ViT-B/16 at 32x32: a 2x2 patch grid, the same layers with shorter position embeddings) through
check_parity, and at 224 in the slow suite; small configurations of torchvision's VisionTransformer class
cover what the large variants add (ViT-H/14's 14-pixel patches and 80-wide heads, representation_size).
A model given inputs of another patch grid must equal torchvision's model built for that size with the
state_dict that torchvision's ``interpolate_embeddings`` gives, and a state_dict made at another image size
(the SWAG end-to-end weights) must convert, infer its architecture, export and load as converted weights.
"""

import collections
import copy
import gc
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from archs import LARGE_ARCHS, by_family, parity_params
from flax import nnx
from torchvision.models.vision_transformer import interpolate_embeddings

import convert
import jaxtl.models
from convert.parity import check_parity, compare, eval_logits, to_nhwc
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import from_torchvision, infer_arch, to_torchvision, torch_to_jaxtl_layout
from convert.train_parity import run_training_parity
from jaxtl.models.state_dict import load_state_dict, state_dict, torch_permutations
from jaxtl.models.vit import VisionTransformer, interpolate_pos_embedding

# (arch, image size of the torchvision model and of the batch); the smallest grid each patch size allows is 2x2
# (1x1 for the /32 models at 32 would leave the attention nothing to mix).
# Float64 gradients on B/16 at 32 (check_parity(gradients=False) for the others): B/32 is the same encoder behind
# a patch convolution of another size, B/16 at 224 the same model as at 32, and the largest members are built of
# the same blocks (their float64 copies take 10 GB and more).
NO_GRADIENTS = {("vit_b_32", 64), ("vit_l_16", 32), ("vit_l_32", 64), ("vit_b_16", 224)}
CASES = parity_params(
    [("vit_b_16", 32), ("vit_b_32", 64), ("vit_l_16", 32), ("vit_l_32", 64), ("vit_b_16", 224)],
    quick={("vit_b_16", 32)},
    no_gradients=NO_GRADIENTS,
)
SIZES = {"vit_b_16": (224, 384), "vit_b_32": (224,), "vit_l_16": (224, 512), "vit_l_32": (224,), "vit_h_14": (224, 518)}


def _batch(size, *, seed=1, num_classes=10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=generator)
    return x, torch.randint(0, num_classes, (2,), generator=generator)


def _float64_gradients(model, x, labels):
    """Cross-entropy gradients of every parameter of ``model`` in float64, by torch name (jaxtl layout)."""
    model = nnx.clone(model)
    model.eval()  # no dropout or BatchNorm here: train and eval compute the same function
    with jax.enable_x64(True):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(jnp.asarray(to_nhwc(x), jnp.float64))
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels.numpy())).mean()

        grads = jax.jit(jax.grad(loss))(params)
        return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("arch, size, gradients", CASES)
def test_converted_model_matches_torchvision(arch, size, gradients, request):
    if arch in LARGE_ARCHS:
        request.getfixturevalue("memory_heavy")
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0, image_size=size)
    jax_model = from_torchvision(torch_model, arch)  # its image_size read off the position embeddings
    assert jax_model.image_size == size and jax_model.weight_spec.arch == arch
    x, labels = _batch((size, size))
    report = check_parity(torch_model, jax_model, arch, x, labels, gradients=gradients)
    assert report.passed, report.format()
    if gradients:
        assert report.worst("gradients").rel_l2 < 1e-9, report.format()
        assert len(report.of("gradients")) == len(list(torch_model.parameters()))
    assert report.worst("export logits").max_abs == 0.0, report.format()


@pytest.mark.parametrize("arch", by_family(sorted(SIZES)))
def test_keys_and_shapes_equal_torchvision_at_each_image_size(arch):
    for image_size in SIZES[arch]:
        with torch.device("meta"):
            reference = torchvision.models.get_model(arch, num_classes=7, image_size=image_size)
        options = {} if image_size == 224 else {"image_size": image_size}
        model = jaxtl.models.abstract_model(arch, num_classes=7, **options)
        permutations = torch_permutations(model)
        shapes = {}
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            key, shape = ".".join(map(str, path)), variable.get_value().shape
            torch_shape = [0] * len(shape)
            for axis, source in enumerate(permutations.get(key, range(len(shape)))):
                torch_shape[source] = shape[axis]
            shapes[key] = tuple(torch_shape)
        assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}, (arch, image_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_position_embedding_interpolation_is_torchvisions(dtype):
    generator = torch.Generator().manual_seed(0)
    pos = (0.02 * torch.randn(1, 1 + 14 * 14, 24, generator=generator)).to(dtype)
    bound = 1e-6 if dtype == torch.float32 else 1e-14  # of the largest value: float32 / float64 rounding
    with jax.enable_x64(dtype == torch.float64):
        for side in (10, 20, 14, 3, 1):
            state = collections.OrderedDict({"encoder.pos_embedding": pos.clone()})
            expected = interpolate_embeddings(side * 16, 16, state)["encoder.pos_embedding"].numpy()
            actual = np.asarray(interpolate_pos_embedding(jnp.asarray(pos.numpy()), (side, side)))
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            np.testing.assert_allclose(actual, expected, rtol=0, atol=bound * np.abs(expected).max())
        # A grid that is not square: the same interpolation per axis, as F.interpolate(size=(rows, columns)) does.
        grid = pos[:, 1:].permute(0, 2, 1).reshape(1, 24, 14, 14)
        expected = F.interpolate(grid, size=(9, 23), mode="bicubic", align_corners=True)
        expected = expected.reshape(1, 24, -1).permute(0, 2, 1).numpy()
        actual = np.asarray(interpolate_pos_embedding(jnp.asarray(pos.numpy()), (9, 23)))
    np.testing.assert_allclose(actual[:, 1:], expected, rtol=0, atol=bound * np.abs(expected).max())
    np.testing.assert_array_equal(actual[:, :1], pos[:, :1].numpy())


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values where torchvision's init leaves zeros or ones (head, biases, class token, LayerNorms)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln" in name and name.endswith("weight"):
                param.uniform_(0.6, 1.4, generator=generator)
            elif name.endswith("bias") or name == "class_token":
                param.uniform_(-0.3, 0.3, generator=generator)
            elif name.startswith("heads."):
                param.uniform_(-0.2, 0.2, generator=generator)


@pytest.mark.parametrize(
    "config",
    [
        # ViT-H/14's patches and head width (1280 / 16 = 80: its attention scale is no power of two).
        dict(image_size=28, patch_size=14, num_layers=2, num_heads=2, hidden_dim=160, mlp_dim=320),
        # torchvision's representation_size: heads.pre_logits and tanh before heads.head.
        dict(image_size=24, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, representation_size=16),
    ],
    ids=["h14-heads", "pre-logits"],
)
def test_small_configurations_match_torchvision(config):
    torch.manual_seed(0)
    reference = torchvision.models.VisionTransformer(**config, num_classes=6).eval()
    _randomize(reference)
    model = VisionTransformer(**config, num_classes=6, rngs=nnx.Rngs(0))
    load_state_dict(model, torch_to_jaxtl_layout(model, reference.state_dict()), source="torchvision")
    x, labels = _batch((config["image_size"],) * 2, num_classes=6)
    with torch.no_grad():
        expected = reference(x).numpy()
    assert compare("eval logits", "logits", expected, eval_logits(model, x)).passed
    reference64 = copy.deepcopy(reference).double()
    F.cross_entropy(reference64(x.double()), labels).backward()
    torch_grads = torch_to_jaxtl_layout(model, {n: p.grad for n, p in reference64.named_parameters()})
    jax_grads = _float64_gradients(model, x, labels)
    assert torch_grads.keys() == jax_grads.keys()
    for name, grad in torch_grads.items():
        assert compare("gradients", name, grad, jax_grads[name]).rel_l2 < 1e-9, name
    exported = torchvision.models.VisionTransformer(**config, num_classes=6)
    exported.load_state_dict(to_torchvision(model), strict=True)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.slow
def test_a_model_on_another_grid_equals_torchvision_with_interpolated_embeddings():
    # A 224 B/16 (14x14 grid) on 160x160 inputs (10x10): torchvision's vit_b_16(image_size=160) with the
    # state_dict interpolate_embeddings makes; the float64 gradients through the interpolation too.
    torch_model = randomized_torchvision_model("vit_b_16", num_classes=10, seed=0)
    jax_model = from_torchvision(torch_model, "vit_b_16")
    reference = torchvision.models.vit_b_16(image_size=160, num_classes=10)
    reference.load_state_dict(interpolate_embeddings(160, 16, copy.deepcopy(torch_model.state_dict())), strict=True)
    x, labels = _batch((160, 160))
    with torch.no_grad():
        expected = reference.eval()(x).numpy()
    result = compare("eval logits", "logits", expected, eval_logits(jax_model, x))
    assert result.passed, result
    reference64 = reference.double()
    params = {n: p.detach().double().requires_grad_() for n, p in torch_model.named_parameters()}

    def loss(params):
        state = {"encoder.pos_embedding": params["encoder.pos_embedding"]}
        position = interpolate_embeddings(160, 16, state)["encoder.pos_embedding"]
        logits = torch.func.functional_call(reference64, {**params, "encoder.pos_embedding": position}, (x.double(),))
        return F.cross_entropy(logits, labels)

    loss(params).backward()
    torch_grads = torch_to_jaxtl_layout(jax_model, {n: p.grad for n, p in params.items()})
    jax_grads = _float64_gradients(jax_model, x, labels)
    for name, grad in torch_grads.items():
        assert compare("gradients", name, grad, jax_grads[name]).rel_l2 < 1e-9, name


@pytest.mark.slow
def test_a_state_dict_of_another_image_size_converts_and_loads(tmp_path):
    # As torchvision's SWAG end-to-end ViT-B/16 is, at 384: inferred, converted, exported, cached and created.
    torch.manual_seed(0)
    torch_model = torchvision.models.vit_b_16(image_size=384, num_classes=10).eval()
    _randomize(torch_model)
    state = torch_model.state_dict()
    assert infer_arch(state) == "vit_b_16"
    model = from_torchvision(state)
    assert model.image_size == 384 and model.encoder.pos_embedding.get_value().shape == (1, 577, 768)
    fresh = torchvision.models.vit_b_16(image_size=384, num_classes=10)
    fresh.load_state_dict(to_torchvision(model), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    x, _ = _batch((384, 384))
    with torch.no_grad():
        expected = torch_model(x[:1]).numpy()
    assert compare("eval logits", "logits", expected, eval_logits(model, x[:1])).passed
    torch.save(state, tmp_path / "vit_b_16_384.pth")
    converted = convert.convert_weights("vit_b_16", tmp_path / "vit_b_16_384.pth", out=tmp_path / "converted")
    created = jaxtl.models.create("vit_b_16", weights=converted)
    assert created.image_size == 384 and created.num_classes == 10
    loaded = state_dict(created)
    assert all(np.array_equal(loaded[k], v) for k, v in state_dict(model).items())


@pytest.mark.slow
def test_architecture_is_inferred_by_patch_size():
    for arch in ("vit_b_16", "vit_b_32"):
        with torch.device("meta"):
            shapes = torchvision.models.get_model(arch, num_classes=7).state_dict()
        state = {k: torch.zeros(v.shape) for k, v in shapes.items()}
        assert infer_arch(state) == arch
        assert from_torchvision(state).num_classes == 7


def _digests(state) -> dict[str, str]:
    return {key: hashlib.blake2b(memoryview(tensor.numpy())).hexdigest() for key, tensor in state.items()}


@pytest.mark.slow
def test_vit_h_14_logits_and_export(memory_heavy):
    # 632M parameters: no float64 gradients here (tens of GB); the small h14-heads configuration covers them.
    # At most two 2.5 GB copies of the weights at a time: the torch model's are kept as digests once converted.
    torch_model = randomized_torchvision_model("vit_h_14", num_classes=10, seed=0, image_size=28)
    x, _ = _batch((28, 28))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    jax_model = from_torchvision(torch_model, "vit_h_14")
    digests = _digests(torch_model.state_dict())
    del torch_model
    gc.collect()
    result = compare("eval logits", "logits", expected, eval_logits(jax_model, x))
    assert result.passed, result
    exported = to_torchvision(jax_model)
    del jax_model
    gc.collect()
    # A model on the meta device takes the exported tensors as they are (assign): a strict load without 2.5 GB more.
    with torch.device("meta"):
        fresh = torchvision.models.vit_h_14(image_size=28, num_classes=10)
    fresh.load_state_dict(exported, strict=True, assign=True)
    assert _digests(fresh.state_dict()) == digests  # every tensor bit for bit


@pytest.mark.slow
def test_progressive_unfreezing_matches_pytorch_step_for_step():
    report = run_training_parity(
        "vit_b_16", "progressive_unfreezing", batch=4, size=(32, 32), builder_options={"image_size": 32}
    )
    assert report.passed, report.format()
    assert report.dtype == "float32" and len(report.of("loss")) == 20
    assert len(report.of("parameters")) == 152
    frozen_torch = {c.name for c in report.of("frozen torch")}
    assert frozen_torch == {c.name for c in report.of("frozen jaxtl")} and frozen_torch
    changed = {c.name for c in report.of("updates")}
    assert {"heads.head.weight", "heads.head.bias", "conv_proj.weight", "class_token"} <= changed
