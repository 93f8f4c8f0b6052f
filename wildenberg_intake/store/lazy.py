"""Read-through access: an array of a store that fetches the shards a read touches, then reads the cache.

Every path that reads voxels lazily goes through `ReadThroughArray`: `to_dask()` (its dask chunks
are the store's output shards), `read()`, previews and the `lazy=True` torch datasets. A read first
makes sure each shard it touches is recorded, writing it with the same `ShardWriter` task a full
materialisation runs (one source request per chunk, shared chunks staged, the shard renamed into
place, then its done record), and only then reads it from the cache. So lazy reads and a later
`materialise()` share all their work, and many processes read through one cache: a process that
finds a shard being written by another waits for its record (a killed writer's lock is taken over
as in a materialisation).

With a disk budget (`cache_limit`), the shards least recently used are evicted once the store's
shard files exceed it, except those a process is reading right now (`StoreCache.hold`).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import re
import threading
import time

import numpy as np

from .format import SHARDS
from .layout import array_path, shard_box, shard_grid
from .cache import DamagedShard, StoreCache
from .liveness import close_lock_fd
from .engine import DEFAULT_CONNECTIONS, DEFAULT_WORKERS, prepare, writer_for
from .ledger import parse_shard_key, shard_key
from .plan import StorePlan
from .reader import DEFAULT_CACHE_MB, ShardedArrayReader, window

_FINISHING = threading.Lock()


def _after_fork():
    global _FINISHING
    _FINISHING = threading.Lock()  # a prefetch thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value, name: str = "cache_limit") -> int | None:
    """Bytes from an integer or a string such as "50GB", "512 MiB" or "2e9"; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower()) \
        if isinstance(value, str) else None
    if match and match.group(2) in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(f"{name}={value!r} is not valid; allowed: a positive number of bytes, or a string such as "
                     "'50GB', '500MB', '2GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")


