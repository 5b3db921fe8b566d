"""The parallel loader: deterministic, resumable mid-epoch, fixed batch shapes.

Order: epoch ``e`` visits the examples in ``permutation(seed, e)`` (or in order without shuffling),
each exactly once. Batches always have ``batch_size`` rows: the last one of an epoch is padded and
its padding rows have ``mask == False``, so no example is dropped and no shape changes (no
recompile). A position is (epoch, batch); iterating ``epoch(e, start_batch=b)`` yields exactly what
an uninterrupted epoch yields from batch ``b`` on, so a run resumes from a saved position.

Workers are threads: PIL's decoders and resamplers release the GIL, and threads share the batch
buffers (each example is written into its row, no pickling, no copies between processes), and
forking a process that has started JAX is unsafe. Measured against torch's DataLoader in
bench/data_loader.py.

Random train transforms draw from ``numpy.random.default_rng([seed, epoch, index])``: the same crop
for the same example in the same epoch, whatever the thread timing or the resume point.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxtl.data.sources import Source
from jaxtl.errors import DataError

log = logging.getLogger(__name__)

Transform = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch on the host.

    Attributes:
        images: (batch_size, H, W, 3) uint8; padding rows are zero.
        labels: (batch_size,) int32; padding rows are 0.
        mask: (batch_size,) bool; False for padding rows and for skipped bad files.
        indices: (batch_size,) int64 source indices; -1 for padding rows.
    """

    images: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """A loader position: the next batch to yield is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoaderState:
        return cls(epoch=int(data["epoch"]), batch=int(data["batch"]))


def even_batch_size(n: int, max_batch: int, multiple: int = 1) -> int:
    """The batch size that covers ``n`` examples in as few batches of at most ``max_batch`` as can be,
    with the least padding; a multiple of ``multiple`` (as ``max_batch`` must be).

    400 examples, at most 64 a batch: 7 batches of 58 (6 padding rows), where 64 would pad 48.
    """
    if n < 1 or max_batch < 1 or multiple < 1 or max_batch % multiple:
        raise ValueError(
            f"even_batch_size(n={n}, max_batch={max_batch}, multiple={multiple}): n and max_batch must be >= 1, "
            "max_batch a multiple of multiple"
        )
    batches = -(-n // max_batch)  # ceiling division
    size = -(-n // batches)
    return -(-size // multiple) * multiple


def default_num_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Loader:
    """Batches of ``transform(image, rng)`` over a source.

    Args:
        source: an ImageFolder or TfdsSource (anything with ``len``, ``load``, ``describe``).
        transform: an EvalTransform or TrainTransform (``output_size`` gives the image shape).
        batch_size: rows per batch, padding included.
        shuffle: a new permutation every epoch (train); in order otherwise (eval).
        seed: the order and the random transforms are functions of (seed, epoch, index).
        num_workers: decoding threads (default: the CPUs this process may use).
        prefetch: batches decoded ahead of the one being consumed.
        skip_bad_files: a file that cannot be decoded is masked out of its batch and counted in
            ``skipped`` instead of stopping with a DataError that names it.
    """

    def __init__(
        self,
        source: Source,
        transform: Transform,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        num_workers: int | None = None,
        prefetch: int = 2,
        skip_bad_files: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if len(source) == 0:
            raise DataError(f"{source!r} has no examples")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be at least 1")
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers or default_num_workers()
        self.prefetch = max(1, prefetch)
        self.skip_bad_files = skip_bad_files
        self.skipped: list[str] = []
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """Batches per epoch (the last one padded)."""
        return -(-len(self.source) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The source indices of ``epoch`` in the order they are yielded."""
        if not self.shuffle:
            return np.arange(len(self.source))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """(batch_size,) source indices of one batch, -1 for padding."""
        indices = self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        return np.pad(indices, (0, self.batch_size - len(indices)), constant_values=-1)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside the epoch's {len(self)} batches")
        pool = self._executor()
        pending: collections.deque = collections.deque()
        next_batch = start_batch
        while next_batch < len(self) and len(pending) < self.prefetch:
            pending.append(self._submit(pool, epoch, next_batch))
            next_batch += 1
        while pending:
            batch, futures = pending.popleft()
            if next_batch < len(self):
                pending.append(self._submit(pool, epoch, next_batch))
                next_batch += 1
            for future in futures:
                future.result()  # re-raises a worker's DataError, in the batch's row order
            yield batch

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="jaxtl-loader")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor, epoch: int, batch: int):
        indices = self.batch_indices(epoch, batch)
        height, width = self.transform.output_size
        out = Batch(
            images=np.zeros((self.batch_size, height, width, 3), np.uint8),
            labels=np.zeros((self.batch_size,), np.int32),
            mask=indices >= 0,
            indices=indices,
        )
        futures = [pool.submit(self._fill, out, row, int(index), epoch) for row, index in enumerate(indices) if index >= 0]
        return out, futures

    def _fill(self, out: Batch, row: int, index: int, epoch: int) -> None:
        try:
            image, label = self.source.load(index)
        except DataError as error:
            if not self.skip_bad_files:
                raise
            out.mask[row] = False
            self.skipped.append(self.source.describe(index))  # list.append is atomic under the GIL
            log.warning("skipped %s", error)
            return
        rng = np.random.default_rng([self.seed, epoch, index])
        array = self.transform(image, rng)
        if array.shape != out.images.shape[1:]:
            raise DataError(f"{self.source.describe(index)}: transform gave shape {array.shape}, expected {out.images.shape[1:]}")
        out.images[row] = array
        out.labels[row] = label


def device_batches(batches: Iterator[Batch], sharding=None, size: int = 2) -> Iterator[Batch]:
    """Moves batches to the device(s) ``size`` ahead of use (device_put is asynchronous).

    ``sharding`` is a ``jax.sharding.Sharding`` for the batch axis (see :func:`data_sharding`);
    by default the first local device.
    """
    import jax

    queue: collections.deque = collections.deque()

    def put(batch: Batch) -> Batch:
        return Batch(*(jax.device_put(getattr(batch, f.name), sharding) for f in dataclasses.fields(Batch)))

    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def data_sharding(batch_size: int):
    """A NamedSharding that splits the batch axis across all local devices (a 1-D ``data`` mesh)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(
            f"batch_size={batch_size} does not split evenly across {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    return NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
