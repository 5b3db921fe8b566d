"""Reading torchvision weight files safely: weights-only unpickling, sha256 checks, and downloads."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
from collections.abc import Mapping
from pathlib import Path

import torch

from jaxtl.errors import WeightsError
from jaxtl.weights import WeightSpec, sha256_prefix_of

# Checkpoints that wrap the state_dict under one well-known key, as the reference recipe's
# torch.save({"model": model.state_dict(), "classes": ...}) does.
_WRAPPER_KEYS = ("model", "state_dict")
SAFETENSORS_SUFFIX = ".safetensors"
DOWNLOAD_TIMEOUT_S = 30.0


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, expected_prefix: str | None) -> str:
    """Returns the file's sha256; raises WeightsError unless it starts with ``expected_prefix``.

    torchvision names its files ``<arch>-<first hex digits of the sha256>.pth`` (torch.hub's
    check_hash convention); that prefix is checked when present.
    """
    digest = sha256_of(path)
    if expected_prefix and not digest.startswith(expected_prefix.lower()):
        raise WeightsError(
            f"hash mismatch for {path}: its sha256 is {digest[:16]}..., but its name says it starts with "
            f"{expected_prefix}. The file is corrupt, truncated or not what its name says: delete it and download "
            "it again"
        )
    return digest


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Loads a torch weight file weights-only (no code runs) and checks its hash against its name.

    Accepts a plain state_dict or one wrapped under ``"model"`` / ``"state_dict"``, and safetensors files
    (``.safetensors``, as timm and the Hugging Face hub publish weights), which hold tensors only.

    Returns:
        The state_dict (CPU tensors) and the file's full sha256.

    Raises:
        WeightsError: missing file, hash mismatch, unreadable or non-torch file, a pickle that
            would run code, or content that is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    digest = check_hash(path, sha256_prefix_of(path.name))
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path), digest
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"refusing {path}: it is not a plain weights file (unpickling it would need code from the file: "
            f"{first_line}). Save only tensors, e.g. torch.save(model.state_dict(), path)"
        ) from None
    except Exception as error:  # garbage makes torch's readers raise anything (KeyError, RuntimeError, ...)
        raise WeightsError(
            f"cannot read {path} as a torch weights file ({type(error).__name__}: {str(error).strip()[:200]}); "
            "it may be truncated or not a torch file: download or save it again"
        ) from None
    return _unwrap_state_dict(content, path), digest


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        content = load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"cannot read {path} as a safetensors file ({type(error).__name__}: {str(error).strip()[:200]}); "
            "it may be truncated or not a safetensors file: download or save it again"
        ) from None
    return _unwrap_state_dict(content, path)


def _unwrap_state_dict(content: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(content, Mapping) and not all(isinstance(v, torch.Tensor) for v in content.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not content:
        raise WeightsError(f"{path} holds a {type(content).__name__}, not a state_dict (a mapping of names to tensors)")
    not_tensors = [k for k, v in content.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} is not a state_dict: entries {not_tensors[:5]} are not tensors")
    return dict(content)


def torch_hub_file(spec: WeightSpec) -> Path:
    """Where torch.hub (and so torchvision's weights API) caches the file of ``spec``: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.file_name


def download_weights(spec: WeightSpec, *, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The local file of ``spec``, downloaded into torch.hub's cache if it is not there yet.

    The URL is the one of torchvision's weight enum; torch.hub's downloader checks the hash prefix.
    A network that does not answer fails after ``timeout_s`` instead of hanging.
    """
    import torchvision

    enum_url = torchvision.models.get_model_weights(spec.arch)[spec.name].url
    if enum_url != spec.source:
        raise WeightsError(
            f"torchvision's URL for {spec.arch} {spec.name} is {enum_url}, jaxtl's spec says {spec.source}"
        )
    destination = torch_hub_file(spec)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(spec.source, str(destination), hash_prefix=spec.sha256_prefix, progress=True)
    except Exception as error:
        raise WeightsError(
            f"could not download {spec.arch} {spec.name} from {spec.source} ({type(error).__name__}: {error}). "
            f"Without a network, copy {spec.file_name} into {destination.parent} or pass the file with --weights PATH"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return destination
