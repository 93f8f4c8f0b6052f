"""The multiscale pyramid: each level halves x and y of the one below (z is kept: it is already 40 nm).

Made on transfer (igneous's way: "downsamples are generated while transferring"): the task that
writes a shard also makes, from the voxels it holds, its quarter of the next level's shard and
stages it (`staging.QuarterStage`) before recording the shard. A level shard is then assembled
from its (at most 2 x 2) staged quarters, whose encoded chunks are copied as they are; it decodes
them once, to record its voxels' checksum and to make its own quarter of the level above. So no
level is made by reading and decoding the level below from its shards, and a materialisation
orders its tasks so that each level shard follows the shards under it (`engine.pyramid_order`).

Lazily, a level shard makes only what it needs: a shard below it that is not recorded is written
first (staging its quarter); one that is recorded but whose quarter is gone (consumed, then the
level shard evicted) is read back, held against eviction meanwhile. Locks, durable writes and
done records are those of level 0. How voxels are downsampled: `downsample.py`.
"""

from __future__ import annotations

import numpy as np

from .format import CHUNKS, SHARDS, assemble_shard, blosc_codec
from .layout import array_path, shard_box
from .downsample import decode_into, quarter_chunks
from .liveness import close_lock_fd
from .plan import LevelSource, StorePlan, pyramid_levels, split_level
from .reader import ShardedArrayReader
from .shards import DEFAULT_CONNECTIONS, ShardTask, ShardWriter, cache_for, finish_array, shard_buffer
from .staging import QuarterStage

READ_BACK_TRIES = 20  # a parent evicted this often between its write and its read back: the budget is too small


def parents_of(index, parent_shape) -> list[tuple]:
    """The shards of the level below (an array of `parent_shape`) under level shard `index`."""
    ny, nx = -(-parent_shape[1] // SHARDS[1]), -(-parent_shape[2] // SHARDS[2])
    return [(index[0], j, k) for j in range(2 * index[1], min(2 * index[1] + 2, ny))
            for k in range(2 * index[2], min(2 * index[2] + 2, nx))]


class LevelWriter(ShardTask):
    """Writes the shards of one pyramid level (`<array>@<level>`); picklable like `ShardWriter`.

    stage_quarters: also stage each shard's quarter of the level above (a materialisation, or a
    lazy read of the level above, needs it; a lazy read of this level alone does not)."""

    def __init__(self, plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS,
                 stage_quarters: bool = False):
        self.plan, self.name, self.connections = plan, name, connections
        self.src: LevelSource = plan.source(name)
        base, level = split_level(name)
        self.level = level
        self.parent_name = base if level == 1 else f"{base}@{level - 1}"
        # The level below stages its quarters for us while it writes.
        self.parent = ShardWriter(plan, base, connections, stage_quarters=True) if level == 1 else \
            LevelWriter(plan, self.parent_name, connections, stage_quarters=True)
        self.stage_quarters = stage_quarters and level < pyramid_levels(plan.arrays[base].shape)
        self.cache = cache_for(plan)
        self.quarters = QuarterStage(self.cache.root, name)  # staged for this level by the level below
        self.next_name = f"{base}@{level + 1}"

    @property
    def stage_shared(self) -> bool:
        """Whether the fetched array below stages the source chunks other shards need (`ShardWriter`)."""
        return self.parent.stage_shared

    @stage_shared.setter
    def stage_shared(self, value: bool):
        self.parent.stage_shared = value

    @property
    def layer(self):  # the fetched array's layer (its fetcher is the run's)
        return self.parent.layer

    def finish(self):
        finish_array(self.cache, self.name, self.src.shape)

    def write(self, index) -> int:
        """Make level shard `index` from the quarters of the shards below it (writing those first if
        they are not recorded), write it and record it. Returns bytes written (0 if it was there)."""
        cache, src = self.cache, self.src
        index = tuple(index)
        parents = parents_of(index, self.parent.src.shape)
        for p in parents:  # before our lock: the level below may be written by another process
            if not cache.is_done(self.parent_name, p):
                self.parent.write(p)
        with cache.own_shard(self.name, index, self.layer.fetcher.cancelled.is_set) as needed:
            if not needed:  # made by another task: the quarters staged for it are nobody's now
                for p in parents:
                    self.quarters.release(p)
                return 0
            encoded = {}
            for p in parents:
                encoded.update(self._quarter(p))
            start, stop = shard_box(index, src.shape)
            shape = tuple(b - a for a, b in zip(start, stop))
            if self.stage_quarters:  # decoded only to make the level above: no level records a digest
                codec, quarter = blosc_codec(src.codec, src.is_label), {}
                for z_row, z0 in enumerate(range(0, shape[0], CHUNKS[0])):  # one inner-chunk row at a time
                    if any(c[0] == z_row for c in encoded):  # else zeros: no chunk at any level above
                        slab = decode_into(shard_buffer((min(CHUNKS[0], shape[0] - z0),) + shape[1:], src.dtype,
                                                        False), encoded, z_row, codec)
                        quarter.update(quarter_chunks(slab, index, z_row, src.is_label, src.codec))
                # Staged before this shard is recorded, as level 0 does.
                QuarterStage(cache.root, self.next_name).put(index, quarter)
            cache.write_shard(self.name, index, assemble_shard(encoded))
            cache.mark_done(self.name, index)
        for p in parents:  # used: the level shard is recorded
            self.quarters.release(p)
        return int(np.prod(shape)) * np.dtype(src.dtype).itemsize

    def _quarter(self, parent) -> dict:
        """The encoded quarter that shard `parent` of the level below contributes: staged, or made
        again from the recorded shard (held against eviction while it is read), or written first."""
        for _ in range(READ_BACK_TRIES):
            staged = self.quarters.get(parent)
            if staged is not None:
                return staged
            fd = self.cache.hold(self.parent_name, parent)
            if fd is None:  # not recorded (evicted meanwhile): written again, which stages its quarter
                self.parent.write(parent)
                continue
            try:
                return self._read_back(parent)
            finally:
                close_lock_fd(fd)
        raise RuntimeError(f"shard {parent} of {self.parent_name} in {self.cache.root} was evicted "
                           f"{READ_BACK_TRIES} times before level {self.name} could be made from it: "
                           "cache_limit is smaller than one level shard needs")

    def _read_back(self, parent) -> dict:
        src = self.parent.src
        reader = ShardedArrayReader(self.cache.zarr_path / array_path(self.parent_name), cache_mb=0)
        start, stop = shard_box(parent, src.shape)
        out = {}
        for z_row, z0 in enumerate(range(start[0], stop[0], CHUNKS[0])):
            slab = reader[z0:min(z0 + CHUNKS[0], stop[0]), start[1]:stop[1], start[2]:stop[2]]
            out.update(quarter_chunks(slab, parent, z_row, src.is_label, self.src.codec))
        return out
