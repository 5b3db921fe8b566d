"""The decoded-image cache against the PIL path: same batches, keys, reuse, atomic builds, bad files, budget."""

import io
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from jaxtl.data import (
    CachedEvalTransform,
    CachedSource,
    ConcatSource,
    DecodedCache,
    EvalTransform,
    ImageFolder,
    Loader,
    cache_key,
    generate_synthetic,
)
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

BILINEAR = Preprocessing(resize_size=40, crop_size=32)
BICUBIC = Preprocessing(resize_size=40, crop_size=32, interpolation="bicubic")
PADDED = Preprocessing(resize_size=40, crop_size=48)  # the crop is larger than the resized image: zero padding
BIG = 1 << 30


def smooth_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A (width, height) image with structure at every scale, so that resampling errors would show."""
    rng = np.random.default_rng(seed)
    noise = np.cumsum(np.cumsum(rng.normal(0, 3, (size[1], size[0], 4)), axis=0), axis=1)
    array = np.clip(128 + noise - noise.mean(axis=(0, 1)), 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(array, "RGBA")


def mixed_folder(tmp_path: Path) -> Path:
    """Generated JPEGs of several sizes and aspect ratios, plus odd-sized JPEG, PNG, grayscale and RGBA files."""
    root = generate_synthetic(
        tmp_path / "synthetic", seed=0, num_classes=3, train_per_class=4, val_per_class=1, min_size=33, max_size=97
    )
    train = root / "train"
    smooth_image((91, 37), 1).save(train / "circle" / "wide.jpg", quality=85)
    smooth_image((37, 91), 2).save(train / "circle" / "tall.JPEG", quality=95)
    smooth_image((53, 41), 3).save(train / "square" / "odd.png")
    smooth_image((45, 45), 4, "L").save(train / "square" / "gray.png")
    smooth_image((61, 29), 5, "RGBA").save(train / "checkerboard" / "alpha.png")
    smooth_image((17, 23), 6).save(train / "checkerboard" / "tiny.jpg")  # upsampled by the resize
    smooth_image((40, 66), 7).save(train / "checkerboard" / "exact.png")  # shorter side already resize_size
    return train


def batches_of(source, transform, **kwargs) -> list:
    args = dict(batch_size=5, shuffle=True, seed=3, num_workers=2, worker_type="thread") | kwargs
    with Loader(source, transform, **args) as loader:
        return [batch for epoch in (0, 1) for batch in loader.epoch(epoch)], loader.skipped


def assert_same_batches(cached: list, pil: list) -> None:
    assert len(cached) == len(pil)
    for a, b in zip(cached, pil):
        assert a.images.dtype == b.images.dtype == np.uint8
        for field in ("images", "labels", "mask", "indices"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


class CountingFolder(ImageFolder):
    """An ImageFolder that counts its decodes and, with ``fail_at``, raises at that index as a kill would."""

    def __init__(self, root, fail_at: int | None = None):
        super().__init__(root)
        self.loads, self.fail_at = 0, fail_at

    def load(self, index):
        if index == self.fail_at:
            raise RuntimeError(f"interrupted at {index}")
        self.loads += 1
        return super().load(index)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in (".locks", ".lock"))


# --- the cached batches are the PIL path's ----------------------------------------------------------


@pytest.mark.parametrize("preprocessing", [BILINEAR, BICUBIC, PADDED], ids=["bilinear", "bicubic", "padded"])
def test_cached_eval_batches_equal_the_pil_paths_bit_for_bit(tmp_path, preprocessing):
    folder = ImageFolder(mixed_folder(tmp_path))
    cached = DecodedCache(budget_bytes=BIG).build(folder, preprocessing, num_workers=0)
    assert len(cached) == len(folder) == 19 and cached.classes == folder.classes
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    for index in range(len(folder)):  # each stored image is PIL's resize of the decoded file
        image, label = cached.load(index)
        original = Image.open(folder.samples[index][0]).convert("RGB")
        short, long = sorted(original.size)
        size = (40, int(40 * long / short)) if original.width == short else (int(40 * long / short), 40)
        expected = original if original.size == size else original.resize(size, resample[preprocessing.interpolation])
        assert np.array_equal(image, np.asarray(expected)) and label == folder.samples[index][1]
    cached_batches, _ = batches_of(cached, CachedEvalTransform(preprocessing))
    pil_batches, _ = batches_of(folder, EvalTransform(preprocessing))
    assert_same_batches(cached_batches, pil_batches)


def test_built_with_processes_and_read_by_processes_equals_the_pil_path(tmp_path):
    folder = ImageFolder(mixed_folder(tmp_path))
    cached = DecodedCache(budget_bytes=BIG).build(folder, BILINEAR, num_workers=2)
    cached_batches, _ = batches_of(cached, CachedEvalTransform(BILINEAR), worker_type="process")
    pil_batches, _ = batches_of(folder, EvalTransform(BILINEAR))
    assert_same_batches(cached_batches, pil_batches)


def test_a_cached_source_pickles_as_its_path(tmp_path):
    folder = ImageFolder(mixed_folder(tmp_path))
    cached = DecodedCache(budget_bytes=BIG).build(folder, BILINEAR, num_workers=0)
    cached.load(0)  # opens the memory map, which must not travel
    payload = pickle.dumps(cached)
    assert len(payload) < 400
    copy = pickle.loads(payload)
    for index in range(len(folder)):
        expected = EvalTransform(BILINEAR)(folder.load(index)[0])
        assert np.array_equal(CachedEvalTransform(BILINEAR)(copy.load(index)[0]), expected)
    assert copy.describe(3) == folder.describe(3)


def test_a_transform_with_other_resize_settings_is_refused(tmp_path):
    folder = ImageFolder(mixed_folder(tmp_path))
    cached = DecodedCache(budget_bytes=BIG).build(folder, BILINEAR, num_workers=0)
    with pytest.raises(DataError, match="resize_size=64"):
        CachedEvalTransform(Preprocessing(resize_size=64, crop_size=32))(cached.load(0)[0])


# --- the key: reuse, rebuild ----------------------------------------------------------------------------


def test_a_second_build_reuses_the_entry_without_decoding(tmp_path):
    root = mixed_folder(tmp_path)
    first = CountingFolder(root)
    built = DecodedCache(budget_bytes=BIG).build(first, BILINEAR, num_workers=0)
    assert first.loads == len(first)
    second = CountingFolder(root)  # another run: a fresh source over the same files
    reused = DecodedCache(budget_bytes=BIG).build(second, BILINEAR, num_workers=0)
    assert second.loads == 0 and reused.path == built.path
    # The crop is taken when reading: another crop size shares the entry; another resize does not.
    assert cache_key(second, Preprocessing(resize_size=40, crop_size=24)) == cache_key(second, BILINEAR)
    assert cache_key(second, Preprocessing(resize_size=41, crop_size=32)) != cache_key(second, BILINEAR)
    assert cache_key(second, BICUBIC) != cache_key(second, BILINEAR)


def test_a_changed_added_or_removed_file_gives_another_key_and_a_rebuild(tmp_path):
    root = mixed_folder(tmp_path)
    cache = DecodedCache(budget_bytes=BIG)
    keys = [cache_key(ImageFolder(root), BILINEAR)]
    cache.build(ImageFolder(root), BILINEAR, num_workers=0)
    target = root / "square" / "odd.png"
    stat = target.stat()

    smooth_image((53, 41), 99).save(target)  # new bytes under the old mtime: the size differs
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    keys.append(cache_key(ImageFolder(root), BILINEAR))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # only the mtime changes
    keys.append(cache_key(ImageFolder(root), BILINEAR))
    smooth_image((20, 30), 8).save(root / "square" / "added.png")
    keys.append(cache_key(ImageFolder(root), BILINEAR))
    (root / "circle" / "wide.jpg").unlink()
    keys.append(cache_key(ImageFolder(root), BILINEAR))
    assert len(set(keys)) == len(keys)

    folder = CountingFolder(root)
    rebuilt = cache.build(folder, BILINEAR, num_workers=0)
    assert folder.loads == len(folder) == 19  # one added, one removed
    assert rebuilt.path.name == keys[-1] and len(cache.entries()) == 2
    for index in range(len(folder)):
        assert np.array_equal(
            CachedEvalTransform(BILINEAR)(rebuilt.load(index)[0]), EvalTransform(BILINEAR)(folder.load(index)[0])
        )


def test_concurrent_builds_of_one_key_decode_once(tmp_path):
    root = mixed_folder(tmp_path)
    folders = [CountingFolder(root), CountingFolder(root)]
    results = [None, None]

    def build(i):
        results[i] = DecodedCache(budget_bytes=BIG).build(folders[i], BILINEAR, num_workers=0)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(f.loads for f in folders) == [0, len(folders[0])]
    assert results[0].path == results[1].path


class Generated:
    """A source that is not a folder of files: it says what its images are with fingerprint()."""

    classes = ("a", "b")

    def __init__(self, version: str):
        self.version = version

    def __len__(self):
        return 4

    def load(self, index):
        return smooth_image((30 + 7 * index, 50 - 5 * index), index), index % 2

    def describe(self, index):
        return f"generated {index}"

    def fingerprint(self):
        return self.version


def test_concatenated_and_fingerprinted_sources_are_cached_as_the_pil_path_reads_them(tmp_path):
    root = mixed_folder(tmp_path)
    both = ConcatSource(ImageFolder(root), ImageFolder(root.parent / "val"))
    assert cache_key(both, BILINEAR) != cache_key(ImageFolder(root), BILINEAR)
    assert cache_key(Generated("1"), BILINEAR) != cache_key(Generated("2"), BILINEAR)
    for source in (both, Generated("1")):
        cached = DecodedCache(budget_bytes=BIG).build(source, BILINEAR, num_workers=0)
        assert len(cached) == len(source) and cached.describe(len(source) - 1) == source.describe(len(source) - 1)
        cached_batches, _ = batches_of(cached, CachedEvalTransform(BILINEAR))
        pil_batches, _ = batches_of(source, EvalTransform(BILINEAR))
        assert_same_batches(cached_batches, pil_batches)


CONCURRENT_BUILD = """
import sys, time
from jaxtl.data import DecodedCache, ImageFolder
from jaxtl.weights import Preprocessing

