"""bench/attention.py in its smoke mode: every implementation measured or its refusal said, on any backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_attention_benchmark_measures_xla_and_torch_against_float64(tmp_path):
    out = tmp_path / "attention.json"
    command = [sys.executable, str(ROOT / "bench" / "attention.py"), "--smoke", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        (r["shape"], r["dtype"], r["implementation"].split(" (")[0]): r for r in json.loads(out.read_text())["rows"]
    }
    assert len(rows) == 2 * 3 * 3  # two shapes, three dtypes, XLA, cuDNN and torch
    for shape in ("vit_b_16", "vit_l_16"):
        # float32: XLA's and torch's are float32 rounding away from float64; bf16: 8 bits of mantissa.
        assert rows[shape, "float32", "xla"]["max_abs_error"] < 2e-6
        assert rows[shape, "float32", "torch sdpa"]["max_abs_error"] < 2e-6
        assert 1e-4 < rows[shape, "bfloat16", "xla"]["max_abs_error"] < 3e-2
        cudnn = rows[shape, "bfloat16", "cudnn"]
        assert "unavailable" in cudnn or cudnn["max_abs_error"] < 3e-2
