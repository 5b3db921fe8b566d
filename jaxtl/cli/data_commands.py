"""What each ``jaxtl data`` command does: prepare a tfds dataset, build the decoded cache, inspect a dataset, write
the generated one."""

from __future__ import annotations

import argparse
import sys
import time


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import subprocess

    # Its own process: tfds prepares most datasets with tensorflow, which must never share a
    # process with torch (or with training, which reads the prepared files without it).
    command = [sys.executable, "-m", "jaxtl.data.prepare", args.name]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return subprocess.call(command)


def cmd_data_cache(args: argparse.Namespace) -> int:
    from jaxtl.config import load_config

    config = load_config(args.config, args.set)
    from jaxtl.train.inputs import build_caches, config_preprocessing

    p = config_preprocessing(config)
    started = time.perf_counter()
    for split, cached in build_caches(config).items():
        size = cached.meta["bytes"] / 2**20
        bad = f", {len(cached.invalid)} unreadable (data.skip_bad_files)" if cached.invalid else ""
        print(f"{split}: {len(cached)} images{bad}, {size:.1f} MiB decoded, in {cached.path}")
    print(f"resized to {p.resize_size} ({p.interpolation}) in {time.perf_counter() - started:.1f}s; runs with "
          "data.cache: decoded read these")  # fmt: skip
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxtl.config import load_config

    config = load_config(args.config, args.set)
    from jaxtl.data.inspect import format_report, inspect_splits
    from jaxtl.train.inputs import load_data

    d = config.data
    # Skipping on: sources that can list their bad rows (source.problems) instead of stopping at the first.
    data = load_data(dataclasses.replace(d, skip_bad_files=True))
    report = inspect_splits({d.train_split: data.train, d.val_split: data.val}, num_workers=d.num_workers)
    print(format_report(report))
    return 1 if report.num_problems else 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from jaxtl.data import generate_synthetic, image_folder_splits

    root = generate_synthetic(
        args.out,
        seed=args.seed,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
    )
    splits = image_folder_splits(root)
    print(f"synthetic dataset in {root}")
    for split, folder in splits.items():
        print(f"  {split}: {len(folder)} images, classes {', '.join(folder.classes)}")
    return 0
