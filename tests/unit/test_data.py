"""Data without torch: the synthetic set, the loader's order, resume, padding, bad files, tfds."""

import gc
import hashlib
import io
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl.data import (
    ConcatSource,
    EvalTransform,
    ImageFolder,
    Loader,
    LoaderState,
    TfdsSource,
    TrainTransform,
    data_sharding,
    device_batches,
    even_batch_size,
    generate_synthetic,
    image_folder_splits,
    load_image,
    normalize,
)
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

SMALL = Preprocessing(resize_size=40, crop_size=32)


def small_synthetic(tmp_path, **kwargs) -> Path:
    args = dict(seed=0, num_classes=3, train_per_class=7, val_per_class=3, min_size=40, max_size=64) | kwargs
    return generate_synthetic(tmp_path / "synthetic", **args)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --- synthetic dataset -------------------------------------------------------------------------


def test_synthetic_is_an_image_folder_with_the_requested_counts(tmp_path):
    root = small_synthetic(tmp_path)
    splits = image_folder_splits(root)
    assert splits["train"].classes == ("checkerboard", "circle", "square")
    assert [len(splits["train"]), len(splits["val"])] == [21, 9]
    for path, _ in splits["train"].samples:
        image = Image.open(path)
        assert image.format == "JPEG" and 40 <= image.width <= 64 and 40 <= image.height <= 64


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    first = digest(small_synthetic(tmp_path / "a"))
    assert digest(small_synthetic(tmp_path / "b")) == first
    assert digest(small_synthetic(tmp_path / "c", seed=1)) != first


def test_synthetic_reuses_a_complete_dataset_and_refuses_a_foreign_folder(tmp_path):
    root = small_synthetic(tmp_path)
    stamp = (root / "train" / "circle" / "00000.jpg").stat().st_mtime_ns
    assert small_synthetic(tmp_path) == root
    assert (root / "train" / "circle" / "00000.jpg").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other arguments"):
        small_synthetic(tmp_path, seed=3)
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="not a synthetic dataset"):
        generate_synthetic(foreign)
    assert not list(tmp_path.glob(".*staging*"))


def test_synthetic_default_lives_in_the_cache(tmp_path):
    root = generate_synthetic(num_classes=2, train_per_class=1, val_per_class=1, min_size=32, max_size=32)
    assert Path(os.environ["JAXTL_CACHE"]) in root.parents


def test_synthetic_classes_differ_in_appearance(tmp_path):
    """A figure is visible: pixels of each image differ from its background (a learnable signal)."""
    root = small_synthetic(tmp_path)
    for path in sorted(root.rglob("*.jpg"))[:10]:
        array = np.asarray(Image.open(path).convert("RGB"), np.float32)
        assert array.std(axis=(0, 1)).max() > 20


# --- ImageFolder errors --------------------------------------------------------------------------


def write_image(path: Path, size=(50, 40), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path, format=fmt)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"without images in .*: b\. Image extensions"):
        ImageFolder(tmp_path)


def test_hidden_folders_are_classes_and_the_error_says_so(tmp_path):
    write_image(tmp_path / "a" / "1.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    with pytest.raises(DataError, match=r"hidden folders count as classes.*remove \.ipynb_checkpoints"):
        ImageFolder(tmp_path)


def test_missing_or_empty_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder_splits(tmp_path / "nowhere")
    write_image(tmp_path / "train" / "a" / "1.png")
    with pytest.raises(DataError, match=r"no split folder val \(found: train\)"):
        image_folder_splits(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        image_folder_splits(tmp_path)


def test_classes_that_differ_between_splits_are_listed(tmp_path):
    for split, classes in (("train", "abc"), ("val", "abd")):
        for c in classes:
            write_image(tmp_path / split / c / "1.png")
    with pytest.raises(DataError, match=r"only in val: \['d'\]; only in train: \['c'\]"):
        image_folder_splits(tmp_path)


# --- bad image files -------------------------------------------------------------------------------


def jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("zero.jpg", b"", "empty \\(zero-byte\\) file"),
        ("text.jpg", b"this is not an image\n" * 4, "not an image PIL can read \\(84 bytes\\)"),
        ("truncated.jpg", jpeg_bytes()[:400], "truncated or corrupt"),
    ],
)
def test_bad_file_errors_name_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_image(str(path))
    assert str(path) in str(info.value)


