"""The run config: YAML files -> frozen, typed dataclasses, with dotted command-line overrides.

    config = load_config("configs/quickstart.yaml", overrides=["data.batch_size=16", "phases.0.epochs=1"])

Unknown keys, values of the wrong type and out-of-range values are ConfigErrors that name the file
and the dotted key. The resolved config (every default filled in) is written into the run directory
and stored in every checkpoint.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxtl.bounds import Bounds, bounded, field_bounds
from jaxtl.data.loader import DEFAULT_WORKER_TYPE, WorkerType
from jaxtl.errors import JaxtlError
from jaxtl.optim import OptimizerConfig, Phase
from jaxtl.optim.settings import Labels, describe_freezing

DEFAULT_PHASE_EPOCHS = 1  # a config's phase that gives neither epochs nor steps
MAX_SEED = 2**63 - 1  # numpy's generators take no negative seed, jax's keys no wider one


class ConfigError(JaxtlError, ValueError):
    """A config file, key or value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    weights: str | None = "DEFAULT"  # a torchvision weight name, a .pth file, a converted directory, or None
    # Train from torchvision's random init when the weights cannot be had (no cache, no network).
    # Only the quickstart sets this; any other config stops with a message instead.
    allow_random_init_fallback: bool = False
    download_timeout_s: float = bounded(20.0, low=0)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    seed: int = bounded(0, low=0, high=MAX_SEED)
    num_classes: int = bounded(5, low=2, high=8)
    train_per_class: int = bounded(60, low=1)
    val_per_class: int = bounded(20, low=1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "folder", "tfds"] = "synthetic"
    root: str | None = None  # folder: root/<split>/<class>/<image>
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = bounded(32, low=1)
    eval_batch_size: int = bounded(64, low=1)
    num_workers: int | None = bounded(None, low=1)
    worker_type: WorkerType = DEFAULT_WORKER_TYPE  # jaxtl.data.Loader's default
    # The weights' eval preprocessing by default; set crop_size to train and evaluate at another
    # resolution (resize_size then keeps the weights' resize/crop ratio unless given too).
    crop_size: int | None = bounded(None, low=32)
    resize_size: int | None = bounded(None, low=32)
    random_resized_crop: bool = False
    flip_p: float = bounded(0.0, low=0, high=1)
    # decoded: each image decoded and resized once into a memory-mapped cache (jaxtl.data.cache); training
    # augmentation then runs on the device (jaxtl.data.augment), which the three keys below need.
    cache: Literal["none", "decoded"] = "none"
    augment: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = "none"
    color_jitter: tuple[float, float, float, float] | None = bounded(None, low=0)  # brightness, contrast, sat., hue
    random_erasing: float = bounded(0.0, low=0, high=1)  # its probability
    # Mixup / CutMix of each train batch on the device (torchvision.transforms.v2.MixUp / CutMix), with
    # probability mix_prob; CutMix instead of Mixup with probability mix_switch_prob when both alphas are > 0.
    mixup_alpha: float = bounded(0.0, low=0)
    cutmix_alpha: float = bounded(0.0, low=0)
    mix_prob: float = bounded(1.0, low=0, high=1)
    mix_switch_prob: float = bounded(0.5, low=0, high=1)
    skip_bad_files: bool = False
    max_image_pixels: int | None = bounded(178956970, low=1)  # PIL's default decompression-bomb limit
    synthetic: SyntheticConfig = SyntheticConfig()


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` epochs (Keras'
    EarlyStopping): ``ends`` the phase (the next one starts; patience counts within a phase) or the run."""

    metric: Literal["val_loss", "val_acc1"] = "val_loss"
    patience: int = bounded(3, low=1)
    min_delta: float = bounded(0.0, low=0)
    ends: Literal["phase", "run"] = "phase"


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """A moving average of the weights and BatchNorm statistics (torchvision's reference ExponentialMovingAverage),
    updated after every ``every_steps``-th optimizer step; ``warmup``: timm's, the decay ``1 - (1 + t) ** -2/3`` at
    the t-th update while that is below ``decay``. Validation, ``best`` and predictions use the average."""

    decay: float = bounded(0.9998, low=0, high=1)
    every_steps: int = bounded(1, low=1)
    warmup: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = bounded(0, low=0, high=MAX_SEED)
    precision: Literal["fp32", "bf16"] = "fp32"
    feature_cache: bool = True  # head-only phases without augmentation train on features computed once
    log_every: int = bounded(10, low=1)
    checkpoint_metric: Literal["val_acc1", "val_loss"] = "val_acc1"
    # Also write checkpoints/latest every N steps inside an epoch (None: at epoch ends only), so that
    # a kill loses at most N steps of a long epoch; a resume continues from the batch after it.
    checkpoint_every_steps: int | None = bounded(None, low=1)
    # XLA:CPU's dots in YNNPACK for the eval-mode programs (feature pass, validation, predict), for the
    # train steps too ("all"), or for none ("off"); ignored on GPUs (jaxtl.xla.program_options).
    ynnpack: Literal["eval", "all", "off"] = "eval"
    # torch.nn.CrossEntropyLoss(label_smoothing=, weight=) for the training loss (validation's stays plain):
    # class_weights "balanced" (scikit-learn's, from the train split's labels) or one weight per class.
    label_smoothing: float = bounded(0.0, low=0, high=1)
    class_weights: Literal["balanced"] | tuple[float, ...] | None = bounded(None, low=0)
    early_stopping: EarlyStoppingConfig | None = None
    # k micro-batches of data.batch_size per optimizer step, their gradients summed (a k-times larger batch).
    accumulate_steps: int = bounded(1, low=1)
    # Train-mode BatchNorm statistics over the whole batch across devices (SyncBatchNorm), or per device
    # (false: PyTorch DistributedDataParallel's default, each replica its own rows' statistics).
    bn_sync: bool = True
    ema: EmaConfig | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run: where it writes, the model, the data, the optimizer, its phases, the loop's settings.

    ``optim`` applies to every phase that sets no ``optimizer`` of its own.
    """

    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig()
    phases: tuple[Phase, ...] = (Phase("head", "head_only", epochs=3),)
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        """Plain values for YAML; a freezing written in Python is named ``python:module.function``."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Labels) or callable(value):
        return describe_freezing(value)
    return value


# Bounds on what a config may hold: YAML aliases can make a list that holds itself, or a few lines
# that expand to billions of values ("billion laughs"); a real config is a few dozen values, 4 levels deep.
MAX_VALUES = 100_000
MAX_DEPTH = 32


def _to_plain(value: Any, source: str = "config") -> Any:
    """Mappings as dicts and sequences as lists, copied; ConfigError past MAX_VALUES values or MAX_DEPTH levels."""
    count = 0

    def copy(value: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"{source}: more than {MAX_VALUES} values (YAML aliases that expand?); a run config is far smaller"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{source}: nested too deeply (more than {MAX_DEPTH} levels; a YAML alias inside itself?)"
            )
        if isinstance(value, Mapping):
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v, depth + 1) for v in value]
        return value

    return copy(value, 0)


def _show_key(key: Any) -> str:
    """A key as written in an error message: plain if it prints on one line, its repr otherwise."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else repr(key)


def _describe_yaml_error(error: Exception) -> str:
    """A YAML parser error on one line: what, and where."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    text = ", ".join(str(part) for part in parts if part) or str(error)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(text.split())


def _same_kind(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is the kind of thing ``annotation`` holds (a list for a tuple, a string for a Literal)."""
    origin = typing.get_origin(annotation) or annotation
    if isinstance(value, (list, tuple)):
        return origin in (tuple, list, Sequence)
    if isinstance(value, str):
        return origin in (Literal, str)
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(annotation) or origin in (dict, Mapping)
    return False


def _convert(value: Any, annotation: Any, key: str, source: str, bounds: Bounds | None = None) -> Any:
    """``value`` checked against (and converted to) ``annotation``; ConfigError naming ``key`` otherwise.

    ``bounds`` apply to the numbers in ``value``. Values only Python can give (a rules function, a
    :class:`jaxtl.optim.Labels`, a Rule) are taken where the annotation allows them.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    where = f"{source}: {key}"
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(annotation))}"
            )
        return _build(annotation, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key, source, bounds)
            except ConfigError as error:
                errors.append((_same_kind(value, option), error))
        raise next((error for same, error in errors if same), errors[0][1])  # the option the value was meant for
    if origin is collections.abc.Callable:
        if not callable(value) or isinstance(value, type):
            raise ConfigError(f"{where} must be a function, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}.{i}", source, bounds) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{key}.{i}", source, bounds) for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has a non-string key {k!r}; quote it")
            out[k] = _convert(v, value_type, f"{key}.{k}", source, bounds)
        return out
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return _check_bounds(value, bounds, where)
    if annotation is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            digits = str(value)
            raise ConfigError(f"{where} must be a finite number, got {digits[:6]}... ({len(digits)} digits)") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be finite, got {value}")
        return _check_bounds(value, bounds, where)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type):  # a Python-only type, e.g. jaxtl.optim.Labels
        if not isinstance(value, annotation):
            raise ConfigError(f"{where} must be a {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _check_bounds(value: float, bounds: Bounds | None, where: str) -> float:
    if bounds is not None and not bounds.contains(value):
        raise ConfigError(f"{where} = {value} is out of range {bounds.describe()}")
    return value


def _build(cls: type, data: Mapping, prefix: str, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(where + _show_key(k) for k in unknown)}; "
            f"known under {prefix or 'the top level'}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], key, source, field_bounds(field))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {key} is required")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {prefix or 'config'}: {error}") from None


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {here}: no item {part} (the list has {len(node)})")
            node = node[int(part)]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {here} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: {key}: no item {last} (the list has {len(node)})")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{source}: {'.'.join(parts[:-1])} is not a mapping")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=3e-4", "phases.0.epochs=1"]`` -> [(key, YAML-parsed value)]."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not key.isprintable():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError) as error:
            problem = _describe_yaml_error(error)
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: Mapping | None, overrides: Sequence[str] = (), source: str = "config") -> RunConfig:
    """A RunConfig from a plain mapping (as read from YAML) and dotted overrides."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of {', '.join(f.name for f in dataclasses.fields(RunConfig))}"
        )
    data = _to_plain(dict(data), source)
    if "phases" not in data:
        data["phases"] = RunConfig().to_dict()["phases"]
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, _to_plain(value, f"override {key}"), f"override {key}")
    for phase in data["phases"] if isinstance(data["phases"], list) else ():
        if isinstance(phase, dict) and phase.get("steps") is None and phase.get("epochs") is None:
            phase["epochs"] = DEFAULT_PHASE_EPOCHS
    config = _build(RunConfig, data, "", source)
    if not config.phases:
        raise ConfigError(f"{source}: phases is empty; give at least one phase")
    names = [p.name for p in config.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: phase names repeat ({', '.join(names)}); each phase needs its own name")
    d = config.data
    if d.source == "folder" and not d.root:
        raise ConfigError(f"{source}: data.root is required when data.source is folder")
    if d.source == "tfds" and not d.tfds_name:
        raise ConfigError(f"{source}: data.tfds_name is required when data.source is tfds")
    device_only = [key for key, on in (("data.augment", d.augment != "none"), ("data.color_jitter", d.color_jitter),
                                       ("data.random_erasing", d.random_erasing > 0)) if on]  # fmt: skip
    if device_only and d.cache != "decoded":
        raise ConfigError(
            f"{source}: {', '.join(device_only)} run(s) on the device, from decoded images: set data.cache: decoded"
        )
    if d.color_jitter is not None and d.color_jitter[3] > 0.5:
        raise ConfigError(f"{source}: data.color_jitter.3 (hue) = {d.color_jitter[3]} is out of range [0, 0.5]")
    return config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML config (None: the defaults) and applies ``overrides``."""
    if path is None:
        return config_from_dict({}, overrides, "defaults")
    return config_from_dict(read_config_file(path), overrides, str(path))


def read_config_file(path: str | Path) -> Any:
    """A YAML config file's plain contents, not yet checked; ConfigError naming the file if it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (configs in this repository: configs/*.yaml)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(f"{path} is not valid YAML: {_describe_yaml_error(error)}") from None
    return data


def save_config(config: RunConfig, path: str | Path) -> None:
    """Writes ``config`` as YAML to ``path`` atomically: a failed write (a full disk) leaves the old file whole."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
