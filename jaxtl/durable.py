"""Durable writes: flushing a directory's entries to disk, so that a rename survives a power cut."""

from __future__ import annotations

import os


def sync_directory(directory: str | os.PathLike) -> None:
    """fsync ``directory`` itself: its entries (a file created or renamed into it) reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
