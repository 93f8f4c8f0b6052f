"""Downsampling for the pyramid: x and y halved, z kept (it is already 40 nm).

Documented exactly, so that an independent implementation gets the same bytes: each output voxel
summarises the 2 x 2 block of the level below at (2y, 2x), clipped at the array's edge (edge
blocks have 1 or 2 voxels);
- EM (mean): the sum of the block's voxels divided by their count, rounded half up;
- labels (mode): the value held by most of the block's voxels, ties to the lowest value.

Shards nest (a level's shard starts at even y, x of the level below, and covers 2 x 2 of its
shards), so downsampling shard by shard gives the same voxels as downsampling the whole array.
"""

from __future__ import annotations

import numpy as np

import numba

from .format import CHUNKS, check_crc32c, encode_chunks

# Compiled loops (numba, cached on disk after the first use, GIL released so shard tasks run them
# side by side): per 32 M-voxel shard they measured 5-10x numpy's vectorised versions for the mode
# and 6x for the mean, one pass over the block and no temporary arrays.


@numba.njit(nogil=True, cache=True)
def _mean_narrow(block, out):  # itemsize <= 2: four voxels plus the rounding fit uint32
    depth, rows, cols = block.shape
    for z in range(depth):
        for j in range(rows // 2):
            for i in range(cols // 2):
                total = (np.uint32(block[z, 2 * j, 2 * i]) + np.uint32(block[z, 2 * j, 2 * i + 1])
                         + np.uint32(block[z, 2 * j + 1, 2 * i]) + np.uint32(block[z, 2 * j + 1, 2 * i + 1]))
                out[z, j, i] = (total + np.uint32(2)) >> np.uint32(2)
    _mean_edges(block, out)
    return out


@numba.njit(nogil=True, cache=True)
def _mean_wide(block, out):
    depth, rows, cols = block.shape
    for z in range(depth):
        for j in range(rows // 2):
            for i in range(cols // 2):
                total = (np.uint64(block[z, 2 * j, 2 * i]) + np.uint64(block[z, 2 * j, 2 * i + 1])
                         + np.uint64(block[z, 2 * j + 1, 2 * i]) + np.uint64(block[z, 2 * j + 1, 2 * i + 1]))
                out[z, j, i] = (total + np.uint64(2)) >> np.uint64(2)
    _mean_edges(block, out)
    return out


@numba.njit(nogil=True, inline="always")
def _mean_edges(block, out):
    """The clipped blocks of an odd last row or column: their voxels' mean, rounded half up."""
    depth, rows, cols = block.shape
    for z in range(depth):
        for j in range(out.shape[1]):
            for i in range(out.shape[2]):
                if 2 * j + 1 < rows and 2 * i + 1 < cols:
                    continue
                total, count = np.uint64(0), np.uint64(0)
                for y in range(2 * j, min(2 * j + 2, rows)):
                    for x in range(2 * i, min(2 * i + 2, cols)):
                        total += np.uint64(block[z, y, x])
                        count += np.uint64(1)
                out[z, j, i] = (np.uint64(2) * total + count) // (np.uint64(2) * count)


@numba.njit(nogil=True, inline="always")
def _mode_of_four(a, b, c, d):
    """The most frequent of four values, ties to the lowest."""
    if a == b:
        return min(a, c) if c == d and c != a else a  # two pairs tie; otherwise a pair or more wins
    if c == d:
        return c  # a pair (or three) against singles
    a_pair, b_pair = a == c or a == d, b == c or b == d
    if a_pair and b_pair:
        return min(a, b)
    if a_pair:
        return a
    if b_pair:
        return b
    return min(min(a, b), min(c, d))


@numba.njit(nogil=True, cache=True)
def _mode(block, out):
    depth, rows, cols = block.shape
    for z in range(depth):
        for j in range(rows // 2):
            for i in range(cols // 2):
                out[z, j, i] = _mode_of_four(block[z, 2 * j, 2 * i], block[z, 2 * j, 2 * i + 1],
                                             block[z, 2 * j + 1, 2 * i], block[z, 2 * j + 1, 2 * i + 1])
        # Clipped blocks of an odd last row or column: one voxel, or two (equal: it; else the lowest).
        for j in range(out.shape[1]):
            for i in range(out.shape[2]):
                if 2 * j + 1 < rows and 2 * i + 1 < cols:
                    continue
                a = block[z, 2 * j, 2 * i]
                b = block[z, 2 * j + 1, 2 * i] if 2 * j + 1 < rows else \
                    block[z, 2 * j, 2 * i + 1] if 2 * i + 1 < cols else a
                out[z, j, i] = min(a, b)
    return out


def _halved(block: np.ndarray) -> np.ndarray:
    z, y, x = block.shape
    return np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """x and y halved by the rounded-half-up mean of each (edge-clipped) 2 x 2 block."""
    kernel = _mean_narrow if block.dtype.itemsize <= 2 else _mean_wide
    return kernel(block, _halved(block))


def downsample_mode(block: np.ndarray) -> np.ndarray:
    """x and y halved by the most frequent value of each (edge-clipped) 2 x 2 block, ties to the lowest."""
    return _mode(block, _halved(block))


def downsample(block: np.ndarray, is_label: bool) -> np.ndarray:
    """`downsample_mode` for labels, `downsample_mean` for EM."""
    return downsample_mode(block) if is_label else downsample_mean(block)


def quarter_offset(parent) -> tuple:
    """Inner-chunk coordinates, in the next level's shard, of the first chunk of the quarter that
    shard `parent` contributes to it (shards are 2 x 4 x 4 inner chunks; a quarter 2 x 2 x 2)."""
    return (0, 2 * (parent[1] % 2), 2 * (parent[2] % 2))


def quarter_chunks(slab: np.ndarray, parent, z_row: int, is_label: bool, codec: str) -> dict:
    """The next level's encoded inner chunks made from z-slab `slab` (one or two inner-chunk rows of
    shard `parent`, starting at inner-chunk row `z_row`), by coordinates in the next level's shard."""
    oz, oy, ox = quarter_offset(parent)
    return encode_chunks(downsample(slab, is_label), codec, is_label, first=(z_row + oz, oy, ox))


def decode_into(out: np.ndarray, encoded: dict, z_row: int, codec_blosc):
    """Decode the inner chunks of inner-chunk row `z_row` in `encoded` ({coords in the shard: Blosc
    bytes + crc32c}) into `out` (that row of the shard: CHUNKS[0] or fewer slices, the shard's y, x),
    zeros where a chunk is absent. Returns `out`."""
    out.fill(0)
    dz, ny, nx = out.shape
    for (cz, cy, cx), blob in encoded.items():
        if cz != z_row:
            continue
        payload = check_crc32c(blob)
        if payload is None:
            raise ValueError(f"inner chunk {(cz, cy, cx)} fails its crc32c")
        chunk = np.frombuffer(codec_blosc.decode(payload), dtype=out.dtype).reshape(CHUNKS)
        y0, x0 = cy * CHUNKS[1], cx * CHUNKS[2]
        part = out[:, y0:y0 + CHUNKS[1], x0:x0 + CHUNKS[2]]
        part[...] = chunk[:dz, :part.shape[1], :part.shape[2]]
    return out
