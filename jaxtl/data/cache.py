"""The decoded-image cache: each image decoded and resized once into a memory-mapped file per split.

An entry ``<root>/<key>/`` holds ``images.u8`` (every valid image's uint8 (H, W, 3) pixels after the eval
resize, back to back), ``index.npy`` (per example: int64 ``offset`` into images.u8, int32 ``height``,
``width``, ``label``, bool ``valid``: False for a bad file skipped while building; a multi-label source's
multi-hot labels are in ``targets.npy``, (N, C) uint8), ``names.json`` (each
example's ``source.describe(i)``, for messages), ``meta.json`` (format, key inputs, counts, bad files'
messages) and ``last_used`` (its mtime orders entries for eviction). The key is a sha256 over the
source's files (an ImageFolder's relative paths, labels, sizes, mtime_ns and classes; a tfds split's
dataset, version, split and prepared files: ``TfdsSource.fingerprint``), the resize settings, Pillow's
version (its decoders and resamplers make the pixels) and the format version.

An entry is written under a staging name and renamed into place, so a killed build leaves nothing that
loads. A per-key file lock serialises builds of one key across processes; a root lock covers eviction.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from jaxtl.data.cached_source import FORMAT, INDEX_DTYPE, CachedSource, is_complete
from jaxtl.data.loader import default_num_workers
from jaxtl.data.sources import ConcatSource, ImageFolder, Source, is_multilabel, labels_of
from jaxtl.data.transforms import resize
from jaxtl.durable import sync_directory
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing, cache_dir

log = logging.getLogger(__name__)

# 50 GiB holds ~200k images resized to a 256-pixel shorter side (4:3: 256 x 341 x 3 = 262 KB each): Food-101,
# Flowers, Pets, CUB and the like with room to spare. Never more than half the disk left (free space plus
# what the cache holds), so checkpoints, runs and weights keep room.
DEFAULT_BUDGET_BYTES = 50 << 30
BUDGET_ENV = "JAXTL_DECODED_CACHE_BUDGET"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_STAGING = re.compile(r"^\.staging-([0-9a-f]{64})-")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def default_cache_root() -> Path:
    """``$JAXTL_CACHE/decoded`` (see :func:`jaxtl.weights.cache_dir`)."""
    return cache_dir() / "decoded"


def default_budget_bytes(root: Path) -> int:
    """``$JAXTL_DECODED_CACHE_BUDGET`` (bytes, or with a K/M/G/T suffix), else min(50 GiB, half of what
    the disk has left for the cache: its free space plus what the cache holds now)."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", text.lower())
        if not match:
            raise DataError(f"${BUDGET_ENV}={text!r} is not a size; write bytes or e.g. 100G")
        return int(match[1]) * _UNITS[match[2]]
    existing = root if root.exists() else next(p for p in root.parents if p.exists())
    return min(DEFAULT_BUDGET_BYTES, (shutil.disk_usage(existing).free + _tree_size(root)) // 2)


def source_fingerprint(source: Source) -> str:
    """A sha256 of what a source's images are: its ``fingerprint()``, or its files' names, sizes and mtimes.

    Raises:
        DataError: the source can say neither.
    """
    h = hashlib.sha256()
    if callable(getattr(source, "fingerprint", None)):  # first: a subclass of ImageFolder may change the pixels
        h.update(json.dumps([type(source).__name__, str(source.fingerprint())]).encode())
    elif isinstance(source, ImageFolder):
        h.update(json.dumps(["ImageFolder", list(source.classes), source.max_pixels]).encode())
        for path, label in source.samples:
            try:
                stat = os.stat(path)
                state = [stat.st_size, stat.st_mtime_ns]
            except OSError:  # a broken link: the build stops at it or skips it, as the loader would
                state = None
            h.update(json.dumps([os.path.relpath(path, source.root), label, state]).encode())
    elif isinstance(source, ConcatSource):
        h.update(json.dumps(["ConcatSource", [source_fingerprint(part) for part in source.sources]]).encode())
    else:
        raise DataError(
            f"{source!r} cannot be cached: the decoded cache keys an entry by the source's files, and this source "
            "is neither an ImageFolder nor a ConcatSource of them and has no fingerprint() method; give it one "
            "(a string that changes whenever an image does) or use it without the cache"
        )
    return h.hexdigest()


def resize_settings(preprocessing: Preprocessing) -> dict:
    """The preprocessing fields that change a cached image (the crop is taken when reading)."""
    p = preprocessing
    return {"resize_size": p.resize_size, "interpolation": p.interpolation, "antialias": p.antialias}


def cache_key(source: Source, preprocessing: Preprocessing) -> str:
    """The entry name of ``source`` decoded with ``preprocessing``'s resize: 64 hex digits."""
    inputs = {"format": FORMAT, "source": source_fingerprint(source), "pillow": PIL.__version__}
    inputs |= resize_settings(preprocessing)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class DecodedCache:
    """A directory of decoded entries with a byte budget; least recently used entries are evicted.

    Args:
        root: the cache directory (default :func:`default_cache_root`).
        budget_bytes: the most the entries may hold together (default :func:`default_budget_bytes`).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, budget_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        if budget_bytes is not None and budget_bytes < 1:
            raise ValueError(f"budget_bytes={budget_bytes} must be at least 1")
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes(self.root)

    def __repr__(self) -> str:
        return f"DecodedCache({str(self.root)!r}, budget_bytes={self.budget_bytes})"

    def entries(self) -> list[Path]:
        """The complete entries, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _KEY.match(p.name) and is_complete(p)]
        return sorted(found, key=_last_used)

    def build(
        self,
        source: Source,
        preprocessing: Preprocessing,
        *,
        skip_bad_files: bool = False,
        num_workers: int | None = None,
        progress: bool | None = None,
    ) -> CachedSource:
        """The cached form of ``source``: reused when its key has an entry, decoded and written otherwise.

        Args:
            source: an ImageFolder, a ConcatSource of them, or a source with a ``fingerprint()``.
            preprocessing: its ``resize_size``, ``interpolation`` and ``antialias`` are applied (as
                :class:`jaxtl.data.EvalTransform` applies them); the crop is taken when reading.
            skip_bad_files: a file that cannot be decoded is stored as invalid (a Loader over the cache
                then skips or stops at it as it would at the file) instead of stopping the build.
            num_workers: decoding processes (forkserver); 0 decodes in this process. Default: the CPUs.
            progress: a tqdm bar (None: only on a terminal).

        Raises:
            DataError: a bad file without ``skip_bad_files`` (naming it), or an entry over the budget.
        """
        key = cache_key(source, preprocessing)
        entry = self.root / key
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            message = f"cannot create the decoded cache {self.root} ({error.strerror}); choose another root"
            raise DataError(f"{message} or set $JAXTL_CACHE") from None
        with _acquire(self._key_lock(key), f"another process is building {entry}; waiting for it"):
            if is_complete(entry, key):
                _touch(entry)
                return CachedSource(entry)
            staging = self.root / f".staging-{key}-{uuid.uuid4().hex[:8]}"
            with _acquire(self._root_lock(), "waiting for the decoded cache's lock"):
                self._remove_stale(keep=key)
            try:
                staging.mkdir()
                _write_entry(staging, key, source, preprocessing, skip_bad_files, num_workers, progress, self)
                with _acquire(self._root_lock(), "waiting for the decoded cache's lock"):
                    self._evict(incoming=_tree_size(staging), keep=key)
                    if entry.exists():  # damaged (incomplete): nothing else writes this key while we hold its lock
                        _remove(entry)
                    os.replace(staging, entry)
                sync_directory(self.root)
            finally:
                if staging.exists():
                    _remove(staging)
        return CachedSource(entry)

    def _key_lock(self, key: str) -> FileLock:
        (self.root / ".locks").mkdir(exist_ok=True)
        return FileLock(self.root / ".locks" / f"{key}.lock")

    def _root_lock(self) -> FileLock:
        return FileLock(self.root / ".lock")

    def _remove_stale(self, keep: str) -> None:
        """Removes what killed builds left: staging directories whose key no build holds."""
        for path in self.root.iterdir():
            match = _STAGING.match(path.name)
            if path.name.startswith(".evicting-") or (match and match[1] == keep):  # keep's lock is ours
                _remove(path)
            elif match:
                with _held(self._key_lock(match[1])) as held:
                    if held:
                        _remove(path)

    def _evict(self, incoming: int, keep: str) -> None:
        """Removes least recently used entries, not locked by a build, until ``incoming`` more bytes fit."""
        entries = [p for p in self.entries() if p.name != keep]
        total = incoming + sum(_tree_size(p) for p in entries)
        for path in entries:
            if total <= self.budget_bytes:
                return
            with _held(self._key_lock(path.name)) as held:
                if held:  # else a build of that key is checking or rewriting it
                    size = _tree_size(path)
                    _remove(path)
                    total -= size
                    log.info("decoded cache: evicted %s (%d MiB, least recently used)", path, size >> 20)
        if total > self.budget_bytes:
            log.warning(f"decoded cache {self.root} is over its budget: the rest is in use by other builds")


