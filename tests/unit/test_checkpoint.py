"""Checkpoints: versions behind a link, a manifest checked on load, fallback to an intact version, failed writes."""

import collections
import json
import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtl.train import checkpoint as ckpt
from jaxtl.train import faults
from jaxtl.train.checkpoint import CheckpointError, load_arrays, load_latest_good, load_meta, save_checkpoint


def arrays_of(value: float) -> dict:
    return {"model": {"fc": {"weight": np.full((3, 4), value, np.float32)}}, "opt_state": {"0": np.arange(5.0) + value}}


def save(directory: Path, step: int, **kwargs) -> Path:
    return save_checkpoint(directory, arrays_of(float(step)), {"step": step}, **kwargs)


def versions(checkpoints: Path, name: str = "latest") -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(f"{name}.") and not p.is_symlink())


def leftovers(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("."))


def files_of(version: Path) -> set[str]:
    return {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()}


def test_latest_links_a_complete_version_listed_file_by_file_in_its_manifest(tmp_path):
    latest = tmp_path / "latest"
    save(latest, 5)
    first = os.readlink(latest)
    save(latest, 10)
    assert latest.is_symlink() and os.readlink(latest) != first and os.readlink(latest).startswith("latest.")
    manifest = json.loads((latest / "manifest.json").read_text())
    assert set(manifest["files"]) == files_of(latest.resolve()) - {"manifest.json"}
    assert "meta.json" in manifest["files"] and any(f.startswith("arrays/") for f in manifest["files"])
    for relative, entry in manifest["files"].items():
        assert entry["size"] == (latest / relative).stat().st_size
    assert load_meta(latest)["step"] == 10 and load_meta(latest)["format"] == ckpt.FORMAT
    assert np.array_equal(load_arrays(latest)["model"]["fc"]["weight"], np.full((3, 4), 10.0))
    # The previous version stays as a fallback; an older one goes; nothing staged is left.
    assert versions(tmp_path) == sorted([first, os.readlink(latest)])
    save(latest, 15)
    assert len(versions(tmp_path)) == 2 and first not in versions(tmp_path)
    assert leftovers(tmp_path) == []


