"""What every exported artifact carries: class names, the eval preprocessing and the contract of its input.

An artifact (StableHLO, ONNX or a torchvision state_dict) computes a model's logits for images that have been
resized and center-cropped as :attr:`ArtifactInfo.preprocessing` says, given as uint8 RGB (N, H, W, 3) arrays.
The normalisation (``(x / 255 - mean) / std``) is inside the StableHLO and ONNX graphs, so that a caller
passes the pixels it decoded and cropped, and nothing that could be normalised twice or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxtl.errors import JaxtlError
from jaxtl.weights import Preprocessing

FORMATS = ("stablehlo", "onnx", "torchvision")
# Bumped when an artifact's metadata changes meaning; readers refuse newer versions.
VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ArtifactError(JaxtlError):
    """An artifact that cannot be read: missing, corrupt, foreign or of a newer version."""


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    """An artifact's metadata, written beside (torchvision) or inside (StableHLO, ONNX) the model.

    Attributes:
        format: one of :data:`FORMATS`.
        arch: the registry name of the architecture (``"resnet50"``).
        classes: class names in label order; ``class_to_idx`` maps them back.
        preprocessing: resize, center crop and interpolation to apply before the artifact; its mean and std
            are applied inside the graph (StableHLO, ONNX) and listed for a torchvision state_dict's users.
        task: ``"multiclass"`` (softmax) or ``"multilabel"`` (a sigmoid per class, ``threshold``).
        threshold: the probability from which a multi-label model predicts a class; None for multiclass.
        precision: ``"float32"`` or ``"bfloat16"``, the dtype the graph computes in (the logits are float32).
        weights: where the weights came from (``source``, ``name``), for the record.
    """

    format: str
    arch: str
    classes: tuple[str, ...]
    class_to_idx: Mapping[str, int]
    preprocessing: Preprocessing
    task: Literal["multiclass", "multilabel"] = "multiclass"
    threshold: float | None = None
    precision: Literal["float32", "bfloat16"] = "float32"
    weights: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """The height and width of the images the artifact takes."""
        return self.preprocessing.crop_size

    def replace(self, **changes: Any) -> ArtifactInfo:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        p = self.preprocessing
        return {
            "jaxtl_artifact": VERSION,
            "format": self.format,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "class_to_idx": dict(self.class_to_idx),
            "task": self.task,
            "threshold": self.threshold,
            "precision": self.precision,
            "preprocessing": dataclasses.asdict(p),
            "input": {
                "name": INPUT_NAME,
                "dtype": "uint8",
                "shape": ["batch", p.crop_size, p.crop_size, 3],
                "layout": "NHWC, RGB, resized and center-cropped as preprocessing says",
                "normalization": "inside the graph: (x / 255 - mean) / std"
                if self.format != "torchvision"
                else "by the caller: (x / 255 - mean) / std, then NCHW",
            },
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", self.num_classes]},
            "weights": dict(self.weights),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Any, source: str) -> ArtifactInfo:
        """Reads :meth:`to_json`'s dict; ``source`` names the file in errors."""
        if not isinstance(data, dict) or "jaxtl_artifact" not in data:
            raise ArtifactError(f"{source} carries no jaxtl artifact metadata; export one with `jaxtl export`")
        if not isinstance(data["jaxtl_artifact"], int) or data["jaxtl_artifact"] > VERSION:
            raise ArtifactError(
                f"{source} is a jaxtl artifact of version {data['jaxtl_artifact']!r}, newer than this jaxtl reads "
                f"({VERSION}); upgrade jaxtl"
            )
        try:
            p = data["preprocessing"]
            preprocessing = Preprocessing(
                resize_size=int(p["resize_size"]), crop_size=int(p["crop_size"]), interpolation=p["interpolation"],
                mean=tuple(map(float, p["mean"])), std=tuple(map(float, p["std"])),
                antialias=bool(p.get("antialias", True)),
            )  # fmt: skip
            info = cls(
                format=data["format"], arch=data["arch"], classes=tuple(data["classes"]),
                class_to_idx=dict(data["class_to_idx"]), preprocessing=preprocessing, task=data["task"],
                threshold=data["threshold"], precision=data["precision"], weights=dict(data.get("weights", {})),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{source}: its jaxtl metadata is damaged ({type(error).__name__}: {error})") from None
        if info.format not in FORMATS:
            raise ArtifactError(f"{source}: unknown artifact format {info.format!r} (known: {', '.join(FORMATS)})")
        return info

    @classmethod
    def loads(cls, text: str | bytes, source: str) -> ArtifactInfo:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{source}: its jaxtl metadata is not JSON ({error})") from None
        return cls.from_json(data, source)


def check_images(images: Any, info: ArtifactInfo, source: str) -> np.ndarray:
    """``images`` as the C-contiguous uint8 (N, H, W, 3) array an artifact takes; ``ValueError`` naming the artifact
    (``source``) otherwise."""
    images = np.asarray(images)
    size = info.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{source} takes uint8 images (N, {size}, {size}, 3), resized and center-cropped as its preprocessing "
            f"says; got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


def first_lines(error: BaseException, count: int = 1) -> str:
    """The first ``count`` lines of an error's message, joined: a reader's error quoted in one line of ours."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return " ".join(line.strip() for line in lines[:count]) + (" ..." if len(lines) > count else "")


def model_and_info(path: str | Path):
    """The model of a training checkpoint or of converted weights, in eval mode, and its :class:`ArtifactInfo`
    (format left empty: the exporter sets it).

    A training checkpoint gives its run's class names, task and threshold; converted weights give their
    categories (``class_0``... where the weights have none).
    """
    from jaxtl import models, weights

    path = Path(path)
    if not path.exists():
        raise ArtifactError(
            f"{path} does not exist; export a training checkpoint (RUN_DIR/checkpoints/best) or converted weights "
            "(from `jaxtl convert`)"
        )
    if (path / "meta.json").is_file():
        from jaxtl.train import load_checkpoint
        from jaxtl.train.task import DEFAULT_THRESHOLD

        model, meta = load_checkpoint(path)
        multilabel = meta.config.get("task") == "multilabel"
        info = ArtifactInfo(
            format="", arch=meta.arch, classes=tuple(meta.classes), class_to_idx=dict(meta.class_to_idx),
            preprocessing=meta.preprocessing, task="multilabel" if multilabel else "multiclass",
            threshold=float(meta.metrics.get("val_threshold", DEFAULT_THRESHOLD)) if multilabel else None,
            weights=dict(meta.weights),
        )  # fmt: skip
        return model, info
    if not weights.is_converted_weights(path):
        raise ArtifactError(
            f"{path} is neither a training checkpoint (RUN_DIR/checkpoints/best, with meta.json) nor converted "
            "weights (from `jaxtl convert`)"
        )
    spec = weights.fill_default_preprocessing(weights.load_weight_spec(path))
    if spec.preprocessing is None:
        raise ArtifactError(
            f"{path}: its weights state no preprocessing and {spec.arch} has no default weights to take it from; "
            "fine-tune them with `jaxtl train` (a checkpoint records its preprocessing) and export the checkpoint"
        )
    model = models.create(spec.arch, weights=path)
    model.eval()
    classes = tuple(spec.categories) if spec.categories else tuple(f"class_{i}" for i in range(spec.num_classes))
    info = ArtifactInfo(
        format="", arch=spec.arch, classes=classes, class_to_idx={name: i for i, name in enumerate(classes)},
        preprocessing=spec.preprocessing, weights={"source": spec.source, "name": spec.name},
    )  # fmt: skip
    return model, info
