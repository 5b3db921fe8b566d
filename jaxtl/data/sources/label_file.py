"""Label files, Kaggle's layout: a folder of images and a CSV, TSV or JSON-lines file naming each image's label.

The format follows the extension: ``.csv`` (comma-separated), ``.tsv`` (tab-separated), ``.jsonl`` or ``.ndjson``
(one JSON object per line). CSV and TSV files start with a header row and quote as spreadsheets do (the csv
module); a UTF-8 byte-order mark is accepted. Line numbers in messages are the file's own, the header being line 1.

Each row names one image (``image_column``: a path relative to ``root``, by default the label file's folder; any
extension) and its label:

- single-label: ``label_column`` holds the class name; the label is the class index.
- multi-label by separator: ``label_separator`` splits ``label_column`` into class names (Kaggle Planet's
  ``tags`` column ``"clear primary water"`` with ``label_separator=" "``); an empty cell has no positive class.
- multi-label by class columns: ``class_columns`` lists one column per class (``"*"``: every column except the
  image and split columns, in header order), each holding ``0``/``1`` (``false``/``true``, ``0.0``/``1.0`` too).

A multi-label source (``multilabel = True``) loads a (C,) uint8 multi-hot vector.

Class order: ``classes`` exactly as listed (a label not in it is an "unknown label"); otherwise the labels
sorted, numerically when every label is an integer literal (``10`` after ``9``, so labels ``0 .. C-1`` keep
their value as class index); with ``class_columns``, the columns' order.

Splits: ``split`` keeps the rows whose ``split_column`` holds that value (any value names a split); a file
without that column is one split whole. :func:`label_file_splits` gives every split the same classes.

Bad rows, each one DataError naming the file, line and value, or with ``skip_bad_rows`` skipped and listed in
``problems``: an image file that does not exist, an empty image cell, an unknown label, an empty label
(single-label), a class-column value that is not 0/1, an image listed twice in a split (or in two splits), a row
with the wrong number of fields, a line that is not a JSON object. Images are decoded in ``load``, where a
corrupt image is found, as in ImageFolder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.data.sources.base import allow_pixels, load_image
from jaxtl.errors import DataError

# extension -> CSV delimiter; None: JSON lines.
FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
_TRUE, _FALSE = {"1", "1.0", "true"}, {"0", "0.0", "false"}
_INTEGER = re.compile(r"[+-]?\d+")

Row = tuple[int, dict[str, str]]


def read_label_rows(
    file: str | os.PathLike, *, encoding: str = "utf-8", problems: list[str] | None = None
) -> tuple[list[str], list[Row]]:
    """The header and the rows of a label file, as text.

    Args:
        file: a ``.csv``, ``.tsv``, ``.jsonl`` or ``.ndjson`` file.
        encoding: the file's text encoding.
        problems: where malformed rows (a wrong number of fields, a line that is not a JSON object) are
            listed and skipped; without it the first one raises.

    Returns:
        The column names (JSON lines: every key, in order of first appearance) and (line number, row) pairs;
        JSON values other than strings are written as JSON (``1``, ``1.0``, ``true``), null as "".

    Raises:
        DataError: the file cannot be read or decoded, has an unknown extension, is empty, or has a
            malformed row and no ``problems`` list was given.
    """
    file = Path(file)
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{file}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            "name the label file .csv, .tsv, .jsonl or .ndjson"
        )
    text = _decode(file, encoding)
    if FORMATS[suffix] is None:
        header, rows = _json_rows(file, text, problems)
    else:
        header, rows = _delimited_rows(file, text, FORMATS[suffix], problems)
    if not header:
        raise DataError(f"label file {file} is empty")
    return header, rows


def _decode(file: Path, encoding: str) -> str:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"label file {file} does not exist") from None
    except OSError as error:
        raise DataError(f"cannot read label file {file}: {error.strerror}") from None
    try:
        text = data.decode(encoding)
    except LookupError:
        raise DataError(f"{file}: unknown encoding {encoding!r} (data.labels.encoding)") from None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise DataError(
            f"{file} line {line}: byte {column} of the line ({data[error.start]:#04x}) is not valid {encoding}; "
            "give the file's encoding, e.g. encoding='latin-1' or 'cp1252' (data.labels.encoding)"
        ) from None
    return text.removeprefix("\ufeff")


def _malformed(problems: list[str] | None, message: str) -> None:
    if problems is None:
        raise DataError(message)
    problems.append(message)


def _delimited_rows(file: Path, text: str, delimiter: str, problems: list[str] | None) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] = []
    rows = []
    end = 0
    try:
        for fields in reader:
            line, end = end + 1, reader.line_num  # a quoted value may span lines: the row starts after the last
            if not fields:  # a blank line, skipped as pandas skips it
                continue
            if not header:
                header = fields
                if repeated := sorted({name for name in header if header.count(name) > 1}):
                    raise DataError(f"{file} line {line}: the header names column {', '.join(repeated)} twice")
                continue
            if len(fields) != len(header):
                _malformed(
                    problems,
                    f"{file} line {line}: {len(fields)} fields where the header has {len(header)} "
                    f"(a value holding {delimiter!r} needs double quotes)",
                )
                continue
            rows.append((line, dict(zip(header, fields, strict=True))))
    except csv.Error as error:
        raise DataError(f"{file} line {reader.line_num}: not valid {file.suffix[1:].upper()} ({error})") from None
    return header, rows


def _json_rows(file: Path, text: str, problems: list[str] | None) -> tuple[list[str], list[Row]]:
    header: dict[str, None] = {}
    rows = []
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as error:
            _malformed(problems, f"{file} line {line}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(value, dict):
            _malformed(
                problems,
                f"{file} line {line}: {content.strip()[:40]} is not a JSON object; "
                'write one object per line, e.g. {"image": "a.jpg", "label": "cat"}',
            )
            continue
        header.update(dict.fromkeys(value))
        rows.append((line, {key: _json_text(item) for key, item in value.items()}))
    return list(header), rows


def _json_text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """Label names in class order: sorted, numerically when every name is an integer literal."""
    names = set(names)
    if all(_INTEGER.fullmatch(name) for name in names):
        return tuple(sorted(names, key=lambda name: (int(name), name)))
    return tuple(sorted(names))


class _BadRow(Exception):
    """One row's problem, without the file and line (the caller adds them)."""


