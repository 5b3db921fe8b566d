"""XLA flags the ``jaxtl`` commands run with, and the helper that adds flags to ``XLA_FLAGS``.

XLA reads ``XLA_FLAGS`` once, when jax starts its first backend: set them before the first
computation. Neither torch nor jax is imported here.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
from collections.abc import Mapping, MutableMapping

# XLA:CPU hands each dot it emits to YNNPACK instead of its own kernels. Measured on 2 cores
# (bench/cpu_steps.py, ResNet-18 at 224, 2026-11-29): eval 29.5 -> 44.2 img/s, full fine-tuning step
# 6.8 -> 9.8, last block + head 22.4 -> 27.5; EfficientNet-B0 eval 50 -> 67. The results move by
# float32 rounding only (relative 2e-7 on ResNet-18's features), and every parity test passes with it.
# Compiles are faster too. GPU compiles ignore xla_cpu_* flags. XLA aborts on a flag it does not
# know, and this one is experimental: it is added only for the jaxlib releases it was tested with.
CPU_FLAGS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
CPU_FLAGS_JAXLIB = ((0, 10),)  # (major, minor) releases of jaxlib


def add_xla_flags(flags: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends ``--name=value`` to ``environ["XLA_FLAGS"]`` for each of ``flags`` it does not name yet.

    A flag already in ``XLA_FLAGS`` keeps its value, so a user's own setting wins (an empty value,
    ``--xla_cpu_experimental_ynn_fusion_type=``, turns YNNPACK off). Returns the flags added.
    """
    current = shlex.split(environ.get("XLA_FLAGS", ""))
    named = {flag.lstrip("-").split("=", 1)[0] for flag in current}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in named]
    if added:
        environ["XLA_FLAGS"] = shlex.join(current + added)
    return added


def use_cpu_flags(environ: MutableMapping[str, str] = os.environ, *, jaxlib_version: str | None = None) -> list[str]:
    """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS`` where jaxlib is a release they were tested with (the
    installed one unless ``jaxlib_version`` says otherwise), as the ``jaxtl`` commands do. Call it
    before jax's first computation. Returns the flags added."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return []
    release = re.match(r"(\d+)\.(\d+)", jaxlib_version)
    if release is None or (int(release[1]), int(release[2])) not in CPU_FLAGS_JAXLIB:
        return []
    return add_xla_flags(CPU_FLAGS, environ)