def test_broken_symlink_is_named(tmp_path):
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "missing-target.jpg")
    with pytest.raises(DataError, match="broken symlink"):
        load_image(str(link))


def test_oversized_image_hits_the_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    write_image(path, size=(300, 200))
    with pytest.raises(DataError, match=r"300x200 = 60000 pixels exceeds the limit of 50000.*data.max_image_pixels"):
        load_image(str(path), max_pixels=50_000)
    assert load_image(str(path), max_pixels=60_000).size == (300, 200)


def test_pil_decompression_bomb_guard_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    write_image(path, size=(300, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL refuses > 2x its limit inside open()
    with pytest.raises(DataError, match=r"bomb.png: Image size \(60000 pixels\) exceeds limit.*max_image_pixels"):
        load_image(str(path), max_pixels=None)


def hostile_folder(root: Path) -> list[str]:
    """Six good images per class and one bad file in each of two classes."""
    for c in ("a", "b"):
        for i in range(6):
            write_image(root / c / f"{i}.png", size=(40 + i, 36))
    (root / "a" / "3x.jpg").write_bytes(b"")
    (root / "b" / "2x.jpg").write_bytes(jpeg_bytes()[:300])
    return [str(root / "a" / "3x.jpg"), str(root / "b" / "2x.jpg")]


def test_loader_stops_at_the_first_bad_file_by_default(tmp_path):
    bad = hostile_folder(tmp_path)
    loader = Loader(ImageFolder(tmp_path), EvalTransform(SMALL), batch_size=4, shuffle=False)
    with pytest.raises(DataError, match="3x.jpg: an empty"):
        list(loader.epoch(0))
    assert bad[0].endswith("3x.jpg")


def test_loader_skips_and_counts_bad_files_when_asked(tmp_path, caplog):
    bad = hostile_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    loader = Loader(folder, EvalTransform(SMALL), batch_size=4, shuffle=True, skip_bad_files=True)
    batches = list(loader.epoch(0))
    assert sorted(loader.skipped) == sorted(bad)
    assert sum(int(b.mask.sum()) for b in batches) == len(folder) - 2
    for batch in batches:
        for row in np.flatnonzero((batch.indices >= 0) & ~batch.mask):
            assert folder.describe(int(batch.indices[row])) in bad
            assert not batch.images[row].any()
    assert "skipped" in caplog.text


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    write_image(path, mode=mode)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (50, 40)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


# --- transforms ---------------------------------------------------------------------------------


def test_normalize_on_device_matches_the_host(tmp_path):
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    host = normalize(batch)
    device = jax.jit(lambda b: normalize(b, xp=jnp))(batch)
    np.testing.assert_allclose(np.asarray(device), host, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        host[0, 0, 0], (batch[0, 0, 0] / 255 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], atol=1e-6
    )


def test_eval_transform_pads_images_smaller_than_the_crop():
    image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    crop = EvalTransform(Preprocessing(resize_size=20, crop_size=24))(image)
    assert crop.shape == (24, 24, 3)
    assert not crop[:2].any() and not crop[-2:].any() and crop[2:-2].min() == 200


def test_train_transform_without_augmentation_is_the_eval_transform(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    train = TrainTransform(SMALL)
    assert not train.is_random
    assert np.array_equal(train(image), EvalTransform(SMALL)(image))


def test_random_resized_crop_respects_scale_and_ratio():
    from jaxtl.data.transforms import random_resized_crop_params

    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(120, 90, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
        assert 0.08 * 120 * 90 * 0.9 <= h * w <= 120 * 90
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # The fallback (no draw fits in 10 tries) is torchvision's central crop at the extreme ratio.
    assert random_resized_crop_params(10, 100, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(0)) == (0, 45, 10, 10)


def test_train_transform_flips_with_its_probability():
    image = Image.fromarray(np.arange(32 * 40 * 3, dtype=np.uint8).reshape(32, 40, 3) % 251)
    transform = TrainTransform(Preprocessing(resize_size=32, crop_size=32), flip_p=0.5)
    base = EvalTransform(transform.preprocessing)(image)
    flips = [not np.array_equal(transform(image, np.random.default_rng(i)), base) for i in range(400)]
    assert 0.42 < np.mean(flips) < 0.58
    assert np.array_equal(transform(image, np.random.default_rng(7)), transform(image, np.random.default_rng(7)))


@pytest.mark.parametrize("kwargs", [{"flip_p": 1.5}, {"scale": (0.5, 0.2)}, {"ratio": (0.0, 1.0)}])
def test_train_transform_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        TrainTransform(SMALL, **kwargs)


# --- the loader ------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    return ImageFolder(small_synthetic(tmp_path) / "train")


def epoch_indices(loader, epoch, start=0):
    return np.concatenate([b.indices for b in loader.epoch(epoch, start)])


def test_every_example_once_per_epoch_with_a_padded_masked_last_batch(folder):
    loader = Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=True, seed=3)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3  # 21 examples
    assert all(b.images.shape == (8, 32, 32, 3) and b.images.dtype == np.uint8 for b in batches)
    indices = np.concatenate([b.indices for b in batches])
    assert sorted(indices[indices >= 0]) == list(range(21))
    assert list(batches[-1].mask) == [True] * 5 + [False] * 3
    assert list(batches[-1].indices[5:]) == [-1] * 3 and not batches[-1].images[5:].any()
    labels = np.concatenate([b.labels for b in batches])[: len(folder)]
    assert list(labels) == [folder.samples[i][1] for i in indices[: len(folder)]]


def test_order_is_a_function_of_seed_and_epoch(folder):
    make = lambda seed: Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=True, seed=seed)
    a, b, c = make(0), make(0), make(1)
    assert np.array_equal(epoch_indices(a, 0), epoch_indices(b, 0))
    assert not np.array_equal(epoch_indices(a, 0), epoch_indices(a, 1))
    assert not np.array_equal(epoch_indices(a, 0), epoch_indices(c, 0))
    unshuffled = Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=False)
    assert list(epoch_indices(unshuffled, 5)[:21]) == list(range(21))


def test_images_are_the_transformed_source_images(folder):
    transform = EvalTransform(SMALL)
    batch = next(Loader(folder, transform, batch_size=4, shuffle=True, num_workers=3).epoch(2))
    for row, index in enumerate(batch.indices):
        assert np.array_equal(batch.images[row], transform(folder.load(int(index))[0]))


def test_resume_mid_epoch_gives_the_identical_remaining_batches(folder):
    transform = TrainTransform(SMALL, random_resized_crop=True, flip_p=0.5)
    full = list(Loader(folder, transform, batch_size=4, shuffle=True, seed=5, num_workers=3).epoch(1))
    state = LoaderState.from_dict(LoaderState(epoch=1, batch=2).to_dict())
    resumed = Loader(folder, transform, batch_size=4, shuffle=True, seed=5, num_workers=1)
    rest = list(resumed.epoch(state.epoch, state.batch))
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        for field in ("images", "labels", "mask", "indices"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def test_random_train_transforms_change_between_epochs(folder):
    transform = TrainTransform(SMALL, random_resized_crop=True)
    loader = Loader(folder, transform, batch_size=21, shuffle=False, seed=0)
    first, second = next(loader.epoch(0)), next(loader.epoch(1))
    assert not np.array_equal(first.images, second.images)


def test_device_batches_shard_the_batch_axis(folder):
    loader = Loader(folder, EvalTransform(SMALL), batch_size=4, shuffle=False)
    sharding = data_sharding(4)
    batches = list(device_batches(loader.epoch(0), sharding))
    assert len(batches) == len(loader)
    assert all(isinstance(b.images, jax.Array) and b.images.sharding == sharding for b in batches)
    host = list(loader.epoch(0))
    assert all(np.array_equal(np.asarray(d.images), h.images) for d, h in zip(batches, host))


def test_data_sharding_needs_a_divisible_batch():
    if jax.local_device_count() == 1:
        assert data_sharding(3).mesh.shape == {"data": 1}
    else:
        with pytest.raises(ValueError, match="does not split evenly"):
            data_sharding(jax.local_device_count() + 1)


def test_loader_rejects_bad_arguments(folder):
    with pytest.raises(ValueError, match="batch_size=0"):
        Loader(folder, EvalTransform(SMALL), batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match="start_batch=9"):
        list(Loader(folder, EvalTransform(SMALL), batch_size=4, shuffle=False).epoch(0, 9))


@pytest.mark.parametrize(
    ("n", "max_batch", "multiple", "expected"),
    [
        (400, 64, 1, 58),  # 7 batches: 6 padding rows, not 48
        (300, 64, 1, 60),  # 5 full batches
        (128, 64, 1, 64),
        (65, 64, 1, 33),  # 2 batches either way: 1 padding row, not 63
        (1, 64, 1, 1),
        (400, 64, 8, 64),  # 58 rounded up to a multiple of 8 devices
        (100, 64, 8, 56),
        (7, 8, 8, 8),
    ],
)
def test_even_batch_size_needs_the_fewest_batches_and_pads_least(n, max_batch, multiple, expected):
    size = even_batch_size(n, max_batch, multiple)
    assert size == expected
    batches = -(-n // size)
    assert batches == -(-n // max_batch)  # no more batches than max_batch needs
    assert size % multiple == 0 and size <= max_batch
    assert batches * size - n < batches * multiple  # each batch pads less than one multiple


def test_even_batch_size_rejects_bad_arguments():
    for args in [(0, 64, 1), (10, 0, 1), (10, 60, 8), (10, 8, 0)]:
        with pytest.raises(ValueError, match="even_batch_size"):
            even_batch_size(*args)


def test_concat_source_indexes_its_sources_one_after_the_other(tmp_path):
    splits = image_folder_splits(small_synthetic(tmp_path))
    train, val = splits["train"], splits["val"]
    both = ConcatSource(train, val)
    assert len(both) == len(train) + len(val) == 30 and both.classes == train.classes
    for index, (source, local) in {0: (train, 0), 20: (train, 20), 21: (val, 0), 29: (val, 8)}.items():
        assert both.describe(index) == source.describe(local)
        image, label = both.load(index)
        expected, expected_label = source.load(local)
        assert label == expected_label and np.array_equal(np.asarray(image), np.asarray(expected))
    for index in (-1, 30):
        with pytest.raises(IndexError, match=f"index {index} is outside the 30 examples"):
            both.describe(index)
    loader = Loader(both, EvalTransform(SMALL), batch_size=even_batch_size(len(both), 8), shuffle=False)
    assert len(loader) == 4 and sorted(epoch_indices(loader, 0)) == [-1, -1, *range(30)]


# --- worker processes ----------------------------------------------------------------------------


def batches_equal(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("images", "labels", "mask", "indices"))


def test_process_workers_give_the_thread_workers_batches_byte_for_byte(folder):
    transform = TrainTransform(SMALL, random_resized_crop=True, flip_p=0.5)
    make = lambda kind: Loader(folder, transform, batch_size=8, shuffle=True, seed=4, num_workers=2, worker_type=kind)
    with make("process") as processes, make("thread") as threads:
        for epoch in (0, 1, 2):  # three epochs: every shared-memory slot is reused
            a, b = list(processes.epoch(epoch)), list(threads.epoch(epoch))
            assert len(a) == len(b) == 3 and all(map(batches_equal, a, b))
        assert not a[-1].images[5:].any()  # the padding rows of a reused slot are zero
        resumed = list(processes.epoch(1, start_batch=2))
        assert batches_equal(resumed[0], list(threads.epoch(1))[2])
        # An epoch left after one batch: its queued work is cancelled or waited for, not mixed into the next.
        abandoned = processes.epoch(7)
        next(abandoned)
        del abandoned
        assert all(map(batches_equal, processes.epoch(2), threads.epoch(2)))
        assert type(processes._workers).__name__ == "ProcessWorkers"


def test_process_workers_stop_at_or_skip_bad_files_as_threads_do(tmp_path, caplog):
    bad = hostile_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    with Loader(
        folder, EvalTransform(SMALL), batch_size=4, shuffle=False, num_workers=2, worker_type="process"
    ) as loader:
        with pytest.raises(DataError, match="3x.jpg: an empty"):
            list(loader.epoch(0))
    make = lambda kind: Loader(
        folder, EvalTransform(SMALL), batch_size=4, shuffle=True, skip_bad_files=True, num_workers=2, worker_type=kind
    )
    with make("process") as processes, make("thread") as threads:
        for epoch in (0, 1):
            assert all(map(batches_equal, processes.epoch(epoch), threads.epoch(epoch)))
        assert sorted(processes.skipped) == sorted(threads.skipped) == sorted(bad + bad)
    assert caplog.text.count("skipped") >= 4  # logged in the main process


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_loader_of_some_rows_yields_those_rows_of_every_batch(folder, kind):
    # As each process of a multi-process run loads the rows its devices hold.
    transform = TrainTransform(SMALL, random_resized_crop=True, flip_p=0.5)
    make = lambda rows: Loader(
        folder, transform, batch_size=8, shuffle=True, seed=2, num_workers=2, worker_type=kind, rows=rows
    )
    whole = list(make(None).epoch(1))
    with make(slice(2, 6)) as part:
        rows = list(part.epoch(1))
    assert len(rows) == len(whole) == 3
    for a, b in zip(rows, whole):
        assert a.images.shape == (4, 32, 32, 3)
        for field in ("images", "labels", "mask", "indices"):
            assert np.array_equal(getattr(a, field), getattr(b, field)[2:6])
    with pytest.raises(ValueError, match="is not a non-empty contiguous range of a batch of 8"):
        make(slice(8, 9))


def test_closing_process_workers_frees_their_shared_memory(folder):
    from multiprocessing.shared_memory import SharedMemory

    loader = Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=False, num_workers=2, worker_type="process")
    first = list(loader.epoch(0))
    name = loader._workers.memory.name
    loader.close()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)
    assert all(map(batches_equal, first, loader.epoch(0)))  # a later epoch starts new workers
    name = loader._workers.memory.name
    del loader  # never closed: collecting it frees the memory too
    gc.collect()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)


def test_a_killed_worker_process_is_one_clear_error(folder):
    loader = Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=False, num_workers=2, worker_type="process")
    with loader:
        list(loader.epoch(0))
        for process in loader._workers.pool._processes.values():
            os.kill(process.pid, 9)
        with pytest.raises(DataError, match=r"loader worker process for ImageFolder\(.*stopped: killed"):
            list(loader.epoch(1))


