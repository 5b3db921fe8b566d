"""The parallel loader: deterministic, resumable mid-epoch, fixed batch shapes.

Order: epoch ``e`` visits the examples in ``permutation(seed, e)`` (or in order without shuffling),
each exactly once; a ``sampler`` (``sampler.order(seed, e)``, e.g. :class:`jaxtl.data.ClassBalancedSampler`)
or a source with its own ``epoch_order(seed, e)`` (WebDataset shards: shard by shard) gives the train order
instead. Batches always have ``batch_size`` rows: the last one of an epoch is padded and
its padding rows have ``mask == False``, so no example is dropped and no shape changes (no
recompile). A position is (epoch, batch); iterating ``epoch(e, start_batch=b)`` yields exactly what
an uninterrupted epoch yields from batch ``b`` on, so a run resumes from a saved position.

Workers are threads or processes (``worker_type``). Threads share the batch buffers and start at
once; PIL's decoders and resamplers release the GIL, but the Python between them does not, so
threads stop scaling when many cores decode at once. Processes (started with ``forkserver``:
forking a process that runs JAX's threads is unsafe) each hold their own GIL and write their rows
into shared-memory batch slots; a batch is copied out of its slot before it is yielded. Both give
the same batches, byte for byte. Measured against torch's DataLoader in bench/data_loader.py.
The workers themselves are in :mod:`jaxtl.data.workers`.

Random train transforms draw from ``numpy.random.default_rng([seed, epoch, index])``: the same crop
for the same example in the same epoch, whatever the thread timing or the resume point.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import numpy as np

from jaxtl.data.sources import Source, is_multilabel
from jaxtl.data.workers import PROCESS_WORKERS_FROM, CannotUseProcesses, ProcessWorkers, ThreadWorkers
from jaxtl.errors import DataError

log = logging.getLogger(__name__)

WorkerType = Literal["auto", "thread", "process"]
# Threads below PROCESS_WORKERS_FROM workers (no processes on a small machine or in a test), processes from
# there on where they can run: a library user and a run config get the same loader.
DEFAULT_WORKER_TYPE: WorkerType = "auto"

Transform = Callable[..., np.ndarray]


class Sampler(Protocol):
    """The order of a shuffled epoch: ``len(sampler)`` source indices from ``order(seed, epoch)``, a function
    of its arguments only (a resumed run gets the same epoch)."""

    def __len__(self) -> int: ...

    def order(self, seed: int, epoch: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class SourceOrder:
    """A source's own epoch order (``source.epoch_order``) as a sampler."""

    source: Source

    def __len__(self) -> int:
        return len(self.source)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return self.source.epoch_order(seed, epoch)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch on the host (the loader's ``rows`` of it: all of them by default).

    Attributes:
        images: (batch_size, H, W, 3) uint8; padding rows are zero.
        labels: (batch_size,) int32 class indices, or (batch_size, C) uint8 multi-hot from a multi-label source;
            padding rows are 0.
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
        num_workers: decoding threads or processes (default: the CPUs this process may use).
        prefetch: batches decoded ahead of the one being consumed.
        skip_bad_files: a file that cannot be decoded is masked out of its batch and counted in
            ``skipped`` instead of stopping with a DataError that names it.
        rows: the rows of every batch this loader decodes and yields (default all): each process of a
            multi-process run loads the rows its devices hold (``jaxtl.train.distributed.local_rows``).
        worker_type: ``"thread"``; ``"process"`` (the source and transform must pickle, and a
            script that iterates the loader needs ``if __name__ == "__main__":``, as with torch's
            DataLoader); or ``"auto"``: processes from :data:`PROCESS_WORKERS_FROM` workers on where
            they can run (the source and transform pickle, /dev/shm has room), threads otherwise.
        sampler: the order of a shuffled epoch instead of a permutation: ``sampler.order(seed, epoch)``, source
            indices (any number of them, repeats allowed). Without one, a shuffled loader over a source that has
            ``epoch_order(seed, epoch)`` takes that order.
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
        worker_type: WorkerType = DEFAULT_WORKER_TYPE,
        rows: slice | None = None,
        sampler: Sampler | None = None,
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
        if worker_type not in ("auto", "thread", "process"):
            raise ValueError(f"worker_type={worker_type!r} is not one of 'auto', 'thread', 'process'")
        self.worker_type = worker_type
        if sampler is not None and not shuffle:
            raise ValueError("a sampler orders a shuffled loader; this loader has shuffle=False")
        if sampler is None and shuffle and callable(getattr(source, "epoch_order", None)):
            sampler = SourceOrder(source)
        self.sampler = sampler
        self.rows = slice(None) if rows is None else rows
        self.rows_per_batch = len(range(*self.rows.indices(batch_size)))
        if self.rows_per_batch < 1 or self.rows.step not in (None, 1):
            raise ValueError(f"rows={rows} is not a non-empty contiguous range of a batch of {batch_size}")
        self.skipped: list[str] = []
        self._workers: ThreadWorkers | ProcessWorkers | None = None
        self._order: tuple[int | None, np.ndarray | None] = (None, None)  # (epoch, order): one epoch's, kept

    def __len__(self) -> int:
        """Batches per epoch (the last one padded)."""
        return -(-self.examples_per_epoch // self.batch_size)

    @property
    def examples_per_epoch(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.source)

    def order(self, epoch: int) -> np.ndarray:
        """The source indices of ``epoch`` in the order they are yielded (kept for the epoch's batches)."""
        if self._order[0] != epoch:
            n = len(self.source)
            if self.sampler is not None:
                order = np.array(self.sampler.order(self.seed, epoch), np.int64)
                if order.ndim != 1 or len(order) != len(self.sampler) or np.any((order < 0) | (order >= n)):
                    raise DataError(
                        f"{self.sampler!r} gave an order of shape {order.shape} for epoch {epoch}; expected "
                        f"{len(self.sampler)} source indices in [0, {n})"
                    )
            elif self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            order.flags.writeable = False
            self._order = (epoch, order)
        return self._order[1]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """(batch_size,) source indices of one batch, -1 for padding."""
        indices = self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        return np.pad(indices, (0, self.batch_size - len(indices)), constant_values=-1)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside the epoch's {len(self)} batches")
        workers = self._start_workers()
        pending: collections.deque = collections.deque()
        next_batch = start_batch
        while next_batch < len(self) and len(pending) < self.prefetch:
            pending.append(workers.submit(epoch, self.batch_indices(epoch, next_batch)[self.rows]))
            next_batch += 1
        while pending:
            ticket = pending.popleft()
            if next_batch < len(self):
                pending.append(workers.submit(epoch, self.batch_indices(epoch, next_batch)[self.rows]))
                next_batch += 1
            yield workers.collect(ticket)  # re-raises a worker's DataError, in the batch's row order

    def _start_workers(self) -> ThreadWorkers | ProcessWorkers:
        if self._workers is None:
            if self.worker_type == "process":
                self._workers = ProcessWorkers(self)
            elif self.worker_type == "auto" and self.num_workers >= PROCESS_WORKERS_FROM:
                try:
                    self._workers = ProcessWorkers(self)
                except CannotUseProcesses as error:
                    log.info("loader: threads, not processes: %s", error)
            if self._workers is None:
                self._workers = ThreadWorkers(self)
        return self._workers

    def close(self) -> None:
        """Stops the workers (and frees the shared memory of process workers); a later epoch restarts them."""
        if self._workers is not None:
            self._workers.close(wait=True)
            self._workers = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_workers", None) is not None:
            self._workers.close(wait=False)

    def record_skipped(self, description: str, error: str) -> None:
        self.skipped.append(description)  # list.append is atomic under the GIL
        log.warning("skipped %s", error)

    def empty_batch(self, indices: np.ndarray) -> Batch:
        height, width = self.transform.output_size
        return Batch(
            images=np.zeros((len(indices), height, width, 3), np.uint8),
            labels=(
                np.zeros((len(indices), len(self.source.classes)), np.uint8)
                if is_multilabel(self.source)
                else np.zeros((len(indices),), np.int32)
            ),
            mask=indices >= 0,
            indices=indices,
        )


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
    """A NamedSharding that splits the batch axis across all devices, every process's (a 1-D ``data`` mesh)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()  # every process's: one data-parallel axis across hosts
    if batch_size % len(devices):
        raise ValueError(
            f"batch_size={batch_size} does not split evenly across {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    return NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
