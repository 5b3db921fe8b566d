"""`jaxtl export --format stablehlo` and `jaxtl predict` on its artifact, against the checkpoint it came from.

The reference is the checkpoint's own eval step (:class:`jaxtl.train.Predictor`) on the same uint8 crops of real
photographs; the artifact is also run in a fresh Python process that imports neither jaxtl nor flax.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from exported import photo_paths

from jaxtl.artifacts import ArtifactError, ArtifactInfo, model_and_info
from jaxtl.artifacts.loading import load_classifier, open_artifact
from jaxtl.artifacts.stablehlo import export_stablehlo
from jaxtl.data import EvalTransform, load_image
from jaxtl.train import Predictor

JAXTL = [sys.executable, "-m", "jaxtl.cli"]


def run(args, *, expect=0):
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def checkpoint(exported_checkpoint):
    return exported_checkpoint


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "model-stablehlo"
    result = run([*JAXTL, "export", str(checkpoint), "--format", "stablehlo", "--out", str(out)])
    assert f"exported resnet18 to {out}/ (StableHLO, float32" in result.stdout
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's logits for the photographs' crops, and the crops."""
    predictor = Predictor.from_checkpoint(checkpoint)
    crops = np.stack([predictor.transform(load_image(str(path))) for path in photo_paths()])
    n = len(crops)
    logits, _ = predictor.step(predictor.state, crops, np.zeros((n,), np.int32), np.ones((n,), bool))
    return np.asarray(logits), crops


def top5(logits):
    return np.argsort(-logits, axis=-1, kind="stable")[:, :5]


def test_the_artifacts_logits_are_the_checkpoints_on_real_photographs(artifact, reference, checkpoint):
    expected, crops = reference
    loaded = open_artifact(artifact)
    got = loaded.logits(crops)
    assert got.dtype == np.float32 and got.shape == expected.shape == (6, 7)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (top5(got) == top5(expected)).all()
    # What it carries: the checkpoint's classes, class_to_idx and preprocessing.
    _, info = model_and_info(checkpoint)
    assert loaded.info == info.replace(format="stablehlo", precision="float32")
    assert loaded.exported.platforms == ("cpu", "cuda")


