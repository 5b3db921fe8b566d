"""The command line, run as a user runs it: convert, export, parity, models, and its errors."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

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


# Two processes; the quick subset runs `jaxtl convert` in test_weight_layouts and the export in test_export_onnx.
@pytest.mark.slow
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
        (["export", "/missing/dir", "--out", "x.pth"], "/missing/dir does not exist; export a training checkpoint"),
        (["parity", "resnet05"], "unknown architecture 'resnet05'"),
    ],
)
def test_bad_input_gets_one_clear_error(args, message):
    result = run(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# main() in a fresh process, then the heavy modules it loaded.
LOADED = """import sys
from jaxtl.cli import main
code = main(sys.argv[1:])
print("loaded:", *sorted(m for m in ("jax", "torch") if m in sys.modules))
sys.exit(code)"""


@pytest.mark.parametrize(
    "args, message, not_loaded",
    [
        (["convert", "resnet18", "--weights", "IMAGENET1K_V9"], "unknown weights 'IMAGENET1K_V9'", "torch"),
        (["convert", "resnet18", "--weights", "/missing/file.pth"], "/missing/file.pth does not exist", "torch"),
        (["export", "/missing/dir", "--out", "x.pth"], "/missing/dir does not exist; export a training", "torch"),
        (["train", "/missing/run.yaml"], "/missing/run.yaml does not exist", "jax"),
        (["train", "configs/quickstart.yaml", "--set", "optim.lr=-1"], "optim.lr = -1.0 is out of range", "jax"),
        (["train", "--resume", "/missing/run"], "/missing/run is not a jaxtl run directory", "jax"),
    ],
    ids=["weight-name", "weight-file", "export-dir", "config-file", "config-value", "resume-dir"],
)
def test_bad_input_is_reported_before_torch_or_jax_is_loaded(args, message, not_loaded):
    root = Path(__file__).parents[2]
    command = [sys.executable, "-c", LOADED, *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    loaded = result.stdout.split("loaded:")[1].split()
    assert not_loaded not in loaded and (not_loaded == "jax" or "torch" not in loaded)


def test_the_compilation_cache_is_bounded_in_jaxtls_cache_unless_jax_is_told_otherwise(tmp_path):
    code = (
        "from jaxtl.cli import _enable_compilation_cache\n"
        "_enable_compilation_cache()\n"
        "import jax\n"
        "c = jax.config\n"
        "print(c.jax_compilation_cache_dir, c.jax_compilation_cache_max_size, "
        "c.jax_persistent_cache_min_compile_time_secs)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"JAXTL_CACHE": str(tmp_path)}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.split() == [str(tmp_path / "xla"), str(4 << 30), "0.0"]
    env |= {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine"),
        "JAX_COMPILATION_CACHE_MAX_SIZE": "-1",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2.5",
    }
    mine = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert mine.stdout.split() == [str(tmp_path / "mine"), "-1", "2.5"]


def test_help_describes_every_command():
    result = run("--help")
    for command in ["models", "convert", "export", "parity", "predict", "demo"]:
        assert command in result.stdout
    assert "weights-only" in run("convert", "--help").stdout
