"""Checkpoints in other layouts than torchvision's: self-supervised ResNet-50s as MoCo, SwAV, DINO, Barlow Twins
and VICReg publish them, timm's safetensors files, and torchvision's legacy DenseNet keys.

Each checkpoint is written here from a random torchvision (or timm) model in the structure its training code
saves, then read back: the backbone must be the torch model's exactly, the head fresh, the keys dropped named.
"""

import copy
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import convert
import jaxtl.models
from convert.layouts import (
    DINO_PREPROCESSING,
    LAYOUTS,
    SELF_SUPERVISED_PREPROCESSING,
    map_layout,
    rename_legacy_densenet_keys,
    timm_preprocessing,
)
from convert.parity import to_nhwc
from convert.random_models import randomized_torchvision_model
from jaxtl import weights
from jaxtl.cli import main
from jaxtl.errors import WeightsError
from jaxtl.models.state_dict import state_dict

ARCH = "resnet50"
SELF_SUPERVISED = ["moco_v2", "moco_v3", "swav", "dino", "barlow_twins", "vicreg"]


@pytest.fixture(scope="module")
def resnet50():
    """A random torchvision ResNet-50 with randomised BatchNorm statistics: the backbone every checkpoint holds."""
    return randomized_torchvision_model(ARCH, num_classes=1000, seed=3, calibration_shape=(32, 32))


def _backbone(model):
    """The model's state without its classifier: what a self-supervised checkpoint's backbone must equal."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _perturbed(state):
    """Another encoder's state (MoCo's momentum encoder), with other values than ``state``'s."""
    return {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}


def _mlp(dims, last_bn):
    """MoCo v3's _build_mlp: Linear (no bias), BatchNorm1d and ReLU between layers, an affine-free BN last."""
    layers = []
    for index, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(dim_in, dim_out, bias=False))
        if index < len(dims) - 2:
            layers += [torch.nn.BatchNorm1d(dim_out), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(dim_out, affine=False))
    return torch.nn.Sequential(*layers)


def _with_head(model, head):
    encoder = copy.deepcopy(model)
    encoder.fc = head
    return encoder.state_dict()


def _prefixed(prefix, state):
    return {f"{prefix}{k}": v for k, v in state.items()}


def _optimizer_state(count):
    """An SGD optimizer's state_dict as the training scripts save it (no momentum buffers, to keep files small)."""
    group = {"lr": 0.03, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False}
    return {"state": {}, "param_groups": [{**group, "params": list(range(count))}]}


