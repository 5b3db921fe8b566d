"""Input pipeline throughput: jaxtl's loader against torch's DataLoader, same files, transform, workers.

Both decode the generated ImageFolder (the quickstart's 5 classes, 60 train images per class, or a
larger set with --per-class), apply the weights' eval transform (resize, center crop, normalise),
or with ``--train`` RandomResizedCrop + flip, and batch it. torch: ``DataLoader(ImageFolder(root,
transform), num_workers=W, shuffle=True)``. jaxtl: ``Loader(ImageFolder(root), transform,
num_workers=W, shuffle=True)`` with worker threads and with worker processes, each followed by the
on-device normalisation of each batch (jitted, blocked on), so every side ends with normalised
float32 batches. Rounds alternate between the sides after a warm-up epoch each; the table gives
median images per second and the ratio to torch.

    python bench/data_loader.py [--workers 2] [--batch 32] [--rounds 5] [--per-class 60] [--train]
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

from jaxtl.data import EvalTransform, ImageFolder, Loader, TrainTransform, generate_synthetic, normalize
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
    parser.add_argument("--train", action="store_true", help="RandomResizedCrop + flip instead of the eval transform")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    root = generate_synthetic(train_per_class=args.per_class) / "train"
    weights = torchvision.models.get_model_weights(args.arch).DEFAULT
    spec = get_weight_spec(args.arch, "DEFAULT")
    p = spec.preprocessing

    torch.set_num_threads(1)  # the main process only collates; workers do the work on both sides
    if args.train:
        from torchvision.transforms import v2

        torch_transform = v2.Compose([
            v2.RandomResizedCrop(p.crop_size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(p.mean, p.std),
        ])  # fmt: skip
        transform = TrainTransform(p, random_resized_crop=True, flip_p=0.5)
    else:
        torch_transform, transform = weights.transforms(), EvalTransform(p)
    torch_loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(root), transform=torch_transform),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    loaders = {
        kind: Loader(
            ImageFolder(root),
            transform,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            worker_type=kind,
        )
        for kind in ("thread", "process")
    }
    to_model = jax.jit(lambda images: normalize(images, p.mean, p.std, xp=jnp))

    n = len(loaders["thread"].source)
    print(f"{n} images of {root} ({'RandomResizedCrop + flip' if args.train else f'{p.resize_size}->{p.crop_size}'}, "
          f"{p.interpolation}), batch {args.batch}, {args.workers} workers, {args.rounds} rounds; "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    epochs = iter(range(1_000_000))
    names = {"thread": "jaxtl threads", "process": "jaxtl processes"}
    sides = {"torch": lambda: torch_epoch(torch_loader)} | {
        names[kind]: lambda loader=loader: jaxtl_epoch(loader, next(epochs), to_model)
        for kind, loader in loaders.items()
    }
    for side in sides.values():
        side()  # warm-up: workers, caches, compile
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            start = time.perf_counter()
            assert side() == n
            times[name].append(time.perf_counter() - start)
    for loader in loaders.values():
        loader.close()

    rates = {side: n / statistics.median(ts) for side, ts in times.items()}
    labels = {
        "torch": f"torch DataLoader + {'v2 train transforms' if args.train else 'weights.transforms()'}",
        "jaxtl threads": f"jaxtl Loader + {type(transform).__name__}, threads",
        "jaxtl processes": f"jaxtl Loader + {type(transform).__name__}, processes",
    }
    print(f"{'pipeline':<50} {'img/s (median)':>15} {'/ torch':>8}")
    for side, rate in rates.items():
        print(f"{labels[side]:<50} {rate:>15.1f} {rate / rates['torch']:>7.2f}x")
    result = {
        "benchmark": "data_loader",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": n,
        "batch": args.batch,
        "workers": args.workers,
        "seconds": times,
        "transform": "train" if args.train else "eval",
        "images_per_second": rates,
        "ratio_over_torch": {side: rate / rates["torch"] for side, rate in rates.items()},
        "torch": torch.__version__,
        "jax": jax.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
