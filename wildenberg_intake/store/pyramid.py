"""The multiscale pyramid: each level halves x and y of the one below (z is kept: it is already 40 nm).

A level's shard is made from the (at most 2 x 2) shards of the level below that it covers, which
are made or fetched first if they are not cached: so a pyramid is produced incrementally from
level 0's shards, lazily too, with the same locks, durable writes and done records as level 0.

Downsampling (documented exactly, so that an independent implementation gets the same bytes):
each output voxel summarises the 2 x 2 block of the level below at (2y, 2x), clipped at the
array's edge (edge blocks have 1 or 2 voxels);
- EM (mean): the sum of the block's voxels divided by their count, rounded half up;
- labels (mode): the value held by most of the block's voxels, ties to the lowest value.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .cache import CHUNKS, SHARDS, array_path, assemble_shard, encode_chunks, shard_box
from .engine import cache_for, finish_array, owning, writer_for
from .plan import LevelSource, StorePlan, split_level
from .reader import ShardedArrayReader


def _blocks(block: np.ndarray):
    """The four voxels of each 2 x 2 (y, x) block as arrays of the output's shape, with masks of
    which exist (edge blocks are clipped)."""
    z, y, x = block.shape
    oy, ox = -(-y // 2), -(-x // 2)
    out, valid = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            v = np.zeros((z, oy, ox), dtype=block.dtype)
            m = np.zeros((1, oy, ox), dtype=bool)
            part = block[:, dy::2, dx::2]
            v[:, :part.shape[1], :part.shape[2]] = part
            m[:, :part.shape[1], :part.shape[2]] = True
            out.append(v)
            valid.append(m)
    return out, valid


def _mean_clipped(block: np.ndarray) -> np.ndarray:
    values, valid = _blocks(block)
    total = sum(v.astype(np.uint64) for v in values)
    count = sum(m.astype(np.uint64) for m in valid)
    return ((2 * total + count) // (2 * count)).astype(block.dtype)


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """x and y halved by the rounded-half-up mean of each (edge-clipped) 2 x 2 block."""
    z, y, x = block.shape
    ey, ex = y - y % 2, x - x % 2
    if block.dtype.itemsize > 2 or not (ey and ex):
        return _mean_clipped(block)
    out = np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)
    # Whole blocks (all but an odd last row or column): four strided adds into one quarter-size sum.
    total = block[:, 0:ey:2, 0:ex:2].astype(np.uint32 if block.dtype.itemsize == 2 else np.uint16)
    total += block[:, 1:ey:2, 0:ex:2]
    total += block[:, 0:ey:2, 1:ex:2]
    total += block[:, 1:ey:2, 1:ex:2]
    total += 2
    total >>= 2  # floor(sum / 4 + 1/2)
    out[:, :ey // 2, :ex // 2] = total
    if y % 2:
        out[:, -1:, :] = _mean_clipped(block[:, ey:, :])
    if x % 2:
        out[:, :, -1:] = _mean_clipped(block[:, :, ex:])
    return out


def _mode_clipped(block: np.ndarray) -> np.ndarray:
    values, valid = _blocks(block)
    return _vote(values, valid)


def _vote(values, valid) -> np.ndarray:
    """The most frequent of the (valid) candidates at each position, ties to the lowest."""
    counts = []
    for v, m in zip(values, valid):
        c = sum((v == w) & n for w, n in zip(values, valid)).astype(np.int8)
        counts.append(np.where(m, c, -1))
    best, best_count = values[0].copy(), counts[0].copy()
    for v, c in zip(values[1:], counts[1:]):
        better = (c > best_count) | ((c == best_count) & (v < best))
        best = np.where(better, v, best)
        best_count = np.where(better, c, best_count)
    return best


def downsample_mode(block: np.ndarray) -> np.ndarray:
    """x and y halved by the most frequent value of each (edge-clipped) 2 x 2 block, ties to the lowest.

    Labels are mostly uniform over 2 x 2 voxels: those blocks take their value at once, and only the
    others (segment faces, object edges) are voted on."""
    z, y, x = block.shape
    ey, ex = y - y % 2, x - x % 2
    if not (ey and ex):
        return _mode_clipped(block)
    out = np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)
    a, b = block[:, 0:ey:2, 0:ex:2], block[:, 1:ey:2, 0:ex:2]
    c, d = block[:, 0:ey:2, 1:ex:2], block[:, 1:ey:2, 1:ex:2]
    whole = out[:, :ey // 2, :ex // 2]
    whole[...] = a
    mixed = (a != b) | (a != c) | (a != d)
    if mixed.any():
        where = np.nonzero(mixed)
        ones = [np.ones(len(where[0]), bool)] * 4
        whole[where] = _vote([a[where], b[where], c[where], d[where]], ones)
    if y % 2:
        out[:, -1:, :] = _mode_clipped(block[:, ey:, :])
    if x % 2:
        out[:, :, -1:] = _mode_clipped(block[:, :, ex:])
    return out


class LevelWriter:
    """Writes the shards of one pyramid level (`<array>@<level>`); picklable like `ShardWriter`."""

    def __init__(self, plan: StorePlan, name: str, connections: int):
        self.plan, self.name, self.connections = plan, name, connections
        self.src: LevelSource = plan.source(name)
        base, level = split_level(name)
        self.parent_name = base if level == 1 else f"{base}@{level - 1}"
        self.parent = writer_for(plan, self.parent_name, connections)
        self.cache = cache_for(plan)

    def __getstate__(self):
        return {"plan": self.plan, "name": self.name, "connections": self.connections}

    def __setstate__(self, state):
        self.__init__(state["plan"], state["name"], state["connections"])

    @property
    def layer(self):  # the fetched array's layer (its fetcher is the run's)
        return self.parent.layer

    def finish(self):
        finish_array(self.cache, self.name, self.src.shape)

    def write(self, index) -> int:
        """Make level shard `index` from the level below (making or fetching its shards first if
        they are not cached), write it and record it. Returns bytes written (0 if it was there)."""
        cache, src = self.cache, self.src
        start, stop = shard_box(index, src.shape)
        parent_shape = self.parent.src.shape
        parents = sorted({(index[0], j, k) for j in range(2 * index[1], min(2 * index[1] + 2,
                                                                             -(-parent_shape[1] // SHARDS[1])))
                          for k in range(2 * index[2], min(2 * index[2] + 2, -(-parent_shape[2] // SHARDS[2])))})
        for p in parents:  # before our lock: the level below may be written by another process
            if not cache.is_done(self.parent_name, p):
                self.parent.write(p)
        with owning(cache, self.name, index) as needed:
            if not needed:
                return 0
            reader = ShardedArrayReader(cache.zarr_path / array_path(self.parent_name), cache_mb=0)
            shape = tuple(b - a for a, b in zip(start, stop))
            encoded, digest = {}, hashlib.sha256()
            down = downsample_mode if src.is_label else downsample_mean
            for z0 in range(start[0], stop[0], CHUNKS[0]):  # one inner-chunk row of z at a time
                z1 = min(z0 + CHUNKS[0], stop[0])
                out = np.zeros((z1 - z0,) + shape[1:], dtype=src.dtype)
                for p in parents:  # parent shards start at even y, x: no block straddles two
                    p_start, p_stop = shard_box(p, parent_shape)
                    part = down(reader[z0:z1, p_start[1]:p_stop[1], p_start[2]:p_stop[2]])
                    oy, ox = p_start[1] // 2 - start[1], p_start[2] // 2 - start[2]
                    out[:, oy:oy + part.shape[1], ox:ox + part.shape[2]] = part
                encoded.update(encode_chunks(out, src.codec, src.is_label,
                                             first=((z0 - start[0]) // CHUNKS[0], 0, 0)))
                digest.update(out)
            written = cache.write_shard(self.name, index, assemble_shard(encoded))
            cache.mark_done(self.name, index, written, digest.hexdigest(), ())
        return int(np.prod(shape)) * np.dtype(src.dtype).itemsize
