"""The size ledger of a store: every file the package keeps there with its bytes, without listing it.

A disk budget (`cache_limit`) and the lazy bookkeeping need the store's sizes after every shard
written. Listing and stat-ing every record for that costs O(n) per shard, O(n^2) over a lazy fill
(hours on NFS, where a stat is a round trip). The ledger is an append-only log instead:

    <store>/ledger.log   one line per change:  "+ <kind> <key> <bytes> <time>"  or  "- <kind> <key>"

kinds: `shard` (key `<array>:<i.j.k>`: a recorded shard's file, 0 bytes for an all-zero shard) and
`staged` (key: the file's path under the store: staged source chunks and pyramid quarters).
Lines are appended under an flock, one write each. Every process keeps its own view and reads only
the lines appended since it last looked, so each change costs O(1) amortised; a log grown past
twice its live entries is rewritten whole (others see a new file and read it again).

The ledger is a derived index, never the truth: records say what is done. It is rebuilt from the
records and the staging folder when absent (a store of an older version, or deleted by hand), and a
shard found recorded but missing from it (its writer killed between its record and its line) is
added when it is next read.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

from .files import durable_write
from .liveness import file_lock

_RECORD = re.compile(r"\d+\.\d+\.\d+")
STAGED_FIRST = 1e10  # seconds taken off a staged file's time among the eviction candidates


def shard_key(name: str, index) -> str:
    return f"{name}:{'.'.join(str(int(i)) for i in index)}"


def parse_shard_key(key: str) -> tuple[str, tuple]:
    name, _, index = key.rpartition(":")
    return name, tuple(int(i) for i in index.split("."))


class Ledger:
    """This process's view of one store's ledger (one per store and process: `ledger_for`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "ledger.log"
        self.lock_path = self.root / "locks" / "ledger.lock"
        self._mutex = threading.RLock()
        self._reset()

    def _reset(self):
        self.entries: dict = {}  # (kind, key) -> [bytes, time]
        self.total = 0
        self.counts: Counter = Counter()  # array -> shards recorded
        self.largest: Counter = Counter()  # array -> bytes of its largest shard seen
        self._shards: dict = {}  # array -> set of recorded indices
        self._heap: list = []  # (time, kind, key): eviction candidates, oldest first (stale ones skipped)
        self._file, self._offset, self._lines = None, 0, 0

    # -- reading ---------------------------------------------------------------------------------
    def refresh(self, locked: bool = False):
        """Apply the lines appended since this process last looked (one stat when there are none).
        `locked`: the caller holds the ledger lock (an flock: taking it again would wait on itself)."""
        with self._mutex:
            if self._file == "memory":
                return  # a store this process cannot write: its view was built once, nothing appends
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._rebuild(locked)
                return
            if (st.st_ino, st.st_dev) != self._file:  # first look, or rewritten by a compaction
                self._reset()
                self._file = (st.st_ino, st.st_dev)
            if st.st_size <= self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
            end = data.rfind(b"\n") + 1  # a line being appended right now is read next time
            for line in data[:end].decode(errors="replace").splitlines():
                self._apply(line)
            self._offset += end

    def _apply(self, line: str):
        fields = line.split()
        self._lines += 1
        if len(fields) == 5 and fields[0] == "+":
            _, kind, key, size, when = fields
            try:
                self._put(kind, key, int(size), float(when))
            except ValueError:
                pass  # a line cut by a power loss
        elif len(fields) == 3 and fields[0] == "-":
            self._drop(fields[1], fields[2])

    def _put(self, kind: str, key: str, size: int, when: float):
        self._drop(kind, key)
        if kind == "staged":  # evicted before any shard: made again only if a shard not written yet needs it
            when -= STAGED_FIRST
        self.entries[(kind, key)] = [size, when]
        self.total += size
        heapq.heappush(self._heap, (when, kind, key))
        if len(self._heap) > 2 * len(self.entries) + 1024:  # drop the stale candidates
            self._heap = [(w, k, n) for (k, n), (_, w) in self.entries.items()]
            heapq.heapify(self._heap)
        if kind == "shard":
            name, index = parse_shard_key(key)
            self.counts[name] += 1
            self.largest[name] = max(self.largest[name], size)
            self._shards.setdefault(name, set()).add(index)

    def _drop(self, kind: str, key: str):
        old = self.entries.pop((kind, key), None)
        if old is None:
            return
        self.total -= old[0]
        if kind == "shard":
            name, index = parse_shard_key(key)
            self.counts[name] -= 1
            self._shards[name].discard(index)

    # -- writing ---------------------------------------------------------------------------------
    def add(self, kind: str, key: str, size: int, when: float | None = None):
        """Note a file of `size` bytes written (replacing any earlier entry of `key`)."""
        self._append(f"+ {kind} {key} {int(size)} {time.time() if when is None else when:.6f}\n")

    def remove(self, kind: str, key: str):
        """Note a file removed (nothing if the ledger does not hold it)."""
        with self._mutex:
            self.refresh()
            if (kind, key) not in self.entries:
                return
        self._append(f"- {kind} {key}\n")

    def _append(self, line: str):
        with self._mutex, file_lock(self.lock_path):
            self.refresh(locked=True)  # every line before ours applied first: all views agree on the order
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self.refresh(locked=True)
            if self._lines > 4096 and self._lines > 2 * len(self.entries):
                self._write_whole()

    def _write_whole(self):
        """Rewrite the log as its live entries (under the ledger lock)."""
        lines = [f"+ {kind} {key} {size} {when + (STAGED_FIRST if kind == 'staged' else 0):.6f}\n"
                 for (kind, key), (size, when) in self.entries.items()]
        durable_write(self.path, "".join(lines).encode())
        self._reset()
        self.refresh(locked=True)

    def _rebuild(self, locked: bool):
        """Write the ledger from the store's records and staging folder (it was absent). A store this
        process cannot write (a read-only mount of a store of an older version) gets the same view
        in memory only."""
        try:
            with contextlib.nullcontext() if locked else file_lock(self.lock_path):
                if self.path.exists():  # rebuilt by another process meanwhile
                    self.refresh(locked=True)
                    return
                lines = self._scan()
                os.makedirs(self.root, exist_ok=True)
                durable_write(self.path, "".join(lines).encode())
                self.refresh(locked=True)
        except OSError as e:
            if isinstance(e, FileNotFoundError) or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            self._reset()
            for line in self._scan():
                self._apply(line)
            self._file = "memory"

    def _scan(self) -> list:
        """The ledger's lines for what the store's folder holds now (records and staged files)."""
        lines = []
        progress = self.root / "progress"
        if progress.is_dir():
            for record in progress.rglob("*"):
                if not _RECORD.fullmatch(record.name):
                    continue
                try:
                    size = json.loads(record.read_text()).get("bytes", 0)
                    when = record.stat().st_mtime
                except (OSError, ValueError):
                    continue
                name = str(record.parent.relative_to(progress))
                lines.append(f"+ shard {shard_key(name, record.name.split('.'))} {size} {when:.6f}\n")
        staging = self.root / "staging"
        if staging.is_dir():
            for path in staging.rglob("*"):
                if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".lock") \
                        and "tables" not in path.relative_to(staging).parts[:1]:
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    lines.append(f"+ staged {path.relative_to(self.root)} {st.st_size} {st.st_mtime:.6f}\n")
        return lines

    def remove_under(self, prefix: str):
        """Note every staged file under `prefix` (a path under the store) removed: a folder deleted whole."""
        with self._mutex:
            self.refresh()
            gone = [key for kind, key in self.entries if kind == "staged" and key.startswith(prefix.rstrip("/") + "/")]
        for key in gone:
            self.remove("staged", key)

    # -- questions -------------------------------------------------------------------------------
    def shards(self, name: str) -> set:
        """Indices of array `name`'s shards the ledger holds (after a refresh)."""
        with self._mutex:
            self.refresh()
            return set(self._shards.get(name, ()))

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self.entries

    def by_kind(self) -> dict:
        """{kind or array: (files, bytes)}: the breakdown `wildenberg-intake du` shows."""
        with self._mutex:
            self.refresh()
            out: dict = {}
            for (kind, key), (size, _) in self.entries.items():
                group = parse_shard_key(key)[0] if kind == "shard" else f"staged: {Path(key).parts[1]}"
                files, total = out.get(group, (0, 0))
                out[group] = (files + 1, total + size)
            return out

    def oldest(self):
        """Pop the entry used least recently as far as this process knows: (kind, key, time), or None."""
        with self._mutex:
            while self._heap:
                when, kind, key = heapq.heappop(self._heap)
                entry = self.entries.get((kind, key))
                if entry is not None and entry[1] == when:
                    return kind, key, when
            return None

    def requeue(self, kind: str, key: str, when: float):
        """Put an entry back among the candidates as used at `when` (a shard read since it was noted,
        or one that could not go now)."""
        with self._mutex:
            entry = self.entries.get((kind, key))
            if entry is not None:
                entry[1] = when
                heapq.heappush(self._heap, (when, kind, key))


_LEDGERS: dict = {}
_LEDGERS_LOCK = threading.Lock()


def _after_fork():
    global _LEDGERS_LOCK
    _LEDGERS_LOCK = threading.Lock()  # a parent's thread may have held it; its views are not ours
    _LEDGERS.clear()


os.register_at_fork(after_in_child=_after_fork)


def ledger_for(root) -> Ledger:
    """This process's ledger of the store at `root` (shared by every object of the process)."""
    key = (str(root), os.getpid())
    with _LEDGERS_LOCK:
        if key not in _LEDGERS:
            _LEDGERS[key] = Ledger(Path(root))
        return _LEDGERS[key]
