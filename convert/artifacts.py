"""The torch side of ``jaxtl export``: torchvision state_dicts and ONNX graphs of jaxtl models, and the runtime of
the torchvision artifacts (:class:`TorchvisionArtifact`).

Both formats go through torchvision: the model's state as a torchvision state_dict (:func:`to_torchvision`)
loaded with ``strict=True`` into torchvision's own module. The ONNX graph is that module, behind a uint8 NHWC
input that it normalises as jaxtl does, exported by torch's ONNX exporter (``dynamo=True``, which needs
onnxscript). Measured against jaxtl's eval step on ResNet-18, EfficientNet-B0 and MobileNetV3-L, it differs by
float32 rounding (a few 1e-6 of the largest logit), as torch's own eager forward does; jax2onnx took neither a
dynamic batch nor ResNet's max pooling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torchvision

from convert.torchvision_state import to_torchvision
from jaxtl.artifacts.info import INPUT_NAME, OUTPUT_NAME, ArtifactError, ArtifactInfo, check_images, first_lines
from jaxtl.data.transforms import normalize
from jaxtl.errors import JaxtlError
from jaxtl.models.registry import model_options

__all__ = ["TorchvisionArtifact", "export_onnx", "export_torchvision", "torchvision_module"]

# protobuf's limit on one file is 2 GiB; above this many bytes of weights an ONNX model keeps them in PATH.data.
_EXTERNAL_DATA_BYTES = 1_800_000_000


@contextlib.contextmanager
def _without_random_init() -> Iterator[None]:
    """``torch.nn.init``'s functions leave their tensor as it is, for a module whose every parameter is loaded next.

    torchvision's builders fill each parameter with random values (1-2 s for a ConvNeXt-L or ViT-L on one core)
    through ``torch.nn.init``, and every module's ``reset_parameters`` does through the same functions. The
    functions are replaced in the module itself: a torch module built in another thread meanwhile is not
    initialised either.
    """
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def torchvision_module(arch: str, state: Mapping[str, torch.Tensor], num_classes: int) -> torch.nn.Module:
    """torchvision's ``arch`` holding ``state``'s tensors (loaded with ``strict=True``), float32, in eval mode.

    The builder's options beyond ``num_classes`` (a ViT's ``image_size``) are those ``state``'s shapes imply.
    The module is built without torchvision's random init, which the strict load replaces whole, and takes the
    tensors themselves (``assign=True``): change them and the module changes.
    Raises ``ValueError`` (unknown architecture) or ``RuntimeError`` (keys or shapes that do not fit).
    """
    with _without_random_init():
        module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **model_options(arch, state))
    module.load_state_dict(state, strict=True, assign=True)
    return module.float().eval()


class _UInt8Classifier(torch.nn.Module):
    """uint8 (N, H, W, 3) -> ``module``'s logits, normalised in torchvision's order: ``(x / 255 - mean) / std``."""

    def __init__(self, module: torch.nn.Module, mean, std):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 1, 1, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return self.module(x.permute(0, 3, 1, 2)).to(torch.float32)


def _module_of(model, info: ArtifactInfo) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    state = to_torchvision(model)
    return state, torchvision_module(info.arch, state, info.num_classes)


def export_torchvision(model, info: ArtifactInfo, path: str | Path) -> ArtifactInfo:
    """Writes ``model``'s torchvision state_dict to ``path`` (``torch.save``; it loads into
    ``torchvision.models.get_model(arch, num_classes=...)`` with ``strict=True``) and ``info`` as JSON beside it
    (``path.with_suffix(".json")``). Both files are written whole or not at all. Returns the info written.
    """
    path = Path(path)
    info = info.replace(format="torchvision", precision="float32")
    state, _ = _module_of(model, info)  # loads strictly into torchvision's module: what a user will do
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".json")
    with _staging(path) as staged:
        torch.save(state, staged / path.name)
        (staged / sidecar.name).write_text(info.dumps(), encoding="utf-8")
        os.replace(staged / path.name, path)
        os.replace(staged / sidecar.name, sidecar)
    return info


def export_onnx(model, info: ArtifactInfo, path: str | Path, *, opset: int | None = None) -> ArtifactInfo:
    """Writes ``model`` as an ONNX graph to ``path``: input ``"images"`` uint8 (batch, H, W, 3) with H = W =
    ``info.image_size``, the normalisation inside, output ``"logits"`` float32 (batch, num_classes); ``info``
    (format ``"onnx"``) as JSON in its ``metadata_props["jaxtl"]``.

    One self-contained file, unless the weights pass protobuf's 2 GiB: then they go to ``PATH.data`` beside it.
    Written whole or not at all; checked with ``onnx.checker``. ``opset``: torch's default where None.
    Returns the info written.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's dynamo exporter writes the graph with it
    except ImportError as error:
        raise JaxtlError(f"exporting to ONNX needs {error.name}: pip install 'jaxtl[onnx]'") from None

    path = Path(path)
    info = info.replace(format="onnx", precision="float32")
    state, module = _module_of(model, info)
    built_for = model_options(info.arch, state).get("image_size")
    if built_for is not None and built_for != info.image_size:  # a ViT: torchvision's takes one size only
        raise JaxtlError(
            f"torchvision's {info.arch} with these weights takes {built_for}x{built_for} images only, and this "
            f"model's preprocessing crops {info.image_size}x{info.image_size}: it cannot be exported to ONNX"
        )
    external = sum(tensor.nbytes for tensor in state.values()) > _EXTERNAL_DATA_BYTES
    classifier = _UInt8Classifier(module, info.preprocessing.mean, info.preprocessing.std).eval()
    size = info.image_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)  # batch 2: torch.export specialises 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staging(path) as staged:
        with torch.no_grad():
            program = torch.onnx.export(
                classifier, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=opset,
                verbose=False,
            )  # fmt: skip
        program.model.metadata_props["jaxtl"] = info.dumps()
        program.model.doc_string = f"jaxtl {info.arch}: logits of {info.num_classes} classes for uint8 NHWC crops"
        program.save(staged / path.name, external_data=external)
        onnx.checker.check_model(str(staged / path.name))
        data = staged / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(staged / path.name, path)
    return info


