"""Checkpoint key layouts: what published checkpoints other than torchvision's call their keys, mapped onto
torchvision's.

Medical, satellite and scientific images are often better served by self-supervised ResNet-50 weights than by
ImageNet classifiers, and those are published as their training code saved them: MoCo's whole model under
``module.encoder_q.`` (with a momentum encoder, a queue and a projection head beside it), SwAV's with its
prototypes, DINO's, Barlow Twins' and VICReg's as a bare torchvision backbone. timm's ResNets have torchvision's
keys, its EfficientNets names of their own (``conv_stem``, ``blocks.S.B.conv_dw``). Each layout here says which
keys hold the backbone, which keys are dropped and why, and the eval preprocessing the weights were evaluated
with. The mapping renames keys only: values are never touched, so every check of ``from_torchvision`` (every key
consumed, every shape right) applies to the result. A checkpoint without a classifier head gets a fresh one
when it is loaded (its spec says ``num_classes=0``).

torchvision's own DenseNet files still use the key names of its old modules (``denselayer1.norm.1.weight``),
which torchvision's loader renames with a regular expression (``torchvision.models.densenet._load_state_dict``);
:func:`rename_legacy_densenet_keys` does the same, so those files read as torchvision reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flax import nnx

from jaxtl.errors import WeightsError
from jaxtl.models.names import dotted_name
from jaxtl.models.registry import abstract_model, reset_head
from jaxtl.models.state_dict import load_state_dict, state_dict
from jaxtl.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# DataParallel and DistributedDataParallel save their module's keys under this prefix.
WRAPPER_PREFIX = "module."
# torchvision.models.densenet._load_state_dict's pattern, verbatim: the old _DenseLayer's 'norm.1', 'conv.2', ...
LEGACY_DENSENET_PATTERN = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# The linear evaluation protocol of MoCo, SwAV, Barlow Twins and VICReg: torchvision's Resize(256), CenterCrop(224).
SELF_SUPERVISED_PREPROCESSING = Preprocessing(resize_size=256, crop_size=224, interpolation="bilinear")
# DINO's eval_linear.py resizes with interpolation=3, PIL's bicubic.
DINO_PREPROCESSING = Preprocessing(resize_size=256, crop_size=224, interpolation="bicubic")
# timm's defaults (timm.data.constants) for a model whose pretrained_cfg is not known.
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_CONFIG_FILE = "config.json"
FRESH_HEAD = "jaxtl gives the model a fresh head"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Keys starting with ``prefix``: kept with ``prefix`` stripped (``reason`` None), or dropped for ``reason``."""

    prefix: str
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """One published layout of checkpoint keys.

    Attributes:
        name: what ``--layout`` calls it.
        title: what its weights are, for messages and the spec's name.
        marks: key prefixes (after a DataParallel ``module.``) that only this layout has: detection looks for them.
        rules: the first rule whose prefix a key starts with decides it; a key no rule matches is kept as it is,
            so that strict loading reports it if the model has no such key.
        preprocessing: the eval preprocessing its weights were evaluated with; None: decided per file (timm's
            config.json) or by the architecture's torchvision DEFAULT weights.
        evaluated_by: whose evaluation ``preprocessing`` is, for the report.
    """

    name: str
    title: str
    marks: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    preprocessing: Preprocessing | None = None
    evaluated_by: str = ""


