"""Checkpoints: ``latest`` (for resume) and ``best`` (by validation metric), written atomically.

A checkpoint is a directory: ``arrays/`` (orbax: the model's parameters and BatchNorm statistics
by torchvision name, and the optimizer state's leaves) and ``meta.json`` (step, phase, epoch,
loader position, metrics, the resolved config, class names and class_to_idx, weights source and
preprocessing). It is written under a temporary name and renamed into place; the previous one is
removed only after the new one is complete, so an interruption leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtl.errors import JaxtlError

FORMAT = "jaxtl-checkpoint-1"


class CheckpointError(JaxtlError):
    """A checkpoint that is missing, incomplete or inconsistent."""


def save_checkpoint(directory: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Writes ``arrays`` (a nested dict of arrays) and ``meta`` (JSON) to ``directory`` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging.absolute() / "arrays", jax.device_get(arrays))
        (staging / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1) + "\n", encoding="utf-8")
        previous = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        if directory.exists():
            os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a jaxtl checkpoint (no meta.json)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_arrays(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            arrays = checkpointer.restore(directory.absolute() / "arrays")
    except Exception as error:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{directory}/arrays cannot be restored: {type(error).__name__}: {error}") from None
    return jax.tree.map(np.asarray, arrays)