@pytest.mark.slow
def test_a_fresh_process_runs_it_with_jax_alone_at_batch_1_7_and_64(artifact, reference, tmp_path):
    expected, crops = reference
    np.save(tmp_path / "crops.npy", crops)
    script = textwrap.dedent(
        f"""
        import json, pathlib, sys
        import jax, numpy as np
        root = pathlib.Path({str(artifact)!r})
        exported = jax.export.deserialize(bytearray((root / "model.stablehlo").read_bytes()))
        info = json.loads((root / "jaxtl.json").read_text())
        crops = np.load({str(tmp_path / "crops.npy")!r})
        for n in (1, 7, 64):
            images = np.resize(crops, (n, *crops.shape[1:]))  # the photographs repeated
            np.save({str(tmp_path)!r} + f"/logits{{n}}.npy", np.asarray(exported.call(images)))
        print(json.dumps({{"classes": info["classes"], "modules": sorted(sys.modules)}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [m for m in printed["modules"] if m.split(".")[0] in ("jaxtl", "flax", "convert")]
    assert len(printed["classes"]) == 7
    for n in (1, 7, 64):
        logits = np.load(tmp_path / f"logits{n}.npy")
        rows = np.resize(np.arange(len(crops)), n)
        assert logits.shape == (n, 7)
        np.testing.assert_allclose(logits, expected[rows], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_predict_prints_what_it_prints_for_the_checkpoint(artifact, checkpoint):
    photos = [str(path) for path in photo_paths()[:3]]
    from_checkpoint = run([*JAXTL, "predict", str(checkpoint), *photos]).stdout.splitlines()
    from_artifact = run([*JAXTL, "predict", str(artifact), *photos]).stdout.splitlines()
    assert len(from_artifact) == 3
    for a, b in zip(from_artifact, from_checkpoint, strict=True):
        path, ranked = a.split(": ", 1)
        assert b.startswith(f"{path}: ")
        names = [item.rsplit(" ", 1) for item in ranked.split(", ")]
        expected = [item.rsplit(" ", 1) for item in b.split(": ", 1)[1].split(", ")]
        assert [n for n, _ in names] == [n for n, _ in expected]  # the same top-5, in the same order
        np.testing.assert_allclose([float(p) for _, p in names], [float(p) for _, p in expected], atol=1.001e-3)


@pytest.mark.slow
def test_a_bfloat16_artifact_computes_in_bf16(checkpoint, reference, tmp_path):
    expected, crops = reference
    model, info = model_and_info(checkpoint)
    written = export_stablehlo(model, info, tmp_path / "bf16", precision="bfloat16", platforms=("cpu",))
    assert written.precision == "bfloat16" and ArtifactInfo.loads((tmp_path / "bf16" / "jaxtl.json").read_text(), "")
    got = open_artifact(tmp_path / "bf16").logits(crops)
    assert got.dtype == np.float32
    error = np.abs(got - expected).max()
    # bf16 keeps 8 bits of mantissa: within a few percent of the logits' scale, and not float32's result.
    assert 1e-4 < error < 0.05 * np.abs(expected).max(), error
    assert (np.argmax(got, -1) == np.argmax(expected, -1)).mean() >= 5 / 6


@pytest.mark.slow
def test_export_replaces_an_earlier_artifact_and_refuses_other_directories(checkpoint, tmp_path):
    model, info = model_and_info(checkpoint)
    out = tmp_path / "artifact"
    export_stablehlo(model, info, out, platforms=("cpu",))
    assert open_artifact(out).info.classes[0] != "c0"
    export_stablehlo(model, info.replace(classes=tuple(f"c{i}" for i in range(7))), out, platforms=("cpu",))
    assert open_artifact(out).info.classes[0] == "c0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # nothing left beside it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="other exists and is not a StableHLO artifact"):
        export_stablehlo(model, info, tmp_path / "other", platforms=("cpu",))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_corrupt_or_foreign_artifact_is_one_error_naming_the_file(artifact, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "jaxtl.json").write_bytes((artifact / "jaxtl.json").read_bytes())
    (corrupt / "model.stablehlo").write_bytes((artifact / "model.stablehlo").read_bytes()[:5000])
    no_meta = tmp_path / "no-meta"
    no_meta.mkdir()
    (no_meta / "model.stablehlo").write_bytes(b"\0" * 64)
    foreign_meta = tmp_path / "foreign"
    foreign_meta.mkdir()
    (foreign_meta / "model.stablehlo").write_bytes(b"\0" * 64)
    (foreign_meta / "jaxtl.json").write_text('{"name": "something else"}')
    random_file = tmp_path / "weights.bin"
    random_file.write_bytes(os.urandom(256))
    cases = {
        corrupt: f"{corrupt / 'model.stablehlo'} cannot be read as a jax.export serialization",
        no_meta: f"{no_meta} is not a StableHLO artifact: jaxtl.json is missing",
        foreign_meta: f"{foreign_meta / 'jaxtl.json'} carries no jaxtl artifact metadata",
        random_file: f"{random_file} is not an artifact jaxtl reads",
        tmp_path / "missing": f"{tmp_path / 'missing'} does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(ArtifactError) as caught:
            load_classifier(path)
        assert str(caught.value).startswith(message), caught.value
    photo = str(photo_paths()[0])
    result = run([*JAXTL, "predict", str(corrupt), photo], expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        f"jaxtl predict: error: {corrupt / 'model.stablehlo'} cannot be read as a jax.export serialization (damaged, "
        "or not one); export it again with `jaxtl export CHECKPOINT --format stablehlo`"
    )
    assert "Traceback" not in result.stderr


def test_the_classifier_of_an_artifact_gives_the_checkpoints_probabilities(artifact, checkpoint):
    predictor, classifier = Predictor.from_checkpoint(checkpoint), load_classifier(artifact)
    assert classifier.classes == predictor.classes and not classifier.multilabel
    assert isinstance(classifier.transform, EvalTransform)
    image = load_image(str(photo_paths()[2]))
    np.testing.assert_allclose(classifier.probabilities(image), predictor.probabilities(image), rtol=0, atol=1e-5)