class Slow(ImageFolder):
    loads = 0

    def load(self, index):
        Slow.loads += 1
        time.sleep(0.05)  # long enough for both processes to be building at once
        return super().load(index)

entry = DecodedCache(sys.argv[2], budget_bytes=1 << 30).build(Slow(sys.argv[1]), Preprocessing(40, 32), num_workers=0)
print(Slow.loads, entry.path.name)
"""


def test_two_processes_building_one_key_decode_it_once(tmp_path):
    root = mixed_folder(tmp_path)
    cache = DecodedCache(tmp_path / "cache", budget_bytes=BIG)
    command = [sys.executable, "-c", CONCURRENT_BUILD, str(root), str(cache.root)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(process.communicate(timeout=120)[0].split() for process in processes)
    assert [process.returncode for process in processes] == [0, 0]
    key = cache_key(ImageFolder(root), BILINEAR)
    assert outputs == [["0", key], [str(len(ImageFolder(root))), key]]
    assert cache.entries() == [cache.root / key]


def test_a_source_without_a_fingerprint_cannot_be_cached(tmp_path):
    class Plain:
        classes = ("a",)

        def __len__(self):
            return 1

    with pytest.raises(DataError, match="cannot be cached.*fingerprint"):
        DecodedCache(budget_bytes=BIG).build(Plain(), BILINEAR)


# --- atomic builds ------------------------------------------------------------------------------------


def test_a_build_that_fails_midway_leaves_no_entry_and_the_next_succeeds(tmp_path):
    root = mixed_folder(tmp_path)
    cache = DecodedCache(budget_bytes=BIG)
    with pytest.raises(RuntimeError, match="interrupted at 11"):
        cache.build(CountingFolder(root, fail_at=11), BILINEAR, num_workers=0)
    assert cache.entries() == [] and leftovers(cache.root) == []
    folder = CountingFolder(root)
    cached = cache.build(folder, BILINEAR, num_workers=0)
    assert folder.loads == len(folder) and cache.entries() == [cached.path]


KILLED_BUILD = """
import os, signal, sys
from jaxtl.data import DecodedCache, ImageFolder
from jaxtl.weights import Preprocessing