def unpicklable_transform(preprocessing):
    transform = EvalTransform(preprocessing)
    return type(
        "Local", (), {"output_size": transform.output_size, "__call__": lambda self, image, rng: transform(image)}
    )()


def test_auto_workers_are_processes_from_four_workers_where_they_can_run(folder, monkeypatch, caplog):
    from jaxtl.data import workers as worker_module  # PROCESS_WORKERS_FROM, and the shutil it asks about /dev/shm

    assert worker_module.PROCESS_WORKERS_FROM == 4
    kinds = {}
    for name, workers, transform in (
        ("three", 3, EvalTransform(SMALL)),
        ("four", 4, EvalTransform(SMALL)),
        ("unpicklable", 4, unpicklable_transform(SMALL)),
    ):
        with Loader(folder, transform, batch_size=8, shuffle=False, num_workers=workers, worker_type="auto") as loader:
            batches = list(loader.epoch(0))
            kinds[name] = type(loader._workers).__name__
        assert sum(int(b.mask.sum()) for b in batches) == len(folder)
    assert kinds == {"three": "ThreadWorkers", "four": "ProcessWorkers", "unpicklable": "ThreadWorkers"}
    with pytest.raises(DataError, match="worker_type='process' needs a source and transform that pickle.*Local"):
        list(Loader(folder, unpicklable_transform(SMALL), batch_size=8, shuffle=False, worker_type="process").epoch(0))

    # A container's small /dev/shm: writing past it would kill the process with SIGBUS.
    usage = worker_module.shutil.disk_usage("/")
    monkeypatch.setattr(worker_module.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    caplog.set_level("INFO", logger="jaxtl.data.loader")
    with Loader(
        folder, EvalTransform(SMALL), batch_size=256, shuffle=False, num_workers=4, worker_type="auto"
    ) as loader:
        next(loader.epoch(0))
        assert type(loader._workers).__name__ == "ThreadWorkers"
    assert "threads, not processes: /dev/shm has 1 MiB free" in caplog.text
    with pytest.raises(DataError, match=r"/dev/shm has 1 MiB free .* need 2 MiB \(3 batches of 256\).*--shm-size"):
        next(Loader(folder, EvalTransform(SMALL), batch_size=256, shuffle=False, worker_type="process").epoch(0))
    with pytest.raises(ValueError, match="worker_type='fibre' is not one of"):
        Loader(folder, EvalTransform(SMALL), batch_size=8, shuffle=False, worker_type="fibre")


# --- tfds ------------------------------------------------------------------------------------------


def test_tfds_source_through_the_loader():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=11):
        source = TfdsSource("tf_flowers", "train")
        assert source.classes == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
        assert len(source) == 11
        image, label = source.load(3)
        assert image.mode == "RGB" and 0 <= label < 5
        loader = Loader(source, EvalTransform(SMALL), batch_size=4, shuffle=True)
        batches = list(loader.epoch(0))
        with Loader(
            source, EvalTransform(SMALL), batch_size=4, shuffle=True, num_workers=2, worker_type="process"
        ) as p:
            assert all(map(batches_equal, p.epoch(0), batches))
    indices = np.concatenate([b.indices for b in batches])
    assert sorted(indices[indices >= 0]) == list(range(11))
    assert batches[0].images.shape == (4, 32, 32, 3)


