"""Integrity checks that read voxels back: through the package's own reader, which refuses a shard a
store records but cannot produce (missing, truncated, another shard's file) instead of reading it as
zeros, as zarr-python would."""

from __future__ import annotations

import numpy as np

from .cache import StoreCache, combine_digests
from .format import CONTENT_DIGEST, new_digest
from .layout import array_path, shard_box, shard_grid
from .reader import ShardedArrayReader


def recompute_content_checksum(cache: StoreCache, name: str, algorithm: str = CONTENT_DIGEST) -> str:
    """`StoreCache.content_checksum` computed from the voxels on disk now (reads the whole array, shard
    by shard), with each shard's digest by `algorithm` (CONTENT_DIGEST, or "sha256" for a lock made
    by a version that recorded sha256). Raises `DamagedShard` for a recorded shard whose file is
    missing or damaged."""
    reader = ShardedArrayReader(cache.zarr_path / array_path(name), cache_mb=0)
    hashes = []
    for index in shard_grid(reader.shape):
        start, stop = shard_box(index, reader.shape)
        block = np.ascontiguousarray(reader[tuple(slice(a, b) for a, b in zip(start, stop))])
        digest = new_digest(algorithm)
        digest.update(block)
        hashes.append(digest.hexdigest())
    return combine_digests(hashes)
