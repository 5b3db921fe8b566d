"""Hugging Face datasets on disk (save_to_disk's Arrow files, the Hub's Parquet files), read with pyarrow alone.

The ``datasets`` package is neither needed nor imported: the files and the features ``datasets`` records in
their schema (metadata ``b"huggingface"``: ``{"info": {"features": ...}}``) are read with pyarrow.

Layouts (``path``):

- a directory written by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` lists the splits; ``split``
  picks one) or by ``Dataset.save_to_disk`` (``state.json``; no ``split``). Their ``.arrow`` files (Arrow IPC
  streams) are memory-mapped: a row is read where it lies.
- a Parquet or Arrow file, or a directory or glob of them, such as the Hub's
  ``data/<split>-00000-of-00002.parquet``: ``split`` picks the files named after it (the split, then one of
  ``-._`` or a digit) or in a folder named after it (``train/0000.parquet``); no ``split``: every file.
  Parquet is read a row group at a time, the last few kept: random access reads the row group of each
  example it visits, so shuffled training over large row groups is faster from save_to_disk's files.

Images decode as ``datasets`` decodes its ``Image`` feature (``features/image.py``): a struct of ``bytes``
and ``path``; the bytes are opened with PIL or, without bytes, the file at ``path`` (a relative path from the
current directory, as ``datasets`` opens it); the image is loaded, turned upright by its EXIF orientation
and converted to the feature's ``mode`` where it has one; then to RGB as torchvision's loader converts.
A binary column is taken as image bytes.

Labels follow the label column's feature:

- ``ClassLabel``: its names in its order; -1 (``datasets``' "no label") or a value outside them is an error.
- a ``Sequence``/``List`` of ``ClassLabel`` (or of strings or integers): multi-label; ``load`` gives a
  (num_classes,) uint8 multi-hot vector and ``labels()`` an (N, num_classes) uint8 matrix.
- strings: the classes are the distinct values, sorted.
- plain integers: indices into ``classes``; without ``classes`` the names are ``"0"`` up to the largest
  label (a split that lacks the largest label gets fewer classes: pass ``classes``).

``classes`` given: the classes in that order; the dataset's names (ClassLabel names or strings) must be among
them and map by name.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxtl.data.sources.base import allow_pixels, check_same_classes
from jaxtl.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = (
    "a directory written by datasets' save_to_disk (Dataset or DatasetDict), a Parquet or Arrow file, or a "
    "directory or glob of them (the Hub's data/<split>-00000-of-00002.parquet)"
)
DATA_SUFFIXES = (".parquet", ".arrow")
ROW_GROUPS_KEPT = 4  # Parquet row groups each process keeps decoded: in-order reading reads each once
_SHARD_NAME = re.compile(r"(.+)-\d{5}-of-\d{5}\.")  # datasets' SPLIT_PATTERN_SHARDED: <split>-00000-of-00002.*


class HFSource:
    """One split of a Hugging Face dataset on disk, read with pyarrow (see the module docstring for the layouts).

    Args:
        path: a save_to_disk directory, a Parquet or Arrow file, or a directory or glob of them.
        split: the DatasetDict split, or the split whose files to read (None: a Dataset, or every file).
        image_column: the column of images (datasets' ``Image`` feature).
        label_column: the column of labels: ClassLabel, strings or integers, or a list of them (multi-label).
        classes: the class names in label order; the dataset's names must be among them.
        max_pixels: images with more pixels are refused (PIL's decompression-bomb limit by default).

    Attributes:
        classes: class names in label order; ``class_to_idx``: name -> label.
        multilabel: the label column holds lists: ``load`` gives (num_classes,) uint8 multi-hot vectors.

    Raises:
        DataError: a path of none of the layouts, a split that is not there, a missing column, a label that
            is missing, -1 or out of range (each naming the file, row and value).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | None = None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        classes: Sequence[str] | None = None,
        max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    ):
        self.path, self.split = os.fspath(path), split
        self.image_column, self.label_column, self.max_pixels = image_column, label_column, max_pixels
        self._options = dict(
            image_column=image_column, label_column=label_column, classes=classes, max_pixels=max_pixels
        )
        if classes is not None and len(set(classes)) != len(classes):
            raise DataError(f"classes={list(classes)} names a class twice")
        self._files = find_data_files(self.path, split)
        self._lock = threading.Lock()
        self._tables: dict[int, pa.Table] = {}  # Arrow files, memory-mapped when first read
        self._group_ends: dict[int, np.ndarray] = {}  # Parquet files: the row that ends each row group
        self._row_groups: collections.OrderedDict[tuple[int, int], pa.Table] = collections.OrderedDict()
        schema, labels = self._scan()
        self._image_mode = _image_mode(schema, image_column, self._files[0])
        self._labels, names = self._label_indices(labels, _features(schema).get(label_column) or {}, classes)
        self._labels.flags.writeable = False
        self.multilabel = self._labels.ndim == 2
        self.classes = tuple(names)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        allow_pixels(max_pixels)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __reduce__(self):
        # Pickled as its arguments: a worker process opens (and memory-maps) the files itself.
        return partial(HFSource, **self._options), (self.path, self.split)

    def load(self, index: int) -> tuple[Image.Image, int | np.ndarray]:
        """The image (PIL, RGB) and label of row ``index``: a class index, or a (C,) uint8 multi-hot vector."""
        file, row = self._locate(index)
        data, path = self._image_value(file, row)
        image = self._decode(data, path, self.describe(index))
        label = self._labels[index]
        return image, (label.copy() if self.multilabel else int(label))

    def describe(self, index: int) -> str:
        file, row = self._locate(index)
        return f"{self._files[file]} row {row}"

    def labels(self) -> np.ndarray:
        """Every row's label without decoding: (N,) int64 class indices, or (N, C) uint8 multi-hot."""
        return self._labels.copy()

    def fingerprint(self) -> str:
        """What this split's images and labels are, for the decoded cache's key: its files' names (below their
        common folder), sizes and modification times, the split, the columns, the classes and ``max_pixels``."""
        root = os.path.commonpath([file.parent for file in self._files])
        files = []
        for file in self._files:
            stat = file.stat()
            files.append([os.path.relpath(file, root), stat.st_size, stat.st_mtime_ns])
        return json.dumps(
            [files, self.split, self.image_column, self.label_column, list(self.classes), self.max_pixels]
        )

    def __repr__(self) -> str:
        return (
            f"HFSource({self.path!r}, split={self.split!r}: {len(self)} examples in {len(self._files)} files, "
            f"{len(self.classes)} classes{', multi-label' if self.multilabel else ''})"
        )

    def _scan(self) -> tuple[pa.Schema, pa.Array]:
        """Counts every file's rows (and a Parquet file's row groups) and reads its labels: the first file's
        schema and every label, in row order."""
        rows, chunks, first = [], [], None
        for index, file in enumerate(self._files):
            if file.suffix == ".parquet":
                with _reading(file), pq.ParquetFile(file, memory_map=True) as parquet:
                    schema, metadata = parquet.schema_arrow, parquet.metadata
                    self._check_columns(file, schema, first)
                    groups = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
                    self._group_ends[index] = np.cumsum(groups, dtype=np.int64)
                    table = parquet.read(columns=[self.label_column])
            else:
                table = self._arrow_table(index)
                schema = table.schema
                self._check_columns(file, schema, first)
            first = first or schema
            rows.append(table.num_rows)
            chunks.extend(table.column(self.label_column).chunks)
        self._ends = np.cumsum(rows, dtype=np.int64)
        return first, pa.chunked_array(chunks, first.field(self.label_column).type).combine_chunks()

    def _check_columns(self, file: Path, schema: pa.Schema, first: pa.Schema | None) -> None:
        for column, argument in ((self.image_column, "image_column"), (self.label_column, "label_column")):
            if column not in schema.names:
                raise DataError(
                    f"{file} has no column {column!r} (columns: {', '.join(schema.names)}); "
                    f"pass {argument}= the one that holds the {argument.removesuffix('_column')}s"
                )
            if first is not None and schema.field(column).type != first.field(column).type:
                raise DataError(
                    f"{file}: column {column!r} holds {schema.field(column).type}, but {self._files[0]}'s holds "
                    f"{first.field(column).type}; the files of a split need one schema"
                )

    def _arrow_table(self, file: int) -> pa.Table:
        """An Arrow file's table, memory-mapped (opened once per process)."""
        if file not in self._tables:
            with _reading(self._files[file]):
                self._tables[file] = _read_arrow(self._files[file])
        return self._tables[file]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} examples")
        file = int(np.searchsorted(self._ends, index, side="right"))
        return file, index - (int(self._ends[file - 1]) if file else 0)

    def _image_value(self, file: int, row: int) -> tuple[bytes | None, str | None]:
        """The (bytes, path) of one row's image."""
        with self._lock:
            if self._files[file].suffix == ".parquet":
                ends = self._group_ends[file]
                group = int(np.searchsorted(ends, row, side="right"))
                column = self._row_group(file, group).column(0)
                row -= int(ends[group - 1]) if group else 0
            else:
                column = self._arrow_table(file).column(self.image_column)
        value = column[row].as_py()
        return (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)

    def _row_group(self, file: int, group: int) -> pa.Table:
        """One row group's image column, from the few kept (the caller holds the lock)."""
        key = (file, group)
        if key in self._row_groups:
            self._row_groups.move_to_end(key)
        else:
            with _reading(self._files[file]), pq.ParquetFile(self._files[file], memory_map=True) as parquet:
                self._row_groups[key] = parquet.read_row_group(group, columns=[self.image_column])
            if len(self._row_groups) > ROW_GROUPS_KEPT:
                self._row_groups.popitem(last=False)
        return self._row_groups[key]

    def _decode(self, data: bytes | None, path: str | None, where: str) -> Image.Image:
        """datasets' ``Image.decode_example``, then ``convert("RGB")``; every failure a DataError naming the row."""
        where = f"{where}, column {self.image_column!r}"
        if data is None and path is None:
            raise DataError(f"{where}: no image (neither bytes nor a path)")
        if data is None and "://" in path:
            raise DataError(f"{where}: {path} is a remote file; download the dataset with its images embedded")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(BytesIO(data) if data is not None else path)
                pixels = image.width * image.height
                if self.max_pixels is not None and pixels > self.max_pixels:
                    raise DataError(
                        f"{where}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of "
                        f"{self.max_pixels} (PIL's decompression-bomb guard); if the image is trusted, raise "
                        "data.max_image_pixels"
                    )
                image.load()
                if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
                    image = ImageOps.exif_transpose(image)
                if self._image_mode and self._image_mode != image.mode:
                    image = image.convert(self._image_mode)
                return image if image.mode == "RGB" else image.convert("RGB")
        except DataError:
            raise
        except Image.DecompressionBombError as error:
            raise DataError(f"{where}: {error}; if the image is trusted, raise data.max_image_pixels") from None
        except UnidentifiedImageError:
            what = f"{len(data)} bytes" if data is not None else f"the file {path}"
            raise DataError(f"{where}: {what}, not an image PIL can read") from None
        except FileNotFoundError:
            relative = f"a relative path is opened from the current directory, {os.getcwd()}, as datasets opens it"
            raise DataError(f"{where}: {path}: no such file ({relative})") from None
        except (OSError, SyntaxError, ValueError) as error:
            message = f"cannot decode the image ({error}); it is probably truncated or corrupt"
            raise DataError(f"{where}: {message}") from None

    def _label_indices(self, column: pa.Array, feature: dict, classes: Sequence[str] | None):
        """(labels, class names): (N,) int64 class indices or (N, C) uint8 multi-hot, from the label column."""
        kind = column.type
        multilabel = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        rows, values = np.arange(len(column)), column
        self._refuse_nulls(values, rows)
        if multilabel:
            feature = feature.get("feature") or {}  # a Sequence / List / LargeList of it
            rows = np.repeat(rows, pc.list_value_length(column).to_numpy(zero_copy_only=False))
            values = column.flatten()
            self._refuse_nulls(values, rows)
        if feature.get("_type") == "ClassLabel":
            indices, names = values.to_numpy(zero_copy_only=False).astype(np.int64), list(feature["names"])
            self._check_range(indices, rows, len(names), f"ClassLabel with {len(names)} names")
            if classes is not None:
                missing = [name for name in names if name not in classes]
                if missing:
                    raise DataError(
                        f"{self.path}: column {self.label_column!r} names classes that classes= lacks: "
                        + ", ".join(missing)
                    )
                indices, names = np.asarray([list(classes).index(name) for name in names])[indices], list(classes)
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            names = list(classes) if classes is not None else sorted(pc.unique(values).to_pylist())
            found = pc.index_in(values, value_set=pa.array(names, values.type))
            if found.null_count:
                row = int(np.flatnonzero(~found.is_valid().to_numpy(zero_copy_only=False))[0])
                raise DataError(
                    f"{self.describe(int(rows[row]))}, column {self.label_column!r}: label {values[row].as_py()!r} "
                    f"is not among classes= ({', '.join(names)})"
                )
            indices = found.to_numpy(zero_copy_only=False).astype(np.int64)
        elif pa.types.is_integer(values.type):
            indices = values.to_numpy(zero_copy_only=False).astype(np.int64)
            count = len(classes) if classes is not None else None
            self._check_range(indices, rows, count, f"classes= with {count} names")
            names = list(classes) if classes is not None else [str(i) for i in range(indices.max(initial=-1) + 1)]
            if classes is None:
                log.warning("%s: integer labels without names: classes '0' to '%d'", self.path, len(names) - 1)
        else:
            raise DataError(
                f"{self.path}: column {self.label_column!r} holds {column.type}; expected datasets' ClassLabel, "
                "strings or integers, or a list of them (multi-label)"
            )
        if not multilabel:
            return indices, names
        multi_hot = np.zeros((len(column), len(names)), np.uint8)
        multi_hot[rows, indices] = 1
        return multi_hot, names

    def _refuse_nulls(self, values: pa.Array, rows: np.ndarray) -> None:
        if values.null_count:
            row = rows[int(np.flatnonzero(~values.is_valid().to_numpy(zero_copy_only=False))[0])]
            raise DataError(
                f"{self.describe(int(row))}, column {self.label_column!r}: a null label; every row needs one"
            )

    def _check_range(self, indices: np.ndarray, rows: np.ndarray, count: int | None, what: str) -> None:
        """Every index in 0..count-1 (count None: not negative)."""
        bad = np.flatnonzero((indices < 0) | (indices >= (count if count is not None else np.inf)))
        if len(bad):
            value = int(indices[bad[0]])
            if value == -1:
                why = "datasets' 'no label' (an unlabelled split?)"
            else:
                why = f"outside 0..{count - 1} ({what})" if count is not None else "negative"
            raise DataError(
                f"{self.describe(int(rows[bad[0]]))}, column {self.label_column!r}: label {value} is {why} "
                f"({len(bad)} such labels)"
            )


