"""WebDatasetSource against the webdataset package: the same samples, keys, pixels and labels; shard-wise epochs."""

import gzip
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import skimage.data
import webdataset
from PIL import Image

from jaxtl.data import EvalTransform, Loader
from jaxtl.data.sources.webdataset import WebDatasetSource, expand_braces
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

SMALL = Preprocessing(resize_size=40, crop_size=32)
PHOTOS = os.path.dirname(skimage.data.__file__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def photo(name: str) -> bytes:
    with open(os.path.join(PHOTOS, name), "rb") as f:
        return f.read()


def generated(mode: str, image_format: str, offset: int = 0) -> bytes:
    """A small crop of a photograph in ``mode`` (L, RGBA with an alpha gradient, P), encoded as ``image_format``."""
    image = Image.open(os.path.join(PHOTOS, "chelsea.png")).convert("RGB")
    image = image.crop((100 + offset, 60, 160 + offset, 105)).resize((30, 22))
    if mode == "P":
        image = image.quantize(16)
    elif mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    else:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def write_shard(path, samples) -> str:
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def three_shards(tmp_path) -> list[str]:
    """train-000..002.tar: JPEG photographs and small PNG/WebP images of modes L, RGBA and P; .cls and .json."""
    shards = [
        [
            {"__key__": "s000", "jpg": photo("rocket.jpg"), "cls": 0},
            {"__key__": "s001", "png": generated("L", "PNG"), "cls": 2},
            {"__key__": "s002", "webp": generated("RGBA", "WEBP"), "cls": 1},
        ],
        [
            {"__key__": "s003", "png": generated("P", "PNG"), "json": {"label": 1}},
            {"__key__": "s004", "jpg": photo("hubble_deep_field.jpg"), "cls": 3},
            {"__key__": "s005", "webp": generated("L", "WEBP", 5), "cls": 0, "txt": "a caption"},
        ],
        [
            {"__key__": "s006", "png": generated("RGBA", "PNG", 9), "cls": 1},
            {"__key__": "s007", "jpg": photo("retina.jpg"), "json": {"label": 2, "other": 5}},
            {"__key__": "s008", "jpg": generated("L", "JPEG"), "cls": 2},
        ],
    ]
    return [write_shard(tmp_path / f"train-{number:03d}.tar", samples) for number, samples in enumerate(shards)]


def reference(urls, label_of=lambda sample: sample["cls"] if "cls" in sample else sample["json"]["label"], keep=None):
    """(url, key, RGB pixels, label) of every sample (that ``keep``s) as webdataset reads and decodes them."""
    samples = []
    for sample in webdataset.WebDataset(urls, shardshuffle=False).select(keep or bool).decode("pil"):
        image = sample[next(key for key in IMAGE_KEYS if key in sample)]
        samples.append((sample["__url__"], sample["__key__"], np.asarray(image.convert("RGB")), label_of(sample)))
    return samples


def assert_same_samples(source, expected, to_label=lambda label: label):
    assert len(source) == len(expected)
    for index, (url, key, pixels, label) in enumerate(expected):
        image, loaded = source.load(index)
        assert source.describe(index) == f"{url}:{key}"
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels, err_msg=source.describe(index))
        np.testing.assert_array_equal(loaded, to_label(label))


# --- samples, as webdataset reads them ---------------------------------------------------------


def test_samples_are_webdatasets_in_order_with_the_same_keys_pixels_and_labels(tmp_path):
    three_shards(tmp_path)
    pattern = str(tmp_path / "train-{000..002}.tar")
    source = WebDatasetSource(pattern)
    expected = reference(pattern)
    assert [key for _, key, _, _ in expected] == [f"s{number:03d}" for number in range(9)]
    assert_same_samples(source, expected)
    assert source.classes == ("0", "1", "2", "3") and not source.multilabel and source.problems == []
    np.testing.assert_array_equal(source.labels(), [label for *_, label in expected])
    assert source.labels().dtype == np.int64


