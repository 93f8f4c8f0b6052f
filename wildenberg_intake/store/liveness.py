"""Liveness: every lock of the store is an OS lock (flock) that the kernel takes away when its holder dies.

Two kinds, one mechanism:

- `file_lock(path)`: a blocking flock for a short critical section (an array's COMPLETE mark and its
  evictions, the label list, the size ledger).
- `try_lock(path)` / `owning(...)`: an *ownership* lock for work that takes long (writing a shard,
  fetching a staged source chunk, a synapse run's scratch folder). The holder keeps an exclusive
  flock on the lock file for as long as it works; whoever obtains the flock knows that no process
  sharing the kernel's (or NFS's) locks holds it, whatever process ids the file names. A process id
  is never trusted: a pid reused by another process, or the same small pid of a restarted
  container, is not a holder. The file names its holder (host, boot id, pid, process start time, a
  random token) for people and for the one case the flock cannot decide alone:

- Across hosts whose flocks do not reach each other (NFS mounted with `local_lock=all`/`nolock`, or
  v3 without `lockd`), a holder on another host is alive while it refreshes the file's mtime (a
  *lease*, every `HEARTBEAT_SECONDS`); a lease not refreshed for `LOCK_STALE_SECONDS` is taken over.
  On NFS v4 and v3 with `lockd`, flocks are shared between clients and the lease is a second check.

Release is atomic under the holder's flock: the lock file is unlinked while still locked (only if it
is still the holder's file), so a taker that opened the old file sees it unlinked once it obtains
the flock and starts again on the new path. Forked children close their copies of every lock
descriptor (a child holds none of its parent's locks: an flock lives while any copy is open).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK_STALE_SECONDS = 600  # a lease of another host not refreshed for this long is taken over
HEARTBEAT_SECONDS = 60  # how often a holder refreshes its leases
FILE_MODE = 0o666  # every file the package makes: the umask decides (a group cache under umask 002: 0o664)

# Descriptors of this process that hold (or are about to hold) an flock. A forked child shares their
# open file descriptions, and an flock is released only once every descriptor of its description is
# closed: kept open in a child (a torch loader worker, a table's worker process), they would hold
# the parent's locks for the child's whole life, and the next taker would wait for ever. The child
# holds none of them (the threads that did are not in it): it closes its copies.
_LOCK_FDS: set = set()
# Opening a descriptor and registering it are one step for fork: a fork between the two would give
# the child a copy it does not know to close (seen: a loader worker forked while I/O threads took
# the ledger's lock kept it for its whole life). Forks wait for this lock.
_FDS_LOCK = threading.Lock()


def open_lock_fd(path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open for a descriptor that will hold an flock (closed in forked children); close it with
    `close_lock_fd`."""
    with _FDS_LOCK:
        fd = os.open(path, flags, mode)
        _LOCK_FDS.add(fd)
    return fd


def close_lock_fd(fd: int):
    """Close a descriptor of `open_lock_fd` (releasing its flock)."""
    with _FDS_LOCK:
        _LOCK_FDS.discard(fd)
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False):
    """An OS lock (flock) on `path` for the block: released by the OS if the holder dies, and never
    held by a forked child."""
    os.makedirs(path.parent, exist_ok=True)
    fd = open_lock_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        close_lock_fd(fd)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with the
    boot id, it tells a process from a later one that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


_IDENTITY: tuple | None = None


def identity() -> tuple[str, str, int, str]:
    """(host, boot id, pid, start time) of this process."""
    global _IDENTITY
    if _IDENTITY is None or _IDENTITY[2] != os.getpid():
        _IDENTITY = (socket.gethostname(), _boot_id(), os.getpid(), _start_time(os.getpid()))
    return _IDENTITY


class Held:
    """An ownership lock this process holds: its file and the descriptor whose flock holds it."""

    def __init__(self, path: Path, fd: int, token: str):
        self.path, self.fd, self.token = path, fd, token
        self.released = False
        self.pid = os.getpid()  # a forked child closed its copy of `fd`: the number may be another file's

    def __repr__(self):
        return f"Held({str(self.path)!r}, {self.token!r})"

    def release(self):
        """Remove the lock file (if it is still this holder's) and drop the flock. Idempotent."""
        if self.released or os.getpid() != self.pid:
            return
        self.released = True
        _HEARTBEAT.remove(self)
        try:
            try:
                now, mine = os.stat(self.path), os.fstat(self.fd)
                if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.path)  # still flocked: nobody can take it between the check and this
            except FileNotFoundError:
                pass
        finally:
            try:
                close_lock_fd(self.fd)
            except OSError:
                pass  # closed in a forked child already