_LINEAR_EVALUATION = "the linear evaluation of MoCo, SwAV, Barlow Twins and VICReg (DINO's is bicubic: --layout dino)"
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("torchvision", "torchvision state_dict"),
        Layout("backbone", "a torchvision backbone without a head, as DINO, Barlow Twins and VICReg publish theirs",
               preprocessing=SELF_SUPERVISED_PREPROCESSING, evaluated_by=_LINEAR_EVALUATION),
        Layout("dino", "DINO", preprocessing=DINO_PREPROCESSING, evaluated_by="DINO's eval_linear.py"),
        Layout("barlow_twins", "Barlow Twins", preprocessing=SELF_SUPERVISED_PREPROCESSING,
               evaluated_by="Barlow Twins' evaluate.py"),
        Layout("vicreg", "VICReg", preprocessing=SELF_SUPERVISED_PREPROCESSING, evaluated_by="VICReg's evaluate.py"),
        Layout(
            "moco_v2",
            "MoCo v1/v2",
            marks=("encoder_q.",),
            rules=(
                Rule("encoder_q.fc.", f"MoCo's projection head; {FRESH_HEAD}"),
                Rule("encoder_q."),
                Rule("encoder_k.", "MoCo's momentum encoder"),
                Rule("queue", "MoCo's queue of negative keys"),
            ),
            preprocessing=SELF_SUPERVISED_PREPROCESSING,
            evaluated_by="MoCo's main_lincls.py",
        ),
        Layout(
            "moco_v3",
            "MoCo v3",
            marks=("base_encoder.",),
            rules=(
                Rule("base_encoder.fc.", f"MoCo v3's projection MLP; {FRESH_HEAD}"),
                Rule("base_encoder."),
                Rule("momentum_encoder.", "MoCo v3's momentum encoder"),
                Rule("predictor.", "MoCo v3's prediction MLP"),
            ),
            preprocessing=SELF_SUPERVISED_PREPROCESSING,
            evaluated_by="MoCo v3's main_lincls.py",
        ),
        Layout(
            "swav",
            "SwAV",
            marks=("prototypes.", "projection_head."),
            rules=(
                Rule("projection_head.", f"SwAV's projection head; {FRESH_HEAD}"),
                Rule("prototypes.", "SwAV's prototypes (its cluster centres)"),
            ),
            preprocessing=SELF_SUPERVISED_PREPROCESSING,
            evaluated_by="SwAV's eval_linear.py",
        ),
        Layout("timm", "timm", marks=("conv_stem.",)),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Group:
    """Keys renamed or dropped together, for the report: ``module.encoder_k.* (322 keys, MoCo's momentum encoder)``."""

    pattern: str
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.pattern} ({self.count} key{'s' if self.count != 1 else ''}, {self.reason})"


@dataclasses.dataclass(frozen=True)
class MappedWeights:
    """A checkpoint's state in torchvision's keys, and what was done to get there.

    Attributes:
        layout: the layout read.
        detected: whether it was recognised from the keys (False: named by the caller).
        state: the tensors under torchvision's keys, the head's included when the checkpoint has one.
        renamed: groups of keys renamed (a wrapper prefix, legacy or timm names).
        dropped: groups of keys dropped, each with its reason.
        has_head: whether ``state`` holds the architecture's classifier head.
        preprocessing: the eval preprocessing of the weights, or None for the architecture's torchvision default.
        name: the weights' name for their spec (``moco_v2:<file stem>``, ``timm:resnet50.a1_in1k``).
        notes: anything else the user should know (where the preprocessing comes from).
    """

    layout: Layout
    detected: bool
    state: dict[str, torch.Tensor]
    renamed: tuple[Group, ...]
    dropped: tuple[Group, ...]
    has_head: bool
    preprocessing: Preprocessing | None
    name: str
    notes: tuple[str, ...] = ()

    def report(self) -> list[str]:
        """Lines saying which layout was read, which keys were renamed or dropped and why, and about the head."""
        how = "recognised from its keys" if self.detected else "as given"
        lines = [f"layout: {self.layout.name} ({self.layout.title}), {how}"]
        for verb, groups in (("renamed", self.renamed), ("dropped", self.dropped)):
            if groups:
                lines.append(f"{verb} {sum(g.count for g in groups)} keys: {', '.join(str(g) for g in groups)}")
        if not self.has_head:
            lines.append(f"no classifier head: {FRESH_HEAD} (create(..., num_classes=N))")
        return lines + list(self.notes)


def rename_legacy_densenet_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with torchvision's legacy DenseNet keys renamed as ``torchvision.models.densenet._load_state_dict``
    renames them (``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``), in the same order: a renamed key
    moves to the end, as torchvision's ``del`` and re-insert leave it."""
    renamed = dict(state)
    for key in list(renamed):
        match = LEGACY_DENSENET_PATTERN.match(key)
        if match:
            renamed[match.group(1) + match.group(2)] = renamed.pop(key)
    return renamed


def model_keys(arch: str) -> tuple[list[str], str]:
    """The state_dict keys of ``arch`` (parameters and BatchNorm statistics) and the prefix of its head."""
    model = abstract_model(arch)
    variables = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return [dotted_name(path) for path, _ in variables], f"{model.head_name}."


def read_timm_config(path: Path) -> dict | None:
    """The Hugging Face hub's config.json beside a timm weight file (``architecture``, ``pretrained_cfg``), or None."""
    config_file = Path(path).parent / TIMM_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    is_timm = isinstance(config, dict) and "architecture" in config and isinstance(config.get("pretrained_cfg"), dict)
    return config if is_timm else None


def check_layout_name(layout: str | None, path: str | Path) -> None:
    """Raises WeightsError, listing the known layouts, unless ``layout`` is None or one of them."""
    if layout is not None and layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r} for {path}; known layouts: {', '.join(LAYOUTS)}")


