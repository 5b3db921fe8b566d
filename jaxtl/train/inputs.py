"""A run's data: the train and val sources with their classes, and the loaders that batch them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.config import DataConfig, RunConfig
from jaxtl.data import (
    CachedEvalTransform,
    CachedSource,
    CachedTrainTransform,
    ConcatSource,
    DecodedCache,
    EvalTransform,
    Loader,
    SourceOrder,
    TfdsSource,
    TrainTransform,
    WebDatasetSource,
    data_sharding,
    even_batch_size,
    generate_synthetic,
    image_folder_splits,
    label_file_splits,
)
from jaxtl.data.augment.pipeline import DeviceAugment, make_device_augment
from jaxtl.data.sources import is_multilabel
from jaxtl.data.synthetic import CLASSES
from jaxtl.errors import DataError
from jaxtl.train import distributed
from jaxtl.weights import Preprocessing, make_random_init_spec, resolve_weights


@dataclasses.dataclass(frozen=True)
class RunData:
    """The two splits a run trains and validates on, and their classes in label order."""

    train: Any
    val: Any
    classes: tuple[str, ...]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.classes)}

    @property
    def multilabel(self) -> bool:
        """Whether the sources give multi-hot labels (``multilabel = True``): a multi-label task."""
        return is_multilabel(self.train)

    @classmethod
    def of(cls, data: RunData | Mapping[str, Any] | Sequence[Any]) -> RunData:
        """``data`` as given to :func:`jaxtl.train.fit`: a RunData, ``{"train": ..., "val": ...}`` or ``(train, val)``.

        The sources follow :class:`jaxtl.data.sources.Source` (``len``, ``load(index)``, ``classes``);
        the train source's classes are the run's, and the val source's must be the same.
        """
        if isinstance(data, RunData):
            return data
        if isinstance(data, Mapping):
            if set(data) != {"train", "val"}:
                raise DataError(f"data= must have the keys train and val, got {', '.join(map(str, data))}")
            train, val = data["train"], data["val"]
        else:
            train, val = data
        classes = tuple(getattr(train, "classes", None) or ())
        if not classes:
            raise DataError(f"the train source {train!r} has no classes; give it a classes attribute")
        val_classes = tuple(getattr(val, "classes", None) or classes)
        if val_classes != classes:
            raise DataError(
                f"the val source's classes {list(val_classes)} differ from the train source's {list(classes)}"
            )
        if is_multilabel(train) != is_multilabel(val):
            raise DataError("one of the train and val sources is multi-label (multilabel = True) and the other is not")
        return cls(train, val, classes)


def check_task(config: RunConfig, data: RunData) -> None:
    """The config's ``task`` must be what the data's labels are: class indices, or multi-hot vectors."""
    if data.multilabel != (config.task == "multilabel"):
        kind = "multi-label (several classes per image)" if data.multilabel else "single-label (one class per image)"
        raise DataError(
            f"the data is {kind} and the config says task: {config.task}; set task: "
            f"{'multilabel' if data.multilabel else 'single_label'}"
            + ("" if data.multilabel else ", with a multi-label source (data.labels.label_separator or class_columns)")
        )


def load_data(config: DataConfig) -> RunData:
    """The splits the config's data section names (a synthetic set is generated into the cache once)."""
    splits = (config.train_split, config.val_split)
    if config.source == "tfds":
        train = TfdsSource(config.tfds_name, config.train_split, data_dir=config.tfds_data_dir)
        val = TfdsSource(config.tfds_name, config.val_split, data_dir=config.tfds_data_dir)
        return RunData(train, val, tuple(train.classes))
    if config.source == "csv":
        sources = _label_file_splits(config)
    elif config.source == "hf":
        from jaxtl.data.sources.hf import hf_splits  # imports pyarrow: only where it is needed

        h = config.hf
        sources = hf_splits(Path(h.path).expanduser(), splits, image_column=h.image_column, label_column=h.label_column,
                            classes=h.classes, max_pixels=config.max_image_pixels)  # fmt: skip
    elif config.source == "webdataset":
        w = config.webdataset
        sources = {
            split: WebDatasetSource(
                shards,
                classes=w.classes,
                label_key=w.label_key,
                json_label_field=w.json_label_field,
                skip_bad_samples=config.skip_bad_files,
                max_pixels=config.max_image_pixels,
            )  # fmt: skip
            for split, shards in zip(splits, (w.train, w.val))
        }
    elif config.source == "synthetic" and config.synthetic.multilabel:
        s = config.synthetic
        root = generate_synthetic(seed=s.seed, num_classes=s.num_classes, train_per_class=s.train_per_class,
                                  val_per_class=s.val_per_class, multilabel=True)  # fmt: skip
        sources = label_file_splits({split: root / f"{name}.csv" for split, name in zip(splits, ("train", "val"))},
                                    splits=splits, image_column="image", label_column="labels", label_separator=" ",
                                    classes=CLASSES[: s.num_classes])  # fmt: skip
    else:
        if config.source == "synthetic":
            s = config.synthetic
            root = generate_synthetic(seed=s.seed, num_classes=s.num_classes, train_per_class=s.train_per_class,
                                      val_per_class=s.val_per_class)  # fmt: skip
        else:
            root = Path(config.root).expanduser()
        sources = image_folder_splits(root, splits, max_pixels=config.max_image_pixels)
    train, val = sources[config.train_split], sources[config.val_split]
    return RunData.of((train, val))


