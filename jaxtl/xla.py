"""XLA flags: adding them to ``XLA_FLAGS``, and the opt-in YNNPACK dots for XLA:CPU.

XLA reads ``XLA_FLAGS`` once, when jax starts its first backend: set flags before the first
computation. Neither torch nor jax is imported here.

YNNPACK: ``--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`` makes XLA:CPU
hand each dot it emits to YNNPACK instead of its own kernels. Measured on 2 cores
(bench/cpu_steps.py --xla ynnpack, 2026-11-29, ResNet-18 at 224): eval 29.5 -> 44.2 img/s, full
fine-tuning step 6.8 -> 9.8, last block + head 22.4 -> 27.5; EfficientNet-B0 eval 50 -> 67. For a
whole process it is not on by default: it is experimental in XLA; float64 programs run ~7x slower under it; and its
float32 results differ from XLA's own kernels by rounding (relative 2e-7 on ResNet-18's features),
which in two places of the parity suite lands just beyond a bound set on XLA's kernels (ResNet-152's
train-mode logits at 1.02e-5 against 1e-5 relative; one near-zero squeeze-excitation bias of
EfficientNet-B0 in the progressive recipe). Turn it on with :func:`use_ynnpack` (or the flag itself
in ``XLA_FLAGS``) before jax computes.

Per program: :func:`program_options` gives the options that compile one jitted program with YNNPACK's dots
(``jax.jit(fn, compiler_options=...)``), so a run can use it where it gains and the parity bounds hold. A
run's ``train.ynnpack`` setting chooses: ``eval`` (the default) for the eval-mode programs (the feature
pass of a head-only phase, validation, prediction: ResNet-18's eval +65%, the forward parity bounds hold),
``all`` for the train steps too, ``off`` for none. Only on the CPU and a jaxlib the flag was tested with; in
bf16 runs the eval-mode programs follow the train steps'.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
from collections.abc import Mapping, MutableMapping
from typing import Literal

YNNPACK: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# XLA aborts on a flag it does not know: the (major, minor) jaxlib releases the flag was tested with.
YNNPACK_JAXLIB = ((0, 10),)


def add_xla_flags(flags: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends ``--name=value`` to ``environ["XLA_FLAGS"]`` for each of ``flags`` it does not name yet.

    A flag already in ``XLA_FLAGS`` keeps its value: the user's own setting wins. Returns the flags added.
    """
    current = shlex.split(environ.get("XLA_FLAGS", ""))
    named = {flag.lstrip("-").split("=", 1)[0] for flag in current}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in named]
    if added:
        environ["XLA_FLAGS"] = shlex.join(current + added)
    return added


def ynnpack_supported(jaxlib_version: str | None = None) -> bool:
    """Whether the installed jaxlib (or ``jaxlib_version``) is a release the YNNPACK flag was tested with."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return False
    release = re.match(r"(\d+)\.(\d+)", jaxlib_version)
    return release is not None and (int(release[1]), int(release[2])) in YNNPACK_JAXLIB


def use_ynnpack(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Adds :data:`YNNPACK` to ``XLA_FLAGS`` (see the module's docstring) where jaxlib supports it; call
    it before jax's first computation. Returns the flags added: none on another jaxlib, or where
    ``XLA_FLAGS`` sets the flag already."""
    return add_xla_flags(YNNPACK, environ) if ynnpack_supported() else []


YnnpackSetting = Literal["eval", "all", "off"]
YNNPACK_SETTINGS: tuple[str, ...] = ("eval", "all", "off")


def program_options(
    setting: str, program: Literal["eval", "train"], precision: str = "fp32", backend: str | None = None
) -> dict[str, str]:
    """XLA compiler options for one jitted ``program`` ("eval": eval-mode forward passes; "train": train steps)
    under a run's ``train.ynnpack`` ``setting``: :data:`YNNPACK` where the setting covers the program, the
    backend (default: jax's) is the CPU and jaxlib supports the flag; no options otherwise.

    In a bf16 run (``precision``) the eval-mode programs are compiled as the train steps are: a head trained
    on cached features must see what the train step's forward pass computes, and YNNPACK's bf16 dots round
    otherwise than XLA's (a head-only run's losses moved by 7e-4)."""
    if setting not in YNNPACK_SETTINGS:
        raise ValueError(f"ynnpack={setting!r} is not one of {', '.join(YNNPACK_SETTINGS)}")
    if program == "eval" and precision != "fp32":
        program = "train"
    if setting == "off" or (setting == "eval" and program != "eval") or not ynnpack_supported():
        return {}
    if backend is None:
        import jax

        backend = jax.default_backend()
    return dict(YNNPACK) if backend == "cpu" else {}