def test_members_are_grouped_into_samples_as_webdataset_groups_them(tmp_path):
    path = tmp_path / "odd.tar"
    jpeg, png = generated("RGB", "JPEG"), generated("P", "PNG")
    with tarfile.open(path, "w") as tar:

        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname = "a/b.c/x.jpg"
            tar.addfile(info, io.BytesIO(data))

        add("a", kind=tarfile.DIRTYPE)
        add("__info__", b"metadata")
        add("__meta__/m.jpg", jpeg)
        add("a/b.c/x.jpg", jpeg)  # key a/b.c/x: the key ends at the first dot of the file name
        add("a/b.c/x.cls", b"1")
        add("noextension", b"passed over")
        add("link.jpg", kind=tarfile.SYMTYPE)
        add(".hidden.jpg", jpeg)
        add("_under.PNG", png)  # extensions are lowercased
        add("_under.Cls", b" 0\n")
        add("x.jpg", png)  # a new key starts a new sample; x.jpg holds a PNG (PIL reads the bytes)
        add("x.cls", b"2")
        add("a/b.c/x.json", b'{"label": 1}')  # the key again, not next to its members: a sample of its own
        add("a/b.c/x.png", png)
    expected = reference(str(path))
    assert [key for _, key, _, _ in expected] == ["a/b.c/x", "_under", "x", "a/b.c/x"]
    assert_same_samples(WebDatasetSource(str(path)), expected)


def test_multi_label_json_lists_give_multi_hot_vectors(tmp_path):
    labels = [[0, 2], [1], [], [3, 0, 1], 2]  # a single label among lists is a list of one
    samples = [
        {"__key__": f"m{i}", "png": generated("RGB", "PNG", i), "json": {"tags": t}} for i, t in enumerate(labels)
    ]
    urls = [write_shard(tmp_path / "a.tar", samples[:3]), write_shard(tmp_path / "b.tar", samples[3:])]
    source = WebDatasetSource(urls, json_label_field="tags")
    expected = reference(urls, label_of=lambda sample: sample["json"]["tags"])
    assert source.multilabel and source.classes == ("0", "1", "2", "3")

    def multi_hot(label):
        vector = np.zeros(4, np.uint8)
        vector[label] = 1
        return vector

    assert_same_samples(source, expected, multi_hot)
    assert source.load(0)[1].dtype == np.uint8
    np.testing.assert_array_equal(source.labels(), [multi_hot(label) for *_, label in expected])
    assert source.labels().dtype == np.uint8


def test_class_names_in_json_and_cls_follow_the_given_classes_or_sort(tmp_path):
    names = ["cat", "dog", "cat", "bird"]
    samples = [{"__key__": f"n{i}", "png": generated("L", "PNG", i), "json": {"label": n}} for i, n in enumerate(names)]
    url = write_shard(tmp_path / "names.tar", samples)
    assert WebDatasetSource(url).classes == ("bird", "cat", "dog")
    np.testing.assert_array_equal(WebDatasetSource(url).labels(), [1, 2, 1, 0])
    classes = ("dog", "cat", "bird")
    source = WebDatasetSource(url, classes=classes)
    assert source.class_to_idx == {"dog": 0, "cat": 1, "bird": 2}
    assert_same_samples(source, reference(url), lambda name: classes.index(name))
    cls = write_shard(tmp_path / "cls.tar", [{"__key__": "c0", "png": generated("L", "PNG"), "cls": "bird"}])
    assert WebDatasetSource(cls, classes=classes).load(0)[1] == 2
    with pytest.raises(DataError, match=r"cls.tar:c0.cls: label 'bird' is not an integer; give classes="):
        WebDatasetSource(cls)


def test_shards_from_a_brace_pattern_a_list_or_a_directory(tmp_path):
    urls = three_shards(tmp_path)
    (tmp_path / "notes.txt").write_text("not a shard")
    by_pattern = WebDatasetSource(str(tmp_path / "train-{000..002}.tar"))
    by_list = WebDatasetSource([urls[2], urls[0]])
    by_directory = WebDatasetSource(tmp_path)
    assert [str(path) for path in by_pattern.shards] == urls
    assert [str(path) for path in by_directory.shards] == urls
    assert [str(path) for path in by_list.shards] == [urls[2], urls[0]]
    assert_same_samples(by_list, reference([urls[2], urls[0]]))
    joined = WebDatasetSource(f"{urls[1]}::{tmp_path}/train-{{000,002}}.tar")  # webdataset's "::" joins patterns
    assert [str(path) for path in joined.shards] == [urls[1], urls[0], urls[2]]


