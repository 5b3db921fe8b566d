"""Data parallelism across processes: one jaxtl process per host (or per GPU), joined by jax.distributed.

Every process runs the same program on the same config. The mesh's ``data`` axis spans the devices of
all processes (:func:`jaxtl.data.data_sharding`); each process decodes only the rows of each global
batch that its own devices hold (:func:`local_rows`) and contributes them with :func:`put`. Parameters
and optimizer state are replicated, so every process holds them whole; the first process alone
writes the run directory (config, metrics, TensorBoard events, figures, checkpoints), which must be
on a filesystem every process sees for ``--resume``. With one process all of this reduces to the
single-process path.

Start each process with the coordinator's address and its index::

    jaxtl train CONFIG --coordinator HOST:PORT --num-processes N --process-id I

or with ``--distributed`` alone where JAX detects the cluster (Slurm, Open MPI, Cloud TPU).
"""

from __future__ import annotations

import numpy as np

from jaxtl.errors import JaxtlError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Joins this process to the others (``jax.distributed.initialize``), before any JAX computation.

    CPU processes exchange their collectives over gloo (a GPU's go through NCCL by themselves).
    """
    import jax

    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise JaxtlError(
            "--coordinator, --num-processes and --process-id go together (or give --distributed alone, where JAX "
            "detects the cluster: Slurm, Open MPI, Cloud TPU)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise JaxtlError(
            f"--process-id {process_id} is outside 0..{num_processes - 1} (--num-processes {num_processes})"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except (ValueError, RuntimeError) as error:
        raise JaxtlError(
            f"cannot join the distributed run ({type(error).__name__}: {error}); check --coordinator HOST:PORT (the "
            "first process's host, a free port) and that every process was started"
        ) from None


def is_primary() -> bool:
    """Whether this process writes the run directory (the first process)."""
    import jax

    return jax.process_index() == 0


def local_rows(sharding, batch_size: int) -> slice:
    """The rows of a ``(batch_size, ...)`` batch that this process's devices hold under ``sharding``."""
    spans = sorted(
        (
            index[0].indices(batch_size)[:2]
            for index in sharding.addressable_devices_indices_map((batch_size,)).values()
        ),
    )
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in set(spans)) != stop - start:
        raise JaxtlError(f"this process's devices hold rows {spans} of the batch, not one contiguous range")
    return slice(start, stop)


def put(local: np.ndarray, sharding, batch_size: int):
    """The global ``(batch_size, ...)`` array of which ``local`` holds this process's rows (:func:`local_rows`)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))


def whole(local: np.ndarray, sharding, batch_size: int) -> np.ndarray:
    """The whole batch of which ``local`` holds this process's rows: ``local`` itself with one process."""
    import jax

    if jax.process_count() == 1:
        return local
    return gather(put(local, sharding, batch_size))


def gather(array) -> np.ndarray:
    """A (possibly sharded across processes) array, whole, on this host."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def total(value: float) -> float:
    """The sum of ``value`` over all processes."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.asarray(value, np.float32))))
