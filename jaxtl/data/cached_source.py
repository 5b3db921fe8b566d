"""Reading the decoded-image cache: a Source over a built entry, and the eval transform over its arrays."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.data.transforms import PIL_INTERPOLATION, center_crop, random_resized_crop_params
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

FORMAT = 1
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("height", "<i4"), ("width", "<i4"), ("label", "<i4"), ("valid", "?")])


def is_complete(entry: Path, key: str | None = None) -> bool:
    """Whether ``entry`` holds a whole entry of this format (and ``key``): its files agree with meta.json."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
            return False
        index_ok = (entry / "index.npy").stat().st_size >= meta["count"] * INDEX_DTYPE.itemsize
        index_ok = index_ok and (not meta.get("multilabel") or (entry / "targets.npy").exists())
        return index_ok and (entry / "images.u8").stat().st_size == meta["bytes"] and (entry / "names.json").exists()
    except (OSError, ValueError, KeyError, TypeError):
        return False


class CachedSource:
    """A Source over a built entry: ``load(i)`` gives the cached uint8 (h, w, 3) array and its label.

    Pickles as its path; the memory map is opened on first use in each process. An example stored as
    invalid (a bad file skipped while building) raises the DataError its file raised, so a Loader skips
    or stops at it exactly as it would over the files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_complete(self.path):
            raise DataError(
                f"{self.path} is not a complete decoded-cache entry (removed, evicted or damaged); build it "
                "again with jaxtl.data.DecodedCache().build(source, preprocessing)"
            )
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.classes = tuple(meta["classes"])
        self.multilabel = bool(meta.get("multilabel", False))
        self._targets: np.ndarray | None = None
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.invalid = {int(i): message for i, message in meta["invalid"].items()}
        self._count = int(meta["count"])
        self._index: np.ndarray | None = None
        self._images: np.ndarray | None = None
        self._names: list[str] | None = None

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"CachedSource({str(self.path)!r}: {len(self)} images, {len(self.classes)} classes)"

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            try:
                index = np.load(self.path / "index.npy", allow_pickle=False)
                size = os.path.getsize(self.path / "images.u8")
                images = np.memmap(self.path / "images.u8", np.uint8, "r") if size else np.zeros(0, np.uint8)
            except (OSError, ValueError) as error:
                raise DataError(
                    f"{self.path}: cannot read the decoded cache ({error}); it was removed or evicted: build it again"
                ) from None
            self._index, self._images = index, images
        return self._index, self._images

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """(h, w, 3) uint8 (a read-only view of the memory map) and the label."""
        if index in self.invalid:
            raise DataError(self.invalid[index])
        records, images = self._open()
        offset, height, width, label, _ = records[index].tolist()
        if self.multilabel:
            label = self.labels()[index].copy()
        return images[offset : offset + height * width * 3].reshape(height, width, 3), label

    def labels(self) -> np.ndarray:
        """Every example's label (an invalid one's too): (N,) int64 from the index, or (N, C) uint8 multi-hot."""
        if self.multilabel:
            if self._targets is None:
                self._targets = np.load(self.path / "targets.npy", allow_pickle=False)
            return self._targets
        records, _ = self._open()
        return records["label"].astype(np.int64)

    def sizes(self) -> np.ndarray:
        """(N, 2) int32: each image's decoded (height, width); an invalid image's is (0, 0)."""
        records, _ = self._open()
        return np.stack([records["height"], records["width"]], axis=1).astype(np.int32)

    def describe(self, index: int) -> str:
        if self._names is None:
            self._names = json.loads((self.path / "names.json").read_text())
        return self._names[index]


@dataclasses.dataclass(frozen=True)
class CachedEvalTransform:
    """:class:`jaxtl.data.EvalTransform` over cached (already resized) arrays: the center crop only.

    A Loader over a CachedSource with this transform yields the batches that a Loader over the files
    with ``EvalTransform(preprocessing)`` yields, byte for byte.
    """

    preprocessing: Preprocessing
    is_random = False

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.preprocessing.crop_size, self.preprocessing.crop_size)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The crop: a read-only view of ``image`` (a Loader copies it into its batch)."""
        if min(image.shape[:2]) != self.preprocessing.resize_size:
            raise DataError(
                f"a cached image of {image.shape[0]}x{image.shape[1]} was not resized to resize_size="
                f"{self.preprocessing.resize_size}: the cache was built with other preprocessing; build it "
                "with this one"
            )
        return center_crop(image, self.output_size)


@dataclasses.dataclass(frozen=True)
class CachedTrainTransform:
    """:class:`jaxtl.data.TrainTransform` over cached arrays: RandomResizedCrop and flip with PIL, on the host.

    The crop box is drawn (torchvision's algorithm, from the loader's (seed, epoch, index) generator) on the
    cached image, which is already resized to ``resize_size``: the box's relative geometry is torchvision's,
    but a small box is upsampled from fewer pixels than a crop of the original file would be. The crop is
    resized with PIL and the weights' interpolation, as torchvision resizes a PIL image. Without
    ``random_resized_crop`` the crop is the eval transform's center crop.
    """

    preprocessing: Preprocessing
    random_resized_crop: bool = False
    flip_p: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.preprocessing.crop_size, self.preprocessing.crop_size)

    @property
    def is_random(self) -> bool:
        return self.random_resized_crop or self.flip_p > 0

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The crop, flipped or not; possibly a view (of the cache or of the resized crop), which a Loader copies."""
        if not self.is_random:
            return CachedEvalTransform(self.preprocessing)(image)
        if rng is None:
            raise ValueError("a random train transform needs a numpy Generator")
        if self.random_resized_crop:
            top, left, height, width = random_resized_crop_params(*image.shape[:2], self.scale, self.ratio, rng)
            crop = Image.fromarray(np.ascontiguousarray(image[top : top + height, left : left + width]))
            if (height, width) != self.output_size:
                crop = crop.resize(self.output_size[::-1], PIL_INTERPOLATION[self.preprocessing.interpolation])
            # tobytes + frombuffer: one copy out of PIL, where np.asarray(crop) makes two.
            array = np.frombuffer(crop.tobytes(), np.uint8).reshape(crop.height, crop.width, 3)
        else:
            array = CachedEvalTransform(self.preprocessing)(image)
        if self.flip_p > 0 and rng.random() < self.flip_p:
            array = array[:, ::-1]
        return array
