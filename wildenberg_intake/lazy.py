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

import re
import time

import numpy as np

from .cache import SHARDS, StoreCache, shard_grid
from .engine import DEFAULT_CONNECTIONS, ShardWriter, cache_for, finish_array, prepare
from .plan import StorePlan
from .reader import DEFAULT_CACHE_MB, ShardedArrayReader

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
    """Evict least recently used shards of every array of the store until their files fit `limit`
    bytes; shards in `keep` ((array, index) pairs) and shards being read are kept. Returns the
    number evicted."""
    entries = []
    for name in cache.arrays():
        for index in cache.done_shards(name):
            try:
                used = cache._record(name, index).stat().st_mtime
            except FileNotFoundError:
                continue
            entries.append((used, name, index, cache.shard_bytes(name, index)))
    total = sum(e[3] for e in entries)
    evicted = 0
    for _, name, index, size in sorted(entries):
        if total <= limit:
            break
        if (name, index) not in keep and cache.evict(name, index):
            total -= size
            evicted += 1
    return evicted


class ReadThroughArray:
    """Array `name` of a store as a numpy-style, read-only array (`arr[z0:z1, y0:y1, x0:x1]`) that
    fetches the shards a read touches into the cache first. Picklable (dask workers, loader
    workers): each process opens its own reader and writer.

    connections: chunk requests in flight per process; cache_limit: bytes the store's shard
    files may use (None: no limit); cache_mb: this process's LRU of decoded inner chunks.
    """

    def __init__(self, plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS,
                 cache_limit: int | None = None, cache_mb: float = DEFAULT_CACHE_MB):
        if name not in plan.arrays:
            raise ValueError(f"array {name!r} is unknown; allowed: {sorted(plan.arrays)}")
        self.plan, self.name, self.connections = plan, name, connections
        self.cache_limit, self.cache_mb = cache_limit, cache_mb
        src = plan.arrays[name]
        self.shape, self.dtype, self.ndim = tuple(src.shape), np.dtype(src.dtype), 3
        self.size = int(np.prod(self.shape))
        self.total_shards = len(shard_grid(self.shape))
        self.cache = prepare(plan, [name])
        self._writer = None
        self._reader = None

    def __getstate__(self):
        return {"plan": self.plan, "name": self.name, "connections": self.connections,
                "cache_limit": self.cache_limit, "cache_mb": self.cache_mb}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"ReadThroughArray({self.cache.root.name}/{self.name}, shape={self.shape}, dtype={self.dtype})"

    @property
    def writer(self) -> ShardWriter:
        if self._writer is None:
            self._writer = ShardWriter(self.plan, self.name, self.connections)
        return self._writer

    @property
    def reader(self) -> ShardedArrayReader:
        if self._reader is None:
            from .cache import array_path
            self._reader = ShardedArrayReader(self.cache.zarr_path / array_path(self.name), self.cache_mb)
        return self._reader

    def cached_shards(self) -> set:
        """Shards of this array recorded in the cache now (by any process)."""
        return self.cache.done_shards(self.name)

    def ensure(self, index) -> int:
        """Make sure shard `index` is recorded: fetch and write it unless it is, or wait for the
        process writing it. Returns the bytes this call wrote (0 if it was there)."""
        index = tuple(index)
        if self.cache.is_done(self.name, index):  # one stat; writing nothing keeps a complete store read-only
            return 0
        written = self.writer.write(index)
        if written:
            if self.cache_limit is not None:
                enforce_limit(self.cache, self.cache_limit, keep={(self.name, tuple(index))})
            if len(self.cache.done_shards(self.name)) == self.total_shards:
                finish_array(self.cache, self.name, self.shape)
        return written

    def _hold(self, index) -> int:
        """Ensure shard `index` and hold it against eviction; returns the descriptor to close."""
        for _ in range(20):
            self.ensure(index)
            fd = self.cache.hold(self.name, index, touch=self.cache_limit is not None)
            if fd is not None:
                return fd
            time.sleep(0.01)  # evicted between its write and our hold: write it again
        raise RuntimeError(f"shard {index} of {self.name} in {self.cache.root} was evicted 20 times before it "
                           "could be read: cache_limit is smaller than one read needs")

    def __getitem__(self, key) -> np.ndarray:
        import os
        starts, stops = _box(key, self.shape)
        fds = []
        try:
            for index in shards_touching(starts, stops):
                fds.append(self._hold(index))
            out = self.reader[tuple(slice(a, b) for a, b in zip(starts, stops))]
        finally:
            for fd in fds:
                os.close(fd)
        key = key if isinstance(key, tuple) else (key,)
        # Integer indices drop their axis, as in numpy.
        return out[tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in key)]

    def to_dask(self):
        """A dask array over this array, one dask chunk per output shard; nothing is fetched until computed."""
        import dask.array as da
        return da.from_array(self, chunks=SHARDS, name=f"wildenberg-{self.cache.root.name}-{self.name}",
                             asarray=True, fancy=False, lock=False, meta=np.empty((0, 0, 0), dtype=self.dtype))


def _box(key, shape):
    """(starts, stops) of a tuple of contiguous slices (or integers) over `shape`."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(shape):
        raise IndexError(f"too many indices for an array of shape {shape}: {key!r}")
    key = key + (slice(None),) * (len(shape) - len(key))
    starts, stops = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            k = slice(int(k), int(k) + 1) if k >= 0 else slice(n + int(k), n + int(k) + 1)
        if not isinstance(k, slice) or k.step not in (None, 1):
            raise IndexError(f"only contiguous slices are supported, got {key!r}")
        a, b, _ = k.indices(n)
        starts.append(a)
        stops.append(max(a, b))
    return starts, stops
