"""Checkpoints: ``latest`` (for resume) and ``best`` (by validation metric), written atomically and verified on load.

A checkpoint is a directory: ``arrays/`` (orbax: the model's parameters and BatchNorm statistics
by torchvision name, and the optimizer state's leaves), ``meta.json`` (step, phase, epoch, loader
position, metrics, the resolved config, class names and class_to_idx, weights source and
preprocessing) and ``manifest.json`` (size and sha256 of every other file), written last.

Layout of a run's ``checkpoints/``::

    latest -> latest.4f0c2a9e1b7d     a symbolic link to the current version
    latest.4f0c2a9e1b7d/              the current version
    latest.9a1e5c03d2f4/              the previous version (kept for latest, as a fallback)
    best -> best.77b0e1c2a4d9
    best.77b0e1c2a4d9/

A save writes the new version under a hidden staging name, renames it to its version name, and then
points the link at it with an atomic rename of a new link over the old one. At every instant the link
names a complete checkpoint (or does not exist yet, before the first save), whatever kills the
process; what an interrupted save leaves behind (a staging directory, a version the link never
reached) is removed by the next save. Loading checks the manifest, so a truncated or altered file
is an error that names it; :func:`load_latest_good` falls back to the newest other version that is
intact, which is how ``jaxtl train --resume`` survives a damaged ``latest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtl.durable import sync_directory
from jaxtl.errors import JaxtlError
from jaxtl.train.faults import fault_point

FORMAT = "jaxtl-checkpoint-2"
LEGACY_FORMATS = ("jaxtl-checkpoint-1",)  # no manifest: loaded unverified
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "jaxtl-checkpoint-manifest-1"
ADVICE = "use another checkpoint (jaxtl train --resume falls back to the previous one by itself)"


class CheckpointError(JaxtlError):
    """A checkpoint that is missing, incomplete, damaged or cannot be written."""


# -- saving ---------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any], *, keep_previous: bool = True
) -> Path:
    """Writes ``arrays`` (a nested dict of arrays) and ``meta`` (JSON) as a new version of checkpoint ``directory``.

    Args:
        directory: the checkpoint's name in its parent, e.g. ``run/checkpoints/latest``; it becomes a
            symbolic link to the new version once that is complete.
        arrays: nested dict of arrays (keys without dots).
        meta: JSON-serialisable metadata; ``format`` is added.
        keep_previous: keep the version the link pointed to before, as a fallback for a damaged one.

    Raises:
        CheckpointError: the checkpoint cannot be written (permissions, full disk); it names the path,
            and the checkpoint the link pointed to before is untouched.
    """

    def write(staging: Path) -> None:
        _write_arrays(staging / "arrays", arrays)
        fault_point(f"{Path(directory).name}.arrays")
        _write_json(staging / "meta.json", {"format": FORMAT, **meta})
        _write_json(staging / MANIFEST, {"format": MANIFEST_FORMAT, "files": _describe_files(staging, sync=True)})

    return _publish(Path(directory), write, keep_previous)


def link_checkpoint(source: str | os.PathLike, directory: str | os.PathLike, *, keep_previous: bool = True) -> Path:
    """A new version of checkpoint ``directory`` holding the files of the checkpoint ``source`` (a sibling, e.g.
    ``best`` for ``latest`` when both hold the same state) as hard links: the same files, not written again.

    Versions are never changed in place, so the two names share the files safely; removing one version
    leaves the other's. Where the filesystem has no hard links the files are copied. Raises as
    :func:`save_checkpoint` does.
    """
    source = Path(source).resolve()

    def write(staging: Path) -> None:
        last = ("meta.json", MANIFEST)  # as a save writes them: after the arrays
        for path in sorted(source.iterdir(), key=lambda path: (path.name in last, path.name)):
            if path.name == "meta.json":
                fault_point(f"{Path(directory).name}.arrays")
            _link_tree(path, staging / path.name)
        sync_directory(staging)

    return _publish(Path(directory), write, keep_previous)


def _link_tree(path: Path, target: Path) -> None:
    """``target``: a hard link to file ``path`` (a copy where hard links fail), or a directory of them."""
    if path.is_dir():
        target.mkdir()
        for child in sorted(path.iterdir()):
            _link_tree(child, target / child.name)
        sync_directory(target)
        return
    try:
        os.link(path, target)
    except OSError:
        shutil.copy2(path, target)


def _publish(directory: Path, write, keep_previous: bool) -> Path:
    """``write(staging)`` fills a staging directory; it becomes a new version, then ``directory`` links to it."""
    parent, name = directory.parent, directory.name
    token = uuid.uuid4().hex[:12]
    staging = parent / f".{name}.tmp-{token}"
    version = parent / f"{name}.{token}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_interrupted_saves(parent, name)
        try:
            staging.mkdir()
            write(staging)
            fault_point(f"{name}.staged")
            os.replace(staging, version)
        finally:
            _remove(staging)
        try:
            fault_point(f"{name}.renamed")
            previous = _point_link(directory, version.name)
        except BaseException:
            if _link_target(directory) != version.name:
                _remove(version, name)
            raise
        fault_point(f"{name}.linked")
        keep = {version.name, previous} if keep_previous else {version.name}
        for old in _versions(parent, name):
            if old.name not in keep:
                _remove(old, name)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoint {directory}: {_describe_os_error(error)}; the previous checkpoint is intact. "
            f"Free disk space or make {parent} writable"
        ) from None
    return directory


def _checkpointer() -> ocp.StandardCheckpointer:
    """Orbax for this process alone: in a multi-process run the first process writes and each reads by itself,
    without the barriers orbax would otherwise hold with processes that are not saving."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )


