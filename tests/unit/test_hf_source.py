"""HFSource against the reference: what the ``datasets`` library itself gives for the same files."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from jaxtl.data import EvalTransform, Loader
from jaxtl.data.sources.hf import ROW_GROUPS_KEPT, HFSource, hf_splits
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

SMALL = Preprocessing(resize_size=40, crop_size=32)
NAMES = ["cat", "dog", "bird"]
PHOTOS = ["chelsea.png", "rocket.jpg", "logo.png", "coins.png", "page.png"]  # RGB, RGB, RGBA, L, L


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


def generated_images() -> list[tuple[str, bytes]]:
    """Small images of the modes torchvision's loader converts: L, RGBA, P, CMYK (JPEG), I;16, and a JPEG
    whose EXIF orientation (6: rotate) datasets applies."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8))
    rotated = Image.Exif()
    rotated[Image.ExifTags.Base.Orientation] = 6
    wide = np.arange(17 * 29, dtype=np.uint16).reshape(17, 29) * 97
    return [
        ("gray.png", encoded(rgb.convert("L"), "PNG")),
        ("alpha.png", encoded(Image.fromarray(rng.integers(0, 256, (13, 19, 4), dtype=np.uint8)), "PNG")),
        ("palette.png", encoded(rgb.convert("P"), "PNG")),
        ("cmyk.jpg", encoded(rgb.convert("CMYK"), "JPEG")),
        ("sixteen.png", encoded(Image.fromarray(wide), "PNG")),
        ("rotated.jpg", encoded(rgb, "JPEG", exif=rotated)),
    ]


@pytest.fixture(scope="module")
def images() -> list[dict]:
    """datasets' Image values ({bytes, path}): skimage photographs as their files' bytes, then generated ones."""
    folder = os.path.dirname(skimage.data.__file__)
    photos = [(name, open(os.path.join(folder, name), "rb").read()) for name in PHOTOS]
    return [{"bytes": data, "path": name} for name, data in photos + generated_images()]


def labelled(images: list[dict], **columns) -> datasets.Dataset:
    """A Dataset of ``images`` labelled cat, dog, bird, cat, ...; ``columns`` (and their ``features``) added."""
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)} | columns.pop("features", {})
    data = {"image": images, "label": [i % len(NAMES) for i in range(len(images))]} | columns
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


@pytest.fixture(scope="module")
def saved(images, tmp_path_factory) -> str:
    """A DatasetDict saved with save_to_disk: train in 3 Arrow files, val in 1."""
    path = tmp_path_factory.mktemp("saved") / "dict"
    dataset = labelled(images)
    dataset_dict = datasets.DatasetDict(train=dataset, val=dataset.select([10, 2, 7, 5]))
    dataset_dict.save_to_disk(str(path), num_shards={"train": 3, "val": 1})
    return str(path)


@pytest.fixture(scope="module")
def hub(images, tmp_path_factory) -> str:
    """The Hub's layout: data/train-0000k-of-00002.parquet and data/validation-00000-of-00001.parquet, row groups
    of 2 rows (to_parquet's batch_size), as push_to_hub writes shards with to_parquet."""
    root = tmp_path_factory.mktemp("hub")
    (root / "data").mkdir()
    dataset = labelled(images)
    for index in range(2):
        shard = dataset.shard(num_shards=2, index=index, contiguous=True)
        shard.to_parquet(str(root / "data" / f"train-{index:05d}-of-00002.parquet"), batch_size=2)
    dataset.select([3, 1, 4]).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"), batch_size=2)
    return str(root)


def reference_of(dataset: datasets.Dataset) -> tuple[list[np.ndarray], np.ndarray]:
    """What datasets decodes: every row's image as RGB, and the label column."""
    return [np.asarray(row["image"].convert("RGB")) for row in dataset], np.asarray(dataset["label"], np.int64)


def assert_same(source: HFSource, images: list[np.ndarray], labels: np.ndarray, order=None) -> None:
    assert len(source) == len(images)
    for index in order if order is not None else range(len(images)):
        image, label = source.load(int(index))
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), images[index], err_msg=source.describe(int(index)))
        assert label == labels[index]
    np.testing.assert_array_equal(source.labels(), labels)


def test_save_to_disk_splits_give_what_datasets_gives(saved):
    reference = datasets.load_from_disk(saved)
    for split in ("train", "val"):
        source = HFSource(saved, split)
        assert source.classes == tuple(reference[split].features["label"].names) == tuple(NAMES)
        assert source.class_to_idx == {"cat": 0, "dog": 1, "bird": 2} and not source.multilabel
        assert_same(source, *reference_of(reference[split]), order=np.random.default_rng(1).permutation(len(source)))
    train = HFSource(saved, "train")
    assert train.describe(len(train) - 1) == os.path.join(saved, "train", "data-00002-of-00003.arrow") + " row 2"


