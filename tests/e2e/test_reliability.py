"""Reliability of `jaxtl train` and `jaxtl predict`: kills, damaged checkpoints, full disks, a second run on the
same directory, non-finite losses, hostile image folders and mixed prediction inputs.

The runs are a head-only phase of 3 epochs (5 steps each) on cached features of the tiny synthetic
set at 32x32, with ``best`` chosen by validation loss: it improves, and is saved, in epochs 1 and 2.
Kills come from ``JAXTL_TEST_FAULT`` (jaxtl/train/faults.py): SIGKILL at a named point of the run.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import CONFIGS, JAXTL
from tiny import TINY

from jaxtl.train.checkpoint import load_arrays, load_meta

SMALL = [
    *TINY,
    "data.crop_size=32",
    "phases=[{name: head, policy: head_only, epochs: 3, lrs: {head: 3.0e-3}}]",
    "train.checkpoint_metric=val_loss",
    # The backbone runs every epoch, so that every epoch writes its checkpoints: on cached features they are
    # written at the phase's end (tested below).
    "train.feature_cache=false",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, compilation_cache):
    """One jaxtl cache (the synthetic dataset) for the module's runs; never the user's."""
    return dict(
        os.environ,
        JAXTL_CACHE=str(tmp_path_factory.mktemp("jaxtl-cache")),
        JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
    )


def command(run_dir, *overrides):
    sets = [f"run_dir={run_dir}", *SMALL, *overrides]
    return [*JAXTL, "train", str(CONFIGS / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]


def run(args, env, *, expect=0, fault=None, timeout=600):
    env = dict(env, JAXTL_TEST_FAULT=fault) if fault else env
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == expect, f"exit {result.returncode}, expected {expect}:\n{output}"
    if expect in (0, 2):
        assert "Traceback" not in result.stderr, output
    return result


def error_line(result) -> str:
    """The one error line of a failed command: the last line of stderr (progress lines may precede it)."""
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def resume(run_dir, env, **kwargs):
    return run([*JAXTL, "train", "--resume", str(run_dir)], env, **kwargs)


def checkpoint_versions(run_dir) -> dict[str, list[Path]]:
    checkpoints = Path(run_dir) / "checkpoints"
    out = {"latest": [], "best": [], "leftovers": []}
    for path in sorted(checkpoints.iterdir()):
        name = path.name.split(".")[0]
        if path.name.startswith("."):
            out["leftovers"].append(path)
        elif not path.is_symlink():
            out[name].append(path)
    return out


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: np.asarray(tree)}


def assert_loadable_and_finite(checkpoint: Path) -> dict:
    meta = load_meta(checkpoint)
    arrays = flat(load_arrays(checkpoint))
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.inexact):
            assert np.isfinite(value).all(), f"{checkpoint}: {key} is not finite"
    return {"meta": meta, "arrays": arrays}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    x, y = flat(load_arrays(a)), flat(load_arrays(b))
    assert x.keys() == y.keys()
    for key in x:
        assert np.array_equal(x[key], y[key]), f"{key} differs between {a} and {b}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The uninterrupted run every interrupted one must end equal to."""
    run_dir = tmp_path_factory.mktemp("reliability") / "reference"
    run(command(run_dir), env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records]
    assert [r["epoch"] for r in records] == [1, 2, 3] and losses[1] < losses[0] and losses[2] >= losses[1], records
    assert load_meta(run_dir / "checkpoints" / "best")["best"]["epoch"] == 2  # the kill points count on it
    return run_dir


# --- kill -9, then --resume ---------------------------------------------------------------------------