def _write_arrays(path: Path, arrays: dict[str, Any]) -> None:
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(path.absolute(), jax.device_get(arrays))
    except OSError:
        raise
    except Exception as error:  # orbax reports a failed write in several exception types
        raise OSError(f"orbax could not write {path}: {type(error).__name__}: {error}") from error


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _describe_files(directory: Path, *, sync: bool = False) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``directory`` but the manifest, by POSIX path relative to it."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST:
            files[relative] = {"size": path.stat().st_size, "sha256": _sha256(path, sync=sync)}
    return files


def _sha256(path: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if sync:  # the files orbax wrote reach the disk before the manifest vouches for them
            os.fsync(f.fileno())
    return digest.hexdigest()


def _point_link(directory: Path, target: str) -> str | None:
    """Points the symbolic link ``directory`` at ``target`` (a sibling) atomically; returns its former target."""
    parent, name = directory.parent, directory.name
    previous = _link_target(directory)
    if directory.exists() and not directory.is_symlink():  # a checkpoint directory written before versions
        previous = f"{name}.legacy-{uuid.uuid4().hex[:12]}"
        os.replace(directory, parent / previous)
    link = parent / f".{name}.tmp-link-{uuid.uuid4().hex[:12]}"
    os.symlink(target, link)
    os.replace(link, directory)
    sync_directory(parent)
    return previous


def _link_target(directory: Path) -> str | None:
    return os.readlink(directory) if directory.is_symlink() else None


def _remove_interrupted_saves(parent: Path, name: str) -> None:
    """Staging directories and links that a killed save left (one writer per run: the run lock)."""
    for path in parent.glob(f".{name}.tmp-*"):
        _remove(path)


def _remove(path: Path, name: str | None = None) -> None:
    """Removes a file, link or directory tree. A version of checkpoint ``name`` is first renamed to a
    staging name, so that a removal cut short leaves nothing that looks like a checkpoint."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        if name is not None:
            doomed = path.parent / f".{name}.tmp-old-{uuid.uuid4().hex[:12]}"
            os.replace(path, doomed)
            path = doomed
        shutil.rmtree(path, ignore_errors=True)


def _versions(parent: Path, name: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(name)}\.(?:legacy-)?[0-9a-f]{{12}}$")
    return sorted(p for p in parent.glob(f"{name}.*") if pattern.match(p.name) and p.is_dir() and not p.is_symlink())


def _describe_os_error(error: OSError) -> str:
    text = error.strerror or str(error)
    if error.errno is not None:
        text = f"[Errno {error.errno}] {text}"
    return f"{text}: {error.filename}" if error.filename else text


# -- loading --------------------------------------------------------------------------------------


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's meta.json, checked against its manifest (the arrays are checked by :func:`load_arrays`)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    path = directory / "meta.json"
    if manifest is not None:
        _check_file(directory, "meta.json", manifest["files"].get("meta.json"), hash_it=True)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a jaxtl checkpoint (no meta.json)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}; {ADVICE}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: format {found!r} is not {FORMAT!r}; {ADVICE}")
    if manifest is None and meta["format"] == FORMAT:
        raise CheckpointError(
            f"{directory} is incomplete: {MANIFEST} is missing (a save was cut short, or the directory was altered); "
            f"{ADVICE}"
        )
    return meta


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of the checkpoint against its manifest; returns its meta.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or altered.
    """
    directory = Path(directory)
    meta = load_meta(directory)
    manifest = _read_manifest(directory)
    if manifest is not None:
        for relative, expected in manifest["files"].items():
            _check_file(directory, relative, expected, hash_it=True)
    return meta


def load_arrays(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's arrays (nested dict of numpy arrays), after :func:`verify_checkpoint`."""
    directory = Path(directory)
    verify_checkpoint(directory)
    try:
        with _checkpointer() as checkpointer:
            arrays = checkpointer.restore(directory.resolve() / "arrays")
    except Exception as error:  # orbax raises many types for a damaged directory
        raise CheckpointError(
            f"{directory}/arrays cannot be restored: {type(error).__name__}: {error}; {ADVICE}"
        ) from None
    return jax.tree.map(np.asarray, arrays)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    if directory.is_symlink() and not directory.exists():
        raise CheckpointError(f"{directory} points to {os.readlink(directory)}, which does not exist; {ADVICE}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}): the checkpoint is damaged; {ADVICE}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT or "meta.json" not in files:
        raise CheckpointError(f"{path} is not a {MANIFEST_FORMAT} manifest: the checkpoint is damaged; {ADVICE}")
    return manifest


def _check_file(directory: Path, relative: str, expected: dict | None, *, hash_it: bool) -> None:
    path = directory / relative
    if not isinstance(expected, dict) or not {"size", "sha256"} <= expected.keys():
        raise CheckpointError(
            f"{directory}/{MANIFEST} has no valid entry for {relative}: the checkpoint is damaged; {ADVICE}"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is damaged; {ADVICE}") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({error}); {ADVICE}") from None
    if size != expected["size"]:
        what = "truncated" if size < expected["size"] else "altered"
        raise CheckpointError(
            f"checkpoint file {path} is {what}: {size} bytes, its manifest says {expected['size']}; {ADVICE}"
        )
    if hash_it:
        try:
            digest = _sha256(path)
        except OSError as error:
            raise CheckpointError(f"checkpoint file {path} cannot be read ({error}); {ADVICE}") from None
        if digest != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} was altered: its sha256 is not its manifest's; {ADVICE}")


# -- resuming -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoodCheckpoint:
    """The checkpoint a run resumes from.

    Attributes:
        path: the version directory that was loaded.
        meta: its meta.json.
        arrays: its arrays.
        damaged: ``(path, reason)`` of every newer candidate that failed verification; empty when the
            link's own target was good.
    """

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, Any]
    damaged: tuple[tuple[str, str], ...] = ()


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` (e.g. ``run/checkpoints/latest``) or any version of it exists."""
    directory = Path(directory)
    return directory.exists() or directory.is_symlink() or bool(_versions(directory.parent, directory.name))


def load_latest_good(directory: str | os.PathLike) -> GoodCheckpoint:
    """Loads the checkpoint ``directory`` links to or, if it is missing or damaged, the newest intact other version.

    Candidates: the link's target first, then the other versions by step, newest first.

    Raises:
        CheckpointError: no version is intact; every candidate is listed with its reason.
    """
    directory = Path(directory)
    target = _link_target(directory)
    candidates = [directory] if directory.exists() else []
    others = [v for v in _versions(directory.parent, directory.name) if v.name != target]
    candidates += sorted(others, key=_step_of, reverse=True)
    damaged: list[tuple[str, str]] = []
    if directory.is_symlink() and not directory.exists():
        damaged.append((str(directory), f"points to {target}, which does not exist"))
    for candidate in candidates:
        try:
            meta = load_meta(candidate)
            arrays = load_arrays(candidate)
        except CheckpointError as error:
            damaged.append((str(candidate), str(error).removesuffix(f"; {ADVICE}")))
            continue
        return GoodCheckpoint(candidate.resolve(), meta, arrays, tuple(damaged))
    if not damaged:
        raise CheckpointError(f"there is no checkpoint {directory}")
    reasons = "; ".join(f"{path}: {reason}" for path, reason in damaged)
    raise CheckpointError(f"no intact version of checkpoint {directory}: {reasons}")


def _step_of(version: Path) -> int:
    try:
        return int(json.loads((version / "meta.json").read_text(encoding="utf-8")).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1