def shards_touching(starts, stops) -> list[tuple]:
    """Output shard indices that the voxel box [starts, stops) touches."""
    ranges = [range(a // s, -(-b // s)) for a, b, s in zip(starts, stops, SHARDS)]
    return [(i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2]]


def enforce_limit(cache: StoreCache, limit: int, keep=()) -> int:
    """Evict what the store keeps, least recently used first, until every byte the ledger counts
    (shard files and staged files) fits `limit`; shards in `keep` ((array, index) pairs) and shards
    being read are kept. Returns the number of files removed.

    O(1) amortised per file written: the ledger gives the sizes and the candidates (no listing); a
    candidate's record is stat-ed for its last use (a read by any process touches it), and one read
    since it was noted goes back among the candidates at its new time."""
    ledger = cache.ledger
    ledger.refresh()
    removed, kept = 0, []
    try:
        while ledger.total > limit:
            candidate = ledger.oldest()
            if candidate is None:
                break
            kind, key, when = candidate
            if kind == "staged":  # a staged file is fetched or made again if it is needed again
                (cache.root / key).unlink(missing_ok=True)
                ledger.remove(kind, key)
                removed += 1
                continue
            name, index = parse_shard_key(key)
            try:
                used = cache.record_path(name, index).stat().st_mtime
            except FileNotFoundError:  # forgotten by a process killed before it said so
                ledger.remove(kind, key)
                continue
            if used > when + 1e-3:
                ledger.requeue(kind, key, used)  # read since: not the least recently used
            elif (name, index) in keep or not cache.evict(name, index):
                kept.append((kind, key, when))  # wanted now, or being read
            else:
                removed += 1
    finally:
        for kind, key, when in kept:
            ledger.requeue(kind, key, when)
    return removed


class ReadThroughArray:
    """Array `name` of a store as a numpy-style, read-only array (`arr[z0:z1, y0:y1, x0:x1]`) that
    fetches the shards a read touches into the cache first. Picklable (dask workers, loader
    workers): each process opens its own reader and writer.

    connections: chunk requests in flight per process; cache_limit: bytes the store's shard
    files may use (None: no limit); cache_mb: this process's LRU of decoded inner chunks.
    """

    def __init__(self, plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS,
                 cache_limit: int | None = None, cache_mb: float = DEFAULT_CACHE_MB, check_hashes: bool = False):
        src = plan.source(name)  # a fetched array, or a pyramid level `<array>@<level>`
        self.plan, self.name, self.connections = plan, name, connections
        self.cache_limit, self.cache_mb, self.check_hashes = cache_limit, cache_mb, check_hashes
        self.shape, self.dtype, self.ndim = tuple(src.shape), np.dtype(src.dtype), 3
        self.size = int(np.prod(self.shape))
        self.total_shards = len(shard_grid(self.shape))
        self.cache = prepare(plan, [name])
        self._writer = None
        self._reader = None
        self._keep_names = None
        # Shards whose every byte this process has checked (check_hashes): each on
        # its first read, so that opening an array costs the same for 16 shards or 3,600.
        self._checked = set()

    def __getstate__(self):
        return {"plan": self.plan, "name": self.name, "connections": self.connections,
                "cache_limit": self.cache_limit, "cache_mb": self.cache_mb, "check_hashes": self.check_hashes}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"ReadThroughArray({self.cache.root.name}/{self.name}, shape={self.shape}, dtype={self.dtype})"

    @property
    def writer(self):
        if self._writer is None:
            self._writer = writer_for(self.plan, self.name, self.connections)
            if self.cache_limit is not None:
                self._writer.stage_shared = False  # staged chunks would outgrow the budget mid-shard
        return self._writer

    @property
    def reader(self) -> ShardedArrayReader:
        if self._reader is None:
            self._reader = ShardedArrayReader(self.cache.zarr_path / array_path(self.name), self.cache_mb)
        return self._reader

    def cached_shards(self) -> set:
        """Shards of this array recorded in the cache now (by any process), as the store's ledger
        says (no listing of the records)."""
        return self.cache.ledger.shards(self.name)

    def ensure(self, index) -> int:
        """Make sure shard `index` is recorded: fetch and write it unless it is, or wait for the
        process writing it. Returns the bytes this call wrote (0 if it was there)."""
        index = tuple(index)
        ledger = self.cache.ledger
        if self.cache.is_done(self.name, index):  # one stat; writing nothing keeps a complete store read-only
            # The budget and the completion check count it: a writer killed between its record and
            # its ledger line left it out (then the array would never be marked complete).
            if self.cache_limit is not None or not self.cache.is_complete(self.name):
                ledger.refresh()
                if not ledger.has("shard", shard_key(self.name, index)):
                    record = self.cache.record(self.name, index)
                    if record is not None:
                        ledger.add("shard", shard_key(self.name, index), record.get("bytes", 0))
                        self._finish_if_whole()
            return 0
        # The same shard of the store's other arrays (raw and labels of one window) is kept.
        if self._keep_names is None:
            self._keep_names = self.cache.arrays()
        keep = {(name, index) for name in self._keep_names}
        if self.cache_limit is not None:  # make room first, so that the budget holds while it is written
            enforce_limit(self.cache, max(0, self.cache_limit - self._estimate()), keep)
        written = self.writer.write(index)
        if written:
            if self.cache_limit is not None:
                enforce_limit(self.cache, self.cache_limit, keep)
            self._finish_if_whole()
        return written

    def _finish_if_whole(self):
        """Mark the array complete once every shard is recorded."""
        with _FINISHING:  # threads of one process finishing the last shards at once mark it once
            # The ledger's count first (no listing per shard); mark_complete then checks the records.
            if self.cache.ledger.counts[self.name] >= self.total_shards and not self.cache.is_complete(self.name) \
                    and len(self.cache.done_shards(self.name)) == self.total_shards:
                self.writer.finish()

    def _estimate(self) -> int:
        """Bytes a new shard of this array will likely take: the largest of its shards the ledger
        has seen, 0 before any is."""
        return self.cache.ledger.largest[self.name]

    def _hold(self, index) -> int:
        """Ensure shard `index` and hold it against eviction; returns the descriptor to close."""
        for _ in range(20):
            self.ensure(index)
            fd = self.cache.hold(self.name, index, touch=self.cache_limit is not None)
            if fd is not None:
                # Size and index crc32c against the record: the reader, on its first read of the
                # shard. Every byte's crc32c (check_hashes) only here, once per shard and process.
                if self.check_hashes and index not in self._checked:
                    problem = self.cache.check_shard(self.name, index, hashes=True)
                    if problem:
                        close_lock_fd(fd)
                        raise DamagedShard(self.cache.shard_file(self.name, index), problem)
                    self._checked.add(index)
                return fd
            time.sleep(0.01)  # evicted between its write and our hold: write it again
        raise RuntimeError(f"shard {index} of {self.name} in {self.cache.root} was evicted 20 times before it "
                           "could be read: cache_limit is smaller than one read needs")

    def __getitem__(self, key) -> np.ndarray:
        starts, stops = window(key, self.shape)
        touched = shards_touching(starts, stops)
        missing = [index for index in touched if not self.cache.is_done(self.name, index)]
        # Fetched side by side, not one after another, unless a budget cannot hold them all at once
        # (then shard by shard below: at most one shard in flight over the budget per process).
        fits = self.cache_limit is None or len(missing) * self._estimate() <= self.cache_limit // 2
        if len(missing) > 1 and fits:
            with cf.ThreadPoolExecutor(min(len(missing), DEFAULT_WORKERS), thread_name_prefix="wildenberg-read") as pool:
                list(pool.map(self.ensure, missing))
        out = np.empty(tuple(b - a for a, b in zip(starts, stops)), dtype=self.dtype)
        for index in touched:  # one shard held at a time: descriptors stay bounded whatever the read spans
            lo, hi = shard_box(index, self.shape)
            lo, hi = np.maximum(lo, starts), np.minimum(hi, stops)
            fd = self._hold(index)
            try:
                out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, starts))] = \
                    self.reader[tuple(slice(a, b) for a, b in zip(lo, hi))]
            finally:
                close_lock_fd(fd)
        key = key if isinstance(key, tuple) else (key,)
        # Integer indices drop their axis, as in numpy.
        return out[tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in key)]

    def to_dask(self):
        """A dask array over this array, one dask chunk per output shard; nothing is fetched until computed."""
        import dask.array as da
        return da.from_array(self, chunks=SHARDS, name=f"wildenberg-{self.cache.root.name}-{self.name}",
                             asarray=True, fancy=False, lock=False, meta=np.empty((0, 0, 0), dtype=self.dtype))