@pytest.mark.parametrize(
    "pattern",
    [
        "train-{000000..000011}.tar",
        "{0..10}",
        "{4..1}",
        "{1..9..3}",
        "{-2..2}",
        "{07..10}",
        "{a..e..2}",
        "x{a,b{1..2},}y",
        "a{b,c}d{e,f}",
        "{x}",
        "{}",
        "plain.tar",
        "{0..2}{a,b}",
        "{x{1,2}}",
        "{Z..a}",
        "{c..A..2}",
    ],
)
def test_brace_expansion_is_braceexpands(pattern):
    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))


def test_unbalanced_braces_and_missing_or_empty_shards_are_named(tmp_path):
    with pytest.raises(DataError, match="unbalanced braces"):
        WebDatasetSource(str(tmp_path / "train-{0..2.tar"))
    with pytest.raises(DataError, match=r"shard .*missing-1.tar does not exist"):
        WebDatasetSource(str(tmp_path / "missing-{1..2}.tar"))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"shard .*zero.tar is empty"):
        WebDatasetSource(tmp_path / "zero.tar")
    with pytest.raises(DataError, match=r"empty.tar has no samples"):
        WebDatasetSource(write_shard(tmp_path / "empty.tar", []))
    with pytest.raises(DataError, match=r"shard .*no-shards does not exist"):
        WebDatasetSource(tmp_path / "no-shards")  # not a folder: a pattern without braces
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder has no \*.tar files"):
        WebDatasetSource(tmp_path / "folder")


def test_a_compressed_shard_is_refused_with_what_to_do(tmp_path):
    url = write_shard(tmp_path / "a.tar", [{"__key__": "k", "png": generated("L", "PNG"), "cls": 0}])
    with open(url, "rb") as f, open(tmp_path / "a.tar.gz", "wb") as out:
        out.write(gzip.compress(f.read()))
    with pytest.raises(DataError, match=r"a.tar.gz is not an uncompressed tar file .* decompress it"):
        WebDatasetSource(tmp_path / "a.tar.gz")


# --- bad samples -------------------------------------------------------------------------------

BAD_SAMPLES = {
    "no-image": ({"txt": "caption only", "cls": 0}, r"no image member \(members: cls, txt; image_keys: jpg, jpeg"),
    "no-label": ({"png": generated("L", "PNG")}, r"no label \(neither a .cls nor a .json member\)"),
    "out-of-range": ({"png": generated("L", "PNG"), "cls": 7}, r"label 7 is outside the 3 classes \[0, 3\)"),
    "unknown-name": (
        {"png": generated("L", "PNG"), "json": {"label": "fish"}},
        r"label 'fish' is not one of the classes \(a, b, c\)",
    ),
    "bad-json": (
        {"png": generated("L", "PNG"), "json": {"tag": 1}},
        r"\.json has no field 'label' \(json_label_field\)",
    ),
}


def shard_with(tmp_path, bad_keys) -> str:
    """good-0, then each bad sample followed by a good one."""
    samples = [{"__key__": "good-0", "png": generated("RGB", "PNG"), "cls": 1}]
    for number, key in enumerate(bad_keys, 1):
        samples += [
            {"__key__": key, **BAD_SAMPLES[key][0]},
            {"__key__": f"good-{number}", "jpg": generated("RGB", "JPEG", number), "cls": 2},
        ]
    return write_shard(tmp_path / "bad.tar", samples)


@pytest.mark.parametrize("key", BAD_SAMPLES)
def test_a_bad_sample_is_one_error_naming_the_shard_key_and_what_to_do(tmp_path, key):
    url = shard_with(tmp_path, [key])
    with pytest.raises(DataError, match=BAD_SAMPLES[key][1]) as error:
        WebDatasetSource(url, classes=("a", "b", "c"))
    assert str(error.value).startswith(f"{url}:{key}") and "skip_bad_samples=True" in str(error.value)


