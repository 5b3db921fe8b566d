"""A generated, deterministic, learnable image dataset written as an ImageFolder of JPEGs.

The quickstart trains on it and the tests use it: no download, the same bytes for the same seed.
Each class is a kind of figure (a shape or a texture) drawn at a random colour, size, position and
rotation over a random background (flat, gradient or noise); image sizes and aspect ratios vary so
that the resize and crop of the transforms are exercised.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxtl.errors import DataError

CLASSES = ("checkerboard", "circle", "square", "stripes", "triangle", "cross", "ring", "dots")
_VERSION = 1  # bump when the drawing changes: cached datasets are keyed by it


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _distinct_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A colour at least a fixed distance from the background's mean, so the figure stays visible."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(100):
        colour = np.asarray(_colour(rng))
        if np.linalg.norm(colour - mean) > 120:
            break
    return tuple(int(c) for c in colour)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(np.asarray(_colour(rng), np.uint8), (height, width, 3)).copy()
    if kind == 1:
        a, b = np.asarray(_colour(rng), np.float32), np.asarray(_colour(rng), np.float32)
        t = np.linspace(0.0, 1.0, width if rng.integers(2) else height, dtype=np.float32)
        line = a + (b - a) * t[:, None]
        grid = line[None, :, :] if len(t) == width else line[:, None, :]
        return np.broadcast_to(grid, (height, width, 3)).astype(np.uint8)
    base = np.asarray(_colour(rng), np.float32)
    noise = rng.normal(0.0, 40.0, (height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / sides),
            cy + radius * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _draw(name: str, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    background = _background(rng, height, width)
    image = Image.fromarray(background)
    _figure(image, name, rng, background, (0.18, 0.4))
    return image


def _figure(image: Image.Image, name: str, rng: np.random.Generator, background: np.ndarray, size: tuple) -> None:
    """Draws one figure of class ``name`` on ``image``, its radius ``size`` (a range) times the shorter side."""
    draw = ImageDraw.Draw(image)
    colour = _distinct_colour(rng, background)
    width, height = image.size
    short = min(height, width)
    radius = rng.uniform(*size) * short
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.25)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=colour)
    elif name == "cross":
        arm = max(2, int(radius * 0.35))
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(theta), radius * math.sin(theta)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=arm)
    elif name == "dots":
        r = max(2.0, radius * 0.18)
        for _ in range(int(rng.integers(5, 10))):
            x, y = rng.uniform(cx - radius, cx + radius), rng.uniform(cy - radius, cy + radius)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:  # textures fill a rotated square patch
        patch = int(2 * radius)
        period = max(4, int(rng.uniform(0.12, 0.25) * patch))
        yy, xx = np.mgrid[0:patch, 0:patch]
        if name == "stripes":
            mask = (xx // period) % 2 == 0
        else:  # checkerboard
            mask = ((xx // period) + (yy // period)) % 2 == 0
        texture = Image.fromarray(np.where(mask[..., None], np.asarray(colour, np.uint8), 0).astype(np.uint8))
        alpha = Image.fromarray((mask * 255).astype(np.uint8))
        rotation = float(np.degrees(angle))
        texture = texture.rotate(rotation, expand=False)
        alpha = alpha.rotate(rotation, expand=False)
        image.paste(texture, (int(cx - radius), int(cy - radius)), alpha)


def generate_synthetic(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    num_classes: int = 5,
    train_per_class: int = 60,
    val_per_class: int = 20,
    min_size: int = 160,
    max_size: int = 320,
    multilabel: bool = False,
) -> Path:
    """Writes (once) and returns ``root/{train,val}/<class>/<n>.jpg``.

    Args:
        root: the dataset folder; by default a folder in jaxtl's cache named by the arguments.
        seed: the same seed gives the same images, byte for byte.
        num_classes: 2 to 8 figure classes (:data:`CLASSES`, in order).
        train_per_class, val_per_class: images per class in each split.
        min_size, max_size: bounds of each image's height and width (drawn independently).

    A folder that already holds a complete dataset with the same arguments is reused; otherwise the
    dataset is written to a staging folder and renamed into place, so a partial one is never used.

    ``multilabel=True`` writes a multi-label set instead: ``root/images/<split>-<n>.jpg`` each with one to three
    figures of different classes (each class in an image with probability 0.35, at least one), and
    ``root/{train,val}.csv`` with the columns ``image`` and ``labels`` (the image's classes, space-separated,
    in :data:`CLASSES` order): the Kaggle layout, read by :class:`jaxtl.data.sources.LabelFileSource`.
    ``train_per_class`` and ``val_per_class`` are then ``num_classes`` times fewer than the images per split.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise DataError(f"num_classes={num_classes}: the synthetic dataset has 2 to {len(CLASSES)} classes")
    if train_per_class < 1 or val_per_class < 1:
        raise DataError(f"train_per_class={train_per_class}, val_per_class={val_per_class}: each must be at least 1")
    if not 32 <= min_size <= max_size:
        raise DataError(f"image sizes min_size={min_size}, max_size={max_size} must satisfy 32 <= min <= max")
    params = {
        "version": _VERSION,
        "seed": seed,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "min_size": min_size,
        "max_size": max_size,
    }
    if multilabel:
        params["multilabel"] = True
    if root is None:
        from jaxtl.weights import cache_dir

        name = "synthetic-" + "-".join(f"{k}{v}" for k, v in params.items())
        root = cache_dir() / "datasets" / name
    root = Path(root)
    marker = root / "synthetic.json"
    if marker.exists():
        if json.loads(marker.read_text()) == params:
            return root
        raise DataError(f"{root} holds a synthetic dataset made with other arguments ({marker}); choose another folder")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not a synthetic dataset; choose an empty or new folder")
    staging = root.parent / f".{root.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        if multilabel:
            _write_multilabel(staging, params)
        for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for class_index, name in enumerate(CLASSES[:num_classes] if not multilabel else ()):
                folder = staging / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split_index, class_index, i])
                    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
                    _draw(name, rng, height, width).save(folder / f"{i:05d}.jpg", quality=90)
        (staging / "synthetic.json").write_text(json.dumps(params, indent=1))
        if root.exists():
            root.rmdir()  # empty, checked above
        try:
            os.replace(staging, root)
        except OSError:
            if not marker.exists():  # another process finished the same dataset first: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_multilabel(staging: Path, params: dict) -> None:
    """The multi-label set of :func:`generate_synthetic` (``multilabel=True``) under ``staging``."""
    classes = CLASSES[: params["num_classes"]]
    (staging / "images").mkdir(parents=True)
    for split_index, split in enumerate(("train", "val")):
        rows = ["image,labels"]
        for i in range(params[f"{split}_per_class"] * len(classes)):
            rng = np.random.default_rng([params["seed"], 100 + split_index, i])
            present = rng.random(len(classes)) < 0.35
            if not present.any():
                present[rng.integers(len(classes))] = True
            if present.sum() > 3:
                present[rng.permutation(np.flatnonzero(present))[3:]] = False
            height, width = (int(v) for v in rng.integers(params["min_size"], params["max_size"] + 1, 2))
            background = _background(rng, height, width)
            image = Image.fromarray(background)
            for name in (c for c, here in zip(classes, present) if here):
                _figure(image, name, rng, background, (0.12, 0.22))
            name = f"images/{split}-{i:05d}.jpg"
            image.save(staging / name, quality=90)
            rows.append(f"{name},{' '.join(c for c, here in zip(classes, present) if here)}")
        (staging / f"{split}.csv").write_text("\n".join(rows) + "\n")
