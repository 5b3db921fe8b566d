"""Runs from the decoded-image cache: eval bit-identical to the PIL path, device augmentation resumable bitwise."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtl.config import ConfigError
from jaxtl.models.state_dict import state_dict
from jaxtl.train import Callback, fit

BASE = {
    "model": {"arch": "resnet18", "weights": None},
    "data": {
        "source": "synthetic",
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_workers": 2,
        "crop_size": 64,
        "synthetic": {"num_classes": 3, "train_per_class": 8, "val_per_class": 4},
    },
}


def quiet(line: str) -> None:
    pass


class Interrupt(Exception):
    pass


class StopAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise Interrupt(step)


def config(run_dir, phases, **data) -> dict:
    return {**BASE, "run_dir": str(run_dir), "phases": phases, "data": {**BASE["data"], **data}}


@pytest.mark.slow
def test_a_cached_run_without_augmentation_equals_the_pil_path_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "cache"))
    phases = [{"name": "head", "policy": "head_only", "epochs": 2}, {"name": "last", "policy": "last_n_blocks:1"}]
    pil = fit(config(tmp_path / "pil", phases), log=quiet)
    cached = fit(config(tmp_path / "cached", phases, cache="decoded"), log=quiet)
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in pil.history]
    assert [r["train_loss"] for r in cached.history] == [r["train_loss"] for r in pil.history]
    final, expected = state_dict(cached.model), state_dict(pil.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key
    assert any((tmp_path / "cache" / "decoded").iterdir())  # the cache was used, and kept for the next run


@pytest.mark.slow
def test_device_augmentation_resumed_mid_epoch_ends_bitwise_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "cache"))
    phases = [{"name": "last", "policy": "last_n_blocks:1", "epochs": 2}]
    augmented = {
        "cache": "decoded",
        "random_resized_crop": True,
        "flip_p": 0.5,
        "augment": "trivialaugment",
        "color_jitter": [0.4, 0.4, 0.4, 0.1],
        "random_erasing": 0.25,
    }
    whole = fit(config(tmp_path / "whole", phases, **augmented), log=quiet)
    cut = config(tmp_path / "cut", phases, **augmented)
    cut["train"] = {"checkpoint_every_steps": 2}
    with pytest.raises(Interrupt):
        fit(cut, callbacks=[StopAtStep(5)], log=quiet)  # epoch 2, after its checkpoint at step 4
    resumed = fit(cut, resume=True, log=quiet)
    final, expected = state_dict(resumed.model), state_dict(whole.model)
    for key in expected:
        assert np.array_equal(final[key], expected[key]), key
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    # The augmentation is real: the same run without it trains differently.
    plain = fit(config(tmp_path / "plain", phases, cache="decoded"), log=quiet)
    assert plain.history[0]["train_loss"] != whole.history[0]["train_loss"]


def test_device_augmentation_needs_the_decoded_cache():
    with pytest.raises(ConfigError, match="data.augment run\\(s\\) on the device, from decoded images"):
        fit(config("unused", [{"name": "p", "policy": "full"}], augment="randaugment"))


def test_jaxtl_data_cache_builds_once_what_a_run_then_reads(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    configs = Path(__file__).parents[2] / "configs"
    sets = ["model.weights=null", "data.synthetic.num_classes=2", "data.synthetic.train_per_class=3"]
    command = [sys.executable, "-m", "jaxtl.cli", "data", "cache", str(configs / "quickstart.yaml")]
    command += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "JAXTL_CACHE": str(tmp_path)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("train: 6 images, ") and lines[1].startswith("val: 40 images, ")
    entries = sorted(p.name for p in (tmp_path / "decoded").iterdir() if not p.name.startswith("."))
    assert len(entries) == 2 and all(name in first.stdout for name in entries)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.stdout.splitlines()[:2] == lines[:2]  # the same entries, reused
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir() if not p.name.startswith(".")) == entries
