"""The foreground index: non-zero voxels per block of each label shard, made while the shard's
voxels are in memory and kept in its record, so finding where synapses are costs no read of the store.

Blocks are BLOCK voxels (z, y, x); shards hold whole blocks (SHARDS is a multiple of BLOCK), so the
index of an array is its shards' counts side by side. A record's index is absent exactly where its
shard is (eviction, invalidation and repair go with the record); stores written before the index
get it from `index_array`, a one-time scan of their shards (`wildenberg-intake index ENTRY`).
"""

from __future__ import annotations

import base64
import json
import os
import zlib

import numpy as np

from .format import SHARDS
from .layout import shard_box

BLOCK = (8, 16, 16)  # small enough that a patch's bound is tight (benchmarks/sampling.py)
assert all(s % b == 0 for s, b in zip(SHARDS, BLOCK)) and BLOCK[2] % 8 == 0 and BLOCK[0] * BLOCK[2] // 8 < 256
_LOW_BYTES = np.uint64(0x00FF00FF00FF00FF)


def block_grid(shape) -> tuple:
    """Blocks along each axis of an array (or shard) of `shape`; edge blocks are clipped."""
    return tuple(-(-int(n) // b) for n, b in zip(shape, BLOCK))


def block_counts(block: np.ndarray) -> np.ndarray:
    """Non-zero voxels of each BLOCK of `block` (z, y, x; clipped at its edges), as uint16.

    Measured ~4x faster than a reshaped sum: the block's z-planes are added as bytes, then its
    x-neighbours as byte lanes of 64-bit words (8 voxels a word), so numpy touches each voxel once."""
    nz = (block != 0).view(np.uint8)
    pad = [(0, -n % b) for n, b in zip(nz.shape, BLOCK)]
    if any(p for _, p in pad):
        nz = np.pad(nz, pad)
    (gz, gy, gx), (bz, by, bx) = block_grid(nz.shape), BLOCK
    stack = nz.reshape(gz, bz, gy * by, gx * bx)
    planes = stack[:, 0].copy()
    for k in range(1, bz):  # plane by plane: measured faster than numpy's reduction over the axis
        planes += stack[:, k]  # <= bz a voxel column
    words = planes.reshape(gz, gy * by, gx, bx).view(np.uint64)  # (..., bx / 8): 8 byte lanes each
    lanes = words[..., 0].copy()
    for k in range(1, bx // 8):
        lanes += words[..., k]  # each byte <= bz * bx / 8 (< 256)
    if bz * bx < 256:  # the 8 lanes' sum fits a byte: one multiply adds them into the top byte
        rows = (lanes * np.uint64(0x0101010101010101)) >> np.uint64(56)
    else:  # add byte pairs into 16-bit lanes first
        pairs = (lanes & _LOW_BYTES) + ((lanes >> np.uint64(8)) & _LOW_BYTES)
        rows = (pairs * np.uint64(0x0001000100010001)) >> np.uint64(48)
    return rows.astype(np.uint16).reshape(gz, gy, by, gx).sum(axis=2, dtype=np.uint16)


class ShardCounts:
    """A shard's index, filled z-slab by z-slab as the shard is assembled."""

    def __init__(self, shard_shape):
        self.counts = np.zeros(block_grid(shard_shape), dtype=np.uint16)

    def add(self, slab: np.ndarray, z0: int):
        """Count z-slab `slab`, which starts `z0` voxels into the shard (a multiple of BLOCK[0])."""
        counts = block_counts(slab)
        self.counts[z0 // BLOCK[0]:z0 // BLOCK[0] + counts.shape[0]] = counts

    def record(self) -> dict:
        """The index as a shard record keeps it: little-endian uint16 counts in C order, zlib, base64."""
        return {"block": list(BLOCK), "grid": list(self.counts.shape),
                "counts": base64.b64encode(zlib.compress(self.counts.astype("<u2").tobytes(), 6)).decode()}


def record_counts(record: dict | None, shard_shape) -> np.ndarray | None:
    """The counts a shard record holds (None: no record, or one written before the index)."""
    index = (record or {}).get("foreground")
    if not index or list(index.get("block", [])) != list(BLOCK):
        return None
    grid = tuple(block_grid(shard_shape))
    counts = np.frombuffer(zlib.decompress(base64.b64decode(index["counts"])), dtype="<u2")
    if counts.size != int(np.prod(grid)):
        raise ValueError(f"a shard record's foreground index has {counts.size} blocks; its shard has {grid}")
    return counts.reshape(grid)


def shard_blocks(index, shape) -> tuple:
    """The slices of the block grid of an array of `shape` that shard `index` covers."""
    start, stop = shard_box(index, shape)
    return tuple(slice(a // b, -(-c // b)) for a, c, b in zip(start, stop, BLOCK))


def recorded_counts(cache, name: str, index, shape) -> np.ndarray | None:
    """The counts the record of shard `index` of array `name` (of `shape`) holds, or None."""
    start, stop = shard_box(index, shape)
    return record_counts(cache.record(name, index), np.subtract(stop, start))


def array_counts(cache, name: str, shape):
    """(counts, known) over the block grid of array `name` of `shape`: the index of every recorded
    shard that has one (int32 counts; `known` marks the blocks of those shards)."""
    counts = np.zeros(block_grid(shape), dtype=np.int32)
    known = np.zeros(block_grid(shape), dtype=bool)
    for index in cache.done_shards(name):
        shard = recorded_counts(cache, name, index, shape)
        if shard is not None:
            counts[shard_blocks(index, shape)] = shard
            known[shard_blocks(index, shape)] = True
    return counts, known


def index_array(cache, name: str, shape, progress: bool = True) -> int:
    """Add the foreground index to every recorded shard of label array `name` that lacks it (a
    store written before the index), reading each once through the package's reader; the record's
    mtime (its last use, which eviction orders by) is kept. Returns the shards indexed."""
    from tqdm.auto import tqdm
    from .layout import array_path
    from .reader import ShardedArrayReader
    todo = [i for i in sorted(cache.done_shards(name)) if recorded_counts(cache, name, i, shape) is None]
    reader = ShardedArrayReader(cache.zarr_path / array_path(name))
    return sum(index_shard(cache, name, index, shape, reader) is not None
               for index in tqdm(todo, unit="shard", disable=not progress, desc=f"index {name}"))


def index_shard(cache, name: str, index, shape, reader=None) -> np.ndarray | None:
    """Count recorded shard `index` of label array `name` through `reader` (the package's
    ShardedArrayReader of the array; made here if None) and add the counts to its record, keeping
    the record's mtime. Returns them (None: the shard is not recorded, or was evicted meanwhile)."""
    from .files import durable_write
    from .layout import array_path
    from .liveness import close_lock_fd
    from .reader import ShardedArrayReader
    reader = reader or ShardedArrayReader(cache.zarr_path / array_path(name))
    fd = cache.hold(name, index)  # not evicted while it is read and its record rewritten
    if fd is None:
        return None
    try:
        start, stop = shard_box(index, shape)
        counts = ShardCounts(np.subtract(stop, start))
        for z0 in range(start[0], stop[0], SHARDS[0] // 2):
            z1 = min(z0 + SHARDS[0] // 2, stop[0])
            counts.add(reader[z0:z1, start[1]:stop[1], start[2]:stop[2]], z0 - start[0])
        path = cache.record_path(name, index)
        record = json.loads(path.read_text())
        stat = os.stat(path)
        record["foreground"] = counts.record()
        durable_write(path, json.dumps(record).encode())
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return counts.counts
    finally:
        close_lock_fd(fd)