def holder(path: Path) -> dict | None:
    """Who a lock file names as its holder ({"host", "boot_id", "pid", "start", "token"}), None if
    it is absent or names nobody (being written, or written by an older version)."""
    try:
        return _parse(Path(path).read_bytes())
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict | None:
    fields = data.decode(errors="replace").split()
    if len(fields) != 5:
        return None
    return dict(zip(("host", "boot_id", "pid", "start", "token"), fields))


def _leased_elsewhere(named: dict | None, mtime: float) -> bool:
    """Whether the holder a lock file names may be alive although we obtained its flock: only a
    holder on another host (or another boot) whose flocks we may not see, while its lease is fresh."""
    if named is None:
        return False  # names nobody: a killed creator's, or another version's pid-only file
    host, boot, _, _ = identity()
    if (named["host"], named["boot_id"]) == (host, boot):
        return False  # this kernel released its flock: its holder is gone, whatever its pid is now
    return time.time() - mtime < LOCK_STALE_SECONDS


def try_lock(path: Path) -> Held | None:
    """Take ownership lock `path` (created if absent), unless a live holder has it; returns the
    `Held` lock (call `release()`), or None. A dead holder's lock is taken over: its flock is gone
    with it. Never blocks."""
    path = Path(path)
    for _ in range(100):  # each round loses only to a release or takeover made meanwhile
        try:
            fd = open_lock_fd(path, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            close_lock_fd(fd)
            return None  # a live holder (this host, or another sharing our locks)
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            close_lock_fd(fd)  # released (unlinked) before we got its flock: try the file there now
            continue
        if mine.st_size and _leased_elsewhere(_parse(os.pread(fd, 4096, 0)), mine.st_mtime):
            close_lock_fd(fd)
            return None
        host, boot, pid, start = identity()
        token = f"{host} {boot} {pid} {start} {uuid.uuid4().hex}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, token.encode(), 0)
        held = Held(path, fd, token)
        _HEARTBEAT.add(held)
        return held
    raise RuntimeError(f"lock {path} changed hands 100 times while we tried to take it")


class _Heartbeat:
    """Refreshes the mtime of the ownership locks this process holds: their lease for other hosts."""

    def __init__(self):
        self.held: set = set()
        self.lock = threading.Lock()
        self.thread = None

    def add(self, held: Held):
        with self.lock:
            self.held.add(held)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="wildenberg-lock-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, held: Held):
        with self.lock:
            self.held.discard(held)

    def _run(self):
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            with self.lock:  # a lock is released (its descriptor closed) only after leaving this set
                for held in list(self.held):
                    try:
                        os.utime(held.fd)
                    except OSError:
                        pass


_HEARTBEAT = _Heartbeat()


def _after_fork():
    global _HEARTBEAT, _FDS_LOCK
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    _FDS_LOCK = threading.Lock()
    _HEARTBEAT = _Heartbeat()  # a child holds none of its parent's locks, nor its thread


os.register_at_fork(before=lambda: _FDS_LOCK.acquire(), after_in_parent=lambda: _FDS_LOCK.release(),
                    after_in_child=_after_fork)


@contextlib.contextmanager
def owning(lock: Path, is_done, cancelled=lambda: False, what: str = "it"):
    """Own lock file `lock` while doing work that `is_done()` says is finished once another did it:
    waits while another live holder has it (polling; a dead holder's is taken over at once). Yields
    whether the work is still needed (False once another finished it). `cancelled()`: stop waiting,
    raising `Cancelled` naming `what`."""
    from ..source.transfer import Cancelled
    while (held := try_lock(lock)) is None:
        if is_done():
            yield False
            return
        if cancelled():
            raise Cancelled(f"stopped waiting for {what}")
        time.sleep(0.05)
    try:
        yield not is_done()
    finally:
        held.release()


def remove_if_dead(folder: Path, lock: Path) -> bool:
    """Remove `folder` (a run's scratch) if the ownership lock `lock` that its run held is free (the
    run is gone); returns whether it did."""
    import shutil
    held = try_lock(lock)
    if held is None:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        held.release()
    return True
