"""The torch side of jaxtl: torchvision weights and modules into jaxtl models and back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from convert.torchvision_state import from_torchvision, infer_arch, to_torchvision
from convert.weight_files import download_weights, load_state_dict_file, sha256_of
from jaxtl import weights as jaxtl_weights
from jaxtl.errors import WeightsError
from jaxtl.models.state_dict import state_dict

__all__ = ["convert_weights", "from_torchvision", "infer_arch", "load_state_dict_file", "to_torchvision"]


def _spec_for_file(arch: str, path: Path, sha256: str, num_classes: int) -> jaxtl_weights.WeightSpec:
    known = jaxtl_weights.find_spec_by_file_name(path.name)
    if known is not None and known.arch == arch:
        return dataclasses.replace(known, source=str(path.absolute()), sha256=sha256)
    return jaxtl_weights.WeightSpec(
        arch=arch,
        name=path.stem,
        source=str(path.absolute()),
        sha256=sha256,
        num_classes=num_classes,
        sha256_prefix=jaxtl_weights.sha256_prefix_of(path.name),
    )


def _cached_file_conversion(arch: str, path: Path, sha256: str) -> Path:
    """Where the conversion of the state_dict file ``path`` with this ``sha256`` is cached."""
    return jaxtl_weights.cache_dir() / "weights" / arch / f"{path.stem}-{sha256[:12]}"


def convert_weights(
    arch: str,
    weights: str | os.PathLike | jaxtl_weights.ResolvedWeights,
    *,
    out: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Converts torchvision weights for ``arch`` into a jaxtl converted-weights directory.

    Args:
        arch: the registry name, e.g. ``"resnet50"``.
        weights: a torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``; downloaded through
            torchvision's URL into torch.hub's cache if needed) or a path to a .pth state_dict, as
            :func:`jaxtl.weights.resolve_weights` tells them apart (or what it returned).
        out: the directory to write. Defaults to jaxtl's cache for named weights, and to
            ``<cache>/weights/<arch>/<file stem>-<sha256[:12]>`` for files; a file whose conversion
            is there already (the same sha256) is not converted again.
        timeout_s: give up a download whose network does not answer after this many seconds.

    Returns:
        The directory, which ``jaxtl.models.create(arch, weights=...)`` then reads without torch.
        Nothing is written when any check fails.
    """
    resolved = weights
    if not isinstance(resolved, jaxtl_weights.ResolvedWeights) or resolved.arch != arch:
        resolved = jaxtl_weights.resolve_weights(arch, getattr(weights, "given", weights))
    if resolved.kind == "converted":
        raise WeightsError(
            f"{resolved.path} holds converted weights already (from {resolved.spec.source}); pass it as the weights "
            "as it is, or convert the weight name or .pth file it came from"
        )
    if resolved.kind == "file":
        path, named_spec = resolved.path, None
        if out is None:
            sha256 = sha256_of(path)
            cached = _cached_file_conversion(arch, path, sha256)
            if jaxtl_weights.is_converted_weights(cached) and jaxtl_weights.load_weight_spec(cached).sha256 == sha256:
                return cached
    else:
        named_spec = resolved.spec
        path = download_weights(named_spec) if timeout_s is None else download_weights(named_spec, timeout_s=timeout_s)
    state, sha256 = load_state_dict_file(path)
    model = from_torchvision(state, arch, source=str(path))
    num_classes = model.num_classes
    if named_spec is not None:
        spec = dataclasses.replace(named_spec, sha256=sha256)
        default_out = resolved.path
    else:
        spec = _spec_for_file(arch, path, sha256, num_classes)
        default_out = _cached_file_conversion(arch, path, sha256)
    if spec.num_classes != num_classes:
        raise WeightsError(
            f"{path} has a {num_classes}-way head, but {arch} {spec.name} should have {spec.num_classes}"
        )
    return jaxtl_weights.save_converted_weights(out or default_out, state_dict(model), spec)