def test_the_exif_orientation_is_applied_as_datasets_applies_it(saved, images):
    source = HFSource(saved, "train")
    row = next(i for i, image in enumerate(images) if image["path"] == "rotated.jpg")
    stored = Image.open(io.BytesIO(images[row]["bytes"]))
    assert source.load(row)[0].size == (stored.height, stored.width) != stored.size


def test_the_image_feature_mode_applies_before_rgb(images, tmp_path):
    labelled(images[:3], features={"image": datasets.Image(mode="L")}).save_to_disk(str(tmp_path / "gray"))
    reference = datasets.load_from_disk(str(tmp_path / "gray"))
    assert [row["image"].mode for row in reference] == ["L"] * 3
    assert_same(HFSource(tmp_path / "gray"), *reference_of(reference))
    chelsea = np.asarray(HFSource(tmp_path / "gray").load(0)[0])
    assert (chelsea[..., 0] == chelsea[..., 2]).all() and chelsea.std() > 10


def test_parquet_is_read_a_row_group_at_a_time_and_the_last_few_kept(hub, monkeypatch):
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, index, *args, **kwargs):
        reads.append((index, kwargs.get("columns")))
        return read_row_group(self, index, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    source = HFSource(hub, "train")  # files of 6 and 5 rows, in row groups of 2: 6 row groups
    source.load(0)
    source.load(1)
    assert reads == [(0, ["image"])]
    for index in range(len(source)):
        source.load(index)
    assert len(reads) == 6
    for index in reversed(range(len(source))):  # the last ROW_GROUPS_KEPT are still there
        source.load(index)
    assert len(reads) == 6 + 6 - ROW_GROUPS_KEPT


def test_a_single_saved_dataset_has_no_splits(images, tmp_path):
    dataset = labelled(images[:4])
    dataset.save_to_disk(str(tmp_path / "one"))
    assert_same(HFSource(tmp_path / "one"), *reference_of(datasets.load_from_disk(str(tmp_path / "one"))))
    with pytest.raises(DataError, match="one Dataset .* no split 'train'"):
        HFSource(tmp_path / "one", "train")


def test_the_hub_layout_gives_what_load_dataset_gives(hub, tmp_path):
    reference = datasets.load_dataset(hub, cache_dir=str(tmp_path / "cache"))
    assert sorted(reference) == ["train", "validation"]
    assert pq.ParquetFile(os.path.join(hub, "data", "train-00000-of-00002.parquet")).num_row_groups > 1
    for split in ("train", "validation"):
        source = HFSource(hub, split)
        assert source.classes == tuple(reference[split].features["label"].names)
        assert_same(source, *reference_of(reference[split]), order=np.random.default_rng(2).permutation(len(source)))
    by_glob = HFSource(os.path.join(hub, "data", "train-*.parquet"))
    assert_same(by_glob, *reference_of(reference["train"]))
    single = os.path.join(hub, "data", "validation-00000-of-00001.parquet")
    assert_same(HFSource(single), *reference_of(reference["validation"]))
    assert set(hf_splits(hub, ("train", "validation"))) == {"train", "validation"}


def test_a_sequence_of_class_labels_is_multi_label(images, tmp_path):
    tags = [[], [0], [1, 3], [2, 0, 1], [3]]
    features = {"tags": datasets.Sequence(datasets.ClassLabel(names=["a", "b", "c", "d"]))}
    labelled(images[: len(tags)], tags=tags, features=features).save_to_disk(str(tmp_path / "multi"))
    reference = datasets.load_from_disk(str(tmp_path / "multi"))
    expected = np.zeros((len(reference), 4), np.uint8)
    for row, row_tags in enumerate(reference["tags"]):
        expected[row, row_tags] = 1
    source = HFSource(tmp_path / "multi", label_column="tags")
    assert source.multilabel and source.classes == tuple(reference.features["tags"].feature.names)
    np.testing.assert_array_equal(source.labels(), expected)
    image, label = source.load(3)
    assert label.dtype == np.uint8 and label.tolist() == [1, 1, 1, 0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(reference[3]["image"].convert("RGB")))


def test_string_labels_are_classes_sorted_by_name_or_mapped_onto_given_ones(images, tmp_path):
    names = ["dog", "cat", "bird", "dog", "cat"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images[:5], "label": names}, features=features).to_parquet(
        str(tmp_path / "s.parquet")
    )
    reference = datasets.Dataset.from_parquet(str(tmp_path / "s.parquet"), cache_dir=str(tmp_path / "cache"))
    source = HFSource(tmp_path / "s.parquet")
    assert source.classes == tuple(sorted(set(reference["label"])))
    assert source.labels().tolist() == [source.classes.index(name) for name in reference["label"]]
    given = HFSource(tmp_path / "s.parquet", classes=["fish", "dog", "cat", "bird"])
    assert given.labels().tolist() == [["fish", "dog", "cat", "bird"].index(name) for name in reference["label"]]
    with pytest.raises(DataError, match=r"s.parquet row 2, column 'label': label 'bird' is not among classes="):
        HFSource(tmp_path / "s.parquet", classes=["dog", "cat"])


