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

import threading
import warnings

import numpy as np

from .format import CHUNKS, check_crc32c, encode_chunks


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


def _mean_numpy(block: np.ndarray) -> np.ndarray:
    z, y, x = block.shape
    ey, ex = y - y % 2, x - x % 2
    if block.dtype.itemsize > 2 or not (ey and ex):
        return _mean_clipped(block)
    out = np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)
    # Whole blocks (all but an odd last row or column): rows added in pairs while they are
    # contiguous, then the columns of the sum in pairs; measured ~1.8x the four strided adds.
    rows = block[:, 0:ey:2, :ex].astype(np.uint32 if block.dtype.itemsize == 2 else np.uint16)
    rows += block[:, 1:ey:2, :ex]
    total = rows[:, :, 0::2] + rows[:, :, 1::2]
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


def _mode_of_four(a, b, c, d) -> np.ndarray:
    """The most frequent of four candidates at each position, ties to the lowest: sorted by a
    five-comparator network, the mode is the first value of the first run of two or more, else the
    lowest (two pairs tie: the lower pair comes first)."""
    lo1, hi1 = np.minimum(a, b), np.maximum(a, b)
    lo2, hi2 = np.minimum(c, d), np.maximum(c, d)
    s0, m1 = np.minimum(lo1, lo2), np.maximum(lo1, lo2)
    m2, s3 = np.minimum(hi1, hi2), np.maximum(hi1, hi2)
    s1, s2 = np.minimum(m1, m2), np.maximum(m1, m2)
    out = np.where(s2 == s3, s2, s0)
    out = np.where(s1 == s2, s1, out)
    return np.where(s0 == s1, s0, out)


_WORDS = {1: np.uint16, 2: np.uint32, 4: np.uint64}  # two voxels of a dtype as one word


def _mode_numpy(block: np.ndarray) -> np.ndarray:
    """Labels are mostly uniform over 2 x 2 voxels: those blocks take their value at once, and only the
    others (segment faces, object edges, ~5% of a dense segmentation's) are voted on."""
    block = np.ascontiguousarray(block)
    z, y, x = block.shape
    ey, ex = y - y % 2, x - x % 2
    if not (ey and ex):
        return _mode_clipped(block)
    oy, ox = ey // 2, ex // 2
    a = block[:, 0:ey:2, 0:ex:2]
    whole = np.ascontiguousarray(a)  # each block's top-left voxel: uniform blocks' value
    # A block is uniform where its top pair equals its bottom pair (compared as one word each)
    # and its top pair's two voxels are equal.
    word = _WORDS.get(block.dtype.itemsize)
    if word is not None:
        pairs = block[:, :ey, :ex].view(word)
        mixed = pairs[:, 0::2] != pairs[:, 1::2]
    else:
        mixed = (a != block[:, 1:ey:2, 0:ex:2]) | (a != block[:, 1:ey:2, 1:ex:2])
    mixed |= a != block[:, 0:ey:2, 1:ex:2]
    where = np.flatnonzero(mixed)
    if len(where):
        # Offsets in the block of each mixed block's top-left voxel, from its index in `whole`.
        rows, col = np.divmod(where, ox)
        plane, row = np.divmod(rows, oy)
        first = plane * (y * x) + row * (2 * x) + 2 * col
        flat = block.ravel()
        whole.ravel()[where] = _mode_of_four(flat[first], flat[first + x], flat[first + 1], flat[first + x + 1])
    if (y, x) == (ey, ex):
        return whole
    out = np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)
    out[:, :oy, :ox] = whole
    if y % 2:
        out[:, -1:, :] = _mode_clipped(block[:, ey:, :])
    if x % 2:
        out[:, :, -1:] = _mode_clipped(block[:, :, ex:])
    return out


# Two implementations of the same semantics (tests hold both to loops over every dtype and edge):
# numpy's vectorised passes, and compiled loops (`kernels.py`, numba) that measured 5-10x faster
# per shard but cost ~0.5 s per process to load (numba's import and first call). A run whose
# pyramid is made from COMPILED_FROM voxels or more loads them in the background (`warm_up`) and
# uses them once loaded; smaller runs never load them (on the benchmark's 0.16 G-voxel boxes the
# load cost more than it saved: 1.90 against 1.60 s for p105_psd, best of 4).
COMPILED_FROM = 10**9
_compiled = None  # the kernels module once loaded
_warm_up_started = False
_warm_up_lock = threading.Lock()


def warm_up(voxels: int):
    """Load the compiled loops on a background thread, once per process, if a run will downsample
    `voxels` voxels or more (COMPILED_FROM); until they are loaded `downsample` uses numpy."""
    global _warm_up_started
    with _warm_up_lock:
        if _warm_up_started or voxels < COMPILED_FROM:
            return
        _warm_up_started = True

    def load():
        global _compiled
        try:
            from . import kernels
            for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):  # the first call loads each from numba's cache
                block, out = np.zeros((1, 2, 2), dtype), np.zeros((1, 1, 1), dtype)
                kernels.mode(block, out)
                (kernels.mean_narrow if block.itemsize <= 2 else kernels.mean_wide)(block, out)
        except Exception as e:  # e.g. no folder numba may cache into: numpy's passes go on, the same voxels
            warnings.warn(f"the compiled downsampling could not be loaded ({type(e).__name__}: {e}); "
                          "numpy's is used (the same voxels, slower)", RuntimeWarning, stacklevel=1)
            return
        _compiled = kernels

    threading.Thread(target=load, name="wildenberg-warm-up", daemon=True).start()


def _halved(block: np.ndarray) -> np.ndarray:
    z, y, x = block.shape
    return np.empty((z, -(-y // 2), -(-x // 2)), dtype=block.dtype)


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """x and y halved by the rounded-half-up mean of each (edge-clipped) 2 x 2 block."""
    if _compiled is None:
        return _mean_numpy(block)
    kernel = _compiled.mean_narrow if block.dtype.itemsize <= 2 else _compiled.mean_wide
    return kernel(block, _halved(block))


def downsample_mode(block: np.ndarray) -> np.ndarray:
    """x and y halved by the most frequent value of each (edge-clipped) 2 x 2 block, ties to the lowest."""
    return _mode_numpy(block) if _compiled is None else _compiled.mode(block, _halved(block))


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
