"""Durable files: written whole or not at all, in folders that survive a power loss.

Every file the package writes goes through `durable_write` (a temporary file, fsynced, renamed into
place, its folder fsynced), created with mode 0o666 under the umask like any file open() makes, so
that a group sharing a cache under umask 002 can update what another member wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from pathlib import Path

from .liveness import FILE_MODE, close_lock_fd, open_lock_fd


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, *parts: bytes):
    """Write `parts` one after the other to `path` whole and durably: a temporary file, fsynced,
    renamed into place, then its folder fsynced. A kill leaves the old file or the new one, never a
    part; after a power loss a file that is there has its bytes (the data reaches the disk before
    the rename does), so a record written after it never outlives what it records. The temporary
    file is flocked while it is written: one nobody holds is a killed writer's (`remove_leftovers`)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = open_lock_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)  # as open() makes files: umask decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        close_lock_fd(fd)
    _fsync_dir(path.parent)


def remove_leftovers(paths):
    """Remove the temporary files of `durable_write`s cut short by a kill: those no live writer
    holds locked. (A file made a moment ago and not locked yet is empty: it is left alone.)"""
    for leftover in paths:
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stat = os.fstat(fd)
            if stat.st_size or stat.st_mtime < time.time() - 60:
                leftover.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # a live writer's
        finally:
            os.close(fd)


def make_dirs(folder: Path):
    """mkdir -p, each new folder's entry made durable in its parent."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made meanwhile by another task
            continue
        _fsync_dir(new.parent)



def file_sha256(path: Path) -> str | None:
    """sha256 of a file, None if it does not exist (zarr writes no file for an all-zero shard)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