class LabelFileSource:
    """The images a label file names, with their labels (see the module docstring for the format).

    Args:
        file: the label file.
        root: the folder image paths are relative to (default: the label file's folder).
        split: keep only the rows whose ``split_column`` holds this value (a file without the column: all rows).
        image_column, label_column: the columns of the image path and of the label.
        class_columns: multi-label, one 0/1 column per class: their names, or ``"*"`` for every column except
            the image and split columns.
        label_separator: multi-label, ``label_column`` holds several class names separated by this.
        classes: the class names in label order (default: from the labels, sorted).
        skip_bad_rows: skip bad rows, listing each in ``problems``, instead of raising at them.
        max_pixels: larger images are refused (PIL's decompression-bomb limit by default).
        encoding: the label file's text encoding.

    Attributes:
        file, root (absolute), split, classes, class_to_idx, multilabel, columns (the file's header).
        samples: (absolute image path, class index or the tuple of positive class indices), in file order.
        problems: one message per skipped row.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        *,
        split: str | None = None,
        split_column: str = "split",
        image_column: str = "image",
        label_column: str = "label",
        class_columns: Sequence[str] | str | None = None,
        label_separator: str | None = None,
        classes: Sequence[str] | None = None,
        skip_bad_rows: bool = False,
        max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
        encoding: str = "utf-8",
    ):
        if class_columns is not None and (label_separator is not None or classes is not None):
            raise ValueError("class_columns name the classes: give class_columns, or label_separator and classes")
        self.file, self.split, self.max_pixels = Path(file), split, max_pixels
        self.root = Path(os.path.abspath(self.file.parent if root is None else root))
        allow_pixels(max_pixels)
        self.problems: list[str] = []
        header, rows = read_label_rows(self.file, encoding=encoding, problems=self.problems)
        self.columns = tuple(header)
        if class_columns == "*":
            class_columns = [name for name in header if name not in (image_column, split_column)]
        self._require_columns([image_column, *(class_columns or [label_column])])
        self.multilabel = class_columns is not None or label_separator is not None
        given = class_columns if class_columns is not None else classes
        known = None if given is None else self._set_classes(given)
        named = []  # (line, path, class names)
        first_line: dict[str, int] = {}
        for line, row in self._rows_of_split(rows, split_column):
            try:
                path = self._image_path(row, image_column, first_line)
                if class_columns is not None:
                    names = [name for name in class_columns if _flag(row.get(name), name)]
                else:
                    names = _label_names(row.get(label_column), label_column, label_separator)
                if known is not None and (unknown := [name for name in names if name not in known]):
                    raise _BadRow(f"unknown label {unknown[0]!r} (classes: {_listing(self.classes)})")
            except _BadRow as bad:
                self.problems.append(f"{self.file} line {line}: {bad}")
                continue
            first_line[path] = line
            named.append((line, path, names))
        if self.problems and not skip_bad_rows:
            more = len(self.problems) - 1
            hint = "data.skip_bad_files (skip_bad_rows=True) skips them; jaxtl data inspect lists them"
            raise DataError(self.problems[0] + (f" ({more} more bad rows; {hint})" if more else ""))
        if not named:
            raise DataError(f"{self} has no usable rows" + (f": {self.problems[0]}" if self.problems else ""))
        index = (
            self._set_classes(class_order(name for *_, names in named for name in names)) if known is None else known
        )
        self._lines = [line for line, _, _ in named]
        self.samples = [(path, self._label([index[name] for name in names])) for _, path, names in named]

    def _set_classes(self, classes: Sequence[str]) -> dict[str, int]:
        self.classes = tuple(classes)
        if len(set(self.classes)) < len(self.classes):
            raise DataError(f"the classes of {self.file} name a class twice ({_listing(self.classes)}); list each once")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        return self.class_to_idx

    def _label(self, indices: list[int]) -> int | tuple[int, ...]:
        return tuple(sorted(indices)) if self.multilabel else indices[0]

    def _require_columns(self, names: list[str]) -> None:
        missing = [name for name in dict.fromkeys(names) if name not in self.columns]
        if missing:
            raise DataError(
                f"{self.file} has no column {', '.join(map(repr, missing))} (columns: {', '.join(self.columns)}); "
                "name the right ones with image_column, label_column or class_columns (data.labels)"
            )

    def _rows_of_split(self, rows: list[Row], split_column: str) -> list[Row]:
        if self.split is None or split_column not in self.columns:
            return rows
        kept = [(line, row) for line, row in rows if row.get(split_column) == self.split]
        if not kept and rows:
            found = sorted({row.get(split_column, "") for _, row in rows})
            raise DataError(
                f"{self.file} has no rows of split {self.split!r} in column {split_column!r} "
                f"(values: {_listing(found)})"
            )
        return kept

    def _image_path(self, row: dict[str, str], column: str, first_line: dict[str, int]) -> str:
        cell = row.get(column)
        if not cell:
            raise _BadRow(f"no image path in column {column!r}")
        path = os.path.abspath(os.path.join(self.root, cell))
        if not os.path.isfile(path):
            raise _BadRow(f"image {cell!r}: no such file in {self.root}")
        if path in first_line:
            raise _BadRow(f"image {cell!r} is listed again (first on line {first_line[path]}); list each image once")
        return path

    def _reindex(self, classes: Sequence[str]) -> None:
        """Labels in another class order, a superset of this one's classes (the classes of every split)."""
        old = self.classes
        index = self._set_classes(classes)
        self.samples = [
            (path, self._label([index[old[i]] for i in (label if self.multilabel else [label])]))
            for path, label in self.samples
        ]

    def _keep(self, rows: list[int]) -> None:
        self.samples = [self.samples[row] for row in rows]
        self._lines = [self._lines[row] for row in rows]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int | np.ndarray]:
        path, label = self.samples[index]
        image = load_image(path, self.max_pixels)
        if not self.multilabel:
            return image, label
        multi_hot = np.zeros(len(self.classes), np.uint8)
        multi_hot[list(label)] = 1
        return image, multi_hot

    def describe(self, index: int) -> str:
        return f"{self.file} line {self._lines[index]}: {self.samples[index][0]}"

    def labels(self) -> np.ndarray:
        """(N,) int64 class indices, or for a multi-label source (N, C) uint8 multi-hot rows; no image is read."""
        if not self.multilabel:
            return np.asarray([label for _, label in self.samples], np.int64)
        matrix = np.zeros((len(self), len(self.classes)), np.uint8)
        for row, (_, label) in enumerate(self.samples):
            matrix[row, list(label)] = 1
        return matrix

    def fingerprint(self) -> str:
        """What this source's examples are, for the decoded cache's key: each row's image path (relative to
        root), label, size and modification time, the classes and the split (a stat per image, no reading)."""
        rows = []
        for path, label in self.samples:
            try:
                stat = os.stat(path)
                state = [stat.st_size, stat.st_mtime_ns]
            except OSError:  # removed since: loading stops at it or skips it
                state = None
            rows.append([os.path.relpath(path, self.root), label, state])
        return json.dumps([self.split, list(self.classes), self.multilabel, self.max_pixels, rows])

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split is not None else ""
        size = f": {len(self)} images, {len(self.classes)} classes" if hasattr(self, "samples") else ""
        return f"LabelFileSource({str(self.file)!r}{split}{size}{', multi-label' if self.multilabel else ''})"


