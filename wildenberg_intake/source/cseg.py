"""A strict check of a compressed_segmentation chunk before any C decoder sees it.

The decoders (cloud-volume's, neuroglancer's) trust the block headers: an HTML page answered for a
chunk crashed the process with SIGSEGV, and a chunk truncated to half, or with random bytes in its
second half, decoded without error into wrong labels. This module checks, with numpy only, what
an encoder writes (neuroglancer's format, as cloud-volume writes it):

    [channel offset] [per block: (table offset | bits << 24), values offset] [values, tables...]

- one channel, whose data starts right after the offset word;
- a header of two words for every block of the chunk's block grid, bit widths 0, 1, 2, 4, 8, 16, 32;
- every values region and lookup table inside the buffer, after the headers, not overlapping;
- each table (the words up to the next region) a whole number of entries, strictly increasing
  (encoders write sorted unique ids), and every index the block's values hold inside its table.

Truncation and overwritten headers fail the bounds; random bytes in the values or tables fail
the index and order checks with overwhelming probability (a random 512-voxel block keeps all its
indices inside a table of k < 2^bits entries with probability (k / 2^bits)^512).
"""

from __future__ import annotations

import numpy as np

BITS = (0, 1, 2, 4, 8, 16, 32)


def check(data: bytes, shape_xyz, block_xyz, dtype) -> None:
    """Raise ValueError naming what is wrong if `data` is not a well-formed single-channel
    compressed_segmentation chunk of `shape_xyz` voxels in blocks of `block_xyz`."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint32, np.uint64):
        raise ValueError(f"compressed_segmentation holds uint32 or uint64, not {dtype}")
    if len(data) % 4 or len(data) < 8:
        raise ValueError(f"{len(data)} bytes is not a whole number of 32-bit words (at least 2)")
    if data[:1] in (b"<", b"{") or data.lstrip()[:1] == b"<":
        raise ValueError("the body is an HTML/XML/JSON document, not chunk data")
    words = np.frombuffer(data, dtype="<u4")
    n = len(words)
    if int(words[0]) != 1:
        raise ValueError(f"channel offset {int(words[0])} is not 1 (one channel)")
    grid = [-(-int(s) // int(b)) for s, b in zip(shape_xyz, block_xyz)]
    blocks = int(np.prod(grid))
    voxels = int(np.prod(block_xyz))
    first = 1 + 2 * blocks
    if first > n:
        raise ValueError(f"{n} words cannot hold the headers of {blocks} blocks (truncated?)")
    header = words[1:first].reshape(blocks, 2).astype(np.int64)
    table = header[:, 0] & 0xFFFFFF
    bits = header[:, 0] >> 24
    values = header[:, 1]
    if not np.isin(bits, BITS).all():
        raise ValueError(f"bit widths {sorted(set(bits.tolist()) - set(BITS))} are not among {BITS}")
    value_words = -(-voxels * bits // 32)
    v_start, t_start = 1 + values, 1 + table
    if (v_start < first).any() or (t_start < first).any():
        raise ValueError("a block's values or table overlaps the headers")
    if (v_start + value_words > n).any() or (t_start >= n).any():
        raise ValueError(f"a block's values or table lie beyond the {n}-word buffer (truncated?)")
    # Each region runs to the next region's start: tables have no length of their own.
    starts = np.unique(np.concatenate([v_start[value_words > 0], t_start]))
    ends = np.append(starts[1:], n)
    end_of = dict(zip(starts.tolist(), ends.tolist()))
    if any(end_of[s] < s + w for s, w in zip(v_start.tolist(), value_words.tolist()) if w):
        raise ValueError("a block's values overlap another region")
    per_entry = dtype.itemsize // 4
    tables = {}
    for s in np.unique(t_start).tolist():
        length = end_of[s] - s
        if length % per_entry or length == 0:
            raise ValueError(f"the table at word {s} is {length} words, not whole {dtype} entries")
        entries = np.frombuffer(data, dtype=f"<u{dtype.itemsize}", count=length // per_entry, offset=4 * s)
        if len(entries) > 1 and not (entries[1:] > entries[:-1]).all():
            raise ValueError(f"the table at word {s} is not strictly increasing (damaged)")
        tables[s] = len(entries)
    size = np.array([tables[s] for s in t_start.tolist()])
    for b in BITS[1:]:
        which = np.flatnonzero(bits == b)
        if not len(which):
            continue
        w = voxels * b // 32 if voxels * b % 32 == 0 else -(-voxels * b // 32)
        packed = words[(v_start[which, None] + np.arange(w)[None, :])]  # (blocks, words)
        if b >= 8:
            idx = packed.view(f"<u{b // 8}")[:, :voxels]
        else:
            idx = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :voxels * b]
            idx = (idx.reshape(len(which), voxels, b) << np.arange(b, dtype=np.uint8)).sum(axis=2)
        if (idx.max(axis=1) >= size[which]).any():
            raise ValueError("a block's values point past its lookup table (damaged)")
