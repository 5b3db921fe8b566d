"""`jaxtl data inspect`, run as a user runs it: counts against torchvision's ImageFolder, sizes against PIL."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys

import numpy as np
import torchvision
import yaml
from PIL import Image
from skimage import data as skimage_data

from jaxtl.data.inspect import format_report, inspect_splits

JAXTL = [sys.executable, "-m", "jaxtl.cli"]
# (split, class, file name, (width, height)); the photograph is copied into both splits below.
IMAGES = [
    ("train", "cat", "a.png", (64, 48)),
    ("train", "cat", "b.png", (50, 30)),
    ("train", "dog", "c.png", (40, 80)),
    ("train", "dog", "d.png", (33, 35)),
    ("val", "cat", "e.png", (32, 32)),
    ("val", "dog", "f.png", (45, 60)),
]


def run(*args):
    return subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=300, env=os.environ)


def write_folder(root, *, problems: bool):
    rng = np.random.default_rng(0)
    for split, name, file, (width, height) in IMAGES:
        (root / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(root / split / name / file)
    photo = root / "train" / "dog" / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()[::8, ::8]).save(photo)  # a real photograph, 64x64
    if problems:
        (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
        shutil.copy(photo, root / "val" / "cat" / "copy.png")
    return root


def write_config(tmp_path, root):
    config = {"model": {"arch": "resnet18", "weights": None}, "data": {"source": "folder", "root": str(root)}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def table_counts(stdout: str, classes) -> dict[str, list[int]]:
    """The printed table's counts: split -> count per class."""
    lines = stdout.splitlines()
    header = lines.index("examples per class:") + 1
    splits = lines[header].split()
    rows = [lines[header + 1 + i].split()[2:] for i, _ in enumerate(classes)]
    return {split: [int(row[column]) for row in rows] for column, split in enumerate(splits)}


def size_line(split_root) -> str:
    """How the report should print a split's sizes: min / median / max of what PIL reads from each header."""
    sizes = []
    for path in sorted(split_root.rglob("*")):
        if path.is_file() and path.stat().st_size:
            with Image.open(path) as image:
                sizes.append(image.size)
    width, height = np.array(sizes).T
    return (
        f"{split_root.name}: width {width.min()} / {np.median(width):g} / {width.max()}, "
        f"height {height.min()} / {np.median(height):g} / {height.max()} ({len(sizes)} images)"
    )


def test_a_folder_with_problems_is_reported_and_exits_1(tmp_path):
    root = write_folder(tmp_path / "data", problems=True)
    result = run("data", "inspect", str(write_config(tmp_path, root)))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    reference = {split: torchvision.datasets.ImageFolder(root / split) for split in ("train", "val")}
    classes = reference["train"].classes
    assert f"classes (2): 0: {classes[0]}, 1: {classes[1]}" in out
    counts = collections.Counter(reference["train"].targets), collections.Counter(reference["val"].targets)
    assert table_counts(out, classes) == {
        split: [counter[i] for i in range(len(classes))] for split, counter in zip(("train", "val"), counts)
    }
    assert table_counts(out, classes)["train"] == [3, 3]  # the empty file counts, as in torchvision
    assert size_line(root / "train") in out and size_line(root / "val") in out
    empty = root / "train" / "cat" / "empty.jpg"
    assert "unreadable files: 1" in out and f"train: {empty}: an empty (zero-byte) file" in out
    photo, copy = root / "train" / "dog" / "astronaut.png", root / "val" / "cat" / "copy.png"
    assert "images in more than one split: 1" in out and f"train: {photo} = val: {copy}" in out
    assert out.strip().splitlines()[-1] == "2 problems"


def test_a_clean_folder_exits_0(tmp_path):
    root = write_folder(tmp_path / "data", problems=False)
    result = run("data", "inspect", str(write_config(tmp_path, root)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 problems"
    assert "unreadable files: 0" in result.stdout and "images in more than one split: 0" in result.stdout


def test_splits_with_different_classes_exit_2_with_the_message(tmp_path):
    root = write_folder(tmp_path / "data", problems=False)
    (root / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "bird" / "x.png")
    result = run("data", "inspect", str(write_config(tmp_path, root)), "--set", "data.num_workers=1")
    assert result.returncode == 2
    assert "have different classes: only in val: ['bird']" in result.stderr and "Traceback" not in result.stderr


class MultiHotSquares:
    """A multi-label source in memory; example i is a (10 + i) x (20 + 2i) image of gray level ``levels[i]``."""

    multilabel = True
    classes = ("red", "round", "small")

    def __init__(self, labels, levels, problems=()):
        self._labels = np.asarray(labels, np.uint8)
        self.levels = levels
        self.problems = list(problems)

    def __len__(self):
        return len(self._labels)

    def load(self, index):
        side = 10 + index
        return Image.new("RGB", (side, 2 * side), (self.levels[index],) * 3), self._labels[index]

    def describe(self, index):
        return f"row {index}"


def test_a_multilabel_source_reports_positives_cardinality_problems_and_same_pixels():
    labels = [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]]
    train = MultiHotSquares(labels, [0, 1, 2, 3], problems=["labels.csv line 4: bad value 'x'"])
    val = MultiHotSquares([[0, 1, 0], [0, 0, 1]], [0, 9])  # row 0: train row 0's size and pixels; row 1: not
    report = inspect_splits({"train": train, "val": val}, num_workers=2)
    assert report.multilabel
    assert report.counts["train"].tolist() == [3, 2, 1] and report.counts["val"].tolist() == [0, 1, 1]
    assert report.cardinality == {"train": 6 / 4, "val": 1.0}
    assert report.sizes["train"].tolist() == [[10, 20], [11, 22], [12, 24], [13, 26]]
    assert report.label_problems == [("train", "labels.csv line 4: bad value 'x'")]
    assert report.duplicates == [(("train", "row 0"), ("val", "row 0"))]
    text = format_report(report)
    assert "positives per class:" in text and "label cardinality (mean positives per example): train 1.50" in text
    assert text.splitlines()[-1] == "2 problems"
