"""Prepared tfds datasets, read through ``tfds.data_source`` (array_record; no tensorflow in the process)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.errors import DataError


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