def map_layout(
    state: Mapping[str, torch.Tensor], arch: str, *, path: str | Path, layout: str | None = None
) -> MappedWeights:
    """``state``, read from ``path``, in torchvision's keys for ``arch``.

    Args:
        state: the checkpoint's tensors (unwrapped from ``"state_dict"``/``"model"`` already).
        arch: the registry name, e.g. ``"resnet50"``.
        path: the file, named in messages; a timm file's config.json is looked for beside it.
        layout: a name of :data:`LAYOUTS`; None recognises the layout from the keys.

    Raises:
        WeightsError: an unknown layout name, or keys that fit no known layout (naming the file and the layouts,
            and suggesting ``--layout``).
    """
    path = Path(path)
    check_layout_name(layout, path)
    renamed: list[Group] = []
    wrapper = WRAPPER_PREFIX if state and all(k.startswith(WRAPPER_PREFIX) for k in state) else ""
    if wrapper:
        renamed.append(Group(f"{wrapper}*", len(state), "DataParallel's prefix, removed"))
        state = {k[len(wrapper) :]: v for k, v in state.items()}
    legacy = rename_legacy_densenet_keys(state)
    count = sum(1 for k in state if k not in legacy)
    if count:
        renamed.append(Group("*.denselayerN.norm.1.*", count, "torchvision's legacy DenseNet names, renamed as "
                             "torchvision's loader does"))  # fmt: skip
    state = legacy
    config = read_timm_config(path)
    chosen = LAYOUTS[layout] if layout is not None else _detect(state, arch, path, config)
    kept, dropped = _apply_rules(state, chosen, wrapper)
    notes: list[str] = []
    preprocessing = chosen.preprocessing
    name = path.name.split(".")[0]
    if chosen.name == "timm":
        kept, count = _timm_keys(kept, arch, config)
        if count:
            renamed.append(Group("conv_stem, blocks.S.B.*, conv_head, ...", count, "timm's EfficientNet names, "
                                 "renamed to torchvision's"))  # fmt: skip
        preprocessing, note = timm_preprocessing(arch, config)
        notes.append(note)
        if config is not None:
            tag = config.get("pretrained_cfg", {}).get("tag")
            name = config["architecture"] + (f".{tag}" if tag else "")
    if chosen.preprocessing is not None:
        notes.append(f"preprocessing: resize {preprocessing.resize_size}, crop {preprocessing.crop_size}, "
                     f"{preprocessing.interpolation}, ImageNet mean and std, as {chosen.evaluated_by}")  # fmt: skip
    if chosen.name != "torchvision":
        name = f"{chosen.name}:{name}"
    _, head = model_keys(arch)
    has_head = any(k.startswith(head) for k in kept)
    return MappedWeights(
        chosen, layout is None, kept, tuple(renamed), tuple(dropped), has_head, preprocessing, name, tuple(notes)
    )


def _detect(state: Mapping[str, torch.Tensor], arch: str, path: Path, config: dict | None) -> Layout:
    for layout in LAYOUTS.values():
        if layout.marks and any(k.startswith(layout.marks) for k in state):
            return layout
    if config is not None:
        return LAYOUTS["timm"]
    keys, head = model_keys(arch)
    if any(k.startswith(head) for k in state):
        return LAYOUTS["torchvision"]
    if len(set(state) & set(keys)) * 2 >= len(state):
        return LAYOUTS["backbone"]
    raise WeightsError(
        f"cannot tell the key layout of {path} ({len(state)} keys, first {list(state)[:3]}) for {arch}: it is none "
        f"of the layouts jaxtl knows ({', '.join(LAYOUTS)}). If you know which it is, name it with --layout NAME "
        "(layout= in Python)"
    )


def _apply_rules(state: Mapping[str, torch.Tensor], layout: Layout, wrapper: str) -> tuple[dict, list[Group]]:
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[Rule, int] = {}
    for key, value in state.items():
        rule = next((r for r in layout.rules if key.startswith(r.prefix)), None)
        if rule is None:
            kept[key] = value
        elif rule.reason is None:
            kept[key[len(rule.prefix) :]] = value
        else:
            dropped[rule] = dropped.get(rule, 0) + 1
    return kept, [Group(f"{wrapper}{rule.prefix}*", count, rule.reason) for rule, count in dropped.items()]


# timm's EfficientNet blocks -> the index of torchvision's MBConv.block: DepthwiseSeparableConv (expand ratio 1:
# dw, SE, project) and InvertedResidual (expand, dw, SE, project).
_TIMM_DS_BLOCK = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2",
                  "conv_pw": "2.0", "bn2": "2.1"}  # fmt: skip
_TIMM_IR_BLOCK = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "se.conv_reduce": "2.fc1",
                  "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}  # fmt: skip
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)\.([^.]+)$")
_TIMM_SAME_KEYS = ("resnet", "resnext", "wide_resnet")


