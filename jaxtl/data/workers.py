"""Decoding a loader's rows: in threads, or in processes that write them into shared memory."""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import shutil
import weakref
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np

from jaxtl.errors import DataError

if TYPE_CHECKING:
    from jaxtl.data.loader import Batch, Loader

# Worker processes pay a start (an interpreter, jaxtl.data, the pickled source: about half a second)
# and a copy of each batch; threads pay the GIL, which serialises the Python between PIL's calls: a
# fifth of the 1.3 ms that RandomResizedCrop + flip of a generated JPEG takes in one thread, so the
# GIL is near saturation from 4 threads on. bench/data_loader.py times both kinds.
PROCESS_WORKERS_FROM = 4


class CannotUseProcesses(DataError):
    """Process workers cannot run this loader (its source or transform does not pickle, no room in /dev/shm)."""


def _load_row(source, transform, seed: int, epoch: int, index: int, skip_bad_files: bool, shape):
    """``(array, label)`` of one example, or ``(None, (description, message))`` for a skipped bad file."""
    try:
        image, label = source.load(index)
    except DataError as error:
        if not skip_bad_files:
            raise
        return None, (source.describe(index), str(error))
    # A transform that draws nothing (``is_random`` False: the eval transforms) gets no generator to make.
    rng = np.random.default_rng([seed, epoch, index]) if getattr(transform, "is_random", True) else None
    array = transform(image, rng)
    if array.shape != shape:
        raise DataError(f"{source.describe(index)}: transform gave shape {array.shape}, expected {shape}")
    return array, label


