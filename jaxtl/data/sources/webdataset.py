"""WebDataset shards (plain tar files) as a source: indexed once from the tar headers, each image read by offset.

Samples are the ``webdataset`` package's (``webdataset.tariterators``): of a shard's members in tar order, only
regular files count (directories, links and top-level ``__name__`` metadata files are passed over); a member's
name splits into key and extension at the first dot of its last path component (``a/b.seg.jpg`` -> key ``a/b``,
extension ``seg.jpg``, lowercased), a name without such a dot is passed over, and consecutive members with the
same key make one sample (a sample never spans two shards). The index order is the order of
``webdataset.WebDataset(shards, shardshuffle=False)``: the shards in the given order, each one's samples in tar order.

A sample's image is its first member whose extension is in ``image_keys`` (in that order), decoded as
torchvision's ``pil_loader`` decodes a file (``Image.open(...).convert("RGB")``). Its label is the
``label_key`` member (``.cls``: a class index as text; with ``classes`` given, a text that is not an integer is
a class name), or else the ``json_label_field`` of a ``.json`` member: an integer index, a class name, or a list
of them for a multi-label dataset (then ``multilabel`` is True and ``load`` gives a (num_classes,) uint8 multi-hot
vector; a single label among lists counts as a list of one). ``classes`` given: that order. Otherwise integer labels
name the classes ``"0"`` .. ``"<largest label>"``, and names are the classes sorted.

Shards must be uncompressed tar files (a ``.tar.gz`` cannot be read by offset). Bad samples (no image, no label,
a label that is not an integer, out of range or an unknown name, a member name twice in one sample) and truncated
shards raise one DataError, or with ``skip_bad_samples=True`` are left out and listed in ``problems`` (a truncated
shard keeps the complete samples before the break). A missing or empty shard is always an error.

``epoch_order(seed, epoch)`` reads one shard after another: the shards in the order of
``default_rng([seed, epoch]).permutation(num_shards)``, each shard's samples in the order of
``default_rng([seed, epoch, shard]).permutation(n)``; a function of (seed, epoch) alone, so an epoch resumes
mid-way. The loader takes it for shuffled epochs.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.data.sources.base import allow_pixels, decode_image
from jaxtl.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
# webdataset.tariterators: base_plus_ext, and the metadata that tar_file_iterator passes over.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_METADATA = re.compile(r"__[^/]*__($|/)")
_SKIP_HINT = "pass skip_bad_samples=True to leave such samples out"


def expand_braces(pattern: str) -> list[str]:
    """Bash brace expansion as the ``braceexpand`` package (which webdataset uses) does it, without escapes.

    ``"train-{000..002}.tar"`` -> train-000.tar, train-001.tar, train-002.tar (a zero-padded bound pads every
    number to the longer bound's width); ``{a,b}`` lists; ``{1..9..2}`` steps; ``{4..1}`` counts down; ``{a..c}``
    letters; nested groups. A group that is neither a range nor a list stays as written, braces included.
    """
    depth, start = 0, None
    for position, char in enumerate(pattern):
        if char == "{":
            start = position if depth == 0 else start
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                group = _expand_group(pattern[start + 1 : position])
                rest = expand_braces(pattern[position + 1 :])
                return [pattern[:start] + item + tail for item in group for tail in rest]
        if depth < 0:
            break
    if depth != 0:
        raise DataError(f"shard pattern {pattern!r} has unbalanced braces")
    return [pattern]


def _expand_group(expression: str) -> list[str]:
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?", expression)
    letters = re.fullmatch(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?", expression)
    if numbers or letters:
        first, last, step = (numbers or letters).groups()
        step = int(step or 1) or 1
        if letters:
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
            a, b = alphabet.index(first), alphabet.index(last)
            return list(alphabet[a : b + 1 : step] if a < b else alphabet[a : (b - 1 if b else None) : -step])
        padded = any(s.startswith(("0", "-0")) for s in (first, last) if s not in ("0", "-0"))
        width = max(len(first), len(last)) if padded else 0
        a, b = int(first), int(last)
        return [f"{n:0{width}d}" for n in (range(a, b + 1, step) if a < b else range(a, b - 1, -step))]
    items, depth, start = [], 0, 0
    for position, char in enumerate(expression):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(expression[start:position])
            start = position + 1
    if not items:
        return ["{" + item + "}" for item in expand_braces(expression)]
    return [expanded for item in [*items, expression[start:]] for expanded in expand_braces(item)]


def shard_paths(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files of a brace pattern (``::`` joins several, as in webdataset; its ``$WDS_`` variables are not
    expanded), a directory (its ``*.tar`` files, sorted) or a list of paths (taken as they are)."""
    if isinstance(shards, (str, os.PathLike)):
        if Path(shards).is_dir():
            paths = sorted(Path(shards).glob("*.tar"))
            if not paths:
                raise DataError(f"shard folder {shards} has no *.tar files")
            return paths
        return [Path(path) for pattern in str(shards).split("::") for path in expand_braces(pattern)]
    paths = [Path(path) for path in shards]
    if not paths:
        raise DataError("the list of shards is empty")
    return paths


class WebDatasetSource:
    """The samples of WebDataset tar shards, in ``webdataset.WebDataset(shards, shardshuffle=False)``'s order.

    Args:
        shards: a brace pattern (``"data/train-{000000..000009}.tar"``), a list of paths, or a directory.
        classes: class names in label order; by default from the labels (see the module docstring).
        image_keys: the image members' extensions, in order of preference.
        label_key: the extension of a member holding the label as text.
        json_label_field: the field of a ``.json`` member holding the label(s), where there is no ``label_key``.
        skip_bad_samples: leave bad samples and the broken tails of truncated shards out (listed in ``problems``)
            instead of raising.
        max_pixels: larger images are refused (PIL's decompression-bomb limit by default), as in ``load_image``.

    Attributes:
        shards: the shard files (list of Path), in index order.
        classes, class_to_idx: names in label order, and name -> label.
        multilabel: True when the labels are lists (``load`` gives a (num_classes,) uint8 multi-hot vector).
        problems: one message per skipped sample or truncated shard.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        classes: Sequence[str] | None = None,
        image_keys: Sequence[str] = IMAGE_KEYS,
        label_key: str = "cls",
        json_label_field: str = "label",
        skip_bad_samples: bool = False,
        max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    ):
        self.shards = shard_paths(shards)
        self.image_keys, self.label_key, self.json_label_field = tuple(image_keys), label_key, json_label_field
        self.skip_bad_samples, self.max_pixels = skip_bad_samples, max_pixels
        self.classes = None if classes is None else tuple(classes)
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise DataError(f"classes={list(self.classes)} names a class twice")
        self.problems: list[str] = []
        self._files: list[list] = []  # [resolved path, size, mtime_ns] of each shard when it was indexed
        allow_pixels(max_pixels)
        samples = [(shard, *sample) for shard, path in enumerate(self.shards) for sample in self._index_shard(path)]
        shard_of, keys, offsets, sizes, raw_labels = zip(*samples) if samples else ((),) * 5
        names = [f"{self.shards[shard]}:{key}" for shard, key in zip(shard_of, keys)]
        self.multilabel = any(isinstance(label, list) for label in raw_labels)
        if self.classes is None:
            self.classes = _infer_classes(raw_labels, names, self._where())
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        labels = [self._resolve(label, name) for label, name in zip(raw_labels, names)]
        kept = np.array([label is not None for label in labels], bool)
        if not kept.any():
            raise DataError(f"{self._where()} have no usable samples: {'; '.join(self.problems[:3])}")
        labels = [label for label in labels if label is not None]
        # The index as arrays: a process worker gets it pickled in a few buffers.
        self._keys = np.array([key.encode() for key in keys], bytes)[kept]
        self._offsets = np.array(offsets, np.int64)[kept]
        self._sizes = np.array(sizes, np.int64)[kept]
        per_shard = np.bincount(np.array(shard_of, np.int64)[kept], minlength=len(self.shards))
        self._shard_starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self._labels = np.array([index for label in labels for index in np.atleast_1d(label)], np.int64)
        self._label_starts = np.cumsum([0] + [np.size(label) for label in labels], dtype=np.int64)
        self._local = threading.local()

    def _where(self) -> str:
        return f"the shards {self.shards[0]}" + (f" .. {self.shards[-1]}" if len(self.shards) > 1 else "")

    def _bad(self, message: str) -> None:
        if not self.skip_bad_samples:
            raise DataError(f"{message}; {_SKIP_HINT}")
        self.problems.append(message)

    def _index_shard(self, path: Path) -> list[tuple[str, int, int, object]]:
        """(key, image data offset, image size, raw label) of each good sample of one shard."""
        groups, truncated = _read_members(path)
        if truncated and not self.skip_bad_samples:
            raise DataError(f"{path} {truncated}; write the shard again, or {_SKIP_HINT}")
        if not groups and not truncated:
            raise DataError(f"{path} has no samples (no member named <key>.<extension>); remove it from the shards")
        samples = []
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            self._files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
            for number, (key, members, twice) in enumerate(groups):
                problem, sample = self._sample(f"{path}:{key}", members, twice, file)
                if problem is None:
                    samples.append((key, *sample))
                elif not (truncated and number == len(groups) - 1):  # the sample the break cut short
                    self._bad(problem)
        if truncated:
            self.problems.append(f"{path} {truncated}; kept its first {len(samples)} complete samples")
        return samples

    def _sample(self, where: str, members: dict, twice: list, file) -> tuple[str | None, tuple]:
        """(None, (image offset, image size, raw label)) of a good sample, or (the problem, ())."""
        image = next((extension for extension in self.image_keys if extension in members), None)
        if twice:
            return f"{where}: the sample has two .{twice[0]} members (webdataset refuses it too)", ()
        if image is None:
            listed = f"members: {', '.join(members)}; image_keys: {', '.join(self.image_keys)}"
            return f"{where}: no image member ({listed})", ()
        label_member = self.label_key if self.label_key in members else "json" if "json" in members else None
        if label_member is None:
            return f"{where}: no label (neither a .{self.label_key} nor a .json member)", ()
        offset, size = members[label_member]
        file.seek(offset)
        text = file.read(size).decode("utf-8", errors="replace")
        problem, label = self._parse_label(f"{where}.{label_member}", text, label_member == self.label_key)
        return problem, (None if problem else (*members[image], label))

    def _parse_label(self, where: str, text: str, is_text: bool) -> tuple[str | None, object]:
        """(None, an int, a class name or a list of them), or (the problem, None)."""
        if is_text:
            try:
                return None, int(text)
            except ValueError:
                if self.classes is not None:
                    return None, text.strip()
                return f"{where}: label {text.strip()!r} is not an integer; give classes=[...] to use names", None
        try:
            label = json.loads(text)[self.json_label_field]
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{where} has no field {self.json_label_field!r} (json_label_field): {text[:80]!r}", None
        items = label if isinstance(label, list) else [label]
        if any(isinstance(item, bool) or not isinstance(item, (int, str)) for item in items):
            return f"{where}: label {label!r} is not a class index, a class name or a list of them", None
        return None, label

    def _resolve(self, label, name: str) -> int | list[int] | None:
        """The class index (or indices) of a raw label; None for a bad one that is skipped."""
        indices = []
        for item in label if isinstance(label, list) else [label]:
            if isinstance(item, str) and item not in self.class_to_idx:
                listed = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
                self._bad(f"{name}: label {item!r} is not one of the classes ({listed})")
                return None
            if isinstance(item, int) and not 0 <= item < len(self.classes):
                self._bad(f"{name}: label {item} is outside the {len(self.classes)} classes [0, {len(self.classes)})")
                return None
            indices.append(self.class_to_idx[item] if isinstance(item, str) else item)
        return indices if self.multilabel else indices[0]

    def __len__(self) -> int:
        return len(self._offsets)

    def _shard_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} samples")
        return int(np.searchsorted(self._shard_starts, index, side="right")) - 1

    def describe(self, index: int) -> str:
        """``<shard>:<key>``."""
        return f"{self.shards[self._shard_of(index)]}:{self._keys[index].decode()}"

    def load(self, index: int) -> tuple[Image.Image, int | np.ndarray]:
        """(RGB image, class index), or for a multi-label source (RGB image, (num_classes,) uint8 multi-hot)."""
        data = self._read(self._shard_of(index), int(self._offsets[index]), int(self._sizes[index]))
        if len(data) != self._sizes[index]:
            raise DataError(f"{self.describe(index)}: the shard is shorter than when it was indexed; index it again")
        image = decode_image(io.BytesIO(data), self.describe(index), self.max_pixels, size=lambda: len(data))
        return image, self._label(index)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        # Each thread keeps the shard it read last open: an epoch reads shard after shard, and no two threads
        # (nor a forked child and its parent) share a file position.
        held = getattr(self._local, "shard", None)
        if held is None or held.index != shard or held.pid != os.getpid():
            try:
                held = self._local.shard = _OpenShard(shard, open(self.shards[shard], "rb"))
            except OSError as error:
                raise DataError(f"{self.shards[shard]}: cannot open the shard ({error.strerror})") from None
        return held.read(offset, size)

    def _label(self, index: int) -> int | np.ndarray:
        indices = self._labels[self._label_starts[index] : self._label_starts[index + 1]]
        if not self.multilabel:
            return int(indices[0])
        vector = np.zeros(len(self.classes), np.uint8)
        vector[indices] = 1
        return vector

    def labels(self) -> np.ndarray:
        """(N,) int64 class indices, or (N, num_classes) uint8 multi-hot for a multi-label source; from the index."""
        if not self.multilabel:
            return self._labels.copy()
        matrix = np.zeros((len(self), len(self.classes)), np.uint8)
        matrix[np.repeat(np.arange(len(self)), np.diff(self._label_starts)), self._labels] = 1
        return matrix

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """(N,) int64: every index once, shard by shard (see the module docstring)."""
        parts = [np.zeros(0, np.int64)]
        for shard in np.random.default_rng([seed, epoch]).permutation(len(self.shards)):
            start, end = self._shard_starts[shard], self._shard_starts[shard + 1]
            parts.append(start + np.random.default_rng([seed, epoch, shard]).permutation(end - start))
        return np.concatenate(parts)

    def fingerprint(self) -> str:
        """The shards as indexed (resolved path, size, mtime_ns) and the settings that pick samples and labels."""
        settings = [self.classes, self.image_keys, self.label_key, self.json_label_field, self.skip_bad_samples]
        return json.dumps([self._files, settings])

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_local"}  # no open files

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __repr__(self) -> str:
        more = f" .. {str(self.shards[-1])!r}" if len(self.shards) > 1 else ""
        return (
            f"WebDatasetSource({str(self.shards[0])!r}{more}: {len(self)} samples in {len(self.shards)} shards, "
            f"{len(self.classes)} classes)"
        )


class _OpenShard:
    """A shard file that one thread of one process holds open."""

    def __init__(self, index: int, file):
        self.index, self.file, self.pid = index, file, os.getpid()

    def read(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(size)

    def __del__(self):
        self.file.close()


def _read_members(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]], list[str]]], str | None]:
    """One shard's samples as webdataset groups them: (key, {extension: (data offset, size)}, extensions seen
    twice); and, for a truncated or damaged shard, what is wrong (else None). Reads the tar headers only."""
    try:
        file_size = path.stat().st_size
        file = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"shard {path} does not exist") from None
    except OSError as error:
        raise DataError(f"{path}: cannot open the shard ({error.strerror})") from None
    groups, truncated = [], None
    with file:
        if file_size == 0:
            raise DataError(f"shard {path} is empty (0 bytes); write it again or remove it from the shards")
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except tarfile.ReadError as error:
            raise DataError(
                f"{path} is not an uncompressed tar file ({error}); a compressed shard (.tar.gz) cannot be read by "
                "offset: decompress it"
            ) from None
        try:
            for member in tar:
                if member.offset_data + member.size > file_size:
                    truncated = f"is truncated: member {member.name} ends past the end of the file ({file_size} bytes)"
                    break
                name = member.name
                if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                match = None if _METADATA.match(name) else _KEY_AND_EXTENSION.match(name)
                if match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}, []))
                _, members, twice = groups[-1]
                if extension in members:
                    twice.append(extension)
                members[extension] = (member.offset_data, member.size)
        except tarfile.TarError as error:
            truncated = f"is truncated or damaged after byte {tar.offset} ({error})"
        if truncated is None:
            file.seek(tar.offset)  # where tarfile stopped: tar's end-of-archive block of zeros, in a whole shard
            block = file.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
                truncated = f"is truncated or damaged: no tar header or end-of-archive block at byte {tar.offset}"
    return groups, truncated


def _infer_classes(labels: Sequence, names: Sequence[str], where: str) -> tuple[str, ...]:
    """The classes of labels without ``classes``: "0" .. "<largest index>" for indices, or the names sorted."""
    numbers, words = {}, {}
    for label, name in zip(labels, names):
        for item in label if isinstance(label, list) else [label]:
            (words if isinstance(item, str) else numbers).setdefault(item, name)
    if numbers and words:
        number, word = next(iter(numbers.items())), next(iter(words.items()))
        raise DataError(
            f"the labels of {where} mix class indices ({number[1]}: {number[0]}) and class names ({word[1]}: "
            f"{word[0]!r}); give classes=[...] in label order"
        )
    if not numbers and not words:
        raise DataError(f"{where} have no labels to name the classes from; give classes=[...]")
    return tuple(sorted(words)) if words else tuple(str(index) for index in range(max(numbers) + 1))