def _label_file_splits(config: DataConfig) -> dict:
    """data.source: csv -- the label file(s) of data.labels, images under data.root."""

    labels, splits = config.labels, (config.train_split, config.val_split)
    files = Path(labels.file).expanduser() if labels.file else dict(zip(splits, (labels.train, labels.val)))
    if isinstance(files, dict):
        files = {split: Path(path).expanduser() for split, path in files.items()}
    return label_file_splits(
        files, Path(config.root).expanduser() if config.root else None, splits=splits,
        split_column=labels.split_column, image_column=labels.image_column, label_column=labels.label_column,
        class_columns=labels.class_columns, label_separator=labels.label_separator, classes=labels.classes,
        skip_bad_rows=config.skip_bad_files, max_pixels=config.max_image_pixels, encoding=labels.encoding,
    )  # fmt: skip


@dataclasses.dataclass
class DeviceAugmentation:
    """The device half of the train split's augmentation (jaxtl.data.augment.make_device_augment)."""

    augment: Callable  # (images, indices, epoch) -> images

    def __call__(self, images, indices: np.ndarray, epoch: int, put: Callable[[np.ndarray], Any]):
        """The batch augmented; ``put`` shards a host array of the batch's rows as its images are sharded."""
        return self.augment(images, put(indices.astype(np.int32)), epoch)


@dataclasses.dataclass
class RunLoaders:
    """The train loader (shuffled, augmented), the val loader, and ``both``: train then val, in order and
    unaugmented, for computing a frozen backbone's features in one pass. From the decoded cache with a
    per-pixel augmentation, ``device`` augments the train loader's crops."""

    train: Loader
    val: Loader
    both: Loader
    device: DeviceAugmentation | None = None

    def close(self) -> None:
        for loader in (self.train, self.val, self.both):
            loader.close()

    @property
    def skipped(self) -> list[str]:
        return sorted(set(self.train.skipped + self.val.skipped + self.both.skipped))


