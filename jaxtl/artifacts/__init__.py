"""Exported models: StableHLO and ONNX graphs and torchvision state_dicts, with what they need to be used.

:func:`model_and_info` reads a checkpoint for export; each format's module writes its artifact.
"""

from jaxtl.artifacts.info import FORMATS, ArtifactError, ArtifactInfo, model_and_info

__all__ = ["FORMATS", "ArtifactError", "ArtifactInfo", "model_and_info"]
