"""The GPU benchmark's entry point runs in its smoke mode on any backend, so it cannot rot between GPU loans."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_runs_every_case(tmp_path):
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu.py"),
        "--smoke",
        "--data",
        str(tmp_path / "jpegs"),
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["failures"] == []
    cases = {(r["case"], r["arch"]) for r in data["results"]}
    assert cases == {
        ("train bf16", "resnet18"), ("eval bf16", "resnet18"), ("loader->train", "resnet18"),
        ("loader threads", "resnet18"), ("loader(cache)->train, 1st epoch", "resnet18"),
        ("loader(cache)->train, epoch 2+", "resnet18"), ("loader(cache)+trivialaugment->train", "resnet18"),
    }  # fmt: skip
    for r in data["results"]:
        # Both frameworks measured, and the ratio is theirs.
        assert r["jaxtl"] > 0 and r["torch"] > 0, r
        assert math.isclose(r["ratio"], r["jaxtl"] / r["torch"]), r
    rows = {r["case"]: r for r in data["results"]}
    # The first epoch from the cache includes building it; the later epochs are also given as a fraction of the
    # device-resident train rate measured before them.
    assert rows["loader(cache)->train, 1st epoch"]["extra"]["cache_build_s"] > 0
    for case in ("loader(cache)->train, epoch 2+", "loader(cache)+trivialaugment->train"):
        fraction = rows[case]["jaxtl"] / rows["train bf16"]["jaxtl"]
        assert math.isclose(rows[case]["extra"]["of_device_resident"], fraction), rows[case]
        assert f"{fraction:.0%} of device-resident train" in result.stdout
    # Every row is printed as it comes and again in the table at the end.
    assert result.stdout.count("resnet18") >= 2 * len(cases)
    # 5 generated JPEGs (5 classes x 1) per epoch went through every loader.
    assert result.stdout.count(" 5 JPEGs/epoch") == 2 * 5