def _timm_keys(state: dict[str, torch.Tensor], arch: str, config: dict | None) -> tuple[dict, int]:
    """timm's keys as torchvision's: the same for ResNets, renamed for EfficientNet-B0..B7; the number renamed."""
    timm_arch = (config or {}).get("architecture", arch)
    if timm_arch.startswith("tf_"):
        raise WeightsError(
            f"{timm_arch} is a port of TensorFlow weights, computed with TensorFlow's 'same' padding and BatchNorm "
            f"eps 1e-3; torchvision's {arch} pads symmetrically, so these weights would compute something else"
        )
    if arch.startswith(_TIMM_SAME_KEYS):
        return state, 0
    if not re.fullmatch(r"efficientnet_b\d", arch):
        raise WeightsError(
            f"the timm layout is known for ResNets (timm's keys are torchvision's) and EfficientNet-B0..B7, not {arch}"
        )
    blocks = [_TIMM_BLOCK_KEY.match(k) for k in state]
    last = 1 + max((int(m.group(1)) for m in blocks if m), default=0)
    inverted = {(m.group(1), m.group(2)) for m in blocks if m and m.group(3) == "conv_pwl"}
    top = {"conv_stem.": "features.0.0.", "bn1.": "features.0.1.", "conv_head.": f"features.{last + 1}.0.",
           "bn2.": f"features.{last + 1}.1.", "classifier.": "classifier.1."}  # fmt: skip
    mapped, count = {}, 0
    for key, value in state.items():
        new = key
        match = _TIMM_BLOCK_KEY.match(key)
        if match:
            stage, block, module, param = match.groups()
            table = _TIMM_IR_BLOCK if (stage, block) in inverted else _TIMM_DS_BLOCK
            if module in table:
                new = f"features.{int(stage) + 1}.{block}.block.{table[module]}.{param}"
        else:
            prefix = next((p for p in top if key.startswith(p)), None)
            if prefix is not None:
                new = top[prefix] + key[len(prefix) :]
        count += new != key
        mapped[new] = value
    return mapped, count


def timm_preprocessing(arch: str, config: dict | None) -> tuple[Preprocessing, str]:
    """The eval preprocessing of timm weights, as timm's ``transforms_imagenet_eval`` does it, and where it came from.

    From the ``pretrained_cfg`` of the config.json beside the file when there is one, else from timm's registered
    default for ``arch`` (timm installed), else from timm's generic defaults. timm resizes the shorter side to
    ``floor(crop / crop_pct)`` and center-crops ``crop``: jaxtl's resize and crop.
    """
    from jaxtl.data.transforms import PIL_INTERPOLATION

    if config is not None:
        cfg, source = config["pretrained_cfg"], f"timm's pretrained_cfg in the {TIMM_CONFIG_FILE} beside the file"
    else:
        cfg, source = _timm_default_cfg(arch)
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    resize = math.floor(crop / (cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT))
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in PIL_INTERPOLATION:
        source += f"; its interpolation {interpolation!r} is not one jaxtl knows, bicubic is used"
        interpolation = "bicubic"
    if cfg.get("crop_mode", "center") != "center":
        source += f"; its crop_mode {cfg['crop_mode']!r} is read as jaxtl's resize and center crop"
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    preprocessing = Preprocessing(resize_size=resize, crop_size=crop, interpolation=interpolation, mean=mean, std=std)
    return preprocessing, f"preprocessing from {source}: {preprocessing}"


def _timm_default_cfg(arch: str) -> tuple[dict, str]:
    try:
        import timm.models
    except ImportError:
        return {}, "timm's generic defaults (timm is not installed to say its defaults for this model)"
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # timm's registry raises various errors for names it does not know
        cfg = None
    if cfg is None:
        return {}, f"timm's generic defaults (timm has no pretrained_cfg for {arch})"
    return dataclasses.asdict(cfg), f"timm's default pretrained_cfg for {arch} ({cfg.architecture}.{cfg.tag})"


def backbone_state(state: Mapping[str, torch.Tensor], arch: str, *, source: str) -> dict[str, np.ndarray]:
    """The jaxtl-layout arrays of a headless torchvision ``state``: every backbone key checked strictly, no head.

    Raises:
        WeightsMismatchError: ``state`` misses a backbone key of ``arch``, has one it does not have, or a shape differs.
    """
    from convert.torchvision_state import torch_to_jaxtl_layout

    model = abstract_model(arch)
    head = f"{model.head_name}."
    load_state_dict(model, torch_to_jaxtl_layout(model, state), source=source, ignore_prefixes=(head,))
    reset_head(model)  # values for the head's shapes, so that state_dict reads the model; the head is not kept
    return {k: v for k, v in state_dict(model).items() if not k.startswith(head)}