KILLS = [
    pytest.param("latest.renamed:2", id="between-the-renames-of-latest", marks=pytest.mark.slow),
    pytest.param("train.step:8", id="mid-epoch", marks=pytest.mark.slow),
    pytest.param("train.eval:2", id="during-eval", marks=pytest.mark.slow),
    pytest.param("latest.arrays:2", id="between-arrays-and-meta", marks=pytest.mark.slow),
    pytest.param("best.staged:2", id="best-staged-not-renamed", marks=pytest.mark.slow),
    pytest.param("best.linked:2", id="best-linked-old-not-removed", marks=pytest.mark.slow),
    pytest.param("latest.linked:3", id="latest-linked-old-not-removed", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point", KILLS)
def test_killed_at_any_point_resumes_to_the_uninterrupted_parameters(tmp_path, env, reference, point):
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        command(run_dir), check=False, capture_output=True, text=True, env=dict(env, JAXTL_TEST_FAULT=f"kill:{point}")
    )
    assert killed.returncode == -signal.SIGKILL, (
        f"not killed at {point}:\n{killed.stdout[-2000:]}{killed.stderr[-2000:]}"
    )
    # Whatever the instant, the links name complete, intact checkpoints.
    checkpoints = run_dir / "checkpoints"
    latest = assert_loadable_and_finite(checkpoints / "latest")
    assert_loadable_and_finite(checkpoints / "best")
    # best is saved before latest: the best epoch that latest knows of is on disk.
    assert load_meta(checkpoints / "best")["metrics"]["epoch"] >= latest["meta"]["best"]["epoch"]

    resumed = resume(run_dir, env)
    assert resumed.stdout.split("resumed from ")[1].splitlines()[0].endswith(f", step {latest['meta']['step']}")
    assert_same_checkpoint(reference / "checkpoints" / "latest", checkpoints / "latest")
    assert_same_checkpoint(reference / "checkpoints" / "best", checkpoints / "best")
    # One previous latest is kept, no previous best, nothing staged. Killed after the last save's link switch,
    # the run was complete: the resume saves nothing, and the older version waits for a next save to go.
    versions = checkpoint_versions(run_dir)
    assert len(versions["latest"]) == (3 if point == "latest.linked:3" else 2), versions
    assert len(versions["best"]) == 1 and versions["leftovers"] == [], versions


@pytest.mark.slow
def test_a_kill_mid_epoch_loses_at_most_checkpoint_every_steps(tmp_path, env, reference):
    run_dir = tmp_path / "run"
    # Checkpoints every 2 steps inside an epoch: after steps 2 and 4 of epoch 1, 6 and 8 of epoch 2 (5
    # steps an epoch; step 5 and 10 end an epoch and are saved there). Killed as step 8 is dispatched.
    overrides = ("train.checkpoint_every_steps=2",)
    run(command(run_dir, *overrides), env, expect=-signal.SIGKILL, fault="kill:train.step:8")
    meta = load_meta(run_dir / "checkpoints" / "latest")
    assert (meta["step"], meta["epoch_in_phase"], meta["batch"]) == (6, 1, 1)
    resumed = resume(run_dir, env)
    assert "epoch 2, batch 1, step 6" in resumed.stdout
    assert_same_checkpoint(reference / "checkpoints" / "latest", run_dir / "checkpoints" / "latest")
    assert_same_checkpoint(reference / "checkpoints" / "best", run_dir / "checkpoints" / "best")
    # The resumed epoch's train loss counts the batches before the checkpoint too.
    records = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("epoch", "step", "train_loss", "train_acc1", "val_loss", "val_acc1")
    assert [[r[k] for k in keys] for r in records(run_dir)] == [[r[k] for k in keys] for r in records(reference)]


@pytest.mark.slow
def test_on_cached_features_checkpoints_wait_for_the_phase_end_and_a_run_killed_before_starts_again_bitwise(
    tmp_path, env
):
    # The head trains on cached features: best and latest are written at the phase's end. Killed during the third
    # epoch's validation, the run has none yet (best improved at epochs 1 and 2, kept for the phase's end);
    # --resume starts it again, and it ends with the checkpoints and records of an uninterrupted run.
    cached = "train.feature_cache=true"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(command(whole, cached), env)
    run(command(cut, cached), env, expect=-signal.SIGKILL, fault="kill:train.eval:3")
    assert not (cut / "checkpoints" / "latest").exists() and not (cut / "checkpoints" / "best").exists()
    resumed = resume(cut, env)
    assert f"{cut} has no checkpoint yet: the run starts again from its beginning" in resumed.stdout
    assert_same_checkpoint(whole / "checkpoints" / "latest", cut / "checkpoints" / "latest")
    assert_same_checkpoint(whole / "checkpoints" / "best", cut / "checkpoints" / "best")
    assert load_meta(cut / "checkpoints" / "best")["best"]["epoch"] == 2
    records = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("epoch", "step", "train_loss", "train_acc1", "val_loss", "val_acc1")
    last = {r["epoch"]: [r[k] for k in keys] for r in records(cut)}  # the killed attempt's epochs, then the run's
    assert [last[epoch] for epoch in sorted(last)] == [[r[k] for k in keys] for r in records(whole)]


# --- damaged checkpoints ------------------------------------------------------------------------------


def truncate_largest_array_file(version: Path) -> Path:
    path = max((p for p in (version / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[:100])
    return path


@pytest.mark.slow
def test_resume_falls_back_from_a_damaged_latest_and_says_so(tmp_path, env, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, symlinks=True)
    latest = run_dir / "checkpoints" / "latest"
    damaged = truncate_largest_array_file(latest.resolve()).relative_to(latest.resolve())
    previous = [v for v in checkpoint_versions(run_dir)["latest"] if v != latest.resolve()]
    assert load_meta(previous[0])["step"] == 10

    resumed = resume(run_dir, env)
    notices = [line for line in resumed.stdout.splitlines() if "is damaged" in line]
    assert len(notices) == 1
    assert notices[0].startswith(
        f"checkpoint {latest} is damaged (checkpoint file {latest / damaged} is truncated: 100 bytes"
    )
    assert notices[0].endswith(f"resuming from the previous good checkpoint {previous[0]} (step 10)")
    assert_same_checkpoint(reference / "checkpoints" / "latest", run_dir / "checkpoints" / "latest")

    # With no intact version left, a clear error instead.
    for version in checkpoint_versions(run_dir)["latest"]:
        truncate_largest_array_file(version)
    error = error_line(resume(run_dir, env, expect=2))
    assert "cannot be resumed: no intact version of checkpoint" in error
    assert error.count("is truncated") == 2 and "without --resume, in a new run_dir" in error


# --- a failed write -----------------------------------------------------------------------------------


@pytest.mark.slow  # tests/unit/test_checkpoint.py covers the failed writes in-process; this, the CLI's message
def test_a_write_failure_during_a_checkpoint_stops_with_the_path_and_keeps_the_previous(tmp_path, env):
    run_dir = tmp_path / "run"
    error = error_line(run(command(run_dir), env, expect=2, fault="oserror:latest.arrays:2"))
    assert error.startswith(f"jaxtl train: error: cannot write checkpoint {run_dir}/checkpoints/latest:")
    assert "No space left on device" in error and "the previous checkpoint is intact" in error
    assert error.endswith(f"then continue the run: jaxtl train --resume {run_dir}")
    assert assert_loadable_and_finite(run_dir / "checkpoints" / "latest")["meta"]["step"] == 5
    assert assert_loadable_and_finite(run_dir / "checkpoints" / "best")["meta"]["step"] == 10  # saved before latest
    versions = checkpoint_versions(run_dir)
    assert len(versions["latest"]) == 1 and versions["leftovers"] == [], versions


# --- two runs, one directory --------------------------------------------------------------------------


def test_a_second_run_on_a_locked_run_directory_refuses(tmp_path, env):
    from jaxtl.train.run_dir import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")  # as a started run has
    with RunLock(run_dir):  # held as a running `jaxtl train` holds it
        fresh = run(command(run_dir), env, expect=2)
        resumed = resume(run_dir, env, expect=2)
    for result in (fresh, resumed):
        assert f"run directory {run_dir} is in use by another jaxtl process" in error_line(result)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"]  # nothing written


# --- non-finite loss ----------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_naming_step_and_phase_and_writes_no_nan_checkpoint(tmp_path, env):
    run_dir = tmp_path / "run"
    phases = (
        "phases=[{name: warm, policy: head_only, epochs: 1}, "
        "{name: absurd, policy: head_only, epochs: 1, lrs: {head: 1.0e+30}}]"
    )
    error = error_line(run(command(run_dir, phases), env, expect=2))
    assert "non-finite training loss" in error
    step = int(error.split(" at step ")[1].split()[0])
    assert 6 < step <= 10 and f"at step {step} (phase 'absurd', epoch 2)" in error
    assert f"The last good checkpoint is {run_dir}/checkpoints/latest (step 5)" in error
    versions = checkpoint_versions(run_dir)
    assert versions["latest"] and versions["best"] and versions["leftovers"] == []
    for version in versions["latest"] + versions["best"]:
        assert assert_loadable_and_finite(version)["meta"]["step"] == 5


# --- a hostile image folder ---------------------------------------------------------------------------


def hostile_dataset(root: Path) -> list[str]:
    """A 2-class ImageFolder whose train split holds every kind of bad file, and two odd but good images.

    Returns the bad files. An unreadable file (mode 000) is among them only when not running as root,
    whose reads permissions do not stop; test_an_unreadable_image_is_named_and_skippable simulates it.
    """
    from jaxtl.data import generate_synthetic

    generate_synthetic(root, seed=0, num_classes=2, train_per_class=5, val_per_class=2, min_size=40, max_size=64)
    a, b = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("CMYK").save(a / "cmyk.jpg")  # good: converts like torchvision
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(b / "gray16.png")  # good: 16-bit
    good_jpeg = next(a.glob("0*.jpg")).read_bytes()
    bad = {
        a / "bad-truncated.jpg": good_jpeg[:300],
        a / "bad-zero.jpg": b"",
        b / "bad-text.jpg": b"this is not an image\n",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    Image.new("1", (14000, 14000)).save(b / "bad-huge.png")  # 196M pixels: over PIL's bomb limit
    (b / "bad-link.jpg").symlink_to(root / "gone.jpg")
    paths = [*bad, b / "bad-huge.png", b / "bad-link.jpg"]
    if os.geteuid() != 0:
        unreadable = a / "bad-unreadable.jpg"
        unreadable.write_bytes(good_jpeg)
        unreadable.chmod(0)
        paths.append(unreadable)
    return [str(p) for p in paths]


@pytest.mark.slow
def test_a_hostile_folder_stops_at_the_first_bad_file_or_is_skipped_and_counted(tmp_path, env):
    from jaxtl.data import ImageFolder

    root = tmp_path / "hostile"
    bad = hostile_dataset(root)
    folder = ["data.source=folder", f"data.root={root}", "phases=[{name: head, policy: head_only, epochs: 1}]"]
    # The first pass over train is the unshuffled feature pass: the first bad file in torchvision's order.
    first_bad = next(path for path, _ in ImageFolder(root / "train").samples if path in bad)
    error = error_line(run(command(tmp_path / "strict", *folder), env, expect=2))
    assert error.startswith(f"jaxtl train: error: {first_bad}: ")

    val_bad = root / "val" / Path(bad[0]).parent.name / "bad-val.jpg"
    val_bad.write_bytes(b"")
    skip = [*folder, "data.skip_bad_files=true"]
    skipping = run(command(tmp_path / "skipping", *skip, "train.feature_cache=true"), env)
    assert f"skipped {len(bad) + 1} unreadable file(s) (data.skip_bad_files)" in skipping.stdout
    # The head trained on cached features (the default here) sees exactly the examples the head trained
    # through the frozen backbone sees: a skipped file is left out of both, in train and in val.
    assert "on cached features" in skipping.stdout
    run(command(tmp_path / "uncached", *skip, "train.feature_cache=false"), env)
    (cached,) = [json.loads(line) for line in (tmp_path / "skipping" / "metrics.jsonl").read_text().splitlines()]
    (uncached,) = [json.loads(line) for line in (tmp_path / "uncached" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(cached["train_loss"])
    for key in ("train_loss", "train_acc1", "val_loss", "val_acc1"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-5), key
    # jaxtl eval reads the run's data settings: it skips and counts the same files.
    best = tmp_path / "skipping" / "checkpoints" / "best"
    evaluated = run([*JAXTL, "eval", str(best), "--split", "train"], env)
    good = len(ImageFolder(root / "train")) - len(bad)
    assert f"on train ({good} images, {len(bad)} unreadable file(s) skipped (data.skip_bad_files))" in evaluated.stdout


@pytest.mark.slow
def test_a_batch_of_only_skipped_files_is_passed_over_where_batchnorm_trains(tmp_path, env):
    # BatchNorm in train mode takes the batch's statistics over its readable rows: none would give 0 / 0.
    from jaxtl.data import EvalTransform, ImageFolder, Loader, generate_synthetic
    from jaxtl.weights import Preprocessing

    root = generate_synthetic(tmp_path / "data", seed=0, num_classes=2, train_per_class=4, val_per_class=2)
    for i in range(4):
        (root / "train" / "checkerboard" / f"bad-{i}.jpg").write_bytes(b"")
    folder = ImageFolder(root / "train")
    bad = {i for i, (path, _) in enumerate(folder.samples) if "bad-" in path}
    transform = EvalTransform(Preprocessing(resize_size=73, crop_size=64))

    def all_bad_batch(seed):  # the loader's first-epoch order for the run's seed, in batches of 2
        order = Loader(folder, transform, batch_size=2, shuffle=True, seed=seed).order(0)
        return any(set(pair) <= bad for pair in order.reshape(-1, 2).tolist())

    seed = next(seed for seed in range(100) if all_bad_batch(seed))
    overrides = [
        "data.source=folder", f"data.root={root}", "data.skip_bad_files=true", "data.crop_size=64",
        "data.batch_size=2", "data.eval_batch_size=2", f"train.seed={seed}",
        "phases=[{name: all, policy: full, epochs: 1}]",
    ]  # fmt: skip
    result = run(command(tmp_path / "run", *overrides), env)
    assert "skipped 4 unreadable file(s)" in result.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    assert (tmp_path / "run" / "checkpoints" / "latest" / "meta.json").is_file()


def test_an_unreadable_image_is_named_and_skippable(tmp_path, monkeypatch):
    """Permission denied, simulated (a test may run as root, whom permissions do not stop)."""
    import builtins

    from jaxtl.data import EvalTransform, ImageFolder, Loader
    from jaxtl.errors import DataError
    from jaxtl.weights import Preprocessing

    root = tmp_path / "folder"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(root / name / f"{i}.png")
    locked = str(root / "b" / "1.png")
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    transform = EvalTransform(Preprocessing(resize_size=40, crop_size=32))
    with pytest.raises(DataError, match=rf"^{locked}: permission denied; make the file readable or remove it$"):
        list(Loader(ImageFolder(root), transform, batch_size=4, shuffle=False, num_workers=1).epoch(0))
    loader = Loader(ImageFolder(root), transform, batch_size=4, shuffle=False, num_workers=1, skip_bad_files=True)
    assert sum(int(b.mask.sum()) for b in loader.epoch(0)) == 5 and loader.skipped == [locked]


# --- predict on mixed inputs --------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_gives_a_result_or_an_error_line_per_file(tmp_path, env, reference):
    checkpoint = str(reference / "checkpoints" / "best")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    good = {"rgb.jpg": "RGB", "gray.png": "L", "rgba.png": "RGBA", "cmyk.jpg": "CMYK", "palette.png": "P"}
    for name, mode in good.items():
        Image.fromarray(pixels).convert(mode).save(mixed / name)
    (mixed / "text.jpg").write_text("not an image")
    (mixed / "zero.png").write_bytes(b"")
    (mixed / "notes.txt").write_text("not an image, and not named like one")
    (mixed / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    missing = tmp_path / "missing.jpg"

    result = run([*JAXTL, "predict", checkpoint, str(mixed), str(missing), "--top-k", "2"], env, expect=1)
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {str(mixed / n) for n in (*good, "text.jpg", "zero.png", "link.jpg")} | {str(missing)}
    for name in good:
        ranked = lines[str(mixed / name)].split(", ")
        assert len(ranked) == 2 and all(0 <= float(r.split()[1]) <= 1 for r in ranked), ranked
    assert (
        lines[str(mixed / "text.jpg")].startswith("error: ")
        and "not an image PIL can read" in lines[str(mixed / "text.jpg")]
    )
    assert "empty (zero-byte)" in lines[str(mixed / "zero.png")]
    assert "broken symlink" in lines[str(mixed / "link.jpg")] and "no such file" in lines[str(missing)]
    assert "4 of 9 file(s) could not be classified" in result.stderr and "notes.txt" not in result.stdout

    only_bad = run([*JAXTL, "predict", checkpoint, str(missing), str(mixed / "text.jpg")], env, expect=2)
    assert "no image could be classified (2 file(s) failed" in error_line(only_bad)
    assert len(only_bad.stdout.strip().splitlines()) == 2