def test_class_label_names_map_by_name_onto_given_classes(saved):
    source = HFSource(saved, "train", classes=["bird", "dog", "cat", "fish"])
    reference = datasets.load_from_disk(saved)["train"]
    names = reference.features["label"].names
    assert source.labels().tolist() == [["bird", "dog", "cat", "fish"].index(names[i]) for i in reference["label"]]
    with pytest.raises(DataError, match="names classes that classes= lacks: bird"):
        HFSource(saved, "train", classes=["cat", "dog"])


def test_plain_integer_labels_need_classes_or_count_up_to_the_largest(images, tmp_path, caplog):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images[:3], "label": [0, 4, 2]}, features=features).to_parquet(
        str(tmp_path / "i.parquet")
    )
    source = HFSource(tmp_path / "i.parquet")
    assert source.classes == ("0", "1", "2", "3", "4") and source.labels().tolist() == [0, 4, 2]
    assert "integer labels without names: classes '0' to '4'" in caplog.text
    with pytest.raises(DataError, match=r"i.parquet row 1, column 'label': label 4 is outside 0..2"):
        HFSource(tmp_path / "i.parquet", classes=["a", "b", "c"])


def test_the_no_label_value_is_an_error_naming_the_row(images, tmp_path):
    dataset = labelled(images[:4], label=[0, 1, -1, 2])
    dataset.save_to_disk(str(tmp_path / "unlabelled"))
    assert datasets.load_from_disk(str(tmp_path / "unlabelled"))[2]["label"] == -1
    with pytest.raises(DataError, match=r"data-00000-of-00001.arrow row 2, column 'label': label -1 .*no label"):
        HFSource(tmp_path / "unlabelled")


