"""The run config: YAML files -> frozen, typed dataclasses, with dotted command-line overrides.

    config = load_config("configs/quickstart.yaml", overrides=["data.batch_size=16", "phases.0.epochs=1"])

Unknown keys, values of the wrong type and out-of-range values are ConfigErrors that name the file
and the dotted key. The resolved config (every default filled in) is written into the run directory
and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxtl.bounds import bounded
from jaxtl.config_values import (
    ConfigError,
    build_dataclass,
    copy_plain,
    describe_yaml_error,
    parse_overrides,
    set_dotted,
    to_plain,
)
from jaxtl.data.loader import DEFAULT_WORKER_TYPE, WorkerType
from jaxtl.optim import OptimizerConfig, Phase

DEFAULT_PHASE_EPOCHS = 1  # a config's phase that gives neither epochs nor steps
MAX_SEED = 2**63 - 1  # numpy's generators take no negative seed, jax's keys no wider one


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
    multilabel: bool = False  # one to three figures per image, labels in train.csv / val.csv (task: multilabel)


@dataclasses.dataclass(frozen=True)
class LabelFileConfig:
    """``data.source: csv``: label files (CSV, TSV or JSON lines; jaxtl.data.sources.LabelFileSource), one per split
    (``train``, ``val``) or one for all (``file``) whose ``split_column`` names each row's split (data.train_split,
    data.val_split). Image paths are relative to data.root (default: the label file's folder). Multi-label:
    ``label_separator`` splits the label column, or ``class_columns`` (a list, or "*": every other column) hold
    0/1 per class. ``classes``: the class order as listed (default sorted; numerically for integer labels)."""

    train: str | None = None
    val: str | None = None
    file: str | None = None
    split_column: str = "split"
    image_column: str = "image"
    label_column: str | None = "label"
    class_columns: Literal["*"] | tuple[str, ...] | None = None
    label_separator: str | None = None
    classes: tuple[str, ...] | None = None
    encoding: str = "utf-8"


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """``data.source: hf``: a Hugging Face dataset on disk (``save_to_disk``, or Parquet/Arrow files; the splits
    data.train_split and data.val_split), read with pyarrow (jaxtl.data.sources.HFSource)."""

    path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    classes: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class WebDatasetConfig:
    """``data.source: webdataset``: tar shards in the webdataset layout (``key.jpg`` + ``key.cls`` or ``key.json``),
    each split a brace pattern (``shards/train-{000000..000031}.tar``), a folder of .tar files or a list."""

    train: str | tuple[str, ...] | None = None
    val: str | tuple[str, ...] | None = None
    label_key: Literal["cls", "json"] = "cls"
    json_label_field: str = "label"
    classes: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "folder", "tfds", "csv", "hf", "webdataset"] = "synthetic"
    root: str | None = None  # folder: root/<split>/<class>/<image>; csv: the folder image paths are relative to
    labels: LabelFileConfig = LabelFileConfig()
    hf: HFConfig = HFConfig()
    webdataset: WebDatasetConfig = WebDatasetConfig()
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = bounded(32, low=1)
    # The train order: a permutation every epoch, or "class_balanced": each class (a multi-label task: each example's
    # rarest class) drawn equally often, with replacement (jaxtl.data.ClassBalancedSampler).
    sampler: Literal["shuffle", "class_balanced"] = "shuffle"
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

    metric: Literal["val_loss", "val_acc1", "val_map"] = "val_loss"
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
    # Also keep those features on disk here, shared by runs with the same frozen backbone, images and preprocessing
    # (jaxtl.train.feature_store; a jaxtl sweep's policies and seeds); None: in memory only.
    feature_cache_dir: str | None = None
    # Each trainable group's gradient norm and update-to-weight ratio from every step (three norms in the step:
    # a few percent of a CPU step); the distance from the starting weights and BatchNorm drift are always kept.
    group_diagnostics: bool = False
    log_every: int = bounded(10, low=1)
    # What makes a checkpoint the best: None picks val_acc1 for a single-label task and val_map for a multi-label one.
    checkpoint_metric: Literal["val_acc1", "val_loss", "val_map"] | None = None
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
    # Multi-label: torch.nn.BCEWithLogitsLoss(pos_weight=): "balanced" (each class's negatives / positives in the
    # train split) or one weight per class.
    pos_weight: Literal["balanced"] | tuple[float, ...] | None = bounded(None, low=0)
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
    # single_label: softmax, cross-entropy, accuracy; multilabel: sigmoid, binary cross-entropy, mAP / AUROC / F1 at
    # a threshold chosen on validation (the data must give multi-hot labels: jaxtl.train.task).
    task: Literal["single_label", "multilabel"] = "single_label"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig()
    phases: tuple[Phase, ...] = (Phase("head", "head_only", epochs=3),)
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        """Plain values for YAML; a freezing written in Python is named ``python:module.function``."""
        return to_plain(self)


def config_from_dict(data: Mapping | None, overrides: Sequence[str] = (), source: str = "config") -> RunConfig:
    """A RunConfig from a plain mapping (as read from YAML) and dotted overrides."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of {', '.join(f.name for f in dataclasses.fields(RunConfig))}"
        )
    data = copy_plain(dict(data), source)
    if "phases" not in data:
        data["phases"] = RunConfig().to_dict()["phases"]
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, copy_plain(value, f"override {key}"), f"override {key}")
    for phase in data["phases"] if isinstance(data["phases"], list) else ():
        if isinstance(phase, dict) and phase.get("steps") is None and phase.get("epochs") is None:
            phase["epochs"] = DEFAULT_PHASE_EPOCHS
    config = build_dataclass(RunConfig, data, "", source)
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
    needed = {"csv": ("data.labels.train and data.labels.val, or data.labels.file", d.labels.file
                      or (d.labels.train and d.labels.val)),
              "hf": ("data.hf.path", d.hf.path), "webdataset": ("data.webdataset.train and data.webdataset.val",
                                                                 d.webdataset.train and d.webdataset.val)}  # fmt: skip
    if d.source in needed and not needed[d.source][1]:
        raise ConfigError(f"{source}: {needed[d.source][0]} required when data.source is {d.source}")
    metrics = [config.train.checkpoint_metric, config.optim.plateau_metric,
               config.train.early_stopping and config.train.early_stopping.metric]  # fmt: skip
    probes = [f"phases.{i}" for i, phase in enumerate(config.phases) if phase.solver == "linear_probe"]
    if config.task == "multilabel" and probes:
        raise ConfigError(
            f"{source}: {', '.join(probes)} (solver: linear_probe) fit(s) a multinomial logistic regression, a "
            "single-label head; with task: multilabel train the head with the optimizer (remove solver: linear_probe)"
        )
    if config.task == "single_label" and "val_map" in metrics:
        raise ConfigError(
            f"{source}: val_map is the mean average precision of a multi-label task; set task: multilabel"
        )
    device_only = [key for key, on in (("data.augment", d.augment != "none"), ("data.color_jitter", d.color_jitter),
                                       ("data.random_erasing", d.random_erasing > 0)) if on]  # fmt: skip
    if device_only and d.cache != "decoded":
        raise ConfigError(
            f"{source}: {', '.join(device_only)} run(s) on the device, from decoded images: set data.cache: decoded"
        )
    if d.color_jitter is not None and d.color_jitter[3] > 0.5:
        raise ConfigError(f"{source}: data.color_jitter.3 (hue) = {d.color_jitter[3]} is out of range [0, 0.5]")
    until = [f"phases.{i}" for i, phase in enumerate(config.phases) if phase.until == "plateau"]
    if until and config.train.early_stopping is not None:
        raise ConfigError(
            f"{source}: {', '.join(until)} end(s) on a plateau and train.early_stopping is set: both watch validation "
            "with one record; keep one (until: plateau per phase, or train.early_stopping for every phase)"
        )
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
        raise ConfigError(f"{path} is not valid YAML: {describe_yaml_error(error)}") from None
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
