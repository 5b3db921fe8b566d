"""The torch side of jaxtl: torchvision weights and modules into jaxtl models and back."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from convert.layouts import MappedWeights, backbone_state, check_layout_name, map_layout
from convert.torchvision_state import from_torchvision, infer_arch, to_torchvision
from convert.weight_files import download_weights, load_state_dict_file, sha256_of
from jaxtl import weights as jaxtl_weights
from jaxtl.errors import WeightsError
from jaxtl.models.state_dict import state_dict

__all__ = ["convert_weights", "from_torchvision", "infer_arch", "load_state_dict_file", "to_torchvision"]


def _spec_for_file(
    arch: str, path: Path, sha256: str, num_classes: int, mapped: MappedWeights | None = None
) -> jaxtl_weights.WeightSpec:
    known = jaxtl_weights.find_spec_by_file_name(path.name)
    torchvision_layout = mapped is None or mapped.layout.name == "torchvision"
    if known is not None and known.arch == arch and torchvision_layout:
        return dataclasses.replace(known, source=str(path.absolute()), sha256=sha256)
    return jaxtl_weights.WeightSpec(
        arch=arch,
        name=path.stem if torchvision_layout else mapped.name,
        source=str(path.absolute()),
        sha256=sha256,
        num_classes=num_classes,
        sha256_prefix=jaxtl_weights.sha256_prefix_of(path.name),
        preprocessing=None if mapped is None else mapped.preprocessing,
    )


def _cached_file_conversion(arch: str, path: Path, sha256: str, layout: str | None = None) -> Path:
    """Where the conversion of the state_dict file ``path`` with this ``sha256`` (read as ``layout``) is cached."""
    named = f"-{layout}" if layout else ""
    return jaxtl_weights.cache_dir() / "weights" / arch / f"{path.stem}{named}-{sha256[:12]}"


def convert_weights(
    arch: str,
    weights: str | os.PathLike | jaxtl_weights.ResolvedWeights,
    *,
    out: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    layout: str | None = None,
    log: Callable[[str], None] | None = None,
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
        layout: the key layout of a file (``convert.layouts.LAYOUTS``: ``"moco_v2"``, ``"swav"``, ``"timm"``, ...);
            None recognises it from the keys. Weights without a classifier head (self-supervised backbones) are
            written with ``num_classes=0`` in their spec: loading them gives the model a fresh head.
        log: receives the lines saying which layout was read and which keys were renamed or dropped, and why.

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
            cached = _cached_file_conversion(arch, path, sha256, layout)
            if jaxtl_weights.is_converted_weights(cached) and jaxtl_weights.load_weight_spec(cached).sha256 == sha256:
                if log is not None:
                    log(f"{path} was converted before (the same sha256): {cached}")
                return cached
    else:
        if layout not in (None, "torchvision"):
            raise WeightsError(f"{resolved.given!r} names torchvision weights, whose layout is not {layout}")
        named_spec, layout = resolved.spec, "torchvision"
        path = download_weights(named_spec) if timeout_s is None else download_weights(named_spec, timeout_s=timeout_s)
    check_layout_name(layout, path)  # before reading a large file
    state, sha256 = load_state_dict_file(path)
    mapped = map_layout(state, arch, path=path, layout=layout)
    if mapped.has_head:
        model = from_torchvision(mapped.state, arch, source=str(path))
        num_classes, arrays = model.num_classes, state_dict(model)
    else:  # a self-supervised backbone: loading it gives the model a fresh head
        num_classes, arrays = 0, backbone_state(mapped.state, arch, source=str(path))
    if named_spec is not None:
        spec = dataclasses.replace(named_spec, sha256=sha256)
        default_out = resolved.path
    else:
        spec = _spec_for_file(arch, path, sha256, num_classes, mapped)
        default_out = _cached_file_conversion(arch, path, sha256, layout)
    if spec.num_classes != num_classes:
        raise WeightsError(
            f"{path} has a {num_classes}-way head, but {arch} {spec.name} should have {spec.num_classes}"
        )
    written = jaxtl_weights.save_converted_weights(out or default_out, arrays, spec)
    if log is not None:
        for line in mapped.report():
            log(line)
    return written
