"""ONNX and torchvision artifacts of a fine-tuned checkpoint give the checkpoint's own logits on real photographs.

One checkpoint (tests/exported.py: resnet18, 7 classes, crop 64) is trained for the module and exported to both
formats; the reference is what jaxtl computes for it (:class:`jaxtl.train.Predictor`'s eval step) on the same
uint8 crops.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from exported import photo_paths
from PIL import Image

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory, exported_checkpoint):
    from convert.artifacts import export_onnx, export_torchvision
    from jaxtl.artifacts import model_and_info
    from jaxtl.data import EvalTransform
    from jaxtl.train import Predictor

    root = tmp_path_factory.mktemp("export_onnx")
    checkpoint = exported_checkpoint
    model, info = model_and_info(checkpoint)
    onnx_path, torchvision_path = root / "out" / "model.onnx", root / "out" / "model.pth"
    onnx_info = export_onnx(model, info, onnx_path)
    torchvision_info = export_torchvision(model, info, torchvision_path)

    predictor = Predictor.from_checkpoint(checkpoint)
    transform = EvalTransform(info.preprocessing)
    images = np.stack([transform(Image.open(path).convert("RGB")) for path in photo_paths()])
    n = len(images)
    logits, _ = predictor.step(predictor.state, images, np.zeros((n,), np.int32), np.ones((n,), bool))
    return types.SimpleNamespace(
        root=root, checkpoint=checkpoint, meta=predictor.meta, info=info, images=images,
        logits=np.asarray(logits, np.float32), onnx_path=onnx_path, onnx_info=onnx_info,
        torchvision_path=torchvision_path, torchvision_info=torchvision_info,
    )  # fmt: skip


def _open(kind: str, path):
    if kind == "onnx":
        from jaxtl.artifacts.onnx_runtime import OnnxArtifact

        return OnnxArtifact.open(path, providers=["CPUExecutionProvider"])
    from convert.artifacts import TorchvisionArtifact

    return TorchvisionArtifact.open(path)


def _top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=-1, kind="stable")[:, :5]


@pytest.mark.parametrize("kind", ["onnx", "torchvision"])
def test_artifact_logits_equal_the_checkpoints(exported, kind):
    artifact = _open(kind, exported.onnx_path if kind == "onnx" else exported.torchvision_path)
    actual = artifact.logits(exported.images)
    assert actual.dtype == np.float32 and actual.shape == exported.logits.shape
    np.testing.assert_allclose(actual, exported.logits, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(_top5(actual), _top5(exported.logits))


def test_onnx_batch_is_dynamic(exported):
    artifact = _open("onnx", exported.onnx_path)
    tiled = np.concatenate([exported.images] * -(-64 // len(exported.images)))[:64]
    singles = np.concatenate([artifact.logits(image[None]) for image in exported.images])
    for batch in (1, 7, 64):
        images = tiled[:batch]
        expected = singles[np.arange(batch) % len(exported.images)]
        np.testing.assert_allclose(artifact.logits(images), expected, rtol=0, atol=1e-5, err_msg=f"batch {batch}")


@pytest.mark.parametrize("kind", ["onnx", "torchvision"])
def test_metadata_round_trip(exported, kind):
    path = exported.onnx_path if kind == "onnx" else exported.torchvision_path
    written = exported.onnx_info if kind == "onnx" else exported.torchvision_info
    info = _open(kind, path).info
    assert info == written
    assert info.format == kind and info.arch == exported.meta.arch == "resnet18"
    assert info.classes == tuple(exported.meta.classes) and info.num_classes == 7
    assert dict(info.class_to_idx) == dict(exported.meta.class_to_idx)
    assert info.preprocessing == exported.meta.preprocessing
    assert info.image_size == exported.images.shape[1]


def test_torchvision_state_dict_loads_strictly_into_torchvision(exported):
    import torch
    import torchvision

    state = torch.load(exported.torchvision_path, weights_only=True)
    module = torchvision.models.get_model("resnet18", num_classes=7)
    module.load_state_dict(state, strict=True)
    assert exported.torchvision_path.with_suffix(".json").is_file()
    # Written atomically: nothing but the artifacts is left in the directory.
    assert sorted(p.name for p in exported.onnx_path.parent.iterdir()) == ["model.json", "model.onnx", "model.pth"]


def test_onnx_is_one_checked_file_with_uint8_images_in(exported):
    import onnx

    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    (logits,) = model.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [64, 64, 3]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _bad_files(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    data = exported.onnx_path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])], "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), foreign)
    missing = tmp_path / "missing.onnx"
    return {"truncated": truncated, "noise": noise, "foreign": foreign, "missing": missing}


@pytest.mark.parametrize("case", ["truncated", "noise", "foreign", "missing"])
def test_bad_onnx_files_are_artifact_errors_naming_the_file(exported, tmp_path, case):
    from jaxtl.artifacts import ArtifactError

    path = _bad_files(exported, tmp_path)[case]
    with pytest.raises(ArtifactError, match=str(path).replace(".", r"\.")) as raised:
        _open("onnx", path)
    if case == "foreign":
        assert "jaxtl export" in str(raised.value)


def test_bad_torchvision_files_are_artifact_errors_naming_the_file(exported, tmp_path):
    import shutil

    import torch

    from jaxtl.artifacts import ArtifactError

    alone = tmp_path / "alone.pth"
    shutil.copy(exported.torchvision_path, alone)  # no sidecar
    with pytest.raises(ArtifactError, match="alone.pth.*alone.json"):
        _open("torchvision", alone)

    sidecar = exported.torchvision_path.with_suffix(".json").read_text()
    cases = {}
    cases["truncated"] = exported.torchvision_path.read_bytes()[:1000]
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list"] = (tmp_path / "list.pth").read_bytes()
    state = torch.load(exported.torchvision_path, weights_only=True)
    torch.save({key: value for key, value in state.items() if not key.startswith("fc.")}, tmp_path / "nofc.pth")
    cases["nofc"] = (tmp_path / "nofc.pth").read_bytes()
    messages = {"truncated": "not a readable torch file", "list": "not a state_dict", "nofc": "does not fit"}
    for name, data in cases.items():
        path = tmp_path / f"{name}_artifact.pth"
        path.write_bytes(data)
        path.with_suffix(".json").write_text(sidecar)
        with pytest.raises(ArtifactError, match=messages[name]) as raised:
            _open("torchvision", path)
        assert str(path) in str(raised.value)


@pytest.mark.slow
def test_failed_onnx_export_leaves_nothing(exported, tmp_path, monkeypatch):
    import onnx

    from convert.artifacts import export_onnx
    from jaxtl.artifacts import model_and_info

    model, info = model_and_info(exported.checkpoint)

    def refuse(path, *args, **kwargs):
        raise onnx.checker.ValidationError(f"refused {path}")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)  # after the graph was written
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, info, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_images_of_another_size_are_refused(exported):
    artifact = _open("onnx", exported.onnx_path)
    with pytest.raises(ValueError, match=r"\(N, 64, 64, 3\)"):
        artifact.logits(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        artifact.logits(exported.images.astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "torchvision"])
def test_predict_on_the_artifact_prints_the_checkpoints_classes_and_probabilities(exported, kind):
    import subprocess
    import sys

    from jaxtl.artifacts.loading import load_classifier
    from jaxtl.data import load_image

    photos = [str(path) for path in photo_paths()[:2]]
    path = exported.onnx_path if kind == "onnx" else exported.torchvision_path
    result = subprocess.run(
        [sys.executable, "-m", "jaxtl.cli", "predict", str(path), *photos, "--top-k", "3"],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    predictor = load_classifier(exported.checkpoint)
    for line, photo in zip(result.stdout.splitlines(), photos, strict=True):
        p = predictor.probabilities(load_image(photo))
        top = np.argsort(-p, kind="stable")[:3]
        assert line.split(": ", 1)[0] == photo
        shown = [item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", ")]
        assert [name for name, _ in shown] == [predictor.classes[i] for i in top]
        np.testing.assert_allclose([float(v) for _, v in shown], p[top], atol=5.001e-4)
