"""The ``jaxtl`` command line: parses arguments and calls the library. The only jaxtl code that calls into
convert/ (lazily, for torch work) besides the weights resolver."""

from __future__ import annotations

import gc
import sys

from jaxtl.cli.parser import build_parser
from jaxtl.errors import JaxtlError

__all__ = ["build_parser", "main"]


def _enable_compilation_cache() -> None:
    """XLA's persistent compilation cache in jaxtl's cache: a second run of a config skips its compiles.

    jax's own variables take precedence: ``JAX_COMPILATION_CACHE_DIR`` (an empty value disables the
    cache), ``JAX_COMPILATION_CACHE_MAX_SIZE`` in bytes (default here 4 GiB) and
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (default here 0: every compile is kept; jax's 1 s
    would recompile a head-only step, 0.6 s, and the small conversions of weight loading on every run).
    A bounded cache is also a locked one, so that concurrent runs share it safely. They are set as
    environment variables, which jax reads when it is imported: a bad argument or config is reported
    before jax is loaded.
    """
    import importlib.util
    import os

    from jaxtl.weights import cache_dir

    defaults = {
        "jax_compilation_cache_dir": str(cache_dir() / "xla"),
        "jax_compilation_cache_max_size": 4 << 30,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
    }
    if importlib.util.find_spec("filelock") is None:  # a --no-deps install: jax can bound the cache only with it
        del defaults["jax_compilation_cache_max_size"]
    unset = {name: value for name, value in defaults.items() if name.upper() not in os.environ}
    os.environ.update({name.upper(): str(value) for name, value in unset.items()})  # read when jax is imported
    if "jax" in sys.modules:  # main() called in a process that has imported jax already
        import jax

        for name, value in unset.items():
            jax.config.update(name, value)


def run() -> None:
    """The ``jaxtl`` command's process: :func:`main`, then an exit that skips the collection of what is left.

    A run leaves millions of Python objects (jax, flax, matplotlib), and the interpreter's final garbage
    collection walks them all on the way out: 0.4-0.5 s of a 13 s ``jaxtl train``. After a command that
    succeeded every file is written and closed and no computation is in flight (its results were read);
    ``gc.freeze()`` then moves the objects out of the collector's sight, and they are freed by their reference
    counts (or with the process) as before. A command that failed may leave computations running on XLA's
    threads: it exits the usual way, whose collection gives them the time to end (measured: a faster exit
    there could tear the runtime down under them).
    """
    code = main()
    if code == 0:
        gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "predict", "lr-find", "suggest", "sweep"):
        _enable_compilation_cache()
    try:
        return args.run(args)
    except JaxtlError as error:
        print(f"jaxtl {args.command}: error: {error}", file=sys.stderr)
        return 2