def test_an_image_stored_by_path_opens_as_datasets_opens_it(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(images[0]["bytes"])
    (tmp_path / "gray.png").write_bytes(images[len(PHOTOS)]["bytes"])
    paths = [str(tmp_path / "photo.png"), "gray.png"]  # absolute, and relative to the current directory
    labelled(paths, label=[1, 2]).to_parquet(str(tmp_path / "paths.parquet"))
    assert pq.read_table(tmp_path / "paths.parquet")["image"].to_pylist()[1] == {"bytes": None, "path": "gray.png"}
    reference = datasets.Dataset.from_parquet(str(tmp_path / "paths.parquet"), cache_dir=str(tmp_path / "cache"))
    assert_same(HFSource(tmp_path / "paths.parquet"), *reference_of(reference))
    (tmp_path / "gray.png").unlink()
    with pytest.raises(DataError, match=r"paths.parquet row 1, column 'image': gray.png: no such file"):
        HFSource(tmp_path / "paths.parquet").load(1)


def test_a_corrupt_image_is_an_error_naming_the_file_and_row(images, tmp_path):
    bad = [images[0], {"bytes": b"not an image", "path": None}, {"bytes": images[1]["bytes"][:400], "path": None}]
    labelled(bad).save_to_disk(str(tmp_path / "bad"))
    source = HFSource(tmp_path / "bad")
    source.load(0)
    file = str(tmp_path / "bad" / "data-00000-of-00001.arrow")
    with pytest.raises(DataError, match=rf"{file} row 1, column 'image': 12 bytes, not an image PIL can read"):
        source.load(1)
    with pytest.raises(DataError, match=rf"{file} row 2, column 'image': cannot decode the image"):
        source.load(2)


def test_images_over_max_pixels_are_refused(saved):
    with pytest.raises(DataError, match="row 0, column 'image': 451x300 = 135300 pixels exceeds the limit of 10000"):
        HFSource(saved, "train", max_pixels=10_000).load(0)


def test_a_missing_column_names_the_columns_there_are(saved):
    with pytest.raises(DataError, match=r"has no column 'fine_label' \(columns: image, label\); pass label_column="):
        HFSource(saved, "train", label_column="fine_label")
    with pytest.raises(DataError, match=r"has no column 'img' \(columns: image, label\); pass image_column="):
        HFSource(saved, "train", image_column="img")


def test_a_path_of_no_known_layout_says_what_is_read(tmp_path):
    with pytest.raises(DataError, match="does not exist; a Hugging Face dataset is read from .*save_to_disk"):
        HFSource(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt is none of them; .*Parquet or Arrow file"):
        HFSource(tmp_path / "notes.txt")
    (tmp_path / "fake.parquet").write_text("hello")
    with pytest.raises(DataError, match="fake.parquet: cannot read it as Parquet"):
        HFSource(tmp_path / "fake.parquet")


def test_a_split_that_is_not_there_names_the_splits_there_are(saved, hub):
    with pytest.raises(DataError, match="splits train, val, not 'test'"):
        HFSource(saved, "test")
    with pytest.raises(DataError, match="splits train, val; pick one with split="):
        HFSource(saved)
    with pytest.raises(DataError, match="no files of split 'val' .* the splits there: train, validation"):
        HFSource(hub, "val")


def test_splits_with_different_classes_are_an_error(images, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    for split, names in (("train", ["dog", "cat", "bird"]), ("val", ["dog", "cat"])):
        dataset = datasets.Dataset.from_dict({"image": images[: len(names)], "label": names}, features=features)
        dataset.to_parquet(str(tmp_path / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"different classes: only in val: -; only in train: \['bird'\]"):
        hf_splits(tmp_path)
    splits = hf_splits(tmp_path, classes=["bird", "cat", "dog"])
    assert splits["val"].labels().tolist() == [2, 1] and splits["train"].classes == ("bird", "cat", "dog")


def test_it_reads_the_same_without_the_datasets_package(saved, hub, monkeypatch):
    expected = {key: reference_of(datasets.load_from_disk(saved)[key]) for key in ("train", "val")}
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    for split, reference in expected.items():
        assert_same(HFSource(saved, split), *reference)
    assert_same(HFSource(hub, "train"), *expected["train"])  # the same rows, written to Parquet
    script = "import sys, jaxtl.data.sources.hf; assert 'datasets' not in sys.modules, 'hf.py imports datasets'"
    subprocess.run([sys.executable, "-c", script], check=True)


def test_it_pickles_as_its_arguments_and_reopens_its_files(hub, saved):
    for source in (HFSource(hub, "train"), HFSource(saved, "train")):
        source.load(0)  # opened and cached here: none of it travels
        payload = pickle.dumps(source)
        assert len(payload) < 500
        copy = pickle.loads(payload)
        assert copy.classes == source.classes and copy.fingerprint() == source.fingerprint()
        np.testing.assert_array_equal(copy.labels(), source.labels())
        for index in (0, len(source) - 1):
            np.testing.assert_array_equal(np.asarray(copy.load(index)[0]), np.asarray(source.load(index)[0]))


def test_the_fingerprint_follows_the_files_and_the_split(saved, images, tmp_path):
    train, val = HFSource(saved, "train"), HFSource(saved, "val")
    assert train.fingerprint() == HFSource(saved, "train").fingerprint() != val.fingerprint()
    labelled(images[:3]).to_parquet(str(tmp_path / "a.parquet"))
    before = HFSource(tmp_path / "a.parquet").fingerprint()
    labelled(images[:3], label=[2, 1, 0]).to_parquet(str(tmp_path / "a.parquet"))
    os.utime(tmp_path / "a.parquet", ns=(1, 1))  # whatever the clock's resolution, the mtime changed
    assert HFSource(tmp_path / "a.parquet").fingerprint() != before


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_a_loader_over_it_gives_the_reference_batches(hub, tmp_path, worker_type):
    reference = datasets.load_dataset(hub, cache_dir=str(tmp_path / "cache"))["train"]
    images, labels = reference_of(reference)
    transform = EvalTransform(SMALL)
    loader = Loader(
        HFSource(hub, "train"), transform, batch_size=4, shuffle=False, num_workers=2, worker_type=worker_type
    )
    with loader:
        batches = list(loader.epoch(0))
    rows = [(b.images[r], b.labels[r], b.indices[r]) for b in batches for r in range(4) if b.mask[r]]
    assert [index for _, _, index in rows] == list(range(len(images)))
    for array, label, index in rows:
        np.testing.assert_array_equal(array, transform(Image.fromarray(images[index])))
        assert label == labels[index]
