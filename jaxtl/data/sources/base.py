"""What every image source is: the Source protocol, sources one after another, and the image loader they share.

A source is a sequence of examples: ``len(source)``, ``source.load(i) -> (PIL RGB image, label)``,
``source.describe(i)`` (a path or a record name, for error messages), ``source.classes``. Images
are decoded only when loaded, in the loader's worker threads. A single-label source's label is the
class index; a multi-label source (``multilabel = True``) gives a (num_classes,) uint8 multi-hot vector.
Optional: ``labels()`` (every label without decoding), ``fingerprint()`` (the decoded cache's key),
``epoch_order(seed, epoch)`` (the train order, e.g. WebDataset shard by shard) and ``problems`` (the rows
or files skipped as bad, each a message).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxtl.errors import DataError


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
        self.multilabel = is_multilabel(sources[0])
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


def load_image(path: str, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """torchvision's ``pil_loader`` (``Image.open(f).convert("RGB")``) with errors that name the file.

    Grayscale, RGBA, palette, CMYK and 16-bit images convert exactly as torchvision converts them.
    Images over ``max_pixels`` (PIL's decompression-bomb limit by default) are refused.
    """
    try:
        with open(path, "rb") as f:
            return decode_image(f, path, max_pixels, size=lambda: _size_of(path))
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable or remove it") from None
    except FileNotFoundError:
        kind = "a broken symlink" if os.path.islink(path) else "no such file"
        raise DataError(f"{path}: {kind}") from None


def decode_image(
    file: BinaryIO, name: str, max_pixels: int | None = Image.MAX_IMAGE_PIXELS, *, size: Callable[[], int | None]
) -> Image.Image:
    """:func:`load_image` of an open binary file (a file in a tar, bytes in a ``BytesIO``), errors naming ``name``;
    ``size()`` gives its size in bytes for the message about a file PIL cannot read."""
    try:
        image = Image.open(file)
        pixels = image.width * image.height
        if max_pixels is not None and pixels > max_pixels:
            raise DataError(
                f"{name}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of {max_pixels} "
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
        raise DataError(f"{name}: {error}; if the image is trusted, raise data.max_image_pixels") from None
    except UnidentifiedImageError:
        bytes_ = size()
        what = "an empty (zero-byte) file" if bytes_ == 0 else f"not an image PIL can read ({bytes_} bytes)"
        raise DataError(f"{name}: {what}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"{name}: cannot decode the image ({error}); the file is probably truncated or corrupt"
        ) from None


def allow_pixels(max_pixels: int | None) -> None:
    """Lets PIL open images up to ``max_pixels`` (None: any): PIL refuses images over twice its global limit inside
    ``Image.open``, so a trusted larger limit lifts it, process-wide; :func:`decode_image` applies ``max_pixels``."""
    if max_pixels is None or (Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = None


def _size_of(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def check_same_classes(splits: dict[str, Source], where: object, hint: str) -> None:
    """Every split of ``splits`` has the first split's classes, in its order; else a DataError naming the classes
    only in each, ending with ``hint`` (what to do)."""
    reference_split, reference = next(iter(splits.items()))
    for split, source in splits.items():
        if source.classes != reference.classes:
            only_here = sorted(set(source.classes) - set(reference.classes))
            only_there = sorted(set(reference.classes) - set(source.classes))
            raise DataError(
                f"the splits of {where} have different classes: only in {split}: {only_here or '-'}; only in "
                f"{reference_split}: {only_there or '-'}"
                + ("" if only_here or only_there else " (the same names in another order)")
                + f". {hint}"
            )


def is_multilabel(source: Source) -> bool:
    """Whether ``source`` gives multi-hot label vectors (``multilabel = True``) rather than class indices."""
    return bool(getattr(source, "multilabel", False))


def labels_of(source: Source) -> np.ndarray:
    """Every example's label, in index order: (N,) int64 class indices, or (N, C) uint8 for a multi-label source.
    From the source's ``labels()`` where it has one, otherwise by loading every example."""
    dtype = np.uint8 if is_multilabel(source) else np.int64
    if callable(getattr(source, "labels", None)):
        return np.asarray(source.labels(), dtype)
    if isinstance(source, ConcatSource):
        return np.concatenate([labels_of(part) for part in source.sources])
    return np.asarray([source.load(index)[1] for index in range(len(source))], dtype)