class Killed(ImageFolder):
    def load(self, index):
        if index == 9:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(index)

DecodedCache(sys.argv[2], budget_bytes=1 << 30).build(Killed(sys.argv[1]), Preprocessing(40, 32), num_workers=0)
"""


def test_a_killed_build_leaves_nothing_that_loads(tmp_path):
    root = mixed_folder(tmp_path)
    cache = DecodedCache(tmp_path / "cache", budget_bytes=BIG)
    process = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(root), str(cache.root)], timeout=120)
    assert process.returncode == -signal.SIGKILL
    staged = leftovers(cache.root)
    assert len(staged) == 1 and staged[0].startswith(".staging-")  # the half-written entry, under its staging name
    assert cache.entries() == []
    with pytest.raises(DataError, match="not a complete decoded-cache entry"):
        CachedSource(cache.root / staged[0])
    cached = cache.build(ImageFolder(root), BILINEAR, num_workers=0)
    assert leftovers(cache.root) == [cached.path.name]  # the next build removed the staging directory


# --- bad files ------------------------------------------------------------------------------------------


def bad_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    root = mixed_folder(tmp_path)
    (root / "circle" / "3x.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    smooth_image((64, 48), 9).save(buffer, "JPEG")
    (root / "square" / "2x.jpg").write_bytes(buffer.getvalue()[:300])
    return root, [str(root / "circle" / "3x.jpg"), str(root / "square" / "2x.jpg")]


def test_a_broken_link_is_keyed_and_skipped_as_the_loader_skips_it(tmp_path):
    root = mixed_folder(tmp_path)
    (root / "circle" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    folder = ImageFolder(root)
    cached = DecodedCache(budget_bytes=BIG).build(folder, BILINEAR, skip_bad_files=True, num_workers=0)
    cached_batches, cached_skipped = batches_of(cached, CachedEvalTransform(BILINEAR), skip_bad_files=True)
    pil_batches, pil_skipped = batches_of(folder, EvalTransform(BILINEAR), skip_bad_files=True)
    assert_same_batches(cached_batches, pil_batches)
    assert cached_skipped == pil_skipped == [str(root / "circle" / "gone.jpg")] * 2


def test_a_bad_file_stops_the_build_with_its_name(tmp_path):
    root, bad = bad_folder(tmp_path)
    cache = DecodedCache(budget_bytes=BIG)
    with pytest.raises(DataError, match="3x.jpg: an empty"):
        cache.build(ImageFolder(root), BILINEAR, num_workers=0)
    assert cache.entries() == [] and leftovers(cache.root) == []


def test_skipped_bad_files_are_invalid_and_the_loader_treats_them_as_the_pil_path_does(tmp_path):
    root, bad = bad_folder(tmp_path)
    folder = ImageFolder(root)
    cached = DecodedCache(budget_bytes=BIG).build(folder, BILINEAR, skip_bad_files=True, num_workers=0)
    assert sorted(cached.describe(i) for i in cached.invalid) == sorted(bad)
    assert cached.meta["valid"] == len(folder) - 2
    cached_batches, cached_skipped = batches_of(cached, CachedEvalTransform(BILINEAR), skip_bad_files=True)
    pil_batches, pil_skipped = batches_of(folder, EvalTransform(BILINEAR), skip_bad_files=True)
    assert_same_batches(cached_batches, pil_batches)
    assert sorted(cached_skipped) == sorted(pil_skipped) == sorted(bad + bad)
    # Without skip_bad_files, reading the entry stops at the file with the PIL path's message.
    with pytest.raises(DataError) as from_cache:
        batches_of(cached, CachedEvalTransform(BILINEAR), shuffle=False)
    with pytest.raises(DataError) as from_files:
        batches_of(folder, EvalTransform(BILINEAR), shuffle=False)
    assert str(from_cache.value) == str(from_files.value) and bad[0] in str(from_cache.value)


# --- the budget -----------------------------------------------------------------------------------------


def same_sized_folders(tmp_path: Path, count: int) -> list[ImageFolder]:
    """Folders of equally sized images (so equally sized entries) with different pixels."""
    args = dict(num_classes=2, train_per_class=3, val_per_class=1, min_size=48, max_size=48)
    return [ImageFolder(generate_synthetic(tmp_path / f"set{k}", seed=k, **args) / "train") for k in range(count)]


def test_the_budget_evicts_the_least_recently_used_entry(tmp_path):
    a, b, c, d = same_sized_folders(tmp_path, 4)
    root = tmp_path / "cache"
    probe = DecodedCache(tmp_path / "probe").build(a, BILINEAR, num_workers=0)
    size = sum(f.stat().st_size for f in probe.path.iterdir())
    cache = DecodedCache(root, budget_bytes=int(2.5 * size))  # room for two entries
    entry_a = cache.build(a, BILINEAR, num_workers=0).path
    entry_b = cache.build(b, BILINEAR, num_workers=0).path
    assert cache.build(a, BILINEAR, num_workers=0).path == entry_a  # a is used again: b is now the oldest
    entry_c = cache.build(c, BILINEAR, num_workers=0).path
    assert cache.entries() == [entry_a, entry_c] and not entry_b.exists()
    # An entry that a build holds (its key's lock) is not evicted: the next oldest goes instead.
    with FileLock(root / ".locks" / f"{entry_a.name}.lock"):
        entry_d = cache.build(d, BILINEAR, num_workers=0).path
    assert cache.entries() == [entry_a, entry_d] and not entry_c.exists()


def test_an_entry_larger_than_the_budget_is_one_error_saying_how_to_raise_it(tmp_path):
    (folder,) = same_sized_folders(tmp_path, 1)
    cache = DecodedCache(tmp_path / "cache", budget_bytes=10_000)
    with pytest.raises(DataError, match=r"exceed the decoded cache's budget.*JAXTL_DECODED_CACHE_BUDGET"):
        cache.build(folder, BILINEAR, num_workers=0)
    assert cache.entries() == [] and leftovers(cache.root) == []


def test_the_budget_can_be_set_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_DECODED_CACHE_BUDGET", "3G")
    assert DecodedCache(tmp_path).budget_bytes == 3 << 30
    monkeypatch.setenv("JAXTL_DECODED_CACHE_BUDGET", "lots")
    with pytest.raises(DataError, match="JAXTL_DECODED_CACHE_BUDGET='lots'"):
        DecodedCache(tmp_path)
    monkeypatch.delenv("JAXTL_DECODED_CACHE_BUDGET")
    assert 0 < DecodedCache(tmp_path / "new").budget_bytes <= 50 << 30