class _staging:
    """A temporary directory beside ``path`` (same file system: ``os.replace`` is atomic), removed on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self.directory

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class TorchvisionArtifact:
    """A torchvision state_dict written by :func:`export_torchvision`, with its JSON sidecar, as a classifier of
    uint8 crops: :meth:`logits` normalises them as torchvision's transforms do and runs torchvision's module."""

    def __init__(self, module: torch.nn.Module, info: ArtifactInfo, path: Path):
        self.module, self.info, self.path = module, info, path

    @classmethod
    def open(cls, path: str | Path) -> TorchvisionArtifact:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist (a torchvision artifact is the .pth `jaxtl export` writes)")
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ArtifactError(
                f"{path} has no metadata beside it ({sidecar.name} is missing): `jaxtl export --format torchvision` "
                "writes both; export the checkpoint again or copy the .json along with the .pth"
            )
        info = ArtifactInfo.loads(sidecar.read_bytes(), str(sidecar))
        if info.format != "torchvision":
            raise ArtifactError(f"{sidecar} describes a {info.format!r} artifact, not {path.name}'s torchvision one")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - pickle, zip and torch errors alike: not a readable file
            raise ArtifactError(
                f"{path} is not a readable torch file ({type(error).__name__}: {first_lines(error)}); "
                "export the checkpoint again"
            ) from None
        if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise ArtifactError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
        try:
            module = torchvision_module(info.arch, state, info.num_classes)
        except (RuntimeError, ValueError, KeyError) as error:
            raise ArtifactError(
                f"{path} does not fit torchvision's {info.arch} with {info.num_classes} classes "
                f"({type(error).__name__}: {first_lines(error, 4)})"
            ) from None
        return cls(module, info, path)

    def logits(self, images) -> np.ndarray:
        """float32 (N, num_classes) logits of uint8 (N, H, W, 3) crops."""
        images = check_images(images, self.info, str(self.path))
        p = self.info.preprocessing
        x = np.ascontiguousarray(normalize(images, p.mean, p.std).transpose(0, 3, 1, 2))
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy().astype(np.float32, copy=False)
