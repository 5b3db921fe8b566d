"""StableHLO artifacts: a model's inference function serialized with ``jax.export``, which runs with jax alone.

The artifact is a directory::

    model.stablehlo   jax.export's serialization: images uint8 (batch, H, W, 3) -> logits float32 (batch, C),
                      the batch dimension symbolic, the weights constants inside, lowered for CPU and CUDA
    jaxtl.json        the metadata (:class:`jaxtl.artifacts.ArtifactInfo`): classes, preprocessing, task

and is used without jaxtl or flax::

    import json, pathlib, jax
    root = pathlib.Path("model-stablehlo")
    exported = jax.export.deserialize(bytearray((root / "model.stablehlo").read_bytes()))
    info = json.loads((root / "jaxtl.json").read_text())
    logits = exported.call(images)  # uint8 (N, crop, crop, 3), resized and cropped as info["preprocessing"] says
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl.artifacts.info import ArtifactError, ArtifactInfo, check_images
from jaxtl.train.evaluate import eval_model_state
from jaxtl.train.step import eval_logits

MODEL_FILE, INFO_FILE = "model.stablehlo", "jaxtl.json"
PLATFORMS = ("cpu", "cuda")
PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def inference_function(model: nnx.Module, info: ArtifactInfo, precision: str = "float32"):
    """``images -> logits``: uint8 (N, H, W, 3) crops to float32 (N, C), what the checkpoint's eval step computes
    (:func:`jaxtl.train.step.eval_logits`: the normalisation inside, eval mode), with the weights closed over (they
    become constants of an exported program).

    With ``precision="bfloat16"`` the parameters and the normalised images are cast to bf16 for the forward pass, as
    a bf16 training run's eval step does (BatchNorm's running statistics stay float32); the logits are float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    graphdef, state = eval_model_state(model)
    p = info.preprocessing

    def logits(images: jax.Array) -> jax.Array:
        return eval_logits(graphdef, state, images, mean=p.mean, std=p.std, compute_dtype=PRECISIONS[precision])

    return logits


def export_stablehlo(
    model: nnx.Module,
    info: ArtifactInfo,
    path: str | os.PathLike,
    *,
    precision: str = "float32",
    platforms: Sequence[str] = PLATFORMS,
) -> ArtifactInfo:
    """Writes ``model`` as a StableHLO artifact directory at ``path`` (replacing an earlier artifact there).

    Args:
        model: a jaxtl model (:func:`jaxtl.artifacts.model_and_info`).
        info: its metadata; the written copy says ``format="stablehlo"`` and ``precision``.
        path: the directory to write. It is written beside and renamed into place, so that an interrupted
            export leaves what was there before.
        precision: ``"float32"`` or ``"bfloat16"``.
        platforms: what the program is lowered for (jax.export's platform names); one artifact runs on each.

    Returns:
        The metadata written.
    """
    info = info.replace(format="stablehlo", precision=precision)
    function = inference_function(model, info, precision)
    (batch,) = jax.export.symbolic_shape("batch")
    size = info.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(function), platforms=tuple(platforms))(images)
    path = Path(path)
    if path.exists() and not (path / INFO_FILE).is_file():
        raise ArtifactError(f"{path} exists and is not a StableHLO artifact; choose another --out or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the artifact from others
        (staging / MODEL_FILE).write_bytes(exported.serialize())
        (staging / INFO_FILE).write_text(info.dumps(), encoding="utf-8")
        if path.exists():  # an earlier artifact: moved aside, then removed once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def is_stablehlo_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


class StableHLOArtifact:
    """A StableHLO artifact, loaded: :meth:`logits` of uint8 crops, :attr:`info` its metadata."""

    def __init__(self, exported: jax.export.Exported, info: ArtifactInfo, path: Path):
        self.exported, self.info, self.path = exported, info, path

    @classmethod
    def open(cls, path: str | os.PathLike) -> StableHLOArtifact:
        path = Path(path)
        model, meta = path / MODEL_FILE, path / INFO_FILE
        for required in (model, meta):
            if not required.is_file():
                raise ArtifactError(f"{path} is not a StableHLO artifact: {required.name} is missing")
        info = ArtifactInfo.loads(meta.read_bytes(), str(meta))
        try:
            exported = jax.export.deserialize(bytearray(model.read_bytes()))
        except Exception:  # flatbuffer and MLIR parsers raise many kinds of error on foreign bytes
            raise ArtifactError(
                f"{model} cannot be read as a jax.export serialization (damaged, or not one); export it again with "
                "`jaxtl export CHECKPOINT --format stablehlo`"
            ) from None
        platform = jax.default_backend()
        if platform not in exported.platforms and not (platform == "gpu" and "cuda" in exported.platforms):
            raise ArtifactError(
                f"{model} was lowered for {', '.join(exported.platforms)}, not for this machine's {platform}; "
                "export it again with that platform"
            )
        size = info.image_size
        if exported.in_avals[0].shape[1:] != (size, size, 3) or exported.in_avals[0].dtype != np.uint8:
            raise ArtifactError(
                f"{model} takes {exported.in_avals[0]}, not what {meta.name} says (uint8 crops of {size})"
            )
        return cls(exported, info, path)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) crops -> float32 (N, C) logits."""
        return np.asarray(self.exported.call(check_images(images, self.info, str(self.path))))
