"""One way to classify with whatever a user holds: a training checkpoint or an exported artifact.

:func:`open_artifact` recognises a StableHLO directory, an ONNX file or a torchvision state_dict (with its JSON
sidecar); :func:`load_classifier` gives anything ``jaxtl predict`` and ``jaxtl demo`` take an object with
``classes``, ``multilabel``, ``threshold`` and ``probabilities(image)``, computed as the checkpoint computes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxtl.artifacts.info import ArtifactError, ArtifactInfo
from jaxtl.artifacts.stablehlo import StableHLOArtifact, is_stablehlo_artifact
from jaxtl.data import EvalTransform
from jaxtl.train.task import DEFAULT_THRESHOLD, probabilities

ONNX_MAGIC = b"\x08"  # an ONNX ModelProto starts with field 1 (ir_version), a varint


class Artifact(Protocol):
    info: ArtifactInfo

    def logits(self, images: np.ndarray) -> np.ndarray: ...


def open_artifact(path: str | os.PathLike) -> Artifact:
    """The exported artifact at ``path``, ready to compute logits.

    Raises:
        ArtifactError: naming ``path``, when it is missing or none of the formats, or when its format's reader
            refuses it (corrupt, foreign, for another platform).
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if path.is_dir():
        if is_stablehlo_artifact(path) or (path / "jaxtl.json").is_file():
            return StableHLOArtifact.open(path)
        raise ArtifactError(
            f"{path} is a directory but neither a StableHLO artifact (model.stablehlo and jaxtl.json) nor a "
            "training checkpoint (meta.json)"
        )
    if path.suffix.lower() in (".pth", ".pt"):
        from convert.artifacts import TorchvisionArtifact

        return TorchvisionArtifact.open(path)
    if path.suffix.lower() == ".onnx" or _starts_with(path, ONNX_MAGIC):
        from jaxtl.artifacts.onnx_runtime import OnnxArtifact

        return OnnxArtifact.open(path)
    raise ArtifactError(
        f"{path} is not an artifact jaxtl reads: a StableHLO directory, an .onnx file or a torchvision .pth with "
        "its .json beside it (write one with `jaxtl export CHECKPOINT --format ... --out PATH`)"
    )


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(magic)) == magic
    except OSError as error:
        raise ArtifactError(f"{path} cannot be read ({error.strerror or error})") from None


class ArtifactClassifier:
    """An artifact's class probabilities for images, with the preprocessing and class names it carries."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.info = artifact.info
        self.transform = EvalTransform(self.info.preprocessing)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def multilabel(self) -> bool:
        return self.info.task == "multilabel"

    @property
    def threshold(self) -> float:
        return float(self.info.threshold if self.info.threshold is not None else DEFAULT_THRESHOLD)

    def logits(self, image: Any) -> np.ndarray:
        """(num_classes,) float32 logits for one PIL image."""
        return self.artifact.logits(self.transform(image)[None])[0]

    def probabilities(self, image: Any) -> np.ndarray:
        """(num_classes,) float32: a softmax, or per-class sigmoids (multi-label)."""
        return np.asarray(probabilities(self.logits(image), self.multilabel))


def load_classifier(path: str | os.PathLike):
    """A :class:`jaxtl.train.Predictor` for a training checkpoint, an :class:`ArtifactClassifier` for an artifact."""
    if (Path(path) / "meta.json").is_file():
        from jaxtl.train import Predictor

        return Predictor.from_checkpoint(path)
    return ArtifactClassifier(open_artifact(path))
