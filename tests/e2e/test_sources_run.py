"""The same images from every source train the same model: the generated set as an ImageFolder, a label file,
a Hugging Face dataset (save_to_disk) and WebDataset shards, each through the decoded cache, give one set of
weights and metrics, to the bit. The head is solved (linear_probe) from the cached features of the whole train
split, so the WebDataset source's own train order (shard by shard) leaves it unchanged too."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset
from test_decoded_cache import Interrupt, StopAtStep

from jaxtl.data import generate_synthetic, image_folder_splits
from jaxtl.models.state_dict import state_dict
from jaxtl.train import fit

PHASES = [{"name": "probe", "policy": "head_only", "epochs": 1, "solver": "linear_probe"}]
BASE = {"model": {"arch": "resnet18", "weights": None}, "phases": PHASES}
DATA = {"batch_size": 8, "eval_batch_size": 8, "num_workers": 2, "crop_size": 32, "cache": "decoded"}


def quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The generated set written in each layout, examples in the ImageFolder's order."""
    root = tmp_path_factory.mktemp("sources")
    folder = generate_synthetic(root / "folder", num_classes=3, train_per_class=5, val_per_class=3)
    splits = image_folder_splits(folder)
    classes = splits["train"].classes
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))})
    hf = {}
    for split, source in splits.items():
        rows = [f"{Path(path).relative_to(folder)},{classes[label]}" for path, label in source.samples]
        (root / f"{split}.csv").write_text("\n".join(["image,label", *rows]) + "\n")
        hf[split] = datasets.Dataset.from_dict(
            {"image": [path for path, _ in source.samples], "label": [label for _, label in source.samples]},
            features=features,
        )
        (root / "shards").mkdir(exist_ok=True)
        half = -(-len(source) // 2)
        for shard in range(2):
            with webdataset.TarWriter(str(root / "shards" / f"{split}-{shard:06d}.tar")) as sink:
                for i, (path, label) in enumerate(source.samples[shard * half : (shard + 1) * half]):
                    sink.write({"__key__": f"{shard}{i:05d}", "jpg": Path(path).read_bytes(), "cls": label})
    datasets.DatasetDict(hf).save_to_disk(str(root / "hf"))  # the images embedded as bytes
    return {
        "folder": {"source": "folder", "root": str(folder)},
        "csv": {"source": "csv", "root": str(folder),
                "labels": {"train": str(root / "train.csv"), "val": str(root / "val.csv")}},
        "hf": {"source": "hf", "hf": {"path": str(root / "hf")}},
        "webdataset": {"source": "webdataset", "webdataset": {
            "train": str(root / "shards" / "train-{000000..000001}.tar"),
            "val": str(root / "shards" / "val-{000000..000001}.tar"), "classes": list(classes)}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def reference(layouts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("folder-run")
    with pytest.MonkeyPatch.context() as monkeypatch:  # a module's fixture: before the per-test cache is set
        monkeypatch.setenv("JAXTL_CACHE", str(run_dir / "cache"))
        return fit({**BASE, "run_dir": str(run_dir / "run"), "data": {**DATA, **layouts["folder"]}}, log=quiet)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("csv", marks=pytest.mark.slow),
        pytest.param("hf", marks=pytest.mark.slow),
        "webdataset",  # the quick subset's: another order and another file layout than the folder's
    ],
)
def test_every_source_trains_the_folders_model_to_the_bit(kind, layouts, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "cache"))
    result = fit({**BASE, "run_dir": str(tmp_path / "run"), "data": {**DATA, **layouts[kind]}}, log=quiet)
    assert result.classes == reference.classes
    keys = ("train_loss", "val_loss", "val_acc1")
    assert [[r[k] for k in keys] for r in result.history] == [[r[k] for k in keys] for r in reference.history]
    final, expected = state_dict(result.model), state_dict(reference.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key
    entries = list((tmp_path / "cache" / "decoded").iterdir())
    assert len([e for e in entries if len(e.name) == 64]) == 2  # the train and val splits' decoded entries
    meta = json.loads(next(e for e in entries if len(e.name) == 64).joinpath("meta.json").read_text())
    assert meta["classes"] == list(reference.classes)


TRAINED = [{"name": "last", "policy": "last_n_blocks:1", "epochs": 2}]


@pytest.mark.parametrize(
    "kind, extra",
    [
        pytest.param("webdataset", {}, id="webdataset-shard-order", marks=pytest.mark.slow),
        pytest.param("folder", {"sampler": "class_balanced"}, id="class-balanced-sampler", marks=pytest.mark.slow),
    ],
)
def test_a_run_in_its_own_train_order_resumes_mid_epoch_to_the_bit(kind, extra, layouts, tmp_path, monkeypatch):
    """The WebDataset source's shard-by-shard order and the class-balanced sampler's draws are functions of (seed,
    epoch): a run stopped mid-epoch resumes to the uninterrupted run's weights."""
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "cache"))
    data = {**DATA, **layouts[kind], **extra, "random_resized_crop": True, "flip_p": 0.5}
    whole = fit({**BASE, "phases": TRAINED, "run_dir": str(tmp_path / "whole"), "data": data}, log=quiet)
    cut = {**BASE, "phases": TRAINED, "run_dir": str(tmp_path / "cut"), "data": data,
           "train": {"checkpoint_every_steps": 1}}  # fmt: skip
    with pytest.raises(Interrupt):
        fit(cut, callbacks=[StopAtStep(3)], log=quiet)  # epoch 2 (2 batches of 8 per epoch), after step 3's checkpoint
    resumed = fit(cut, resume=True, log=quiet)
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    # The order is the source's or the sampler's own: the folder's permutation trains otherwise.
    plain = fit({**BASE, "phases": TRAINED, "run_dir": str(tmp_path / "plain"),
                 "data": {**data, **layouts["folder"], "sampler": "shuffle"}}, log=quiet)  # fmt: skip
    assert plain.history[0]["train_loss"] != whole.history[0]["train_loss"]
