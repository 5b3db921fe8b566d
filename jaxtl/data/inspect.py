"""What a dataset holds before training on it: counts per class, image sizes, unreadable files, label problems.

:func:`inspect_splits` reads every example of every split once, in a thread pool, and returns a
:class:`DataReport`; :func:`format_report` prints it (``jaxtl data inspect CONFIG``). Problems are the files
that do not load, the rows a source skipped as bad (its ``problems``), and images found in more than one split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from jaxtl.data.loader import default_num_workers
from jaxtl.data.sources import Source, is_multilabel, labels_of
from jaxtl.errors import DataError

CHUNK = 64  # examples per pool task: a million-image dataset is 16k futures, not a million


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """An example whose ``source.load`` raised a DataError."""

    split: str
    description: str  # the source's describe(i): a path or a record name
    message: str


@dataclasses.dataclass(frozen=True)
class DataReport:
    """What :func:`inspect_splits` found.

    Attributes:
        classes: class names in label order (the first split's).
        multilabel: whether the splits give multi-hot labels.
        examples: split -> its number of examples.
        counts: split -> (C,) int64 examples per class; positives per class for multi-label splits. From the
            source's ``labels()`` where it has one (unreadable files included, as torchvision counts them),
            otherwise from the examples that load.
        cardinality: split -> mean positive labels per example (multi-label splits only).
        sizes: split -> (n, 2) int64 (width, height) of every image whose size could be read; from the file's
            header where the source is file-based (``samples`` paths), otherwise from the loaded image.
        unreadable: the examples that did not load, with the error each raised.
        label_problems: (split, message) for each bad row or file a source skipped (its ``problems``).
        duplicates: groups of (split, description) of one image found in more than one split, among the
            examples that load: the same file contents (the same path included) for file-based sources, the
            same decoded pixels otherwise.
    """

    classes: tuple[str, ...]
    multilabel: bool
    examples: dict[str, int]
    counts: dict[str, np.ndarray]
    cardinality: dict[str, float]
    sizes: dict[str, np.ndarray]
    unreadable: list[Unreadable]
    label_problems: list[tuple[str, str]]
    duplicates: list[tuple[tuple[str, str], ...]]

    @property
    def num_problems(self) -> int:
        """Unreadable examples, label problems and duplicate groups, each one problem."""
        return len(self.unreadable) + len(self.label_problems) + len(self.duplicates)


@dataclasses.dataclass(frozen=True)
class _Example:
    """One example as the pass over the files saw it."""

    size: tuple[int, int] | None
    digest: str | None  # of the file's bytes, or of the decoded pixels; None when it did not load
    label: np.ndarray | int | None
    error: str | None


def inspect_splits(splits: Mapping[str, Source], *, num_workers: int | None = None) -> DataReport:
    """Reads every example of every split once and reports what it found.

    Args:
        splits: split name -> source (:class:`jaxtl.data.sources.Source`), e.g. ``{"train": ..., "val": ...}``.
        num_workers: threads reading the files (default: the CPUs this process may use).

    Returns:
        A :class:`DataReport`. A DataError from ``source.load`` is recorded as unreadable; any other
        exception is raised.
    """
    if not splits:
        raise ValueError("inspect_splits needs at least one split")
    first = next(iter(splits.values()))
    with ThreadPoolExecutor(num_workers or default_num_workers()) as pool:
        seen_by_split = {split: _read_all(pool, source) for split, source in splits.items()}
    multilabel = is_multilabel(first)
    num_classes = len(first.classes)
    counts, cardinality, sizes, unreadable, label_problems = {}, {}, {}, [], []
    for split, source in splits.items():
        seen = seen_by_split[split]
        labels = _labels(source, seen, multilabel, num_classes)
        if multilabel:
            counts[split] = labels.sum(axis=0, dtype=np.int64)
            cardinality[split] = float(labels.sum(axis=1).mean()) if len(labels) else 0.0
        else:
            counts[split] = np.bincount(labels, minlength=num_classes).astype(np.int64)
        sizes[split] = np.array([e.size for e in seen if e.size is not None], np.int64).reshape(-1, 2)
        unreadable += [Unreadable(split, source.describe(i), e.error) for i, e in enumerate(seen) if e.error]
        label_problems += [(split, message) for message in getattr(source, "problems", None) or ()]
    return DataReport(
        classes=tuple(first.classes),
        multilabel=multilabel,
        examples={split: len(source) for split, source in splits.items()},
        counts=counts,
        cardinality=cardinality,
        sizes=sizes,
        unreadable=unreadable,
        label_problems=label_problems,
        duplicates=_duplicates(splits, seen_by_split),
    )


def _read_all(pool: ThreadPoolExecutor, source: Source) -> list[_Example]:
    starts = range(0, len(source), CHUNK)
    chunks = pool.map(lambda start: [_read(source, i) for i in range(start, min(start + CHUNK, len(source)))], starts)
    return [example for chunk in chunks for example in chunk]


def _read(source: Source, index: int) -> _Example:
    """Loads one example (as training would) and takes its size and digest, from its file where it has one."""
    path = _path_of(source, index)
    size = digest = None
    if path is not None:
        size, digest = _file_size_and_digest(path)
    try:
        image, label = source.load(index)
    except DataError as error:
        return _Example(size, None, None, str(error))
    if path is None:
        size = image.size
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    return _Example(size, digest, label, None)


def _path_of(source: Source, index: int) -> str | None:
    """The example's file for a file-based source (``samples``: paths, or (path, label) pairs), else None."""
    samples = getattr(source, "samples", None)
    if samples is None:
        return None
    sample = samples[index]
    return os.fspath(sample[0] if isinstance(sample, tuple | list) else sample)


def _file_size_and_digest(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the image's header, without decoding its pixels, and the sha256 of the file.
    None for what cannot be read: ``source.load`` then reports why."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError:
        return None, None
    try:
        with Image.open(io.BytesIO(contents)) as image:
            size = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        size = None
    return size, hashlib.sha256(contents).hexdigest()


def _labels(source: Source, seen: list[_Example], multilabel: bool, num_classes: int) -> np.ndarray:
    """Every label the source knows without decoding, or else those of the examples that loaded."""
    if callable(getattr(source, "labels", None)):
        return labels_of(source)
    loaded = [e.label for e in seen if e.error is None]
    if multilabel:
        return np.asarray(loaded, np.uint8).reshape(-1, num_classes)
    return np.asarray(loaded, np.int64)


def _duplicates(
    splits: Mapping[str, Source], seen_by_split: dict[str, list[_Example]]
) -> list[tuple[tuple[str, str], ...]]:
    """Groups of the examples that share a digest, where the group spans more than one split."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for split, source in splits.items():
        for index, example in enumerate(seen_by_split[split]):
            if example.digest is not None:
                groups.setdefault(example.digest, []).append((split, source.describe(index)))
    return [tuple(group) for group in groups.values() if len({split for split, _ in group}) > 1]


def format_report(report: DataReport) -> str:
    """The report as ``jaxtl data inspect`` prints it, ending with the number of problems."""
    lines = [f"classes ({len(report.classes)}): " + ", ".join(f"{i}: {n}" for i, n in enumerate(report.classes))]
    lines += _count_table(report)
    lines.append("image sizes (min / median / max):")
    for split, sizes in report.sizes.items():
        if len(sizes):
            width, height = (f"{s.min()} / {np.median(s):g} / {s.max()}" for s in sizes.T)
            lines.append(
                f"  {split}: width {width}, height {height} ({len(sizes)} image{'' if len(sizes) == 1 else 's'})"
            )
        else:
            lines.append(f"  {split}: no readable image")
    lines.append(f"unreadable files: {len(report.unreadable)}")
    lines += [f"  {u.split}: {_naming(u.message, u.description)}" for u in report.unreadable]
    lines.append(f"label problems: {len(report.label_problems)}")
    lines += [f"  {split}: {message}" for split, message in report.label_problems]
    lines.append(f"images in more than one split: {len(report.duplicates)}")
    lines += ["  " + " = ".join(f"{split}: {what}" for split, what in group) for group in report.duplicates]
    lines.append(f"{report.num_problems} problem{'' if report.num_problems == 1 else 's'}")
    return "\n".join(lines)


def _count_table(report: DataReport) -> list[str]:
    splits = list(report.counts)
    heading = "positives per class" if report.multilabel else "examples per class"
    names = [f"{i}: {name}" for i, name in enumerate(report.classes)] + ["examples"]
    columns = [[*map(str, report.counts[s].tolist()), str(report.examples[s])] for s in splits]
    name_width = max(len(n) for n in names)
    widths = [max(len(split), *map(len, column)) for split, column in zip(splits, columns)]
    lines = [f"{heading}:", "  " + " " * name_width + "".join(f"  {s:>{w}}" for s, w in zip(splits, widths))]
    for row, name in enumerate(names):
        lines.append("  " + f"{name:<{name_width}}" + "".join(f"  {c[row]:>{w}}" for c, w in zip(columns, widths)))
    if report.multilabel:
        lines.append("label cardinality (mean positives per example): "
                     + ", ".join(f"{split} {value:.2f}" for split, value in report.cardinality.items()))  # fmt: skip
    return lines


def _naming(message: str, description: str) -> str:
    """``message``, prefixed with the example's description unless it names it already."""
    return message if description in message else f"{description}: {message}"
