"""Lock files that a killed process cannot leave behind for ever, and that a live writer keeps.

A lock is a file created exclusively, holding `host pid token`. It is taken over when its holder
is gone: on this host, when its process no longer exists (checked first: a live local holder
keeps its lock however long it takes); on another host (a cluster's shared filesystem), when the
file has not been refreshed for `LOCK_STALE_SECONDS` (holders refresh it while they work, see
`owning`). A takeover is judged and made under an OS lock, so of two processes only one wins, and
a holder removes the lock only while it still holds its own token.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .cache import file_lock

LOCK_STALE_SECONDS = 600  # a lock of another host not refreshed for this long is taken over
HEARTBEAT_SECONDS = 60  # how often a holder refreshes its lock


def try_lock(path: Path) -> str | None:
    """Create lock file `path` exclusively, taking it over if its holder is gone; returns this
    holder's token (pass it to `unlock`), or None if another holds it."""
    me = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
    if _create(path, me):
        return me
    # A takeover is judged, the stale file removed and the new one created under one OS lock, so
    # of two processes finding one stale lock only the first replaces it: the second then judges
    # the winner's lock (alive). A file that vanished meanwhile is not removed, only created.
    with file_lock(path.with_name(f".{path.name}.takeover.lock")):
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            inode = None  # released meanwhile: nothing to remove
        if inode is not None:
            if not stale(path):
                return None
            try:  # the file judged stale, not one created since (its holder released it meanwhile)
                if path.stat().st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass
        return me if _create(path, me) else None


def _create(path: Path, token: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return True


def unlock(path: Path, token: str | None):
    """Remove lock `path` if it still holds `token` (a holder taken over never removes its successor's)."""
    try:
        if token is not None and path.read_text() == token:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def stale(path: Path) -> bool:
    """Whether the lock's holder is gone: its process (this host) or its refreshes (another host)."""
    try:
        age = time.time() - path.stat().st_mtime
        host, pid, _ = path.read_text().split()
    except FileNotFoundError:
        return True  # vanished
    except ValueError:  # being written right now, or written only in part by a killed process
        return age > 10
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False  # alive: it keeps its lock however long its work takes
    return age > LOCK_STALE_SECONDS


class _Heartbeat:
    """Refreshes the mtime of the locks this process holds, so that other hosts see them alive."""

    def __init__(self):
        self.held: dict = {}
        self.lock = threading.Lock()
        self.thread = None

    def add(self, path: Path):
        with self.lock:
            self.held[path] = self.held.get(path, 0) + 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="wildenberg-lock-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, path: Path):
        with self.lock:
            self.held[path] -= 1
            if not self.held[path]:
                del self.held[path]

    def _run(self):
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            with self.lock:
                paths = list(self.held)
            for path in paths:
                try:
                    os.utime(path)
                except OSError:
                    pass


_HEARTBEAT = _Heartbeat()


def _after_fork():
    global _HEARTBEAT
    _HEARTBEAT = _Heartbeat()  # a child holds none of its parent's locks, nor its thread


os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def owning(cache, name: str, index, cancelled=lambda: False):
    """Own shard `index` of array `name` of store `cache` while writing it: its lock, waited for
    while another task or process holds it (a gone holder's lock is taken over). Yields whether
    it still needs writing (False once another has recorded it). `cancelled()`: stop waiting
    (raises `Cancelled`) when the run stops."""
    from ..source.transfer import Cancelled
    lock = cache.progress / name / (".".join(map(str, index)) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while (token := try_lock(lock)) is None:
        if cache.is_done(name, index):
            yield False
            return
        if cancelled():
            raise Cancelled(f"stopped waiting for shard {index} of {name}")
        time.sleep(0.05)
    _HEARTBEAT.add(lock)
    try:
        yield not cache.is_done(name, index)
    finally:
        _HEARTBEAT.remove(lock)
        unlock(lock, token)
