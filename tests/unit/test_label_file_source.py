"""LabelFileSource against pandas' reading of the same CSV, TSV and JSON-lines files, on skimage photographs."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from jaxtl.data import EvalTransform, Loader
from jaxtl.data.sources.label_file import LabelFileSource, label_file_splits, read_label_rows
from jaxtl.errors import DataError
from jaxtl.weights import Preprocessing

SMALL = Preprocessing(resize_size=40, crop_size=32)
PHOTOS = ("chelsea.png", "camera.png", "rocket.jpg", "horse.png", "phantom.png", "text.png", "microaneurysms.png")
ANIMALS = ["dog", "cat", "bird", "cat", "dog", "ant", "bird", "cat", "dog", "ant", "cat", "emu"]


@pytest.fixture
def images(tmp_path):
    """tmp_path/images/img/NNN.<ext>: twelve copies of skimage photographs (PNG, JPEG, grayscale, RGBA)."""
    folder = tmp_path / "images" / "img"
    folder.mkdir(parents=True)
    data = os.path.dirname(skimage.data.__file__)
    names = []
    for i in range(len(ANIMALS)):
        photo = PHOTOS[i % len(PHOTOS)]
        names.append(f"img/{i:03d}{os.path.splitext(photo)[1]}")
        shutil.copyfile(os.path.join(data, photo), tmp_path / "images" / names[-1])
    return names


def write_frame(frame: pd.DataFrame, path, **kwargs):
    if path.suffix in (".jsonl", ".ndjson"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",", **kwargs)
    return path


def read_frame(path, **kwargs) -> pd.DataFrame:
    if path.suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True, dtype=False, **kwargs)
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", **kwargs)


def expected_samples(frame: pd.DataFrame, root, categories=None) -> list[tuple[str, int]]:
    codes = pd.Categorical(frame["label"], categories=categories).codes
    return [(os.path.abspath(os.path.join(root, image)), int(code)) for image, code in zip(frame["image"], codes)]


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".ndjson"])
def test_samples_are_pandas_rows_with_labels_in_sorted_class_order(tmp_path, images, extension):
    path = write_frame(pd.DataFrame({"label": ANIMALS, "image": images}), tmp_path / "images" / f"labels{extension}")
    frame = read_frame(path)
    source = LabelFileSource(path)
    assert source.classes == tuple(pd.Categorical(frame["label"]).categories)
    assert source.samples == expected_samples(frame, tmp_path / "images")
    assert list(source.labels()) == list(pd.Categorical(frame["label"]).codes)
    assert not source.multilabel and source.problems == []


def test_integer_labels_sort_numerically_and_keep_their_value(tmp_path, images):
    values = [10, 2, 0, 11, 1, 9, 3, 4, 5, 6, 7, 8]
    path = write_frame(pd.DataFrame({"image": images, "label": values}), tmp_path / "images" / "labels.csv")
    frame = pd.read_csv(path)
    source = LabelFileSource(path)
    assert source.classes == tuple(map(str, sorted(frame["label"])))
    np.testing.assert_array_equal(source.labels(), frame["label"].to_numpy())


def test_listed_classes_keep_their_order_and_root_is_where_paths_start(tmp_path, images):
    listed = ["emu", "dog", "cat", "bird", "ant"]
    path = write_frame(pd.DataFrame({"file": images, "kind": ANIMALS}), tmp_path / "labels.csv")
    source = LabelFileSource(path, tmp_path / "images", image_column="file", label_column="kind", classes=listed)
    frame = pd.read_csv(path).rename(columns={"file": "image", "kind": "label"})
    assert source.classes == tuple(listed)
    assert source.class_to_idx == {name: i for i, name in enumerate(listed)}
    assert source.samples == expected_samples(frame, tmp_path / "images", categories=listed)
    assert source.describe(2) == f"{path} line 4: {tmp_path / 'images' / images[2]}"


def test_a_split_column_and_separate_files_give_the_same_splits_with_shared_classes(tmp_path, images):
    splits = ["train"] * 8 + ["val"] * 3 + ["test"]  # "emu" is only in test
    frame = pd.DataFrame({"image": images, "label": ANIMALS, "split": splits})
    one = write_frame(frame, tmp_path / "images" / "all.csv")
    files = {s: write_frame(frame[frame.split == s].drop(columns="split"), tmp_path / f"{s}.csv") for s in frame.split}
    from_column = label_file_splits(one, splits=("train", "val", "test"))
    from_files = label_file_splits(files, tmp_path / "images")
    reference = pd.read_csv(one)
    classes = tuple(pd.Categorical(reference["label"]).categories)
    for split in ("train", "val", "test"):
        part = reference[reference["split"] == split]
        expected = expected_samples(part, tmp_path / "images", categories=classes)
        assert from_column[split].classes == from_files[split].classes == classes
        assert from_column[split].samples == from_files[split].samples == expected


def test_multi_label_by_separator_is_pandas_get_dummies(tmp_path, images):
    tags = ["clear primary water", "haze", "", "primary", "clear  road", "water haze primary"] * 2
    path = write_frame(pd.DataFrame({"image_name": images, "tags": tags}), tmp_path / "images" / "train.csv")
    source = LabelFileSource(path, image_column="image_name", label_column="tags", label_separator=" ")
    dummies = pd.read_csv(path, keep_default_na=False)["tags"].str.get_dummies(sep=" ")
    dummies = dummies.drop(columns="", errors="ignore")  # pandas 3 counts "" between two spaces as a tag
    assert source.multilabel
    assert source.classes == tuple(dummies.columns)
    np.testing.assert_array_equal(source.labels(), dummies.to_numpy(np.uint8))
    image, multi_hot = source.load(0)
    assert multi_hot.dtype == np.uint8 and list(multi_hot) == list(dummies.iloc[0])


@pytest.mark.parametrize("class_columns", [["cat", "dog", "bird"], "*"])
def test_multi_label_by_class_columns_is_their_values(tmp_path, images, class_columns):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"image": images, "cat": rng.integers(0, 2, 12), "split": "train"})
    frame.insert(2, "dog", rng.integers(0, 2, 12).astype(float))  # 0.0 / 1.0
    frame["bird"] = rng.integers(0, 2, 12).astype(bool)  # True / False
    path = write_frame(frame, tmp_path / "images" / "labels.csv")
    source = LabelFileSource(path, class_columns=class_columns)
    reference = pd.read_csv(path)
    columns = class_columns if class_columns != "*" else [c for c in reference.columns if c not in ("image", "split")]
    assert source.classes == tuple(columns) == ("cat", "dog", "bird")
    np.testing.assert_array_equal(source.labels(), reference[columns].to_numpy().astype(np.uint8))


def test_images_decode_as_pil_converts_them_to_rgb(tmp_path, images):
    path = write_frame(pd.DataFrame({"image": images, "label": ANIMALS}), tmp_path / "images" / "labels.csv")
    source = LabelFileSource(path)
    for i in range(len(PHOTOS)):
        image, label = source.load(i)
        file = os.path.join(tmp_path, "images", pd.read_csv(path)["image"][i])
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(file).convert("RGB")))
        assert label == source.class_to_idx[ANIMALS[i]]


# --- hostile files ------------------------------------------------------------------------------------------


def hostile_lines(images):
    """(line, row, what the error names) for each bad row of the hostile file; good rows around them."""
    return [
        (3, "img/404.jpg,cat", "'img/404.jpg': no such file in"),
        (4, f"{images[3]},wolf", "unknown label 'wolf'"),
        (6, f"{images[0]},dog", f"'{images[0]}' is listed again (first on line 2)"),
        (7, f"{images[5]},cat,extra", "3 fields where the header has 2"),
        (8, f"{images[6]},", "empty label in column 'label'"),
        (9, ",cat", "no image path in column 'image'"),
    ]


def write_hostile(tmp_path, images, bad=None):
    good = [f"{images[0]},dog", f"{images[1]},cat", f"{images[2]},dog", f"{images[4]},cat"]
    rows = {2: good[0], 5: good[1], 10: good[2], 11: good[3]}
    rows |= {line: row for line, row, _ in hostile_lines(images) if bad is None or line == bad}
    lines = ["image,label"] + [rows[n] for n in sorted(rows)]
    path = tmp_path / "images" / "hostile.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, sorted(rows)


@pytest.mark.parametrize("bad", [3, 4, 6, 7, 8, 9])
def test_each_bad_row_is_one_data_error_naming_file_line_and_value(tmp_path, images, bad):
    path, _ = write_hostile(tmp_path, images, bad)
    (what,) = [what for line, _, what in hostile_lines(images) if line == bad]
    with pytest.raises(DataError) as error:
        LabelFileSource(path, classes=["cat", "dog"])
    message = str(error.value)
    file_line = list(sorted([2, 5, 10, 11] + [bad])).index(bad) + 2
    assert message.startswith(f"{path} line {file_line}: "), message
    assert what in message


def test_skipping_bad_rows_keeps_pandas_good_rows_and_lists_each_problem(tmp_path, images):
    path, _ = write_hostile(tmp_path, images)
    source = LabelFileSource(path, classes=["cat", "dog"], skip_bad_rows=True)
    frame = pd.read_csv(path, on_bad_lines="skip", keep_default_na=False)
    frame["line"] = [2, 3, 4, 5, 6, 8, 9, 10, 11]  # pandas drops line 7 (too many fields)
    good = frame[frame["line"].isin([2, 5, 10, 11])]
    assert source.samples == expected_samples(good, tmp_path / "images", categories=["cat", "dog"])
    assert [problem.split(":")[0] for problem in source.problems] == [f"{path} line {n}" for n in (7, 3, 4, 6, 8, 9)]
    for line, _, what in hostile_lines(images):
        (problem,) = [p for p in source.problems if p.startswith(f"{path} line {line}: ")]
        assert what in problem


def test_a_latin_1_file_read_as_utf_8_names_line_and_byte_and_reads_with_its_encoding(tmp_path, images):
    path = tmp_path / "images" / "labels.csv"
    path.write_bytes(b"image,label\n" + f"{images[0]},chat\n{images[1]},café\n".encode("latin-1"))
    byte = len(f"{images[1]},caf") + 1
    with pytest.raises(
        DataError, match=rf"labels.csv line 3: byte {byte} of the line \(0xe9\) is not valid utf-8.*latin"
    ):
        LabelFileSource(path)
    source = LabelFileSource(path, encoding="latin-1")
    frame = pd.read_csv(path, encoding="latin-1")
    assert source.classes == ("café", "chat")
    assert source.samples == expected_samples(frame, tmp_path / "images")


def test_a_utf_8_byte_order_mark_is_not_part_of_the_first_column(tmp_path, images):
    frame = pd.DataFrame({"image": images, "label": ANIMALS})
    path = write_frame(frame, tmp_path / "images" / "labels.csv", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert LabelFileSource(path).samples == expected_samples(pd.read_csv(path), tmp_path / "images")


def test_a_missing_column_names_the_columns_found(tmp_path, images):
    path = write_frame(pd.DataFrame({"id": images, "label": ANIMALS}), tmp_path / "images" / "labels.csv")
    with pytest.raises(DataError, match=r"has no column 'image' \(columns: id, label\)"):
        LabelFileSource(path)


def test_bad_json_lines_and_class_column_values_are_problems(tmp_path, images):
    path = tmp_path / "images" / "labels.jsonl"
    lines = [
        f'{{"image": "{images[0]}", "a": 1, "b": false}}',
        f'{{"image": "{images[1]}", "a": 0, "b": "maybe"}}',
        '["not", "an", "object"]',
        '{"image": broken',
        f'{{"image": "{images[2]}", "a": 1.0, "b": true}}',
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"labels.jsonl line 3: \[\"not\", \"an\", \"object\"\] is not a JSON object"):
        LabelFileSource(path, class_columns="*")
    source = LabelFileSource(path, class_columns="*", skip_bad_rows=True)
    assert source.classes == ("a", "b")
    np.testing.assert_array_equal(source.labels(), [[1, 0], [1, 1]])
    assert len(source.problems) == 3
    assert "line 2: column 'b': 'maybe' is not 0 or 1" in source.problems[2]
    assert "line 4: not valid JSON" in source.problems[1]


def test_an_image_in_two_splits_is_a_problem_of_the_later_split(tmp_path, images):
    frame = pd.DataFrame({"image": images[:4] + images[2:3], "label": ANIMALS[:5], "split": ["train"] * 4 + ["val"]})
    frame.loc[5] = [images[5], "cat", "val"]
    path = write_frame(frame, tmp_path / "images" / "labels.csv")
    with pytest.raises(DataError, match=rf"labels.csv line 6: image '{images[2]}' is also in split train .*line 4"):
        label_file_splits(path)
    splits = label_file_splits(path, skip_bad_rows=True)
    assert [p for p, _ in splits["val"].samples] == [os.path.abspath(tmp_path / "images" / images[5])]
    assert len(splits["val"].problems) == 1 and splits["train"].problems == []


def test_one_file_without_a_split_column_cannot_be_split(tmp_path, images):
    path = write_frame(pd.DataFrame({"image": images, "label": ANIMALS}), tmp_path / "images" / "labels.csv")
    with pytest.raises(DataError, match="has no column 'split' to tell the train and val rows apart"):
        label_file_splits(path)


# --- the source in use --------------------------------------------------------------------------------------


def test_the_source_pickles_and_the_loader_gives_pandas_labels(tmp_path, images):
    path = write_frame(pd.DataFrame({"image": images, "label": ANIMALS}), tmp_path / "images" / "labels.csv")
    source = pickle.loads(pickle.dumps(LabelFileSource(path)))
    frame = pd.read_csv(path)
    loader = Loader(source, EvalTransform(SMALL), batch_size=4, shuffle=False, worker_type="thread", num_workers=2)
    batches = list(loader.epoch(0))
    labels = np.concatenate([batch.labels[batch.mask] for batch in batches])
    np.testing.assert_array_equal(labels, pd.Categorical(frame["label"]).codes)
    first = Image.open(tmp_path / "images" / frame["image"][0]).convert("RGB")
    np.testing.assert_array_equal(batches[0].images[0], EvalTransform(SMALL)(first))


def test_the_fingerprint_changes_with_an_image_or_a_label_and_only_then(tmp_path, images):
    frame = pd.DataFrame({"image": images, "label": ANIMALS})
    path = write_frame(frame, tmp_path / "images" / "labels.csv")
    before = LabelFileSource(path).fingerprint()
    assert LabelFileSource(path).fingerprint() == before
    os.utime(tmp_path / "images" / images[3], ns=(0, 0))
    touched = LabelFileSource(path).fingerprint()
    assert touched != before
    frame.loc[3, "label"] = "emu"
    write_frame(frame, path)
    assert LabelFileSource(path).fingerprint() != touched


def test_read_label_rows_gives_the_header_and_numbered_rows(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text('image\tlabel\n\na.jpg\t"two\nlines"\nb.jpg\tcat\n')
    header, rows = read_label_rows(path)
    frame = pd.read_csv(path, sep="\t")
    assert header == list(frame.columns)
    assert [row for _, row in rows] == frame.to_dict("records")
    assert [line for line, _ in rows] == [3, 5]
