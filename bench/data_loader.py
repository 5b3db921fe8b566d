"""Input pipeline throughput: jaxtl's loader against torch's DataLoader, same files, transform, workers.

Two image sets: the generated ImageFolder (the quickstart's 5 classes, 60 train images per class, or
more with --per-class; 160-320 pixel images), or with ``--set photos`` (``--photos``) real photographs:
scikit-image's sample photos (astronaut, chelsea, coffee, rocket, retina, hubble_deep_field, ...) cut
and resized into ``--photos-count`` 1-3 megapixel JPEGs in 4 classes, written once (deterministically)
into jaxtl's cache directory.

Both sides decode the set, apply the weights' eval transform (resize, center crop, normalise), or with
``--train`` RandomResizedCrop + flip, and batch it. torch: ``DataLoader(ImageFolder(root, transform),
num_workers=W, shuffle=True)``. jaxtl: ``Loader(ImageFolder(root), transform, num_workers=W,
shuffle=True)`` with worker threads and with worker processes, each followed by the on-device
normalisation of each batch (jitted, blocked on), so every side ends with normalised float32 batches.

With ``--cache`` jaxtl also reads the decoded cache (``DecodedCache(tmp).build(...)``, built before the
timing, once without and once with worker processes; both build times are printed):

- eval: ``Loader(CachedSource, CachedEvalTransform)`` + the same normalisation, beside the files' sides;
  and the uint8 batches put on the device without it, as jaxtl's eval and feature steps take them (they
  normalise inside their own program, fused into the model's first layer on a GPU);
- augmented training batches: ``Loader(CachedSource, CachedTrainTransform(random_resized_crop=True,
  flip_p=0.5))`` crops (PIL, on the host) + the jitted device augmentation ``DeviceAugment(policy=
  "trivialaugment")`` until each epoch's augmented uint8 batches are ready, against torch's DataLoader
  with RandomResizedCrop + RandomHorizontalFlip + TrivialAugmentWide + PILToTensor on the files (both uint8
  at the end).

Rounds alternate between the sides after a warm-up epoch each (which also compiles the device
augmentation); the tables give median images per second and the ratio to their torch baseline.

    python bench/data_loader.py [--set generated|photos] [--workers 2] [--batch 32] [--rounds 5]
        [--per-class 60] [--photos-count 400] [--train] [--cache] [--json PATH [--append]]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from PIL import Image

from jaxtl.data import (
    CachedEvalTransform,
    CachedTrainTransform,
    DecodedCache,
    EvalTransform,
    ImageFolder,
    Loader,
    TrainTransform,
    generate_synthetic,
    normalize,
)
from jaxtl.data.augment.pipeline import DeviceAugment, make_device_augment
from jaxtl.weights import cache_dir, get_weight_spec

# The photo set's classes and the scikit-image sample images each is cut from (those that ship with
# scikit-image; the rest need a download). Grayscale ones are stored as RGB.
PHOTO_CLASSES = {
    "portrait": ("astronaut", "chelsea", "cat", "camera"),
    "scene": ("coffee", "rocket", "stereo_motorcycle", "coins"),
    "science": ("immunohistochemistry", "hubble_deep_field", "retina", "cell"),
    "texture": ("brick", "grass", "gravel", "moon"),
}
PLURAL = {"thread": "threads", "process": "processes"}
PHOTOS_VERSION = 1  # bump when the cutting changes: the written set is keyed by it


def _sample_image(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
    return Image.fromarray(np.asarray(array, np.uint8)).convert("RGB")


def _cut_photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (half to all of the area, aspect 3:4 to 16:9, either way up) resized to 1-3 megapixels,
    with a little sensor-like noise so that the JPEG's size is a photo's, not a smooth upscale's."""
    w, h = image.size
    aspect = float(rng.uniform(4 / 3, 16 / 9)) ** (1 if rng.random() < 0.75 else -1)
    area = float(rng.uniform(0.5, 1.0)) * w * h
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    pixels = float(rng.uniform(1e6, 3e6))
    out_w = round((pixels * cw / ch) ** 0.5)
    out_h = round(out_w * ch / cw)
    photo = image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noisy = np.asarray(photo, np.int16) + rng.normal(0, 3, (out_h, out_w, 1)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def generate_photos(count: int = 400, seed: int = 0) -> Path:
    """The photo set's root (``<root>/train/<class>/*.jpg``), written on first use: ``count`` JPEGs
    (quality 90) spread evenly over the classes and, within a class, over its sample images."""
    root = cache_dir() / "datasets" / f"skimage-photos-version{PHOTOS_VERSION}-seed{seed}-count{count}"
    if (root / "done").exists():
        return root
    staging = root.with_name(f".staging-{root.name}-{uuid.uuid4().hex[:8]}")
    classes = list(PHOTO_CLASSES)
    try:
        for name in classes:
            (staging / "train" / name).mkdir(parents=True)
        sources = {name: [_sample_image(s) for s in PHOTO_CLASSES[name]] for name in classes}
        for i in range(count):
            name = classes[i % len(classes)]
            images = sources[name]
            rng = np.random.default_rng([seed, i])
            photo = _cut_photo(images[(i // len(classes)) % len(images)], rng)
            photo.save(staging / "train" / name / f"{i:05d}.jpg", quality=90)
        (staging / "done").touch()
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():
            staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


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


def augmented_epoch(loader: Loader, epoch: int, augment) -> int:
    """One epoch of crops from the cache, each batch augmented on the device; blocked on every output."""
    count = 0
    outs = []
    for batch in loader.epoch(epoch):
        outs.append(augment()(batch.images, batch.indices.astype(np.int32), epoch))
        count += int(batch.mask.sum())
    jax.block_until_ready(outs)
    return count


def build_times(root: Path, preprocessing, workers: int, scratch: Path):
    """Builds the decoded cache of ``root`` twice, into fresh roots: in this process, then with ``workers``
    processes. Returns the second entry and both build times in seconds."""
    times = {}
    for name, num_workers in (("in process", 0), (f"{workers} processes", workers)):
        start = time.perf_counter()
        cached = DecodedCache(scratch / name.replace(" ", "-")).build(
            ImageFolder(root), preprocessing, num_workers=num_workers, progress=False
        )
        times[name] = time.perf_counter() - start
    return cached, times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--set", dest="image_set", choices=("generated", "photos"), default="generated")
    parser.add_argument("--photos", dest="image_set", action="store_const", const="photos", help="--set photos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=60, help="train images per class of the generated set")
    parser.add_argument("--photos-count", type=int, default=400, help="images of the photo set")
    parser.add_argument("--train", action="store_true", help="RandomResizedCrop + flip instead of the eval transform")
    parser.add_argument("--cache", action="store_true", help="add the decoded cache's eval and augmented sides")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--append", action="store_true", help="add this run to --json's list of runs")
    args = parser.parse_args(argv)

    if args.image_set == "photos":
        root = generate_photos(args.photos_count) / "train"
    else:
        root = generate_synthetic(train_per_class=args.per_class) / "train"
    weights = torchvision.models.get_model_weights(args.arch).DEFAULT
    spec = get_weight_spec(args.arch, "DEFAULT")
    p = spec.preprocessing
    from torchvision.transforms import v2

    torch.set_num_threads(1)  # the main process only collates; workers do the work on both sides
    if args.train:
        torch_transform = v2.Compose([
            v2.RandomResizedCrop(p.crop_size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(p.mean, p.std),
        ])  # fmt: skip
        transform = TrainTransform(p, random_resized_crop=True, flip_p=0.5)
    else:
        torch_transform, transform = weights.transforms(), EvalTransform(p)

    def torch_loader(transform):
        return torch.utils.data.DataLoader(
            torchvision.datasets.ImageFolder(str(root), transform=transform),
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )

    def jaxtl_loader(source, transform, kind):
        return Loader(
            source, transform, batch_size=args.batch, shuffle=True, num_workers=args.workers, worker_type=kind
        )

    loaders = {kind: jaxtl_loader(ImageFolder(root), transform, kind) for kind in ("thread", "process")}
    to_model = jax.jit(lambda images: normalize(images, p.mean, p.std, xp=jnp))
    n = len(loaders["thread"].source)
    pixels = [Image.open(path).size for path in sorted(root.glob("*/*.jpg"))]
    megapixels = statistics.median(w * h for w, h in pixels) / 1e6
    print(f"{n} images of {root} ({args.image_set}, median {megapixels:.2f} MP), "
          f"{'RandomResizedCrop + flip' if args.train else f'{p.resize_size}->{p.crop_size}'} ({p.interpolation}), "
          f"batch {args.batch}, {args.workers} workers, {args.rounds} rounds; "
          f"{platform.processor() or platform.machine()}")  # fmt: skip

    epochs = iter(range(1, 1_000_000))  # epoch 0 would do as well: every side's warm-up is an epoch of its own
    sections = {"eval" if not args.train else "train": "torch"}  # section -> its torch side
    baseline = torch_loader(torch_transform)
    sides = {"torch": lambda: torch_epoch(baseline)}
    sides |= {
        f"jaxtl {PLURAL[kind]}": lambda loader=loader: jaxtl_epoch(loader, next(epochs), to_model)
        for kind, loader in loaders.items()
    }
    labels = {
        "torch": f"torch DataLoader + {'v2 train transforms' if args.train else 'weights.transforms()'}",
        "jaxtl threads": f"jaxtl Loader + {type(transform).__name__}, threads",
        "jaxtl processes": f"jaxtl Loader + {type(transform).__name__}, processes",
    }
    section_of = dict.fromkeys(sides, next(iter(sections)))
    builds = {}
    scratch = tempfile.TemporaryDirectory(prefix="jaxtl-bench-cache-")
    if args.cache:
        cached, builds = build_times(root, p, args.workers, Path(scratch.name))
        print("decoded cache built in " + ", ".join(f"{s:.1f} s {name}" for name, s in builds.items())
              + f" ({cached.meta['bytes'] / 2**20:.0f} MiB)")  # fmt: skip
        section = next(iter(sections))
        if not args.train:
            for kind in ("thread", "process"):
                loader = jaxtl_loader(cached, CachedEvalTransform(p), kind)
                loaders[f"cache {kind}"] = loader
                sides[f"cache {PLURAL[kind]}"] = lambda loader=loader: jaxtl_epoch(loader, next(epochs), to_model)
                labels[f"cache {PLURAL[kind]}"] = f"jaxtl Loader + CachedEvalTransform (cache), {PLURAL[kind]}"
                section_of[f"cache {PLURAL[kind]}"] = section
            # What jaxtl's eval and feature steps take: uint8 batches, normalised inside the step's program.
            sides["cache uint8"] = lambda loader=loaders["cache thread"]: jaxtl_epoch(
                loader, next(epochs), jax.device_put
            )
            labels["cache uint8"] = "the same, threads, uint8 on the device (normalised in the step)"
            section_of["cache uint8"] = section
        augment = DeviceAugment(policy="trivialaugment")
        # Made on first use: jax.random.key starts JAX's threads, and torch's workers fork before that.
        device_augment = functools.cache(lambda: make_device_augment(augment, seed=0))
        torch_augment = v2.Compose([
            v2.RandomResizedCrop(p.crop_size, antialias=True), v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(),
            v2.PILToTensor(),
        ])  # fmt: skip
        augment_baseline = torch_loader(torch_augment)
        sides["torch augment"] = lambda: torch_epoch(augment_baseline)
        labels["torch augment"] = "torch DataLoader + RRC, flip, TrivialAugmentWide"
        sections["augment"] = "torch augment"
        for kind in ("thread", "process"):
            loader = jaxtl_loader(cached, CachedTrainTransform(p, random_resized_crop=True, flip_p=0.5), kind)
            loaders[f"augment {kind}"] = loader
            sides[f"augment {PLURAL[kind]}"] = lambda loader=loader: augmented_epoch(
                loader, next(epochs), device_augment
            )
            labels[f"augment {PLURAL[kind]}"] = f"jaxtl cache + host crop/flip + DeviceAugment, {PLURAL[kind]}"
        section_of |= dict.fromkeys(("torch augment", "augment threads", "augment processes"), "augment")

    # Warm-up (workers, caches, compile), torch's first: its workers fork, before JAX starts its threads.
    for name in sorted(sides, key=lambda name: not name.startswith("torch")):
        sides[name]()
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            start = time.perf_counter()
            assert side() == n
            times[name].append(time.perf_counter() - start)
    for loader in loaders.values():
        loader.close()
    scratch.cleanup()

    rates = {side: n / statistics.median(ts) for side, ts in times.items()}
    ratios = {side: rate / rates[sections[section_of[side]]] for side, rate in rates.items()}
    titles = {
        "eval": "eval batches (normalised float32)",
        "train": "train batches (normalised float32)",
        "augment": "augmented train batches (uint8): RandomResizedCrop + flip + TrivialAugmentWide",
    }
    for section in sections:
        print(f"{titles[section]}\n{'pipeline':<64} {'img/s (median)':>15} {'/ torch':>8}")
        for side, rate in rates.items():
            if section_of[side] == section:
                print(f"{labels[side]:<64} {rate:>15.1f} {ratios[side]:>7.2f}x")
    result = {
        "benchmark": "data_loader",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "set": args.image_set,
        "root": str(root),
        "images": n,
        "median_megapixels": megapixels,
        "batch": args.batch,
        "workers": args.workers,
        "rounds": args.rounds,
        "seconds": times,
        "transform": "train" if args.train else "eval",
        "labels": labels,
        "baseline": {side: sections[section_of[side]] for side in sides},
        "cache_build_seconds": builds,
        "images_per_second": rates,
        "ratio_over_torch": ratios,
        "torch": torch.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),  # after the torch workers have forked
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.json.exists():
            previous = json.loads(args.json.read_text())
            result = {"benchmark": "data_loader", "runs": previous.get("runs", [previous]) + [result]}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