# -- a pool of cached windows, grown by a background prefetcher -------------------------------------

def _starts_by_last_shard(i: int, size: int, patch: int, lo: int, hi: int) -> list:
    """Along one axis: the window starts s in shard i (s // size == i) with [s, s + patch) inside
    [lo, hi), grouped by the last shard the window reaches: [(last, s_first, s_last)]."""
    a, b = max(lo, i * size), min(hi - patch, (i + 1) * size - 1)
    out = []
    while a <= b:
        last = (a + patch - 1) // size
        end = min(b, (last + 1) * size - patch)
        out.append((last, a, end))
        a = end + 1
    return out


class ShardPool:
    """Windows of `patch` voxels inside the box [lo, hi) whose every shard is cached for all `arrays`.

    `sample(rng)` draws uniformly among all such windows as the cache is now (exactly: each
    window start is counted once, by the shard holding it), so while a prefetcher is still
    filling the cache the draw is uniform over the cached part of the volume, not over the
    volume: early patches come from the few shards cached first (a seeded random order of them).
    Axes where the box is smaller than the patch take the whole box (torch-em pads the patch).
    """

    def __init__(self, arrays: list, lo, hi, patch, refresh_seconds: float = 1.0):
        self.arrays = arrays
        self.lo, self.hi = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
        self.patch = tuple(min(int(p), b - a) for p, a, b in zip(patch, self.lo, self.hi))
        self.refresh_seconds = refresh_seconds
        self.shards = shards_touching(self.lo, self.hi)  # the shards the box needs
        # Shards in which some window starts (at the box's far edges a shard may hold only the
        # ends of windows): prefetched first, so the first window is ready after one shard.
        self.owners = [s for s in self.shards if all(_starts_by_last_shard(i, n, p, a, b) for i, n, p, a, b in
                                                      zip(s, SHARDS, self.patch, self.lo, self.hi))]
        self._cached, self._checked = frozenset(), 0.0
        self._position = {s: i for i, s in enumerate(self.shards)}
        self._all = frozenset(self.shards)
        # Owners whose windows a change of shard c can alter: those up to `reach` shards before it.
        self._reach = tuple(p // n + 1 for p, n in zip(self.patch, SHARDS))
        self._tables = {}  # "cached" / "anywhere" -> _WindowTable, updated shard by shard

    def cached(self, refresh: bool = False) -> frozenset:
        """Shards of the box cached for every array (re-listed at most every refresh_seconds)."""
        now = time.monotonic()
        if refresh or now - self._checked >= self.refresh_seconds:
            done = set(self.shards)
            for arr in self.arrays:
                done &= arr.cached_shards()
            self._cached, self._checked = frozenset(done), now
        return self._cached

    def _owner_windows(self, shard, cached) -> list:
        """[(sub-box of starts, count)]: the windows starting in `shard` whose every shard is in `cached`."""
        axes = [_starts_by_last_shard(i, s, p, a, b) for i, s, p, a, b in
                zip(shard, SHARDS, self.patch, self.lo, self.hi)]
        out = []
        for combo in itertools.product(*axes):
            needed = itertools.product(*(range(i, last + 1) for i, (last, _, _) in zip(shard, combo)))
            if all(n in cached for n in needed):
                out.append(([(s0, s1) for _, s0, s1 in combo], int(np.prod([s1 - s0 + 1 for _, s0, s1 in combo]))))
        return out

    def _table(self, cached: frozenset, kind: str = "cached") -> "_WindowTable":
        """The windows of `cached`, updated from the last table of `kind` ("cached": the shards cached
        now; "anywhere": every shard of the box) by the shards that changed: O(1) per shard cached or
        evicted, not O(shards)."""
        table = self._tables.get(kind)
        if table is None:
            table = self._tables[kind] = _WindowTable(len(self.shards))
        if table.cached != cached:
            owners = set()
            for changed in cached ^ table.cached:
                for owner in itertools.product(*(range(c - r, c + 1) for c, r in zip(changed, self._reach))):
                    if owner in self._position:
                        owners.add(owner)
            for owner in owners:
                windows = self._owner_windows(owner, cached) if owner in cached else []
                table.set(self._position[owner], windows)
            table.cached = cached
        return table

    def sample(self, rng: np.random.Generator, anywhere: bool = False):
        """A window (tuple of slices in the array's coordinates) of cached shards, or None if none is;
        `anywhere`: of any shards of the box (to be read through the cache). Uniform over the windows:
        one integer drawn among all of them, located by the owners' cumulative counts."""
        table = self._table(self._all, "anywhere") if anywhere else self._table(self.cached())
        starts = table.locate(int(rng.integers(0, table.total))) if table.total else None
        return None if starts is None else tuple(slice(s, s + p) for s, p in zip(starts, self.patch))

    def wait(self, min_shards: int, stall: float, error=lambda: None, finished=lambda: False) -> bool:
        """Block until `min_shards` shards of the box (at most all) are cached and a window is
        (True), or until waiting is pointless (False): the prefetcher has `finished()`, or nothing
        new was cached for `stall` seconds. `error()` returns the prefetcher's exception, raised here."""
        want = min(max(1, min_shards), len(self.shards))
        seen, since = -1, time.monotonic()
        while True:
            exc = error()
            if exc is not None:
                raise RuntimeError(f"prefetching {self.arrays[0].cache.root} failed: {exc}") from exc
            cached = self.cached(refresh=True)
            if len(cached) >= want and self._table(cached).total > 0:
                return True
            if finished():
                return False
            if len(cached) != seen:
                seen, since = len(cached), time.monotonic()
            elif time.monotonic() - since > stall:
                return False
            time.sleep(0.05)


class _WindowTable:
    """Window counts per owner shard (by its position in the box's shard list) and, per owner, the
    sub-boxes of window starts: a window is found from its number among all of them."""

    def __init__(self, n: int):
        self.cached = frozenset()
        self.counts = np.zeros(n, dtype=np.int64)
        self.windows: dict = {}
        self._cumulative = None

    def set(self, position: int, windows: list):
        self.windows[position] = windows
        self.counts[position] = sum(count for _, count in windows)
        self._cumulative = None

    @property
    def total(self) -> int:
        return int(self._cumsum()[-1]) if len(self.counts) else 0

    def _cumsum(self):
        if self._cumulative is None:  # once per change of the cached set, in C
            self._cumulative = np.cumsum(self.counts)
        return self._cumulative

    def locate(self, number: int) -> tuple:
        """The start of window `number` (0 <= number < total)."""
        cumulative = self._cumsum()
        position = int(np.searchsorted(cumulative, number, side="right"))
        number -= int(cumulative[position - 1]) if position else 0
        for box, count in self.windows[position]:
            if number < count:
                offsets = np.unravel_index(number, [s1 - s0 + 1 for s0, s1 in box])
                return tuple(s0 + int(o) for (s0, _), o in zip(box, offsets))
            number -= count
        raise AssertionError("window number past its owner's count")


class Prefetcher:
    """Background threads that fetch a box's shards into the cache in a seeded random order.

    One per dataset, in the process that made it (loader workers read the cache it fills, so they
    share one prefetch effort). Each shard index is fetched for every array of `arrays` (raw and
    labels share their grid), in one pass. Under a cache_limit smaller than the box, least
    recently used shards are evicted as it goes, so the pool ends as the shards most recently
    read or fetched: a seeded random part of the box that fits the budget (it does not cycle
    through the volume again, which would stream the whole box over the network without end).
    """

    def __init__(self, arrays: list, shards: list, seed: int = 0, workers: int = 2, first=()):
        self.arrays, self.shards, self.seed, self.workers = arrays, list(shards), seed, max(1, int(workers))
        self.owner_pid = os.getpid()  # its threads run in this process only (not in forked workers)
        # Threads still fetching, in memory shared with forked loader workers (which have none of
        # the threads, but wait for what they cache).
        import multiprocessing
        self._alive = multiprocessing.RawValue("i", 0)
        first = set(first)
        self.first = [s for s in self.shards if s in first]  # fetched before the others
        self.error = None
        self.fetched = 0
        self._stop = threading.Event()
        self._threads = []
        self._lock = threading.Lock()
        self._order = iter(())

    def order(self) -> list:
        """The order of the shards: a permutation seeded by `seed`, the `first` ones first."""
        rng = np.random.default_rng([self.seed, 0])
        head = set(self.first)
        rest = [s for s in self.shards if s not in head]
        return [self.first[i] for i in rng.permutation(len(self.first))] + \
               [rest[i] for i in rng.permutation(len(rest))]

    def start(self) -> "Prefetcher":
        if not self._threads:
            self._order = iter(self.order())
            self._alive.value = self.workers
            for i in range(self.workers):
                t = threading.Thread(target=self._run, name=f"wildenberg-prefetch-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def _run(self):
        try:
            self._fetch()
        finally:
            with self._lock:
                self._alive.value -= 1

    def _fetch(self):
        while not self._stop.is_set() and self.error is None:
            with self._lock:
                index = next(self._order, None)
            if index is None:
                return
            try:
                wrote = sum(arr.ensure(index) for arr in self.arrays)
            except BaseException as e:  # raised by the dataset that owns this prefetcher
                self.error = e
                return
            if wrote:
                with self._lock:
                    self.fetched += 1

    def stop(self, wait: bool = True):
        """Stop after the shards being fetched now (they are written and recorded whole)."""
        self._stop.set()
        if wait:
            for t in self._threads:
                t.join()

    @property
    def running(self) -> bool:
        """Whether it is still fetching. In a forked loader worker, which has none of its threads,
        True while the process that started it fetches: the worker waits for what it caches."""
        if os.getpid() != self.owner_pid:
            try:
                os.kill(self.owner_pid, 0)
            except ProcessLookupError:
                return False
            return self._alive.value > 0
        return any(t.is_alive() for t in self._threads)
