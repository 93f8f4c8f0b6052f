"""Fast window reads from a cached store, for training loaders.

zarr-python spends far more time per small window on its Python machinery than on decompression.
This reader knows the cache's one layout (sharded zarr v3, Blosc inner chunks, index at the end
with a crc32c): it keeps each shard's index, reads only the inner chunks a window touches with
one pread each, decodes them with Blosc (which releases the GIL) and keeps recently decoded
chunks in a per-process LRU cache, since training windows overlap. The store stays a plain zarr
v3 store; anything else can read it with zarr.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .format import ShardFileError, check_crc32c, index_bytes, shard_index
from .layout import array_name
from .cache import MISSING_FILE, DamagedShard, StoreCache, has_file

DEFAULT_CACHE_MB = 256


class ShardedArrayReader:
    """Read-only numpy-style access (`reader[z0:z1, y0:y1, x0:x1]`) to one array of a cached store.

    Absence is never data: a shard without a file reads as zeros only where its record says it
    holds no voxels. A shard that is not recorded (never written, or evicted), or whose file is
    missing, truncated or another shard's (its size or index crc32c differs from its record),
    raises `DamagedShard` naming the store, array, shard and remedy."""

    def __init__(self, path, cache_mb: float = DEFAULT_CACHE_MB):
        self.path = Path(path)
        real = self.path.resolve()  # a label view links to the store's arrays
        parts = real.parts
        if "data.zarr" not in parts:
            raise ValueError(f"path={str(path)!r} is not an array of a wildenberg-intake store; allowed: "
                             "<cache_dir>/wildenberg2023/<store>/data.zarr/<array> or a label view of one")
        at = len(parts) - 1 - parts[::-1].index("data.zarr")
        self.cache = StoreCache.at(Path(*parts[:at]))
        self.name = array_name("/".join(parts[at + 1:]))
        meta = json.loads((self.path / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        (sharding,) = meta["codecs"]
        if sharding["name"] != "sharding_indexed" or sharding["configuration"].get("index_location", "end") != "end":
            raise ValueError(f"{self.path} is not laid out as this package writes stores; read it with zarr")
        conf = sharding["configuration"]
        # Stores of layout 3 on carry a crc32c after every inner chunk; older ones do not.
        self.checksummed = any(c.get("name") == "crc32c" for c in conf.get("codecs", []))
        self.chunk = tuple(conf["chunk_shape"])
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk))
        self.fill = meta.get("fill_value", 0) or 0
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache = OrderedDict()
        self._cached = 0
        self._indices = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self):
        return {"path": self.path, "cache_mb": self.cache_bytes / 2**20}

    def __setstate__(self, state):
        self.__init__(state["path"], state["cache_mb"])

    def __len__(self):
        return self.shape[0]

    def _shard_path(self, shard) -> Path:
        return self.path / "c" / Path(*map(str, shard))

    def _index(self, shard):
        if shard not in self._indices:
            path = self._shard_path(shard)
            need = index_bytes(self.per_shard)
            record = self.cache.record(self.name, shard)
            if record is None:
                raise DamagedShard(path, "it is not recorded as written: never fetched, or evicted")
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if not has_file(record):
                        raise DamagedShard(path, "a file exists where an all-zero shard was recorded")
                    if size != record["bytes"]:
                        raise DamagedShard(path, f"{size} bytes on disk, {record['bytes']} recorded")
                    f.seek(max(size - need, 0))
                    tail = f.read(need)
            except FileNotFoundError:
                if has_file(record):
                    raise DamagedShard(path, MISSING_FILE) from None
                index = None  # recorded as all zeros: zarr writes no file
            else:
                try:
                    index = shard_index(tail, size, self.per_shard)
                except ShardFileError as e:
                    raise DamagedShard(path, str(e)) from None
                if record.get("index_crc32c") not in (None, tail[-4:].hex()):
                    raise DamagedShard(path, "its index differs from the one recorded (another shard's file?)")
            self._indices[shard] = index
        return self._indices[shard]

    def _chunk(self, coords) -> np.ndarray | None:
        if self._pid != os.getpid():  # forked: a lock held by a parent thread would never be released
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            if coords in self._cache:
                self._cache.move_to_end(coords)
                return self._cache[coords]
        shard = tuple(c // p for c, p in zip(coords, self.per_shard))
        index = self._index(shard)
        data = None
        if index is not None:
            offset, length = (int(v) for v in index[tuple(c % p for c, p in zip(coords, self.per_shard))])
            if offset != 2**64 - 1:
                from numcodecs import blosc
                try:
                    fd = os.open(self._shard_path(shard), os.O_RDONLY)
                except FileNotFoundError:  # removed after its index was read
                    self._indices.pop(shard, None)
                    raise DamagedShard(self._shard_path(shard), "its file is missing") from None
                try:
                    blob = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
                payload = check_crc32c(blob) if self.checksummed else blob
                if payload is None:
                    raise DamagedShard(self._shard_path(shard),
                                       f"inner chunk {coords} fails its crc32c")
                data = np.frombuffer(blosc.decompress(payload), dtype=self.dtype).reshape(self.chunk)
        with self._lock:
            nbytes = data.nbytes if data is not None else 64
            self._cache[coords] = data
            self._cached += nbytes
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes if old is not None else 64
        return data

    def __getitem__(self, key) -> np.ndarray:
        starts, stops = window(key, self.shape)
        shape = tuple(b - a for a, b in zip(starts, stops))
        # np.zeros takes zeroed pages from the OS untouched: the empty chunks of a sparse label cost nothing.
        out = np.zeros(shape, self.dtype) if self.fill == 0 else np.full(shape, self.fill, dtype=self.dtype)
        ranges = [range(a // c, -(-b // c)) for a, b, c in zip(starts, stops, self.chunk)]
        for cz in ranges[0]:
            for cy in ranges[1]:
                for cx in ranges[2]:
                    data = self._chunk((cz, cy, cx))
                    if data is None:
                        continue
                    lo = [max(a, i * c) for a, i, c in zip(starts, (cz, cy, cx), self.chunk)]
                    hi = [min(b, (i + 1) * c) for b, i, c in zip(stops, (cz, cy, cx), self.chunk)]
                    out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, starts))] = \
                        data[tuple(slice(l - i * c, h - i * c) for l, h, i, c in zip(lo, hi, (cz, cy, cx), self.chunk))]
        return out


def window(key, shape) -> tuple[list, list]:
    """(starts, stops) of a window given as contiguous slices or integers over `shape`.

    A window reaching outside the array is refused (IndexError naming the axis, the window and the
    shape) rather than cut to it as numpy would: a window beyond the data is a mistake worth knowing.
    """
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(shape):
        raise IndexError(f"too many indices for an array of shape {tuple(shape)}: {key!r}")
    key = key + (slice(None),) * (len(shape) - len(key))
    starts, stops = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k)
            if not -n <= k < n:
                raise IndexError(f"index {k} on axis {axis} is outside the array of shape {tuple(shape)}")
            k = slice(k % n, k % n + 1)
        if not isinstance(k, slice) or k.step not in (None, 1):
            raise IndexError(f"only contiguous slices and integers are supported, got {key!r}")
        for end in (k.start, k.stop):
            if end is not None and not -n <= end <= n:
                raise IndexError(f"window {k.start}:{k.stop} on axis {axis} reaches outside the array of shape "
                                 f"{tuple(shape)} (allowed: -{n} to {n})")
        a, b, _ = k.indices(n)
        starts.append(a)
        stops.append(max(a, b))
    return starts, stops