def _chunk_size(loader: Loader) -> int:
    """Rows per task: two tasks per worker and batch, fewer round trips than one example per task."""
    return max(1, -(-loader.rows_per_batch // (2 * loader.num_workers)))


class ThreadWorkers:
    """Threads decode chunks of a batch's examples straight into their rows of a fresh batch."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.pool = ThreadPoolExecutor(loader.num_workers, thread_name_prefix="jaxtl-loader")
        self.chunk = _chunk_size(loader)

    def submit(self, epoch: int, indices: np.ndarray) -> tuple[Batch, list[Future]]:
        out = self.loader.empty_batch(indices)
        rows = [(row, int(index)) for row, index in enumerate(indices) if index >= 0]
        chunks = (rows[i : i + self.chunk] for i in range(0, len(rows), self.chunk))
        return out, [self.pool.submit(self._fill, out, chunk, epoch) for chunk in chunks]

    def _fill(self, out: Batch, rows: list[tuple[int, int]], epoch: int) -> None:
        loader = self.loader
        for row, index in rows:
            array, label = _load_row(
                loader.source, loader.transform, loader.seed, epoch, index, loader.skip_bad_files, out.images.shape[1:]
            )
            if array is None:
                out.mask[row] = False
                loader.record_skipped(*label)
                continue
            out.images[row] = array
            out.labels[row] = label

    def collect(self, ticket: tuple[Batch, list[Future]]) -> Batch:
        batch, futures = ticket
        for future in futures:
            future.result()
        return batch

    def close(self, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


# The state of a worker process, set once by _process_init.
_process_state: dict = {}


def _process_init(shared_name: str, slots_shape: tuple, work: bytes, seed: int, skip_bad_files: bool) -> None:
    memory = SharedMemory(shared_name)
    source, transform = pickle.loads(work)
    _process_state.update(
        memory=memory,
        slots=np.ndarray(slots_shape, np.uint8, memory.buf),
        source=source,
        transform=transform,
        seed=seed,
        skip_bad_files=skip_bad_files,
    )


def _process_fill(slot: int, epoch: int, rows: list[tuple[int, int]]) -> list[tuple[int, int | None, tuple | None]]:
    """Decodes ``(row, index)`` pairs into ``slot``; gives ``(row, label, None)`` or ``(row, None, skipped)``."""
    state = _process_state
    images = state["slots"][slot]
    results = []
    for row, index in rows:
        array, label = _load_row(
            state["source"], state["transform"], state["seed"], epoch, index, state["skip_bad_files"], images.shape[1:]
        )
        if array is None:
            results.append((row, None, label))
        else:
            images[row] = array
            results.append((row, label, None))
    return results


class ProcessWorkers:
    """Worker processes decode chunks of a batch into a slot of shared memory; the batch is copied out.

    ``prefetch + 1`` slots: a slot is reused only once its batch has been collected (or, for a batch
    left behind by an abandoned epoch, once its tasks are cancelled or finished).
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        try:
            # Pickled once here, for every worker (a large source's list of files is pickled once, not per worker).
            work = pickle.dumps((loader.source, loader.transform))
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise CannotUseProcesses(
                f"worker_type='process' needs a source and transform that pickle, and {loader.source!r} or "
                f"{loader.transform!r} does not ({error}); use worker_type='thread'"
            ) from None
        height, width = loader.transform.output_size
        self.slots_shape = (loader.prefetch + 1, loader.rows_per_batch, height, width, 3)
        needed = int(np.prod(self.slots_shape))
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            free = needed  # no /dev/shm: the platform's shared memory is not a size-limited tmpfs
        if free < needed:
            # Writing past what a tmpfs can hold kills the process with SIGBUS, not an error.
            raise CannotUseProcesses(
                f"/dev/shm has {free >> 20} MiB free and the loader's worker processes need {needed >> 20} MiB "
                f"({self.slots_shape[0]} batches of {loader.rows_per_batch}); give the container more (docker run "
                "--shm-size=1g), lower the batch size, or use data.worker_type: thread"
            )
        self.memory = SharedMemory(create=True, size=needed)
        self.slots = np.ndarray(self.slots_shape, np.uint8, self.memory.buf)
        self.slot_futures: list[list[Future]] = [[] for _ in range(self.slots_shape[0])]
        self.next_slot = 0
        self.chunk = _chunk_size(loader)
        self.pool = ProcessPoolExecutor(
            loader.num_workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_process_init,
            initargs=(self.memory.name, self.slots_shape, work, loader.seed, loader.skip_bad_files),
        )
        # Also run at exit or when the loader is collected unclosed: /dev/shm keeps what is not unlinked.
        self._finalizer = weakref.finalize(self, ProcessWorkers._release, self.pool, self.memory)

    def submit(self, epoch: int, indices: np.ndarray) -> tuple[Batch, int, list[Future]]:
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.slots_shape[0]
        for future in self.slot_futures[slot]:  # left by an abandoned epoch
            if not future.cancel():
                future.exception()
        rows = [(row, int(index)) for row, index in enumerate(indices) if index >= 0]
        try:
            futures = [
                self.pool.submit(_process_fill, slot, epoch, rows[i : i + self.chunk])
                for i in range(0, len(rows), self.chunk)
            ]
        except (BrokenProcessPool, BrokenPipeError) as error:
            raise self._broken() from error
        self.slot_futures[slot] = futures
        return self.loader.empty_batch(indices), slot, futures

    def collect(self, ticket: tuple[Batch, int, list[Future]]) -> Batch:
        batch, slot, futures = ticket
        for future in futures:
            try:
                results = future.result()
            except BrokenProcessPool as error:
                raise self._broken() from error
            for row, label, skipped in results:
                if skipped is None:
                    batch.labels[row] = label
                else:
                    batch.mask[row] = False
                    self.loader.record_skipped(*skipped)
        self.slot_futures[slot] = []
        np.copyto(batch.images, self.slots[slot], where=batch.mask[:, None, None, None])
        return batch

    def _broken(self) -> DataError:
        return DataError(
            f"a loader worker process for {self.loader.source!r} stopped: killed (out of memory?), or it could "
            'not start because the script that runs the loader has no `if __name__ == "__main__":` guard '
            "(the traceback above says which); lower data.num_workers, add the guard, or use threads "
            "(data.worker_type: thread; Loader(worker_type='thread'))"
        )

    def close(self, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.slots = None  # the last view of the shared memory, which cannot close while one exists
        self._finalizer()

    @staticmethod
    def _release(pool: ProcessPoolExecutor, memory: SharedMemory) -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(BufferError, FileNotFoundError):
            memory.close()
            memory.unlink()
