"""ImageFolder with torchvision's semantics: ``root/<split>/<class>/<image>``, classes sorted by name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.data.sources.base import allow_pixels, check_same_classes, load_image
from jaxtl.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS; matched case-insensitively, as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """torchvision's ``find_classes``: every sub-directory is a class (hidden ones too), sorted by name."""
    try:
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    except FileNotFoundError:
        raise DataError(f"dataset folder {directory} does not exist") from None
    except NotADirectoryError:
        raise DataError(f"dataset path {directory} is a file; expected a folder of class folders") from None
    if not classes:
        raise DataError(f"{directory} has no class folders; expected {directory}/<class>/<image>")
    return classes, {name: index for index, name in enumerate(classes)}


def make_dataset(directory: str | os.PathLike, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """torchvision's ``make_dataset``: (path, class index) in its order; empty classes are an error."""
    samples = []
    empty = []
    for target_class in sorted(class_to_idx):
        target_dir = os.path.join(directory, target_class)
        count = len(samples)
        for root, _, fnames in sorted(os.walk(target_dir, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(root, fname), class_to_idx[target_class]))
        if len(samples) == count:
            empty.append(target_class)
    if empty:
        hidden = [name for name in empty if name.startswith(".")]
        hint = f" (hidden folders count as classes, as in torchvision: remove {', '.join(hidden)})" if hidden else ""
        raise DataError(
            f"class folders without images in {directory}: {', '.join(empty)}{hint}. "
            f"Image extensions: {', '.join(IMG_EXTENSIONS)}"
        )
    return samples


class ImageFolder:
    """One split of ``root/<split>/<class>/<image>``, indexed exactly as torchvision's ImageFolder.

    Attributes:
        root: the split's folder.
        classes: class names, sorted.
        class_to_idx: name -> label, identical to ``torchvision.datasets.ImageFolder(root).class_to_idx``.
        samples: (path, label) pairs in torchvision's order.
    """

    def __init__(self, root: str | os.PathLike, *, max_pixels: int | None = Image.MAX_IMAGE_PIXELS):
        self.root = Path(root)
        classes, self.class_to_idx = find_classes(self.root)
        self.classes = tuple(classes)
        self.samples = make_dataset(self.root, self.class_to_idx)
        self.max_pixels = max_pixels
        allow_pixels(max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path, self.max_pixels), label

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def labels(self) -> np.ndarray:
        """(N,) int64: every example's class index, from the file list."""
        return np.asarray([label for _, label in self.samples], np.int64)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}: {len(self)} images, {len(self.classes)} classes)"


def image_folder_splits(
    root: str | os.PathLike, splits: Sequence[str] = ("train", "val"), **kwargs
) -> dict[str, ImageFolder]:
    """The splits of ``root/<split>/<class>/<image>``; every split must have the same classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {root}/<split>/<class>/<image>")
    missing = [split for split in splits if not (root / split).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{root} has no split folder {', '.join(missing)} (found: {', '.join(present) or 'none'}); "
            f"expected {root}/<split>/<class>/<image>"
        )
    folders = {split: ImageFolder(root / split, **kwargs) for split in splits}
    check_same_classes(folders, root, "Every split needs the same class folders.")
    return folders
