"""A hostile label file, run as a user runs it: `jaxtl train` stops at it with one error line naming the file, line
and value; with data.skip_bad_files it trains on the good rows and says how many it skipped; `jaxtl data inspect`
lists every bad row. A label file in another encoding is named, with the key that reads it."""

import os
import subprocess
import sys
from pathlib import Path

import pandas
import pytest
import yaml

from jaxtl.data import generate_synthetic, image_folder_splits

JAXTL = [sys.executable, "-m", "jaxtl.cli"]


def run(*args, env):
    return subprocess.run([*JAXTL, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, compilation_cache):
    root = tmp_path_factory.mktemp("hostile")
    folder = generate_synthetic(root / "images", num_classes=3, train_per_class=4, val_per_class=2)
    splits = image_folder_splits(folder)
    for split, source in splits.items():
        rows = [f"{Path(path).relative_to(folder)},{source.classes[label]}" for path, label in source.samples]
        if split == "train":
            (folder / "extra.jpg").write_bytes(Path(source.samples[0][0]).read_bytes())
            rows += ["train/circle/missing.jpg,circle", "extra.jpg,hexagon", rows[0]]
        (root / f"{split}.csv").write_text("\n".join(["image,label", *rows]) + "\n")
    config = {
        "run_dir": str(root / "run"), "model": {"arch": "resnet18", "weights": None},
        "data": {"source": "csv", "root": str(folder), "batch_size": 4, "eval_batch_size": 4, "num_workers": 2,
                 "crop_size": 32, "labels": {"train": str(root / "train.csv"), "val": str(root / "val.csv"),
                                             "classes": ["checkerboard", "circle", "square"]}},
        "phases": [{"name": "head", "policy": "head_only", "epochs": 1}],
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, JAXTL_CACHE=str(root / "cache"), JAX_COMPILATION_CACHE_DIR=str(compilation_cache))
    return root, env


@pytest.mark.slow
def test_a_hostile_label_file_stops_naming_the_row_or_is_skipped_and_counted(dataset):
    root, env = dataset
    train_csv = root / "train.csv"
    good = len(pandas.read_csv(train_csv)) - 3  # the reference reads every row; three of them are bad
    stopped = run("train", str(root / "config.yaml"), env=env)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    error = stopped.stderr.strip().splitlines()[-1]
    assert f"{train_csv} line {good + 2}: image 'train/circle/missing.jpg': no such file" in error, error
    assert "2 more bad rows; data.skip_bad_files" in error
    assert not (root / "run" / "checkpoints").exists()

    skipped = run("train", str(root / "config.yaml"), "--set", "data.skip_bad_files=true",
                  "--set", f"run_dir={root / 'skipping'}", env=env)  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"train: skipped 3 bad row(s) or sample(s) (data.skip_bad_files): {train_csv} line {good + 2}" in (
        skipped.stdout
    )
    assert f"{good} train / 6 val images" in skipped.stdout

    inspected = run("data", "inspect", str(root / "config.yaml"), env=env)
    assert inspected.returncode == 1
    for line, what in ((good + 2, "no such file"), (good + 3, "hexagon"), (good + 4, "first on line 2")):
        assert any(f"line {line}" in row and what in row for row in inspected.stdout.splitlines()), (
            line,
            what,
            inspected.stdout,  # fmt: skip
        )
    assert inspected.stdout.strip().splitlines()[-1] == "3 problems"


def test_a_label_file_in_another_encoding_is_named_with_the_key_that_reads_it(dataset, tmp_path):
    root, env = dataset
    latin, val = tmp_path / "latin.csv", tmp_path / "val.csv"
    latin.write_bytes("image,label\ntrain/circle/00000.jpg,café\n".encode("latin-1"))
    val.write_bytes("image,label\nval/circle/00000.jpg,café\n".encode("latin-1"))
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["data"]["labels"] = {"train": str(latin), "val": str(val), "encoding": "utf-8"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run("data", "inspect", str(tmp_path / "config.yaml"), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{latin}" in result.stderr and "data.labels.encoding" in result.stderr
    fixed = run("data", "inspect", str(tmp_path / "config.yaml"), "--set", "data.labels.encoding=latin-1", env=env)
    assert "café" in fixed.stdout, fixed.stdout + fixed.stderr
