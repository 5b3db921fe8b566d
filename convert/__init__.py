"""The torch side of jaxtl: torchvision weights and modules into jaxtl models and back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flax import nnx

import jaxtl.models
from convert.torchvision_state import from_torchvision, infer_arch, to_torchvision
from convert.weight_files import download_weights, load_state_dict_file
from jaxtl import weights as jaxtl_weights
from jaxtl.errors import WeightsError
from jaxtl.models.state_dict import state_dict

__all__ = ["convert_weights", "create_model", "from_torchvision", "infer_arch", "load_state_dict_file", "to_torchvision"]


def _spec_for_file(arch: str, path: Path, sha256: str, num_classes: int) -> jaxtl_weights.WeightSpec:
    known = jaxtl_weights.find_spec_by_file_name(path.name)
    if known is not None and known.arch == arch:
        return dataclasses.replace(known, source=str(path.absolute()), sha256=sha256)
    return jaxtl_weights.WeightSpec(
        arch=arch, name=path.stem, source=str(path.absolute()), sha256=sha256, num_classes=num_classes,
        sha256_prefix=jaxtl_weights.sha256_prefix_of(path.name),
    )


def convert_weights(
    arch: str, weights: str | os.PathLike, *, out: str | os.PathLike | None = None, timeout_s: float | None = None
) -> Path:
    """Converts torchvision weights for ``arch`` into a jaxtl converted-weights directory.

    Args:
        arch: the registry name, e.g. ``"resnet50"``.
        weights: a torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``; downloaded through
            torchvision's URL into torch.hub's cache if needed) or a path to a .pth state_dict.
        out: the directory to write. Defaults to jaxtl's cache for named weights, and to
            ``<cache>/weights/<arch>/<file stem>-<sha256[:12]>`` for files.
        timeout_s: give up a download whose network does not answer after this many seconds.

    Returns:
        The directory, which ``jaxtl.models.create(arch, weights=...)`` then reads without torch.
        Nothing is written when any check fails.
    """
    jaxtl.models.registry.get_builder(arch)  # an unknown arch fails before any download.
    source = jaxtl_weights.weights_source(arch, weights)
    if isinstance(source, Path):
        path, named_spec = source, None
    else:
        named_spec = source
        path = download_weights(named_spec) if timeout_s is None else download_weights(named_spec, timeout_s=timeout_s)
    state, sha256 = load_state_dict_file(path)
    model = from_torchvision(state, arch, source=str(path))
    num_classes = model.num_classes
    if named_spec is not None:
        spec = dataclasses.replace(named_spec, sha256=sha256)
        default_out = jaxtl_weights.converted_weights_path(arch, named_spec.name)
    else:
        spec = _spec_for_file(arch, path, sha256, num_classes)
        default_out = jaxtl_weights.cache_dir() / "weights" / arch / f"{path.stem}-{sha256[:12]}"
    if spec.num_classes != num_classes:
        raise WeightsError(f"{path} has a {num_classes}-way head, but {arch} {spec.name} should have {spec.num_classes}")
    return jaxtl_weights.save_converted_weights(out or default_out, state_dict(model), spec)


def create_model(
    arch: str, *, num_classes: int | None = None, weights: str | os.PathLike | None = None, seed: int = 0
) -> nnx.Module:
    """``jaxtl.models.create`` that also accepts .pth files and named weights not converted yet.

    Converts (and caches) what is needed first, then builds the model from the converted weights.
    """
    if weights is not None:
        try:
            weights = jaxtl.models.registry.resolve_weights(arch, weights)
        except WeightsError:
            weights = convert_weights(arch, weights)
    return jaxtl.models.create(arch, num_classes=num_classes, weights=weights, seed=seed)