def _flag(value: str | None, column: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _BadRow(f"column {column!r}: {value!r} is not 0 or 1 (nor false or true)")


def _label_names(value: str | None, column: str, separator: str | None) -> list[str]:
    if separator is not None:
        return list(dict.fromkeys(name for name in (value or "").split(separator) if name))
    if not value:
        raise _BadRow(f"empty label in column {column!r}; give every image a class")
    return [value]


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def label_file_splits(
    files: str | os.PathLike | Mapping[str, str | os.PathLike],
    root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = ("train", "val"),
    **kwargs,
) -> dict[str, LabelFileSource]:
    """The splits of a labelled image folder, all with the same classes.

    Args:
        files: one label file whose split column picks each split's rows, or ``{split: file}``.
        root: the folder image paths are relative to (default: each label file's folder).
        splits: the splits to read from one file (a mapping names its own).
        **kwargs: the other arguments of :class:`LabelFileSource`.

    Unless ``classes`` is given, the class list comes from the labels of every split together. An image in
    two splits is a bad row of the later split.
    """
    if isinstance(files, Mapping):
        sources = {split: LabelFileSource(file, root, split=split, **kwargs) for split, file in files.items()}
    else:
        sources = {}
        for split in splits:
            sources[split] = LabelFileSource(files, root, split=split, **kwargs)
            column = kwargs.get("split_column", "split")
            if column not in sources[split].columns:
                raise DataError(
                    f"{files} has no column {column!r} to tell the {' and '.join(splits)} rows apart (columns: "
                    f"{', '.join(sources[split].columns)}); add one, set split_column, or give a file per split"
                )
    if kwargs.get("classes") is None and kwargs.get("class_columns") is None:
        classes = class_order(name for source in sources.values() for name in source.classes)
        for source in sources.values():
            source._reindex(classes)
    reference_split, reference = next(iter(sources.items()))
    for split, source in sources.items():
        if source.classes != reference.classes:
            raise DataError(
                f"the class columns of split {split} ({_listing(source.classes)}) differ from those of "
                f"{reference_split} ({_listing(reference.classes)}); every split needs the same class columns"
            )
    _drop_shared_images(sources, kwargs.get("skip_bad_rows", False))
    return sources


def _drop_shared_images(sources: dict[str, LabelFileSource], skip_bad_rows: bool) -> None:
    first: dict[str, str] = {}  # image path -> "<split> (<file> line N)"
    for split, source in sources.items():
        kept = []
        for row, (path, _) in enumerate(source.samples):
            if path not in first:
                first[path] = f"{split} ({source.file} line {source._lines[row]})"
                kept.append(row)
                continue
            message = (
                f"{source.file} line {source._lines[row]}: image {os.path.relpath(path, source.root)!r} is also in "
                f"split {first[path]}; an image belongs to one split"
            )
            if not skip_bad_rows:
                raise DataError(message)
            source.problems.append(message)
        if not kept:
            raise DataError(f"every image of split {split} is also in an earlier split: {source.problems[-1]}")
        source._keep(kept)
