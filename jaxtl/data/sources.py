"""Random-access image sources: an ImageFolder with torchvision's semantics, and tfds datasets.

A source is a sequence of examples: ``len(source)``, ``source.load(i) -> (PIL RGB image, label)``,
``source.describe(i)`` (a path or a record name, for error messages), ``source.classes``. Images
are decoded only when loaded, in the loader's worker threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxtl.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS; matched case-insensitively, as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Source(Protocol):
    classes: tuple[str, ...]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...

    def describe(self, index: int) -> str: ...


class ConcatSource:
    """Sources one after the other: index ``i`` of the second is ``len(first) + i`` here."""

    def __init__(self, *sources: Source):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = sources
        self.classes = sources[0].classes
        self._ends = np.cumsum([len(s) for s in sources])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _locate(self, index: int) -> tuple[Source, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} examples")
        part = int(np.searchsorted(self._ends, index, side="right"))
        return self.sources[part], index - (int(self._ends[part - 1]) if part else 0)

    def load(self, index: int) -> tuple[Image.Image, int]:
        source, local = self._locate(index)
        return source.load(local)

    def describe(self, index: int) -> str:
        source, local = self._locate(index)
        return source.describe(local)

    def __repr__(self) -> str:
        return f"ConcatSource({', '.join(map(repr, self.sources))})"


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


def load_image(path: str, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """torchvision's ``pil_loader`` (``Image.open(f).convert("RGB")``) with errors that name the file.

    Grayscale, RGBA, palette, CMYK and 16-bit images convert exactly as torchvision converts them.
    Images over ``max_pixels`` (PIL's decompression-bomb limit by default) are refused.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise DataError(
                    f"{path}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of {max_pixels} "
                    "(PIL's decompression-bomb guard); if the image is trusted, raise data.max_image_pixels"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if image.mode == "RGB":  # convert("RGB") would return a copy of the same pixels
                    image.load()
                    return image
                return image.convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: {error}; if the image is trusted, raise data.max_image_pixels") from None
    except UnidentifiedImageError:
        size = _size_of(path)
        what = "an empty (zero-byte) file" if size == 0 else f"not an image PIL can read ({size} bytes)"
        raise DataError(f"{path}: {what}") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable or remove it") from None
    except FileNotFoundError:
        kind = "a broken symlink" if os.path.islink(path) else "no such file"
        raise DataError(f"{path}: {kind}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"{path}: cannot decode the image ({error}); the file is probably truncated or corrupt"
        ) from None


def _size_of(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


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
        if max_pixels is None or (Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS):
            # PIL refuses images over twice its global limit inside Image.open; a trusted larger
            # limit has to lift it (process-wide), and load_image applies max_pixels itself.
            Image.MAX_IMAGE_PIXELS = None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path, self.max_pixels), label

    def describe(self, index: int) -> str:
        return self.samples[index][0]

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
    reference_split, reference = next(iter(folders.items()))
    for split, folder in folders.items():
        if folder.classes != reference.classes:
            only_here = sorted(set(folder.classes) - set(reference.classes))
            only_there = sorted(set(reference.classes) - set(folder.classes))
            raise DataError(
                f"the splits of {root} have different classes: only in {split}: {only_here or '-'}; "
                f"only in {reference_split}: {only_there or '-'}. Every split needs the same class folders."
            )
    return folders


class TfdsSource:
    """A split of a prepared tfds dataset read through ``tfds.data_source`` (array_record, no tensorflow).

    The dataset must be prepared first (``jaxtl data prepare NAME``), which runs in its own process.
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError("tfds datasets need tensorflow-datasets: pip install 'jaxtl[data]'") from None
        self.name, self.split = name, split
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(
                f"{name!r} is not in the tfds catalog (https://www.tensorflow.org/datasets/catalog)"
            ) from None
        # as_data_source, not tfds.data_source: the latter downloads and prepares a missing
        # dataset, which needs tensorflow; here an unprepared dataset is an error.
        try:
            self._source = builder.as_data_source(split=split)
        except (KeyError, ValueError, AssertionError, FileNotFoundError, NotImplementedError) as error:
            available = ", ".join(builder.info.splits) or "none prepared"
            raise DataError(
                f"tfds dataset {name!r} split {split!r} cannot be read from {builder.data_dir} (splits: {available}): "
                f"{str(error).strip(chr(34))}. Prepare it first: jaxtl data prepare {name}"
                + (f" --data-dir {data_dir}" if data_dir else "")
            ) from None
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise DataError(f"tfds dataset {name!r} has no feature {key!r} (features: {', '.join(features)})")
        self.image_key, self.label_key = image_key, label_key
        self.classes = tuple(features[label_key].names)
        self._data_dir, self._version = str(builder.data_dir), str(builder.info.version)

    def fingerprint(self) -> str:
        """What this split's images are, for the decoded cache's key: the dataset, its version, the split and
        keys, and the names, sizes and modification times of its prepared files (a dataset prepared again
        gets a new entry)."""
        files = []
        with contextlib.suppress(OSError):  # mock data (tfds.testing) has no files
            for path in sorted(Path(self._data_dir).iterdir()):
                if path.is_file():
                    stat = path.stat()
                    files.append([path.name, stat.st_size, stat.st_mtime_ns])
        return json.dumps([self.name, self._version, self.split, self.image_key, self.label_key, files])

    def __len__(self) -> int:
        return len(self._source)

    def load(self, index: int) -> tuple[Image.Image, int]:
        example = self._source[index]
        image = np.asarray(example[self.image_key])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return Image.fromarray(image).convert("RGB"), int(example[self.label_key])

    def labels(self) -> np.ndarray:
        """Every record's label (each record is read)."""
        return np.asarray([int(self._source[i][self.label_key]) for i in range(len(self))], np.int64)

    def describe(self, index: int) -> str:
        return f"tfds {self.name}[{self.split}] record {index}"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}: {len(self)} examples)"


def labels_of(source: Source) -> np.ndarray:
    """Every example's label, in index order: from the source's ``labels()`` or file list where it has one,
    otherwise by loading every example."""
    if callable(getattr(source, "labels", None)):
        return np.asarray(source.labels(), np.int64)
    if isinstance(source, ImageFolder):
        return np.asarray([label for _, label in source.samples], np.int64)
    if isinstance(source, ConcatSource):
        return np.concatenate([labels_of(part) for part in source.sources])
    return np.asarray([source.load(index)[1] for index in range(len(source))], np.int64)
