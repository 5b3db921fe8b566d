"""ViT attention: jax.nn.dot_product_attention's implementations against a float64 reference, and their speed.

ViT's attention (jaxtl/models/vit.py) calls ``jax.nn.dot_product_attention`` without naming an implementation, which
is XLA's. On an NVIDIA GPU, cuDNN's fused kernel (``implementation="cudnn"``, bf16 and fp16 only) may be faster;
jaxtl would choose it where its error stays within what XLA's own bf16 computation makes. This prints, for
ViT-B/16's shapes (197 tokens, 12 heads of 64) and ViT-L/16's (16 heads), each implementation's largest error
against float64 and its time per call, with torch's ``scaled_dot_product_attention`` beside them where torch has the
device, so that one run on a GPU answers the question.

    python bench/attention.py [--batch 64] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"vit_b_16": (197, 12, 64), "vit_l_16": (197, 16, 64)}


def reference(q, k, v) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(d)) v in numpy, (B, T, N, H)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", scores / scores.sum(-1, keepdims=True), v)


def timed(fn, *args, rounds: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_row(q, k, v, dtype_name: str, rounds: int) -> dict | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    tq, tk, tv = (torch.from_numpy(np.array(a, np.float32)).to(device, dtype).transpose(1, 2) for a in (q, k, v))

    def run():
        out = F.scaled_dot_product_attention(tq, tk, tv)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return {"out": out.transpose(1, 2).float().cpu().numpy(), "seconds": statistics.median(times), "device": device}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="batch 2, 3 rounds: any backend, for the tests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batch, rounds = (2, 3) if args.smoke else (args.batch, args.rounds)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {batch}")
    print(f"{'shape':10} {'dtype':9} {'implementation':16} {'max |err|':>10} {'ms/call':>9}")
    rows = []
    for name, (tokens, heads, dim) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (batch, tokens, heads, dim), jnp.float32) for key in keys)
        expected = reference(q, k, v)
        for dtype_name in ("float32", "bfloat16", "float16"):
            dtype = jnp.dtype(dtype_name)
            args_ = tuple(a.astype(dtype) for a in (q, k, v))
            for implementation in ("xla", "cudnn"):
                row = {"shape": name, "dtype": dtype_name, "implementation": implementation}
                try:
                    fn = jax.jit(
                        lambda q, k, v, i=implementation: jax.nn.dot_product_attention(q, k, v, implementation=i)
                    )
                    out = np.asarray(fn(*args_).astype(jnp.float32))
                    row |= {
                        "max_abs_error": float(np.abs(out - expected).max()),
                        "ms": 1e3 * timed(fn, *args_, rounds=rounds),
                    }
                except Exception as error:  # cuDNN's kernel refuses float32, CPUs and some shapes: say why
                    row["unavailable"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
                rows.append(row)
            torch_result = torch_row(q, k, v, dtype_name, rounds)
            if torch_result is not None:
                error = float(np.abs(torch_result["out"] - expected).max())
                implementation = f"torch sdpa ({torch_result['device']})"
                rows.append(
                    {"shape": name, "dtype": dtype_name, "implementation": implementation, "max_abs_error": error,
                     "ms": 1e3 * torch_result["seconds"]}
                )  # fmt: skip
    for row in rows:
        if "unavailable" in row:
            print(f"{row['shape']:10} {row['dtype']:9} {row['implementation']:16} unavailable: {row['unavailable']}")
        else:
            print(
                f"{row['shape']:10} {row['dtype']:9} {row['implementation']:16} "
                f"{row['max_abs_error']:10.2e} {row['ms']:9.3f}"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