# --- building ---------------------------------------------------------------------------------------


def _decode(source: Source, index: int, preprocessing: Preprocessing, skip_bad_files: bool):
    """``(array, label, None)`` of one example resized, or ``(None, -1, message)`` for a skipped bad file."""
    try:
        image, label = source.load(index)
    except DataError as error:
        if not skip_bad_files:
            raise
        return None, -1, str(error)
    array = np.asarray(resize(image, preprocessing.resize_size, preprocessing.interpolation))
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{source.describe(index)}: decoded to {array.dtype} {array.shape}, expected uint8 (H, W, 3)")
    return array, (-1 if np.ndim(label) else int(label)), None  # multi-hot labels: targets.npy, from labels()


_worker_state: dict = {}


def _worker_init(work: bytes) -> None:
    _worker_state["source"], _worker_state["preprocessing"], _worker_state["skip"] = pickle.loads(work)


def _worker_decode(indices: list[int]) -> list:
    state = _worker_state
    return [_decode(state["source"], i, state["preprocessing"], state["skip"]) for i in indices]


def _decoded(source: Source, preprocessing: Preprocessing, skip_bad_files: bool, num_workers: int) -> Iterator:
    """``(array, label, message)`` for every example, in order; decoded by ``num_workers`` processes."""
    n = len(source)
    work = None
    if num_workers > 0:
        try:
            work = pickle.dumps((source, preprocessing, skip_bad_files))
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            log.info("decoded cache: decoding in this process, %r does not pickle (%s)", source, error)
    if work is None:
        for index in range(n):
            yield _decode(source, index, preprocessing, skip_bad_files)
        return
    chunk = max(1, min(32, -(-n // (4 * num_workers))))
    context = multiprocessing.get_context("forkserver")  # as the loader's: forking a process running JAX is unsafe
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_worker_init, initargs=(work,))
    try:
        pending: collections.deque = collections.deque()
        for start in range(0, n, chunk):
            pending.append(pool.submit(_worker_decode, list(range(start, min(start + chunk, n)))))
            if len(pending) > 2 * num_workers:  # a bounded window: decoded images wait in memory only this far ahead
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_entry(staging, key, source, preprocessing, skip_bad_files, num_workers, progress, cache) -> None:
    """Decodes ``source`` into the (empty) directory ``staging``: images, index, names, meta."""
    n = len(source)
    if num_workers is None:
        num_workers = default_num_workers() if n > 1 else 0
    index = np.zeros(n, INDEX_DTYPE)
    invalid: dict[str, str] = {}
    offset = 0
    bar = tqdm(total=n, desc=f"decoding {source!r}", unit="img", disable=None if progress is None else not progress)
    decoded = contextlib.closing(_decoded(source, preprocessing, skip_bad_files, num_workers))
    with open(staging / "images.u8", "wb") as f, bar, decoded as examples:
        for i, (array, label, message) in enumerate(examples):
            if array is None:
                index[i] = (offset, 0, 0, label, False)
                invalid[str(i)] = message
                log.warning("skipped %s", message)
            else:
                if offset + array.nbytes > cache.budget_bytes:
                    raise DataError(
                        f"the decoded images of {source!r} exceed the decoded cache's budget of "
                        f"{cache.budget_bytes >> 20} MiB after {i} of {n} images ({cache.root}); raise it with "
                        f"${BUDGET_ENV} (e.g. {BUDGET_ENV}=200G) or DecodedCache(budget_bytes=...), or use the "
                        "images uncached"
                    )
                f.write(np.ascontiguousarray(array).data)
                index[i] = (offset, array.shape[0], array.shape[1], label, True)
                offset += array.nbytes
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    _write_file(staging / "index.npy", lambda out: np.save(out, index, allow_pickle=False))
    multilabel = is_multilabel(source)
    if multilabel:  # (N, C) uint8 multi-hot, each example's, from the source's labels()
        targets = np.ascontiguousarray(labels_of(source), np.uint8)
        _write_file(staging / "targets.npy", lambda out: np.save(out, targets, allow_pickle=False))
    names = [source.describe(i) for i in range(n)]
    _write_file(staging / "names.json", lambda out: out.write(json.dumps(names).encode()))
    inputs = {"source": repr(source), "pillow": PIL.__version__, **resize_settings(preprocessing)}
    meta = dict(format=FORMAT, key=key, inputs=inputs, classes=list(source.classes), count=n, valid=n - len(invalid))
    meta |= dict(multilabel=True) if multilabel else {}
    meta |= dict(bytes=offset, invalid=invalid, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_file(staging / "meta.json", lambda out: out.write(json.dumps(meta, indent=1).encode()))
    _touch(staging)


# --- files and locks --------------------------------------------------------------------------------


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _touch(entry: Path) -> None:
    """Marks ``entry`` used now; an explicit time_ns, not the file system's coarser clock, orders entries."""
    now = time.time_ns()
    (entry / "last_used").touch()
    os.utime(entry / "last_used", ns=(now, now))


def _last_used(entry: Path) -> int:
    try:
        return os.stat(entry / "last_used").st_mtime_ns
    except OSError:  # removed meanwhile by another process's eviction
        return 0


def _tree_size(path: Path) -> int:
    """Bytes in the files under ``path``; a file removed meanwhile counts 0."""
    return sum(_file_size(os.path.join(top, name)) for top, _, names in os.walk(path) for name in names)


def _file_size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _remove(path: Path) -> None:
    """Removes a directory: first renamed aside, so that a removal cut short leaves nothing that loads."""
    aside = path.with_name(f".evicting-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _held(lock: FileLock) -> Iterator[bool]:
    """Takes ``lock`` if it is free (yields True) and releases it after the block; yields False otherwise."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def _acquire(lock: FileLock, waiting: str) -> Iterator[None]:
    """Holds ``lock`` for the block, saying why it waits when another process holds it."""
    with _held(lock) as held:
        if not held:
            log.info("%s", waiting)
            lock.acquire()
        try:
            yield
        finally:
            if not held:
                lock.release()
