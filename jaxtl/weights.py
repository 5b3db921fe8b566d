"""Weight specs (source, hash, categories, preprocessing) and the cache of converted weights.

A ``WeightSpec`` is the metadata that travels with a set of weights, as torchvision's weight enums
carry it: where the file comes from, its hash prefix, the categories of its head and the eval
preprocessing it was trained with. The table of jaxtl/weight_table.py mirrors torchvision's enums and is checked
against them by tests/parity/test_weight_specs.py.

Converted weights are stored as a directory: ``state/`` (an orbax checkpoint of the arrays, jaxtl
layout) and ``spec.json``. Loading one needs neither torch nor a network.

A ``weights`` argument anywhere in jaxtl (``create``, ``load_pretrained``, ``convert``, the CLI) is
one of three kinds, told apart by :func:`resolve_weights` alone: a torchvision weight name, a torch
state_dict file, or a converted-weights directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxtl.errors import WeightsError
from jaxtl.weight_table import DEFAULT_EXCEPTIONS, TORCHVISION_WEIGHTS

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
STATE_DIR = "state"
TORCHVISION_URL = "https://download.pytorch.org/models/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing, as torchvision's ``ImageClassification`` transform does it.

    Resize the shorter side to ``resize_size`` (with ``interpolation`` and antialiasing), center
    crop ``crop_size``, scale to [0, 1], normalise with ``mean`` and ``std``.
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True


class Metrics(Mapping[str, float]):
    """Reported accuracies, ``{"acc@1": 80.858, "acc@5": 95.434}``: a read-only mapping that is hashable.

    A model carries its WeightSpec as a static attribute, which Flax NNX keeps in the model's graphdef;
    jit caches by the graphdef's hash, so every field of the spec must hash, and a dict does not.
    Compares equal to a dict with the same items.
    """

    def __init__(self, items: Mapping[str, float] | Iterator[tuple[str, float]] = ()):
        self._items = dict(items)

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Metrics({self._items!r})"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Everything known about one set of weights besides the arrays.

    Attributes:
        arch: registry name of the architecture (``"resnet50"``).
        name: torchvision's weight name (``"IMAGENET1K_V2"``), or the file's stem for a local file.
        source: where the arrays came from: a URL or a file path.
        sha256_prefix: the hash prefix in torchvision's file name (``resnet50-11ad3fa6.pth``), or None.
        sha256: the full sha256 of the source file, once it has been read.
        num_classes: width of the head the weights were trained with; 0 for weights without a classifier head
            (a self-supervised backbone: loading them gives the model a fresh head of the width asked for).
        categories: class names of that head, or None when unknown.
        preprocessing: the eval preprocessing the weights expect, or None when unknown.
        num_params: parameter count, as torchvision reports it.
        metrics: reported accuracies, e.g. ``{"acc@1": 80.858, "acc@5": 95.434}``; a dict is stored as
            :class:`Metrics`, so that the spec hashes.
    """

    arch: str
    name: str
    source: str
    num_classes: int
    sha256_prefix: str | None = None
    sha256: str | None = None
    categories: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    num_params: int | None = None
    metrics: Metrics = dataclasses.field(default_factory=Metrics)

    def __post_init__(self):
        if not isinstance(self.metrics, Metrics):
            object.__setattr__(self, "metrics", Metrics(self.metrics))

    @property
    def file_name(self) -> str:
        return self.source.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(dataclasses.replace(self, metrics={})), "metrics": dict(self.metrics)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightSpec:
        """The spec of ``to_json``'s dict; reads every spec.json written since format version 1."""
        data = dict(data)
        if data.get("preprocessing") is not None:
            pre = dict(data["preprocessing"])
            pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
            data["preprocessing"] = Preprocessing(**pre)
        if data.get("categories") is not None:
            data["categories"] = tuple(data["categories"])
        return cls(**data)


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in torchvision's order."""
    text = resources.files("jaxtl").joinpath("imagenet_categories.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def sha256_prefix_of(file_name: str) -> str | None:
    """The hash prefix torchvision puts in file names: ``resnet50-11ad3fa6.pth`` -> ``11ad3fa6``."""
    stem = Path(file_name).name.split(".")[0]
    if "-" not in stem:
        return None
    prefix = stem.rsplit("-", 1)[-1]
    return prefix.lower() if len(prefix) >= 6 and all(c in "0123456789abcdefABCDEF" for c in prefix) else None


def _imagenet_spec(
    arch, name, file_name, crop, resize, interpolation, num_params, acc1, acc5, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> WeightSpec:
    return WeightSpec(
        arch=arch,
        name=name,
        source=TORCHVISION_URL + file_name,
        sha256_prefix=sha256_prefix_of(file_name),
        num_classes=1000,
        categories=None,  # filled by get_weight_spec: the list is shared by all.
        preprocessing=Preprocessing(
            resize_size=resize, crop_size=crop, interpolation=interpolation, mean=mean, std=std
        ),
        num_params=num_params,
        metrics={"acc@1": acc1, "acc@5": acc5},
    )


_SPECS: dict[str, dict[str, WeightSpec]] = {}
for _row in TORCHVISION_WEIGHTS:
    _SPECS.setdefault(_row[0], {})[_row[1]] = _imagenet_spec(*_row)

# torchvision's DEFAULT: the newest ImageNet weight of each architecture, or as DEFAULT_EXCEPTIONS says.
_DEFAULTS = {arch: DEFAULT_EXCEPTIONS.get(arch, max(names)) for arch, names in _SPECS.items()}


def list_weights(arch: str) -> list[str]:
    """Names of the pretrained weights known for ``arch`` (torchvision's enum member names)."""
    return sorted(_SPECS.get(arch, {}))


def default_weights(arch: str) -> str | None:
    """The weight name torchvision's ``DEFAULT`` points to for ``arch``."""
    return _DEFAULTS.get(arch)


def get_weight_spec(arch: str, name: str) -> WeightSpec:
    """The spec of a named weight: ``"IMAGENET1K_V1"``, ``"DEFAULT"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``."""
    member = name.rsplit(".", 1)[-1]
    if member == "DEFAULT":
        member = default_weights(arch) or member
    spec = _SPECS.get(arch, {}).get(member)
    if spec is None:
        known = ", ".join(["DEFAULT", *list_weights(arch)]) if arch in _SPECS else "none"
        raise WeightsError(f"unknown weights {name!r} for {arch}; known weights for {arch}: {known}")
    return dataclasses.replace(spec, categories=imagenet_categories())


def make_random_init_spec(arch: str, num_classes: int, source: str, *, name: str = "random_init") -> WeightSpec:
    """The spec of a model without pretrained weights: ``source`` says so; the preprocessing is that of
    ``arch``'s DEFAULT weights, which a recipe fine-tuning it from scratch uses too."""
    return fill_default_preprocessing(WeightSpec(arch=arch, name=name, source=source, num_classes=num_classes))


def fill_default_preprocessing(spec: WeightSpec) -> WeightSpec:
    """``spec``, with the preprocessing of its architecture's DEFAULT weights where it states none (a local file)."""
    default = default_weights(spec.arch)
    if spec.preprocessing is not None or default is None:
        return spec
    return dataclasses.replace(spec, preprocessing=_SPECS[spec.arch][default].preprocessing)


WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".safetensors")


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """What a ``weights`` argument names for an architecture (see :func:`resolve_weights`).

    Attributes:
        arch: the architecture the weights are for.
        kind: ``"named"`` (a torchvision weight name), ``"file"`` (a torch state_dict file) or
            ``"converted"`` (a converted-weights directory).
        path: the file (``"file"``), the directory (``"converted"``), or where the named weights are
            cached in converted form (``"named"``), whether or not they are there yet.
        spec: torchvision's spec of a name, the spec.json of a directory; None for a file, whose spec
            is known once it has been read.
        converted: whether ``path`` holds converted weights, which load without torch; when False the
            weights must be converted first, which needs torch and torchvision.
        given: the argument as the caller wrote it (``"DEFAULT"``), for messages.
    """

    arch: str
    kind: Literal["named", "file", "converted"]
    path: Path
    spec: WeightSpec | None
    converted: bool
    given: str


def resolve_weights(arch: str, weights: str | os.PathLike) -> ResolvedWeights:
    """Tells what ``weights`` names for ``arch``: the one place that decides it. Needs no torch, reads no arrays.

    In this order: a converted-weights directory; an existing file (a torch state_dict); a torchvision
    weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V2"``). An argument
    that looks like a path (a ``os.PathLike``, a separator, a .pth/.pt/.bin suffix) is never a name.

    Raises:
        UnknownModelError: an architecture the registry does not know.
        WeightsError: a path that does not exist, a directory that is not converted weights, converted
            weights of another architecture, or a name ``arch`` has no weights of (the known ones listed).
    """
    from jaxtl.models.registry import get_builder

    get_builder(arch)
    given = os.fspath(weights)
    path = Path(given)
    if is_converted_weights(path):
        spec = load_weight_spec(path)
        if spec.arch != arch:
            raise WeightsError(
                f"weights in {path} are for {spec.arch}, not {arch}; build {spec.arch!r} with them, "
                f"or pass weights converted for {arch}"
            )
        return ResolvedWeights(arch, "converted", path, spec, True, given)
    if path.is_file():
        return ResolvedWeights(arch, "file", path, None, False, given)
    known = ", ".join(["DEFAULT", *list_weights(arch)])
    if path.is_dir():
        raise WeightsError(
            f"{path} is not a jaxtl converted-weights directory (expected {SPEC_FILE} and {STATE_DIR}/ inside); "
            f"create one with `jaxtl convert {arch} --weights NAME_OR_PTH --out {path}`"
        )
    if given.endswith(WEIGHT_FILE_SUFFIXES):
        raise WeightsError(
            f"weights file {path} does not exist; give the path of a torchvision state_dict file, "
            f"or a weight name of {arch} ({known})"
        )
    if isinstance(weights, os.PathLike) or os.sep in given or (os.altsep and os.altsep in given):
        raise WeightsError(
            f"weights path {path} does not exist; give a converted-weights directory, a torchvision "
            f"state_dict file, or a weight name of {arch} ({known})"
        )
    try:
        spec = get_weight_spec(arch, given)
    except WeightsError as error:
        raise WeightsError(f"{error}; or give a converted-weights directory or a .pth state_dict file") from None
    cached = converted_weights_path(arch, spec.name)
    return ResolvedWeights(arch, "named", cached, spec, is_converted_weights(cached), given)


def find_spec_by_file_name(file_name: str) -> WeightSpec | None:
    """The spec of a torchvision weight file recognised by its name (``resnet50-11ad3fa6.pth``)."""
    for names in _SPECS.values():
        for spec in names.values():
            if spec.file_name == Path(file_name).name:
                return dataclasses.replace(spec, categories=imagenet_categories())
    return None


def cache_dir() -> Path:
    """Root of jaxtl's caches: ``$JAXTL_CACHE``, else ``$XDG_CACHE_HOME/jaxtl``, else ``~/.cache/jaxtl``."""
    if os.environ.get("JAXTL_CACHE"):
        return Path(os.environ["JAXTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxtl"


def converted_weights_path(arch: str, name: str) -> Path:
    """Where the converted form of a named torchvision weight is cached."""
    spec = get_weight_spec(arch, name)
    return cache_dir() / "weights" / arch / spec.name


def is_converted_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_converted_weights``."""
    path = Path(path)
    return (path / SPEC_FILE).is_file() and (path / STATE_DIR).is_dir()


def nest_arrays(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"layer1.0.conv1.weight": a}`` as ``{"layer1": {"0": {"conv1": {"weight": a}}}}`` (orbax keys hold no dots)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return nested


def flatten_arrays(nested: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """:func:`nest_arrays` undone: dotted keys, numpy arrays."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten_arrays(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = np.asarray(value)
    return flat


def save_converted_weights(path: str | os.PathLike, state: dict[str, np.ndarray], spec: WeightSpec) -> Path:
    """Writes ``state`` (flat, jaxtl layout) and ``spec`` to ``path`` atomically.

    Everything is written to a temporary sibling directory that is renamed into place only when
    complete, so a failure leaves either the previous entry or nothing, never half of one.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / STATE_DIR, nest_arrays(state))
        checkpointer.wait_until_finished()
        document = {"format_version": FORMAT_VERSION, "spec": spec.to_json()}
        (staging / SPEC_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        previous = None
        if path.exists():
            # Move the old entry aside rather than delete it first: a crash in between leaves it whole.
            previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, previous / path.name)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return path


def load_weight_spec(path: str | os.PathLike) -> WeightSpec:
    """The spec stored with converted weights at ``path``."""
    path = Path(path)
    if not is_converted_weights(path):
        raise WeightsError(
            f"{path} is not a jaxtl converted-weights directory (expected {SPEC_FILE} and {STATE_DIR}/ inside); "
            "create one with `jaxtl convert ARCH --weights NAME_OR_PTH --out DIR`"
        )
    try:
        document = json.loads((path / SPEC_FILE).read_text(encoding="utf-8"))
        if document.get("format_version") != FORMAT_VERSION:
            raise WeightsError(
                f"{path / SPEC_FILE} has format_version {document.get('format_version')!r}, this jaxtl reads "
                f"{FORMAT_VERSION}; convert the weights again with `jaxtl convert`"
            )
        return WeightSpec.from_json(document["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"{path / SPEC_FILE} is corrupt ({error}); convert the weights again with `jaxtl convert`"
        ) from None


def load_converted_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], WeightSpec]:
    """Reads converted weights: the flat arrays (jaxtl layout) and their spec. Needs no torch."""
    import orbax.checkpoint as ocp

    spec = load_weight_spec(path)
    try:
        nested = ocp.StandardCheckpointer().restore(Path(path).absolute() / STATE_DIR)
    except Exception as error:  # orbax raises a variety of types for a damaged directory.
        raise WeightsError(
            f"cannot read the arrays in {Path(path) / STATE_DIR} ({type(error).__name__}: {error}); "
            "delete the directory and convert the weights again"
        ) from error
    return flatten_arrays(nested), spec