def published_checkpoint(layout, model):
    """What each method's training code saves for a ResNet-50 (projection heads narrower, to keep files small)."""
    if layout == "moco_v2":  # moco/builder.py with mlp=True; main_moco.py's save_checkpoint
        query = _with_head(
            model, torch.nn.Sequential(torch.nn.Linear(2048, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        )
        state = {
            **_prefixed("module.encoder_q.", query),
            **_prefixed("module.encoder_k.", _perturbed(query)),
            "module.queue": torch.randn(16, 32),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": _optimizer_state(len(state))}
    if layout == "moco_v3":  # moco-v3/moco/builder.py MoCo_ResNet; main_moco.py saves a GradScaler too
        base = _with_head(model, _mlp([2048, 64, 16], last_bn=True))
        state = {
            **_prefixed("module.base_encoder.", base),
            **_prefixed("module.momentum_encoder.", _perturbed(base)),
            **_prefixed("module.predictor.", _mlp([16, 64, 16], last_bn=False).state_dict()),
        }
        scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
        return {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": _optimizer_state(10),
                "scaler": scaler}  # fmt: skip
    if layout == "swav":  # swav/src/resnet50.py: projection_head and prototypes; the hub file is the state_dict
        head = torch.nn.Sequential(torch.nn.Linear(2048, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 16))  # fmt: skip
        state = {**_backbone(model), **_prefixed("projection_head.", head.state_dict()),
                 "prototypes.weight": torch.randn(30, 16)}  # fmt: skip
        return _prefixed("module.", state)
    # DINO, Barlow Twins and VICReg publish the torchvision backbone with fc = Identity: no fc keys.
    return _backbone(model)


# The dropped keys each layout must name, with their count for these checkpoints.
DROPPED = {
    "moco_v2": {"module.encoder_q.fc.*": 4, "module.encoder_k.*": 322, "module.queue*": 2},
    "moco_v3": {"module.base_encoder.fc.*": 10, "module.momentum_encoder.*": 328, "module.predictor.*": 7},
    "swav": {"module.projection_head.*": 9, "module.prototypes.*": 1},
}


def _save(tmp_path, layout, model, name=None):
    path = tmp_path / (name or f"{layout}_resnet50.pth.tar")
    torch.save(published_checkpoint(layout, model), path)
    return path


@pytest.mark.parametrize("layout", SELF_SUPERVISED)
def test_self_supervised_checkpoints_map_to_the_torch_backbone_exactly(tmp_path, resnet50, layout):
    path = _save(tmp_path, layout, resnet50)
    state, _ = convert.load_state_dict_file(path)
    given = layout if layout in ("dino", "barlow_twins", "vicreg") else None  # the same keys: only a name tells
    mapped = map_layout(state, ARCH, path=path, layout=given)
    assert mapped.layout.name == (layout if given or layout in DROPPED else "backbone")
    expected = _backbone(resnet50)
    assert mapped.state.keys() == expected.keys()
    assert all(torch.equal(mapped.state[k], v) for k, v in expected.items())
    assert not mapped.has_head
    assert {g.pattern: g.count for g in mapped.dropped} == DROPPED.get(layout, {})
    expected_preprocessing = DINO_PREPROCESSING if layout == "dino" else SELF_SUPERVISED_PREPROCESSING
    assert mapped.preprocessing == expected_preprocessing
    assert mapped.name == f"{mapped.layout.name}:{layout}_resnet50"


def test_the_bare_backbone_is_recognised_and_its_preprocessing_is_torchvisions_linear_evaluation(tmp_path, resnet50):
    mapped = map_layout(_backbone(resnet50), ARCH, path=tmp_path / "resnet50.pth")
    assert mapped.layout.name == "backbone" and mapped.detected
    assert weights.Preprocessing(256, 224, "bilinear", weights.IMAGENET_MEAN, weights.IMAGENET_STD) == (
        mapped.preprocessing
    )
    assert DINO_PREPROCESSING.interpolation == "bicubic"  # eval_linear.py: Resize(256, interpolation=3)


def _cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_backbone_and_fresh_head(model, torch_model, num_classes):
    """Every backbone array is the torch model's (in jaxtl's layout); the head is a fresh num_classes-way one."""
    ours = state_dict(model)
    theirs = convert.to_torchvision(model)
    for key, value in _backbone(torch_model).items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(theirs[key], value), key
    bound = 1 / np.sqrt(2048)  # the recipe's nn.Linear(2048, num_classes): U(-1/sqrt(in), 1/sqrt(in))
    assert ours["fc.weight"].shape == (2048, num_classes) and ours["fc.bias"].shape == (num_classes,)
    assert 0 < np.abs(ours["fc.weight"]).max() <= bound and np.abs(ours["fc.bias"]).max() <= bound


def _check_cli_conversion(tmp_path, capsys, layout, resnet50):
    path = _save(tmp_path, layout, resnet50)
    out = tmp_path / "converted"
    args = ["convert", ARCH, "--weights", str(path), "--out", str(out)]
    if layout not in DROPPED:
        args += ["--layout", layout]
    code, stdout, stderr = _cli(capsys, *args)
    assert code == 0, stderr
    assert f"layout: {layout}" in stdout and "no classifier head" in stdout
    for pattern, count in DROPPED.get(layout, {}).items():
        assert f"{pattern} ({count} key{'s' if count != 1 else ''}, " in stdout
    spec = weights.load_weight_spec(out)
    assert spec.num_classes == 0 and spec.name == f"{layout}:{layout}_resnet50" and spec.preprocessing is not None
    model = jaxtl.models.load_pretrained(ARCH, num_classes=5, weights=out)
    _assert_backbone_and_fresh_head(model, resnet50, 5)
    assert model.weight_spec.num_classes == 0 and model.weight_spec.preprocessing == spec.preprocessing
    with pytest.raises(WeightsError, match="no classifier head: pass num_classes=N"):
        jaxtl.models.create(ARCH, weights=out)
    return stdout, model


def test_moco_v2_through_the_cli_gives_its_encoder_and_a_fresh_head(tmp_path, capsys, resnet50):
    stdout, _ = _check_cli_conversion(tmp_path, capsys, "moco_v2", resnet50)
    dropped = re.search(r"dropped (\d+) keys: (.*)", stdout)
    assert dropped and int(dropped.group(1)) == sum(DROPPED["moco_v2"].values())
    assert "module.encoder_k.* (322 keys, MoCo's momentum encoder)" in dropped.group(2)
    assert "module.encoder_q.fc.* (4 keys, MoCo's projection head; jaxtl gives the model a fresh head)" in stdout
    assert "module.queue* (2 keys, MoCo's queue of negative keys)" in stdout
    assert "module.* (646 keys, DataParallel's prefix, removed)" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["moco_v3", "swav", "dino", "barlow_twins", "vicreg"])
def test_every_self_supervised_layout_through_the_cli_computes_the_torch_features(tmp_path, capsys, resnet50, layout):
    _, model = _check_cli_conversion(tmp_path, capsys, layout, resnet50)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = torch.flatten(resnet50.avgpool(torch.nn.Sequential(*list(resnet50.children())[:-2])(x)), 1)
    features = np.asarray(nnx.jit(lambda model, x: model.forward_features(x))(model, jnp.asarray(to_nhwc(x))))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_an_unknown_layout_is_one_clear_error_naming_the_file_and_the_layouts(tmp_path, capsys, resnet50):
    path = tmp_path / "lightly_resnet50.pth"
    torch.save(_prefixed("backbone.", _backbone(resnet50)), path)
    code, _, stderr = _cli(capsys, "convert", ARCH, "--weights", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and stderr.count("error:") == 1
    assert f"cannot tell the key layout of {path}" in stderr and "--layout NAME" in stderr
    assert all(name in stderr for name in LAYOUTS)
    code, _, stderr = _cli(capsys, "convert", ARCH, "--weights", str(path), "--layout", "simclr")
    assert code == 2 and "unknown layout 'simclr'" in stderr and "moco_v3" in stderr
    assert not (tmp_path / "out").exists()


def test_the_cli_help_names_every_layout(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in LAYOUTS)


def test_a_dataparallel_torchvision_state_dict_keeps_its_head(tmp_path, resnet50):
    mapped = map_layout(_prefixed("module.", resnet50.state_dict()), ARCH, path=tmp_path / "ddp.pth")
    assert mapped.layout.name == "torchvision" and mapped.has_head and mapped.dropped == ()
    assert mapped.state.keys() == resnet50.state_dict().keys() and mapped.preprocessing is None


# timm -------------------------------------------------------------------------------------------------------------


def _random_timm(name, seed=0):
    """timm's ``name``, random, with randomised BatchNorm affine parameters and statistics, in eval mode."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.6, 1.4), (module.bias, -0.3, 0.3),
                                          (module.running_var, 0.5, 1.5)):  # fmt: skip
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
        head = model.get_classifier()
        x = torch.randn(4, 3, 64, 64, generator=generator)
        scale = model.eval()(x).std()  # logits of order one, as a trained head gives
        head.weight.div_(scale)
        head.bias.div_(scale)
    return model


def _save_for_hf(model, directory, **pretrained_cfg):
    """The Hugging Face hub's timm layout: model.safetensors and config.json (with its pretrained_cfg)."""
    from timm.models import save_for_hf

    save_for_hf(model, directory, model_config={"pretrained_cfg": pretrained_cfg}, safe_serialization=True)
    return directory / "model.safetensors"


def _assert_same_logits(timm_model, jaxtl_model, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = timm_model.eval()(x).numpy()
    jaxtl_model.eval()
    actual = np.asarray(nnx.jit(lambda model, x: model(x))(jaxtl_model, jnp.asarray(to_nhwc(x))))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    return np.abs(actual - expected).max()


def test_timm_efficientnet_b0_safetensors_computes_what_timm_computes(tmp_path, capsys):
    timm_model = _random_timm("efficientnet_b0")
    path = _save_for_hf(timm_model, tmp_path / "hub", input_size=[3, 240, 240], crop_pct=0.9, interpolation="bilinear")
    out = tmp_path / "converted"
    code, stdout, stderr = _cli(capsys, "convert", "efficientnet_b0", "--weights", str(path), "--out", str(out))
    assert code == 0, stderr
    assert "layout: timm (timm), recognised from its keys" in stdout
    assert "renamed 360 keys" in stdout and "config.json beside the file" in stdout
    spec = weights.load_weight_spec(out)
    # timm's eval transform: resize the shorter side to floor(240 / 0.9) = 266, center crop 240
    assert spec.preprocessing == weights.Preprocessing(266, 240, "bilinear")
    assert spec.num_classes == 1000 and spec.name == "timm:efficientnet_b0.ra_in1k"
    _assert_same_logits(timm_model, jaxtl.models.create("efficientnet_b0", weights=out))


@pytest.mark.slow
def test_timm_resnet50_safetensors_computes_what_timm_computes(tmp_path):
    timm_model = _random_timm("resnet50")
    path = _save_for_hf(timm_model, tmp_path / "hub")
    messages = []
    out = convert.convert_weights(ARCH, path, out=tmp_path / "converted", log=messages.append)
    assert messages[0] == "layout: timm (timm), recognised from its keys"
    assert weights.load_weight_spec(out).preprocessing == weights.Preprocessing(235, 224, "bicubic")  # crop_pct 0.95
    _assert_same_logits(timm_model, jaxtl.models.create(ARCH, weights=out))


def test_timm_keys_of_a_file_without_config_take_timms_defaults(tmp_path):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        state = timm.create_model("resnet50").state_dict()
    mapped = map_layout(state, ARCH, path=tmp_path / "resnet50.safetensors", layout="timm")
    assert mapped.state.keys() == state.keys() and mapped.has_head and mapped.renamed == ()
    cfg = timm.models.get_pretrained_cfg("resnet50")
    crop = cfg.input_size[-1]
    assert mapped.preprocessing == weights.Preprocessing(int(crop / cfg.crop_pct), crop, cfg.interpolation)
    assert mapped.name == "timm:resnet50"


@pytest.mark.parametrize(
    "arch", ["efficientnet_b0", *(pytest.param(f"efficientnet_b{i}", marks=pytest.mark.slow) for i in range(1, 8))]
)
def test_timm_efficientnet_keys_map_onto_torchvisions_with_the_same_shapes(tmp_path, arch):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = map_layout(timm.create_model(arch).state_dict(), arch, path=tmp_path / "x.safetensors", layout="timm")
        theirs = torchvision.models.get_model(arch).state_dict()
    assert ours.state.keys() == theirs.keys()
    assert all(ours.state[k].shape == v.shape for k, v in theirs.items())


def test_tensorflow_ported_timm_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "tf_efficientnet_b0", "pretrained_cfg": {}}))
    with torch.device("meta"):
        state = {"conv_stem.weight": torch.empty(32, 3, 3, 3)}
    with pytest.raises(WeightsError, match="tf_efficientnet_b0 is a port of TensorFlow weights"):
        map_layout(state, "efficientnet_b0", path=tmp_path / "model.safetensors")


def test_an_empty_pretrained_cfg_gives_timms_generic_preprocessing():
    preprocessing, note = timm_preprocessing("efficientnet_b0", {"architecture": "x", "pretrained_cfg": {}})
    assert preprocessing == weights.Preprocessing(256, 224, "bicubic") and "config.json" in note


# DenseNet's legacy keys ------------------------------------------------------------------------------------------


def _legacy_keys(state):
    """torchvision's old DenseNet names, as its published files have them: denselayer1.norm1 -> denselayer1.norm.1,
    and no num_batches_tracked (older than the counter)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pattern.sub(r"\1.\2.\3", k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _torchvisions_renaming(state):
    """The dict torchvision.models.densenet._load_state_dict hands to load_state_dict for ``state``."""

    class Weights:
        def get_state_dict(self, progress, check_hash):
            return dict(state)

    class Model:
        def load_state_dict(self, renamed):
            self.loaded = renamed

    model = Model()
    torchvision.models.densenet._load_state_dict(model, Weights(), progress=False)
    return model.loaded


def test_legacy_densenet_files_read_as_torchvision_reads_them(tmp_path):
    modern = torchvision.models.densenet121().state_dict()
    legacy = _legacy_keys(modern)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    loaded, _ = convert.load_state_dict_file(path)
    ours, theirs = rename_legacy_densenet_keys(loaded), _torchvisions_renaming(loaded)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert ours.keys() == {k for k in modern if not k.endswith("num_batches_tracked")}


@pytest.mark.slow
@pytest.mark.skipif("densenet121" not in jaxtl.models.list_models(), reason="jaxtl has no densenet121 yet")
def test_a_legacy_densenet_file_converts_end_to_end(tmp_path):
    torch_model = randomized_torchvision_model("densenet121", num_classes=1000, seed=2)
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(_legacy_keys(torch_model.state_dict()), path)
    messages = []
    out = convert.convert_weights("densenet121", path, out=tmp_path / "converted", log=messages.append)
    assert any("torchvision's legacy DenseNet names" in m for m in messages)
    exported = convert.to_torchvision(jaxtl.models.create("densenet121", weights=out))
    for key, value in torch_model.state_dict().items():
        assert torch.equal(exported[key], value) or key.endswith("num_batches_tracked"), key