def test_best_keeps_no_previous_version(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path / "best", step, keep_previous=False)
    assert versions(tmp_path, "best") == [os.readlink(tmp_path / "best")]
    assert load_meta(tmp_path / "best")["step"] == 3


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_array_file(version: Path) -> Path:
    return max((p for p in (version / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda v: _truncate(_largest_array_file(v)),
            r"checkpoint file .*/arrays/.* is truncated: \d+ bytes, its manifest says \d+",
        ),
        (lambda v: _flip_a_byte(_largest_array_file(v)), r"checkpoint file .*/arrays/.* was altered: its sha256"),
        (lambda v: _largest_array_file(v).unlink(), r"checkpoint file .*/arrays/.* is missing"),
        (lambda v: (v / "manifest.json").unlink(), r"is incomplete: manifest.json is missing"),
        (lambda v: (v / "manifest.json").write_text("{not json"), r"manifest.json cannot be read"),
        (
            lambda v: (v / "meta.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 99})),
            r"meta.json is (truncated|altered)",
        ),
    ],
    ids=["truncated", "altered", "missing", "no-manifest", "bad-manifest", "meta-edited"],
)
def test_damage_is_detected_on_load_naming_the_file_and_what_to_do(tmp_path, damage, message):
    save(tmp_path / "latest", 5)
    damage((tmp_path / "latest").resolve())
    with pytest.raises(CheckpointError, match=message) as info:
        load_arrays(tmp_path / "latest")
    assert "\n" not in str(info.value) and str(info.value).endswith(ckpt.ADVICE)


def test_a_dangling_link_is_reported(tmp_path):
    save(tmp_path / "latest", 5)
    ckpt._remove((tmp_path / "latest").resolve())
    with pytest.raises(CheckpointError, match=r"latest points to latest\.[0-9a-f]{12}, which does not exist"):
        load_meta(tmp_path / "latest")


def test_resume_falls_back_to_the_newest_intact_version_and_lists_why(tmp_path):
    latest = tmp_path / "latest"
    save(latest, 5)
    previous = latest.resolve()
    save(latest, 10)
    good = load_latest_good(latest)
    assert good.meta["step"] == 10 and good.damaged == ()
    _truncate(_largest_array_file(latest.resolve()))
    good = load_latest_good(latest)
    assert good.path == previous and good.meta["step"] == 5 and good.arrays["opt_state"]["0"][0] == 5.0
    assert len(good.damaged) == 1 and good.damaged[0][0] == str(latest) and "is truncated" in good.damaged[0][1]
    # The link itself gone (as after a crash of an older layout): the versions still count.
    latest.unlink()
    assert load_latest_good(latest).meta["step"] == 5
    _flip_a_byte(_largest_array_file(previous))
    with pytest.raises(
        CheckpointError, match=r"no intact version of checkpoint .*latest: .*truncated.*; .*was altered"
    ):
        load_latest_good(latest)


def test_a_checkpoint_of_the_first_format_loads_and_becomes_a_version(tmp_path):
    legacy = tmp_path / "latest"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((legacy / "arrays").absolute(), arrays_of(1.0))
    (legacy / "meta.json").write_text(json.dumps({"format": "jaxtl-checkpoint-1", "step": 1}))
    assert load_meta(legacy)["step"] == 1 and load_arrays(legacy)["opt_state"]["0"][0] == 1.0
    save(legacy, 2)
    assert load_meta(legacy)["step"] == 2
    kept = [v for v in versions(tmp_path) if ".legacy-" in v]
    assert len(kept) == 1 and load_meta(tmp_path / kept[0])["step"] == 1


def test_what_an_interrupted_save_left_is_removed_by_the_next(tmp_path):
    latest = tmp_path / "latest"
    save(latest, 5)
    current = os.readlink(latest)
    (tmp_path / ".latest.tmp-0123456789ab" / "arrays").mkdir(parents=True)  # killed while staging
    orphan = tmp_path / "latest.0123456789ab"  # killed between the rename and the link switch
    orphan.mkdir()
    (tmp_path / ".latest.tmp-link-0123456789ab").symlink_to(current)
    save(latest, 10)
    assert leftovers(tmp_path) == [] and not orphan.exists()
    assert versions(tmp_path) == sorted([current, os.readlink(latest)])


# --- write failures ----------------------------------------------------------------------------------


def test_a_linked_checkpoint_holds_the_files_of_its_source_without_writing_them_again(tmp_path):
    save(tmp_path / "best", 7, keep_previous=False)
    save(tmp_path / "latest", 5)
    ckpt.link_checkpoint(tmp_path / "best", tmp_path / "latest")
    best, latest = (tmp_path / "best").resolve(), (tmp_path / "latest").resolve()
    assert latest != best and latest.name.startswith("latest.") and files_of(latest) == files_of(best)
    for relative in files_of(best):
        assert (latest / relative).stat().st_ino == (best / relative).stat().st_ino, relative  # one file, two names
    assert ckpt.verify_checkpoint(tmp_path / "latest")["step"] == 7
    assert np.array_equal(load_arrays(tmp_path / "latest")["model"]["fc"]["weight"], np.full((3, 4), 7.0))
    assert len(versions(tmp_path)) == 2 and leftovers(tmp_path) == []  # the previous latest is kept
    # A later best removes its old version: latest's names keep the files.
    save(tmp_path / "best", 9, keep_previous=False)
    assert not best.exists() and ckpt.verify_checkpoint(tmp_path / "latest")["step"] == 7


@pytest.mark.parametrize("point", ["latest.arrays", "latest.staged", "latest.renamed"])
def test_an_io_error_while_linking_leaves_the_previous_checkpoint_and_no_staging(tmp_path, monkeypatch, point):
    save(tmp_path / "best", 7, keep_previous=False)
    save(tmp_path / "latest", 5)
    before = versions(tmp_path)
    monkeypatch.setenv("JAXTL_TEST_FAULT", f"oserror:{point}:1")
    monkeypatch.setattr(faults, "_passes", collections.Counter())
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint {tmp_path}/latest: \[Errno 28\]"):
        ckpt.link_checkpoint(tmp_path / "best", tmp_path / "latest")
    assert_previous_intact(tmp_path, before)
    assert load_meta(tmp_path / "best")["step"] == 7


def assert_previous_intact(tmp_path: Path, before: list[str]) -> None:
    assert load_meta(tmp_path / "latest")["step"] == 5
    assert np.array_equal(load_arrays(tmp_path / "latest")["opt_state"]["0"], np.arange(5.0) + 5)
    assert versions(tmp_path) == before, "a half-written version was left"
    assert leftovers(tmp_path) == [], "a staging directory was left"


@pytest.mark.parametrize("point", ["latest.arrays", "latest.staged", "latest.renamed"])
def test_an_injected_io_error_leaves_the_previous_checkpoint_and_no_staging(tmp_path, monkeypatch, point):
    save(tmp_path / "latest", 5)
    before = versions(tmp_path)
    monkeypatch.setenv("JAXTL_TEST_FAULT", f"oserror:{point}:1")
    monkeypatch.setattr(faults, "_passes", collections.Counter())
    with pytest.raises(
        CheckpointError, match=rf"cannot write checkpoint {tmp_path}/latest: \[Errno 28\] No space left"
    ):
        save(tmp_path / "latest", 10)
    assert_previous_intact(tmp_path, before)


def test_an_orbax_write_error_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "latest", 5)
    before = versions(tmp_path)

    def fail(self, directory, *args, **kwargs):
        (Path(directory) / "partial").mkdir(parents=True)  # something was written before the error
        raise OSError(5, "Input/output error", str(directory / "d"))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*/latest: \[Errno 5\] Input/output error: .*tmp-"
    ):
        save(tmp_path / "latest", 10)
    assert_previous_intact(tmp_path, before)