def build_loaders(config: RunConfig, data: RunData, preprocessing: Preprocessing, num_devices: int) -> RunLoaders:
    """The run's loaders; each decodes the rows of its batches that this process's devices hold.

    With ``data.cache: decoded`` they read the decoded cache (built on first use): eval batches are the
    files' byte for byte, and a random train augmentation runs on the device.
    """
    d, p = config.data, preprocessing
    for name, size in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        if size % num_devices:
            raise DataError(
                f"{name}={size} does not split across {num_devices} devices; use a multiple of {num_devices}"
            )
    train, val, device = data.train, data.val, None
    crop = EvalTransform(p)
    augment = TrainTransform(p, random_resized_crop=d.random_resized_crop, flip_p=d.flip_p)
    if d.cache == "decoded":
        cache = DecodedCache()
        train = cache.build(data.train, p, skip_bad_files=d.skip_bad_files, num_workers=d.num_workers)
        val = cache.build(data.val, p, skip_bad_files=d.skip_bad_files, num_workers=d.num_workers)
        crop = CachedEvalTransform(p)
        augment = CachedTrainTransform(p, random_resized_crop=d.random_resized_crop, flip_p=d.flip_p)
        device = _device_augmentation(config, p)
    # class_balanced: the labels of the source given (a cache entry keeps single labels only)
    # The train order: class_balanced draws from the labels of the source given, and a source with an order of its
    # own (WebDataset: shard by shard) keeps it when the loader reads its decoded cache.
    sampler = None
    if d.sampler == "class_balanced":
        from jaxtl.data.samplers import ClassBalancedSampler

        sampler = ClassBalancedSampler.from_source(data.train)
    elif callable(getattr(data.train, "epoch_order", None)):
        sampler = SourceOrder(data.train)
    both = ConcatSource(train, val)
    # One compiled shape for the feature pass, in batches as even as data.eval_batch_size allows (least padding).
    size = even_batch_size(len(both), d.eval_batch_size, multiple=num_devices)
    return RunLoaders(
        # k accumulated micro-batches are one loaded batch, split in the train step (train.accumulate_steps)
        _loader(
            config,
            train,
            augment,
            d.batch_size * config.train.accumulate_steps,
            shuffle=True,
            seed=config.train.seed,
            sampler=sampler,
        ),  # fmt: skip
        _loader(config, val, crop, d.eval_batch_size, shuffle=False),
        _loader(config, both, crop, size, shuffle=False),
        device,
    )


def _loader(config: RunConfig, source, transform, batch_size: int, **kwargs) -> Loader:
    d = config.data
    rows = distributed.local_rows(data_sharding(batch_size), batch_size)
    return Loader(source, transform, batch_size=batch_size, rows=rows, num_workers=d.num_workers,
                  skip_bad_files=d.skip_bad_files, worker_type=d.worker_type, **kwargs)  # fmt: skip


def _device_augmentation(config: RunConfig, p: Preprocessing) -> DeviceAugmentation | None:
    """The config's per-pixel train augmentation on the device, or None when it has none."""
    d = config.data
    augment = DeviceAugment(
        policy=d.augment, color_jitter=d.color_jitter, erasing_p=d.random_erasing,
        erase_fill=tuple(int(round(255 * m)) for m in p.mean),  # torchvision erases normalised images with 0
    )  # fmt: skip
    return DeviceAugmentation(make_device_augment(augment, config.train.seed)) if augment.is_random else None


def config_preprocessing(config: RunConfig) -> Preprocessing:
    """The preprocessing a run of ``config`` uses, known without building its model: its weights' (the
    architecture's DEFAULT weights' when they are random or a file that states none), at ``data.crop_size``."""
    arch, weights = config.model.arch, config.model.weights
    spec = None if weights is None else resolve_weights(arch, weights).spec
    if spec is None or spec.preprocessing is None:
        spec = make_random_init_spec(arch, 1000, source="the architecture's default preprocessing")
    return with_size(spec.preprocessing, config.data.crop_size, config.data.resize_size)


def build_caches(config: RunConfig, data: RunData | None = None) -> dict[str, CachedSource]:
    """The decoded cache of ``config``'s train and val splits, built where missing (``jaxtl data cache``)."""
    data = data or load_data(config.data)
    cache, p, d = DecodedCache(), config_preprocessing(config), config.data
    return {
        split: cache.build(source, p, skip_bad_files=d.skip_bad_files, num_workers=d.num_workers, progress=True)
        for split, source in (("train", data.train), ("val", data.val))
    }


def with_size(p: Preprocessing, crop_size: int | None, resize_size: int | None) -> Preprocessing:
    """The weights' preprocessing at another resolution; mean, std and interpolation stay the weights'."""
    if crop_size is None and resize_size is None:
        return p
    crop = crop_size or p.crop_size
    resize = resize_size or max(crop, round(crop * p.resize_size / p.crop_size))
    return dataclasses.replace(p, crop_size=crop, resize_size=resize)