def test_a_tfds_split_goes_through_the_decoded_cache_as_through_the_loader(tmp_path):
    import tensorflow_datasets as tfds

    from jaxtl.data import CachedEvalTransform, DecodedCache
    from jaxtl.data.cache import cache_key

    with tfds.testing.mock_data(num_examples=9):
        source = TfdsSource("tf_flowers", "train")
        cached = DecodedCache(tmp_path).build(source, SMALL, num_workers=0, progress=False)
        assert cached.classes == source.classes and len(cached) == 9
        direct = list(Loader(source, EvalTransform(SMALL), batch_size=4, shuffle=False).epoch(0))
        from_cache = list(Loader(cached, CachedEvalTransform(SMALL), batch_size=4, shuffle=False).epoch(0))
        assert all(map(batches_equal, from_cache, direct))
        # The key names the split (and the dataset's version and files): another split is another entry.
        assert cache_key(source, SMALL) != cache_key(TfdsSource("tf_flowers", "train[:5]"), SMALL)
        assert DecodedCache(tmp_path).build(source, SMALL, num_workers=0, progress=False).path == cached.path


def test_tfds_errors_name_the_dataset(tmp_path):
    with pytest.raises(DataError, match="'no_such_dataset_xyz' is not in the tfds catalog"):
        TfdsSource("no_such_dataset_xyz", "train", data_dir=tmp_path)
    with pytest.raises(
        DataError,
        match=r"split 'train' cannot be read .*splits: none prepared.*jaxtl data prepare tf_flowers --data-dir",
    ):
        TfdsSource("tf_flowers", "train", data_dir=tmp_path)