def hf_splits(path: str | os.PathLike, splits: Sequence[str] = ("train", "val"), **kwargs) -> dict[str, HFSource]:
    """The splits of a Hugging Face dataset on disk (keyword arguments: :class:`HFSource`'s); every split must
    have the same classes (pass ``classes`` where a split lacks some of the string labels)."""
    sources = {split: HFSource(path, split, **kwargs) for split in splits}
    check_same_classes(sources, path, "Pass classes= (data.hf.classes) to give every split the same classes.")
    return sources


def find_data_files(path: str, split: str | None) -> list[Path]:
    """The data files of ``split`` at ``path`` in row order (see the module docstring for the layouts)."""
    root = Path(path)
    if glob.has_magic(path):
        matches = glob.glob(path, recursive=True)
        files = sorted(Path(match) for match in matches if match.endswith(DATA_SUFFIXES) and os.path.isfile(match))
        if not files:
            raise DataError(f"no Parquet or Arrow file matches {path}")
        base = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), root.parts))
        return _files_of_split(files, split, path, base)
    if (root / "dataset_dict.json").is_file():
        names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        if split not in names:
            raise DataError(
                f"{path} is a DatasetDict (save_to_disk) with the splits {', '.join(names)}"
                + (f", not {split!r}" if split is not None else "; pick one with split=")
            )
        root = root / split
    elif (root / "state.json").is_file() and split is not None:
        raise DataError(f"{path} is one Dataset (save_to_disk), without splits; it has no split {split!r}")
    if (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        return [root / entry["filename"] for entry in state["_data_files"]]
    if root.is_file() and root.suffix in DATA_SUFFIXES:
        return _files_of_split([root], split, path, root.parent)
    if root.is_dir():
        files = sorted(file for file in root.rglob("*") if file.suffix in DATA_SUFFIXES and file.is_file())
        if files:
            return _files_of_split(files, split, path, root)
    what = "does not exist" if not root.exists() else "is none of them"
    raise DataError(f"{path} {what}; a Hugging Face dataset is read from {LAYOUTS}")


def _files_of_split(files: list[Path], split: str | None, path: str, base: Path) -> list[Path]:
    """The files of ``split``: by name, or in a folder of that name below ``base``; every file without a split."""
    if split is None:
        return files
    chosen = [file for file in files if _split_of(file) == split or split in file.relative_to(base).parent.parts]
    if not chosen:
        found = sorted({_split_of(file) for file in files})
        raise DataError(
            f"{path} has no files of split {split!r} (<split>-00000-of-00001.parquet or <split>/...); "
            f"the splits there: {', '.join(found)}"
        )
    return chosen


def _split_of(file: Path) -> str:
    """The split a file name gives: ``train`` for train-00000-of-00002.parquet or train.parquet; the folder's
    name for a name without one (train/0000.parquet)."""
    shard = _SHARD_NAME.match(file.name)
    return shard.group(1) if shard else re.split(r"[-._ 0-9]", file.name)[0] or file.parent.name


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[None]:
    """pyarrow's errors about ``file`` as DataErrors."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{file}: no such file") from None
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{file}: cannot read it as {file.suffix[1:].title()} ({error})") from None


def _read_arrow(file: Path) -> pa.Table:
    """An Arrow IPC stream (save_to_disk's .arrow) or IPC file, memory-mapped: no row is copied."""
    source = pa.memory_map(str(file))
    reader = pa.ipc.open_file if source.read(6) == b"ARROW1" else pa.ipc.open_stream
    source.seek(0)
    return reader(source).read_all()


def _features(schema: pa.Schema) -> dict:
    """The features ``datasets`` recorded in the schema metadata (``{}`` if none)."""
    try:
        return json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"] or {}
    except (KeyError, TypeError, ValueError):
        return {}


def _image_mode(schema: pa.Schema, column: str, file: Path) -> str | None:
    """The image feature's ``mode`` (None: the image's own), after checking that the column holds images."""
    kind = schema.field(column).type
    if pa.types.is_struct(kind):
        holds_images = kind.get_field_index("bytes") >= 0
    else:
        holds_images = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not holds_images:
        raise DataError(
            f"{file}: column {column!r} holds {kind}, not images; expected datasets' Image feature "
            "(struct<bytes, path>) or binary image files"
        )
    return (_features(schema).get(column) or {}).get("mode")
