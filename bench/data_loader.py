"""Input pipeline throughput: jaxtl's loader against torch's DataLoader, same files, transform, workers.

Both decode the generated ImageFolder (the quickstart's 5 classes, 60 train images per class, or a
larger set with --per-class), apply the weights' eval transform (resize, center crop, normalise)
and batch it. torch: ``DataLoader(ImageFolder(root, weights.transforms()), num_workers=W,
shuffle=True)``. jaxtl: ``Loader(ImageFolder(root), EvalTransform(spec), num_workers=W,
shuffle=True)`` followed by the on-device normalisation of each batch (jitted, blocked on), so
both sides end with normalised float32 batches. Rounds alternate between the two after a warm-up
epoch each; the table gives median images per second and the ratio jaxtl / torch.

    python bench/data_loader.py [--workers 2] [--batch 32] [--rounds 5] [--per-class 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
import torchvision

from jaxtl.data import EvalTransform, ImageFolder, Loader, generate_synthetic, normalize
from jaxtl.weights import get_weight_spec


def torch_epoch(loader) -> int:
    count = 0
    for images, _ in loader:
        count += images.shape[0]
    return count


def jaxtl_epoch(loader: Loader, epoch: int, to_model) -> int:
    count = 0
    out = None
    for batch in loader.epoch(epoch):
        out = to_model(batch.images)
        count += int(batch.mask.sum())
    jax.block_until_ready(out)
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=60, help="train images per class of the generated set")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    root = generate_synthetic(train_per_class=args.per_class) / "train"
    weights = torchvision.models.get_model_weights(args.arch).DEFAULT
    spec = get_weight_spec(args.arch, "DEFAULT")
    p = spec.preprocessing

    torch.set_num_threads(1)  # the main process only collates; workers do the work on both sides
    torch_loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(root), transform=weights.transforms()),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    jaxtl_loader = Loader(ImageFolder(root), EvalTransform(p), batch_size=args.batch, shuffle=True, num_workers=args.workers)
    to_model = jax.jit(lambda images: normalize(images, p.mean, p.std, xp=jnp))

    n = len(jaxtl_loader.source)
    print(f"{n} images of {root} ({p.resize_size}->{p.crop_size}, {p.interpolation}), batch {args.batch}, "
          f"{args.workers} workers, {args.rounds} rounds; {platform.processor() or platform.machine()}")
    torch_epoch(torch_loader), jaxtl_epoch(jaxtl_loader, 0, to_model)  # warm-up: workers, caches, compile
    times = {"torch": [], "jaxtl": []}
    for r in range(args.rounds):
        start = time.perf_counter()
        assert torch_epoch(torch_loader) == n
        times["torch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert jaxtl_epoch(jaxtl_loader, r + 1, to_model) == n
        times["jaxtl"].append(time.perf_counter() - start)
    jaxtl_loader.close()

    rates = {side: n / statistics.median(ts) for side, ts in times.items()}
    ratio = rates["jaxtl"] / rates["torch"]
    print(f"{'pipeline':<40} {'img/s (median)':>15}")
    print(f"{'torch DataLoader + weights.transforms()':<40} {rates['torch']:>15.1f}")
    print(f"{'jaxtl Loader + EvalTransform':<40} {rates['jaxtl']:>15.1f}")
    print(f"ratio jaxtl / torch: {ratio:.2f}x")
    result = {
        "benchmark": "data_loader",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": n,
        "batch": args.batch,
        "workers": args.workers,
        "seconds": times,
        "images_per_second": rates,
        "ratio_jaxtl_over_torch": ratio,
        "torch": torch.__version__,
        "jax": jax.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