def test_skipping_bad_samples_lists_them_and_loads_the_rest(tmp_path):
    url = shard_with(tmp_path, list(BAD_SAMPLES))
    source = WebDatasetSource(url, classes=("a", "b", "c"), skip_bad_samples=True)
    assert len(source.problems) == len(BAD_SAMPLES)
    for key, (_, message) in BAD_SAMPLES.items():  # the labels are checked once every shard is read: in two passes
        assert sum(problem.startswith(f"{url}:{key}") for problem in source.problems) == 1
        assert any(re.search(message, problem) for problem in source.problems)
    good = reference(url, keep=lambda sample: sample["__key__"].startswith("good"))
    assert_same_samples(source, good)
    assert len(source) == len(BAD_SAMPLES) + 1


def truncated_copy(tmp_path, url, where: str) -> str:
    """A copy of ``url`` cut inside the data of its last image, or just before the header of its last member."""
    with tarfile.open(url) as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
        last = tar.getmembers()[-1]
    cut = last_image.offset_data + last_image.size // 2 if where == "data" else last.offset
    path = tmp_path / f"cut-{where}.tar"
    with open(url, "rb") as f:
        path.write_bytes(f.read()[:cut])
    return str(path)


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_truncated_shard_is_an_error_or_keeps_its_complete_samples(tmp_path, where):
    samples = [{"__key__": f"k{i}", "jpg": generated("RGB", "JPEG", i), "cls": i % 2} for i in range(5)]
    url = write_shard(tmp_path / "whole.tar", samples)
    cut = truncated_copy(tmp_path, url, where)
    with pytest.raises(DataError, match=rf"{cut} is truncated.*write the shard again, or pass skip_bad_samples=True"):
        WebDatasetSource(cut)
    source = WebDatasetSource([cut, url], skip_bad_samples=True)
    assert len(source.problems) == 1 and source.problems[0].startswith(f"{cut} is truncated")
    assert "kept its first 4 complete samples" in source.problems[0]
    whole = reference(url)
    assert_same_samples(source, [(cut, *rest) for _, *rest in whole[:4]] + whole)


