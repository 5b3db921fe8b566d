"""The command line, run as a user runs it: convert, export, parity, models, and its errors."""

import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from convert.random_models import randomized_torchvision_model

JAXTL = [sys.executable, "-m", "jaxtl.cli"]


def run(*args, check=True):
    result = subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=600, env=os.environ)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def weight_file(tmp_path):
    torch_model = randomized_torchvision_model("resnet18", num_classes=5, seed=7)
    buffer = io.BytesIO()
    torch.save(torch_model.state_dict(), buffer)
    path = tmp_path / f"resnet18-{hashlib.sha256(buffer.getvalue()).hexdigest()[:8]}.pth"
    path.write_bytes(buffer.getvalue())
    return torch_model, path


def test_convert_then_export_gives_back_the_same_torchvision_model(tmp_path, weight_file):
    torch_model, path = weight_file
    out = tmp_path / "converted"
    result = run("convert", "resnet18", "--weights", str(path), "--out", str(out))
    assert f"written to {out}" in result.stdout and "5 classes" in result.stdout

    exported = tmp_path / "export" / "model.pth"
    run("export", str(out), "--out", str(exported))
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), torch_model.eval()(x))
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["arch"] == "resnet18" and sidecar["num_classes"] == 5


@pytest.mark.slow
def test_parity_command_prints_what_it_checked():
    result = run("parity", "resnet18", "--size", "33x47")
    for line in ["eval logits", "train logits", "running stats", "gradients", "export logits"]:
        assert line in result.stdout
    assert "PASS" in result.stdout


def test_models_lists_architectures_and_default_weights():
    result = run("models")
    assert "resnet50             IMAGENET1K_V1, IMAGENET1K_V2 (DEFAULT)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "resnet05", "--weights", "DEFAULT"], "unknown architecture 'resnet05'. Did you mean resnet50"),
        (["convert", "resnet18", "--weights", "IMAGENET1K_V9"], "unknown weights 'IMAGENET1K_V9' for resnet18"),
        (["convert", "resnet18", "--weights", "/missing/file.pth"], "weights file /missing/file.pth does not exist"),
        (["export", "/missing/dir", "--out", "x.pth"], "/missing/dir is not a jaxtl converted-weights directory"),
        (["parity", "resnet05"], "unknown architecture 'resnet05'"),
    ],
)
def test_bad_input_gets_one_clear_error(args, message):
    result = run(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_describes_every_command():
    result = run("--help")
    for command in ["models", "convert", "export", "parity"]:
        assert command in result.stdout
    assert "weights-only" in run("convert", "--help").stdout
