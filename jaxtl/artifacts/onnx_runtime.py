"""ONNX artifacts (``jaxtl export --format onnx``) run with onnxruntime: no torch, no JAX.

The model takes uint8 (N, H, W, 3) crops as ``"images"`` and gives float32 ``"logits"``; its
``metadata_props["jaxtl"]`` holds the :class:`~jaxtl.artifacts.info.ArtifactInfo` JSON, which onnxruntime
reads back as the session's custom metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.artifacts.info import INPUT_NAME, OUTPUT_NAME, ArtifactError, ArtifactInfo, check_images, first_lines

METADATA_KEY = "jaxtl"


def _onnxruntime(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError(
            f"{path} is an ONNX artifact, and running it needs onnxruntime, which is not installed: "
            "pip install 'jaxtl[onnx]'"
        ) from None
    return onnxruntime


def default_providers(onnxruntime) -> list[str]:
    """CUDA first where this onnxruntime has it, then the CPU."""
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


class OnnxArtifact:
    """An ONNX model written by ``jaxtl export``, as a classifier of uint8 crops (:meth:`logits`)."""

    def __init__(self, session: Any, info: ArtifactInfo, path: Path):
        self.session, self.info, self.path = session, info, path

    @classmethod
    def open(cls, path: str | Path, *, providers: Sequence[str] | None = None) -> OnnxArtifact:
        """Reads ``path``; ``providers``: onnxruntime's execution providers (:func:`default_providers` if None).

        Raises :class:`ArtifactError` naming the file for a missing, unreadable or foreign model.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist (an ONNX artifact is the .onnx file `jaxtl export` writes)")
        ort = _onnxruntime(path)
        providers = list(providers) if providers is not None else default_providers(ort)
        try:
            session = _session(ort, path, providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types: a corrupt or foreign file
            raise ArtifactError(
                f"{path} is not an ONNX model onnxruntime can load ({first_lines(error)}); if it was exported by "
                "jaxtl, it is damaged or incomplete: export it again with `jaxtl export --format onnx`"
            ) from None
        metadata = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ArtifactError(
                f"{path} is an ONNX model without jaxtl's metadata (metadata_props[{METADATA_KEY!r}]): it was not "
                "exported by `jaxtl export`, and its classes and preprocessing are unknown; export a jaxtl "
                "checkpoint with `jaxtl export --format onnx`"
            )
        info = ArtifactInfo.loads(metadata[METADATA_KEY], str(path))
        if info.format != "onnx":
            raise ArtifactError(f"{path}: its jaxtl metadata says format {info.format!r}, not 'onnx'")
        inputs = [(i.name, i.type) for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [(INPUT_NAME, "tensor(uint8)")] or outputs != [OUTPUT_NAME]:
            raise ArtifactError(
                f"{path}: its graph takes {inputs} and gives {outputs}, not uint8 {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
            )
        return cls(session, info, path)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def logits(self, images) -> np.ndarray:
        """float32 (N, num_classes) logits of uint8 (N, H, W, 3) crops."""
        images = check_images(images, self.info, str(self.path))
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
        return np.asarray(logits, np.float32)


def _session(ort, path: Path, providers: list[str]):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a CUDA provider that cannot start says so once, below
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception:
        if providers == ["CPUExecutionProvider"] or "CPUExecutionProvider" not in providers:
            raise
        # A CUDA provider whose libraries do not load: the CPU still runs the model (and tells a bad file).
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