def test_undecodable_or_oversized_images_fail_at_load_naming_shard_and_key(tmp_path):
    jpeg = generated("RGB", "JPEG")
    url = write_shard(
        tmp_path / "images.tar",
        [
            {"__key__": "garbage", "jpg": b"not an image at all", "cls": 0},
            {"__key__": "cut", "jpg": jpeg[: len(jpeg) // 2], "cls": 0},
            {"__key__": "fine", "jpg": jpeg, "cls": 1},
        ],
    )
    source = WebDatasetSource(url)
    with pytest.raises(DataError, match=rf"^{url}:garbage: not an image PIL can read \(19 bytes\)"):
        source.load(0)
    with pytest.raises(DataError, match=rf"^{url}:cut: cannot decode the image .*truncated or corrupt"):
        source.load(1)
    assert source.load(2)[0].size == (30, 22)
    with pytest.raises(DataError, match=rf"^{url}:fine: 30x22 = 660 pixels exceeds the limit of 600"):
        WebDatasetSource(url, max_pixels=600).load(2)


def test_class_indices_and_names_mixed_without_classes_are_refused(tmp_path):
    url = write_shard(
        tmp_path / "mixed.tar",
        [
            {"__key__": "i", "png": generated("L", "PNG"), "cls": 1},
            {"__key__": "n", "png": generated("L", "PNG"), "json": {"label": "cat"}},
        ],
    )
    with pytest.raises(DataError, match=rf"mix class indices \({url}:i: 1\) and class names \({url}:n: 'cat'\)"):
        WebDatasetSource(url)


# --- epochs shard by shard, the loader, pickling -----------------------------------------------


@pytest.fixture
def uneven_shards(tmp_path) -> WebDatasetSource:
    """Shards of 5, 1, 6, 0 (its one sample is bad, skipped) and 3 samples."""
    sizes, number, urls = [5, 1, 6, 1, 3], 0, []
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append({"__key__": f"k{number:02d}", "png": generated("L", "PNG", number), "cls": number % 3})
            number += 1
        if shard == 3:
            del samples[0]["cls"]
        urls.append(write_shard(tmp_path / f"u-{shard}.tar", samples))
    return WebDatasetSource(urls, skip_bad_samples=True)


def test_an_epoch_reads_shard_after_shard_in_an_order_of_seed_and_epoch(uneven_shards):
    source = uneven_shards
    assert len(source) == 15 and len(source.problems) == 1
    starts = np.cumsum([0, 5, 1, 6, 0, 3])
    shard_of = lambda index: source.shards.index(Path(source.describe(index).rsplit(":", 1)[0]))
    orders = {}
    for seed, epoch in [(3, 0), (3, 1), (3, 2), (4, 0)]:
        order = source.epoch_order(seed, epoch)
        assert order.dtype == np.int64 and sorted(order) == list(range(15))
        expected = []
        for shard in np.random.default_rng([seed, epoch]).permutation(5):
            n = starts[shard + 1] - starts[shard]
            expected += list(starts[shard] + np.random.default_rng([seed, epoch, shard]).permutation(n))
        np.testing.assert_array_equal(order, expected)
        shards = [shard_of(index) for index in order]
        runs = sum(1 for before, shard in zip([None, *shards], shards) if shard != before)
        assert runs == len(set(shards)) == 4  # each shard's samples one after another (the empty shard has none)
        np.testing.assert_array_equal(source.epoch_order(seed, epoch), order)
        orders[seed, epoch] = tuple(order)
    assert len(set(orders.values())) == 4


def test_a_shuffled_loader_follows_the_sources_epoch_order(uneven_shards):
    source = uneven_shards
    transform = EvalTransform(SMALL)
    with Loader(source, transform, batch_size=4, shuffle=True, seed=3, num_workers=2) as loader:
        for epoch in (0, 1):
            batches = list(loader.epoch(epoch))
            indices = np.concatenate([batch.indices for batch in batches])
            np.testing.assert_array_equal(indices[:15], source.epoch_order(3, epoch))
            assert list(indices[15:]) == [-1]
            labels = np.concatenate([batch.labels for batch in batches])[:15]
            np.testing.assert_array_equal(labels, source.labels()[indices[:15]])
        for row, index in enumerate(batches[0].indices):
            np.testing.assert_array_equal(batches[0].images[row], transform(source.load(int(index))[0]))


def test_pickles_without_open_files_or_images_and_loads_the_same_after(uneven_shards):
    source = uneven_shards
    first = source.load(7)  # a shard is open in this thread now
    blob = pickle.dumps(source)
    assert len(blob) < 4000  # the index, not the images (15 PNGs)
    restored = pickle.loads(blob)
    assert restored.fingerprint() == source.fingerprint() and restored.problems == source.problems
    np.testing.assert_array_equal(restored.labels(), source.labels())
    np.testing.assert_array_equal(restored.epoch_order(1, 2), source.epoch_order(1, 2))
    for index in range(len(source)):
        image, label = restored.load(index)
        assert np.array_equal(np.asarray(image), np.asarray(source.load(index)[0])) and label == source.load(index)[1]
    assert np.array_equal(np.asarray(restored.load(7)[0]), np.asarray(first[0]))


def test_process_workers_give_the_thread_workers_batches(tmp_path):
    source = WebDatasetSource(three_shards(tmp_path))
    make = lambda kind: Loader(
        source, EvalTransform(SMALL), batch_size=4, shuffle=True, seed=1, num_workers=2, worker_type=kind
    )
    with make("process") as processes, make("thread") as threads:
        for ours, theirs in zip(processes.epoch(0), threads.epoch(0), strict=True):
            for field in ("images", "labels", "mask", "indices"):
                np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))


def test_fingerprint_changes_with_a_shard_or_the_label_settings(tmp_path):
    urls = three_shards(tmp_path)
    source = WebDatasetSource(urls)
    assert WebDatasetSource(tmp_path).fingerprint() == source.fingerprint()
    assert WebDatasetSource(urls, image_keys=("png", "webp", "jpg")).fingerprint() != source.fingerprint()
    assert WebDatasetSource(urls, classes="abcd").fingerprint() != source.fingerprint()
    stat = os.stat(urls[1])
    os.utime(urls[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, same size
    assert WebDatasetSource(urls).fingerprint() != source.fingerprint()
    assert repr(source) == f"WebDatasetSource({urls[0]!r} .. {urls[2]!r}: 9 samples in 3 shards, 4 classes)"
