"""Shared test set-up: every test gets its own jaxtl and torch caches, never the user's.

XLA's persistent compilation cache is shared by the whole session, both workers included: the CLI
runs of tests/e2e compile the same programs, and a cached executable is the same program.

Under pytest-xdist each worker runs on its own share of the CPUs (`-n 2` on 2 cores: one core each),
as do the processes it starts: two workers whose XLA and torch thread pools each span every core
only contend for them.

On CPU the suite compiles with XLA's cheap backend options (see _xla_flags): its programs
run a few steps on a few pixels, and compiling them at full optimisation was most of its time.
"""

import contextlib
import ctypes
import fcntl
import gc
import importlib.metadata
import os
import sys
import time

import pytest

from jaxtl.xla import add_xla_flags


def _pin_xdist_worker() -> None:
    """Restricts this xdist worker (and its children) to its own slice of the CPUs, before torch or
    jax start their thread pools (both size them from the affinity mask)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker is None or count < 2 or len(cpus) < count:
        return
    share = len(cpus) // count
    index = int(worker.removeprefix("gw")) % count
    mine = cpus[index * share : (index + 1) * share]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


_pin_xdist_worker()

# XLA:CPU options that cut a compile by 35-65% and slow the compiled program 2-3x: the suite's
# programs are compiled once and run a few steps at a few pixels each. (convert.parity compiles its
# float64 reference with the same options, for the same reason.) Optimisation passes rewrite how a
# program computes, never what: every test still compares against PyTorch or an uninterrupted run
# at its own tolerance. The quickstart end-to-end test runs with the caller's XLA_FLAGS, compiled as
# users' runs are (the `production_xla_env` fixture).
CHEAP_CPU_COMPILE = {
    "xla_backend_optimization_level": "0",
    "xla_llvm_disable_expensive_passes": "true",
    "xla_cpu_use_fusion_emitters": "false",
}
CALLERS_XLA_FLAGS = os.environ.get("XLA_FLAGS")


def _xla_flags() -> None:
    """Adds CHEAP_CPU_COMPILE to XLA_FLAGS for this process and those it starts, before jax starts its
    backend; not where a GPU plugin is installed (GPU compiles are fast, and the optimisation level is
    shared), nor with JAXTL_TEST_XLA=default. The caller's own flags win."""
    if os.environ.get("JAXTL_TEST_XLA") == "default":
        return
    names = (d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions())
    if any(name.startswith(("jax-cuda", "jax-rocm")) for name in names):
        return
    add_xla_flags(CHEAP_CPU_COMPILE)


_xla_flags()


@pytest.fixture
def production_xla_env() -> dict[str, str]:
    """os.environ with the caller's XLA_FLAGS: a jaxtl command started with it compiles as users' runs do."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if CALLERS_XLA_FLAGS is not None:
        env["XLA_FLAGS"] = CALLERS_XLA_FLAGS
    return env


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache for the session: under pytest-xdist, the directory next to the
    workers' own temporary directories, so a program that one worker compiled the other reads.
    Bounded, which makes jax lock the cache for each read and write (the jaxtl CLI bounds it too)."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-compilation-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def persistent_compilation_cache(compilation_cache):
    """The module's own compiles go through the cache its CLI runs use, for modules whose tests
    compile the same programs (training parity's recipes share phases and eval steps). Not for
    every module: keying and writing an entry costs ~1 s per large program, and most programs of
    the suite are compiled once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    previous = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache))
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)
    cache.reset_cache()  # takes the directory even if something compiled before
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_compilation_cache_max_size", previous[1])
    cache.reset_cache()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch, compilation_cache):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "jaxtl-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path


# --- memory: two workers share the machine's 24 GB ----------------------------------------------------------------
# glibc keeps the heap a large model's tensors were freed from (a worker grew to 9 GB running small tests after the
# largest parity tests); malloc_trim gives those pages back. The largest tests take a lock, so that two of them
# never run at once.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_TRIM_ABOVE = 3 << 30  # a worker between tests holds 1-3 GB; trimming (and refaulting) at every test cost minutes


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _return_freed_memory():
    yield
    if _LIBC is not None and _resident_bytes() > _TRIM_ABOVE:
        _LIBC.malloc_trim(0)


def _shared_tmp(tmp_path_factory):
    """The session's temporary directory that every xdist worker sees (each worker's own is inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


_WAITS = "memory-heavy-waits.log"
_WAITS_KEY = pytest.StashKey[list]()


@pytest.fixture
def memory_heavy(tmp_path_factory, request):
    """For a test that peaks at several GB: waits until no other worker runs one (a lock in the session's shared
    temporary directory), and runs with the memory other tests left behind returned to the system. The time each
    test waited is summed at the end of the session (the lock keeps a worker idle meanwhile)."""
    shared = _shared_tmp(tmp_path_factory)
    with open(shared / "memory-heavy.lock", "w") as lock, contextlib.ExitStack() as stack:
        start = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        with open(shared / _WAITS, "a") as waits:
            waits.write(f"{time.monotonic() - start:.2f} {request.node.nodeid}\n")
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        yield


@pytest.fixture(scope="session")
def exported_checkpoint(tmp_path_factory):
    """tests/exported.py's fine-tuned checkpoint, trained once for the whole session: the first worker to need it
    trains it (under a lock in the shared temporary directory), the others read it. Tests must not change it."""
    from exported import train_checkpoint

    shared = _shared_tmp(tmp_path_factory)
    best = shared / "exported-checkpoint" / "run" / "checkpoints" / "best"
    with open(shared / "exported-checkpoint.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (best / "meta.json").is_file():
                train_checkpoint(best.parents[1])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return best


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """Reads the memory_heavy lock's waits before the temporary directory is removed (tmp_path_retention_policy)."""
    config = session.config
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller reads the shared log
        return
    log = _shared_tmp(config._tmp_path_factory) / _WAITS
    lines = log.read_text().splitlines() if log.is_file() else []
    config.stash[_WAITS_KEY] = [float(line.split(" ", 1)[0]) for line in lines]


def pytest_terminal_summary(terminalreporter, config):
    """How long the memory_heavy lock kept tests waiting (a worker is idle meanwhile)."""
    waits = config.stash.get(_WAITS_KEY, [])
    if waits:
        terminalreporter.write_line(
            f"memory_heavy: {len(waits)} tests took the lock, {sum(w > 0.5 for w in waits)} waited for it: "
            f"{sum(waits):.0f} s in all, the longest {max(waits):.0f} s"
        )
