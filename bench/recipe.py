"""The recipe's complete example end to end: PyTorch as docs/recipe.md writes it against `jaxtl train`.

Both start as fresh processes timed from outside (imports, data loading, compilation included), on
the same generated 5-class ImageFolder (60 train / 20 val JPEGs per class by default), from the same
initial ResNet-18 weights: a torchvision model saved once as a .pth (no download needed), which the
PyTorch script loads and jaxtl converts (``jaxtl convert``, done once before the timing, as a
download + conversion would be). Both train a new 5-way head on the frozen backbone with AdamW
(1e-3, weight decay 1e-4), batch 64, 10 epochs, and keep the best checkpoint by validation accuracy.

The PyTorch side is the recipe verbatim (bench/recipe_torch.py): ``model.train()`` every epoch, so
its frozen backbone's BatchNorm runs on batch statistics and updates its running statistics; jaxtl's
head_only policy keeps frozen BatchNorm in eval mode, computes the backbone's features once and
trains the head on them. jaxtl runs twice: with an empty XLA compilation cache, then with the cache
the first run filled; with ``--ynnpack`` a third time, with XLA:CPU's dots in YNNPACK (jaxtl/xla.py)
and a cache an untimed run of it filled. Rounds alternate; the table gives the median wall time, best validation
accuracy and peak resident memory of each side's main process.

    python bench/recipe.py [--rounds 1] [--epochs 10] [--workers 2] [--ynnpack] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def timed(command: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process in MiB, stdout+stderr) of a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{out[-3000:]}")
    return seconds, usage.ru_maxrss // 1024, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each side (alternating)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / jaxtl loader threads")
    parser.add_argument("--per-class", type=int, default=60, help="train images per class (val: a third)")
    parser.add_argument("--ynnpack", action="store_true", help="also time jaxtl with YNNPACK dots (jaxtl/xla.py)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    from jaxtl.data import generate_synthetic

    work = Path(tempfile.mkdtemp(prefix="jaxtl-recipe-"))
    data = generate_synthetic(work / "data", train_per_class=args.per_class, val_per_class=args.per_class // 3)
    torch.manual_seed(0)
    weights = work / "resnet18-initial.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "xla-cache"), PYTHONUNBUFFERED="1")
    converted = work / "resnet18-initial"
    subprocess.run(
        [sys.executable, "-m", "jaxtl.cli", "convert", "resnet18", "--weights", str(weights), "--out", str(converted)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip

    torch_cmd = [
        sys.executable,
        str(HERE / "recipe_torch.py"),
        str(data),
        str(weights),
        str(args.epochs),
        str(args.workers),
    ]

    def jaxtl_cmd(run: str) -> list[str]:
        sets = {
            "run_dir": str(work / run),
            "model.weights": str(converted),
            "data.source": "folder",
            "data.root": str(data),
            "data.num_workers": str(args.workers),
            "phases.0.epochs": str(args.epochs),
        }
        command = [
            sys.executable,
            "-m",
            "jaxtl.cli",
            "train",
            str(ROOT / "configs" / "resnet18_feature_extraction.yaml"),
        ]
        return command + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}; "
        f"{args.per_class * 5} train / {args.per_class // 3 * 5} val images, {args.epochs} epochs, "
        f"{args.workers} workers",
        flush=True,
    )
    from jaxtl.xla import use_ynnpack, ynnpack_supported

    jaxtl_sides = [("jaxtl (cold cache)", "cold", {}), ("jaxtl (warm cache)", "warm", {})]
    if args.ynnpack:
        if not ynnpack_supported():
            parser.error("--ynnpack: the flag was not tested with this jaxlib (see jaxtl/xla.py)")
        ynn_env = dict(env)
        use_ynnpack(ynn_env)
        # Its own cache, filled by a run before the timing: the flag is part of the compile's key.
        jaxtl_sides.append(("jaxtl (YNNPACK, warm cache)", "ynnpack", ynn_env))
    results: dict[str, list] = {"torch": [], **{name: [] for name, _, _ in jaxtl_sides}}
    for r in range(args.rounds):
        seconds, rss, out = timed(torch_cmd, env)
        accuracy = float(re.findall(r"best_val_acc=([0-9.]+)", out)[-1])
        results["torch"].append((seconds, accuracy, rss))
        print(f"torch  round {r + 1}: {seconds:6.1f} s  best val acc {accuracy:.3f}  peak RSS {rss} MiB", flush=True)
        # An empty compilation cache, then the same cache as the cold run left it.
        for name, cache, side_env in jaxtl_sides:
            cache_dir = work / ("xla-cache-ynnpack" if side_env else f"xla-cache-{r}")
            run_env = dict(side_env or env, JAX_COMPILATION_CACHE_DIR=str(cache_dir))
            if side_env and r == 0:
                timed(jaxtl_cmd("warm-up-ynnpack"), run_env)
            seconds, rss, out = timed(jaxtl_cmd(f"run-{cache}-{r}"), run_env)
            accuracy = float(re.findall(r"best val acc@1 ([0-9.]+)", out)[-1])
            results[name].append((seconds, accuracy, rss))
            print(
                f"{name} round {r + 1}: {seconds:6.1f} s  best val acc {accuracy:.3f}  peak RSS {rss} MiB", flush=True
            )

    torch_s = statistics.median(s for s, _, _ in results["torch"])
    width = max(map(len, results))
    print(f"\n{'side':<{width}} {'wall s':>8} {'best val acc':>13} {'peak RSS MiB':>13} {'time / torch':>13}")
    summary = {}
    for name, runs in results.items():
        s = statistics.median(x for x, _, _ in runs)
        acc = statistics.median(a for _, a, _ in runs)
        rss = max(m for _, _, m in runs)
        summary[name] = {"seconds": s, "best_val_acc": acc, "peak_rss_mib": rss, "time_over_torch": s / torch_s}
        print(f"{name:<{width}} {s:8.1f} {acc:13.3f} {rss:13d} {s / torch_s:12.3f}x")
    print("(time / torch < 1: jaxtl faster; peak RSS of the main process, DataLoader workers not counted)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "recipe",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": vars(args) | {"json": str(args.json)},
            "runs": results,
            "summary": summary,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