def test_a_failed_link_switch_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "latest", 5)
    before = versions(tmp_path)

    def fail(source, destination, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(destination))

    monkeypatch.setattr(os, "symlink", fail)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*latest: \[Errno 13\] Permission denied"):
        save(tmp_path / "latest", 10)
    monkeypatch.undo()
    assert_previous_intact(tmp_path, before)


def test_a_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    save(tmp_path / "latest", 5)
    before = versions(tmp_path)
    if os.geteuid() == 0:
        # root writes into a directory without write permission; refuse like the kernel refuses other users
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == tmp_path:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        tmp_path.chmod(0o555)
    try:
        with pytest.raises(
            CheckpointError,
            match=rf"cannot write checkpoint {tmp_path}/latest: .*Permission denied.*make {tmp_path} writable",
        ):
            save(tmp_path / "latest", 10)
    finally:
        tmp_path.chmod(0o755)
    monkeypatch.undo()
    assert_previous_intact(tmp_path, before)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 600 KiB tmpfs, where root can mount one; the checkpoint of the tests fits, a 800 KB one does not."""
    import shutil
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=False, capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_clear_error_and_leaves_the_previous_checkpoint(small_filesystem):
    save(small_filesystem / "latest", 5)
    before = versions(small_filesystem)
    big = {"model": {"fc": {"weight": np.random.default_rng(0).random(200_000, np.float32)}}}
    with pytest.raises(
        CheckpointError, match=rf"cannot write checkpoint {small_filesystem}/latest: .*No space left on device"
    ):
        save_checkpoint(small_filesystem / "latest", big, {"step": 10})
    assert_previous_intact(small_filesystem, before)
