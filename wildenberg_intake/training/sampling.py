"""Patches with foreground, found from the store's foreground index instead of by reading background.

torch-em's way to train on sparse targets is rejection: draw a patch origin uniformly, read the
patch, keep it if its foreground fraction exceeds `min_fraction`, else draw again. The same
distribution (uniform over the acceptable origins) comes from drawing origins uniformly among
those whose foreground *upper bound* exceeds the threshold, and accepting by the exact count:
every acceptable origin is among them (its count is at most its bound), each is proposed with the
same probability, and the exact test removes the rest. The bound of an origin is the sum of the
index's counts over the blocks its patch overlaps (a summed-area table over the block grid); it is
the same for every origin of a cell (origins whose patches overlap the same blocks), so proposals
draw a cell by its number of origins, then an origin inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..store.foreground import BLOCK


def draw(rng, cumulative) -> int:
    """An index drawn with probability proportional to the weights whose running sum is
    `cumulative` (integers; 0 where they are all 0)."""
    return int(np.searchsorted(cumulative, rng.integers(cumulative[-1]), side="right")) if cumulative[-1] else 0


def _axis_cells(lo: int, hi: int, patch: int, block: int):
    """Origins [lo, hi) cut where the first or last block a patch of `patch` voxels overlaps
    changes: (start of each cell, its origins, its first block, one past its last block)."""
    cuts = {lo, hi}
    for edge in range(lo - lo % block, hi + patch + block, block):
        for o in (edge, edge - patch + 1):  # the first block starts at `edge`; the last one does at the second
            if lo < o < hi:
                cuts.add(o)
    starts = np.array(sorted(cuts), dtype=np.int64)
    first = starts[:-1] // block
    last = (starts[:-1] + patch - 1) // block + 1
    return starts[:-1], np.diff(starts), first, last


@dataclass
class ForegroundProposals:
    """Origins of patches that may hold more than `min_fraction` foreground in every channel.

    counts: one block grid of counts per label channel (index.array_counts); shape: the label's;
    box: (start, stop) voxels the patches lie in (a split's ROI); patch: the patch shape. Origins
    are drawn as torch-em draws them (uniform in [start, stop - patch) per axis; `start` where the
    patch does not fit), restricted to those whose bound exceeds the threshold in every channel.
    """

    counts: list
    shape: tuple
    box: tuple
    patch: tuple
    min_fraction: list
    known: np.ndarray | None = None  # blocks whose counts are known (lazy: cached shards); None: all
    proposed: int = 0
    accepted: int = 0
    voxels_read: int = 0
    _cells: tuple = field(default=None, repr=False)

    def __post_init__(self):
        start, stop = self.box
        axes, sizes = [], []
        for a, (lo, hi, p, b) in enumerate(zip(start, stop, self.patch, BLOCK)):
            n = hi - lo
            fit = min(p, n)  # a patch larger than the box is read clipped (torch-em pads it)
            last = lo + max(n - p, 1)  # torch-em: randint(0, n - p), or 0 where n - p <= 0
            axes.append(_axis_cells(lo, last, fit, b))
            sizes.append(fit)
        self.patch_voxels = int(np.prod(sizes))
        grid = tuple(len(ax[0]) for ax in axes)
        tables = [_summed_area(np.asarray(c, dtype=np.int64)) for c in self.counts]
        # A patch over a block whose count is not known (a shard not cached yet) is no candidate.
        unknown = None if self.known is None else _summed_area((~self.known).astype(np.int64))
        largest, where, weights = [0] * len(tables), [], []
        step = max(1, 2**22 // max(grid[1] * grid[2], 1))  # cells bounded a few million at a time
        for z0 in range(0, grid[0], step):
            ok = None
            for c, (table, fraction) in enumerate(zip(tables, self.min_fraction)):
                bound = _bounds(table, axes, slice(z0, z0 + step))
                largest[c] = max(largest[c], int(bound.max()))
                meets = bound > fraction * self.patch_voxels
                ok = meets if ok is None else ok & meets
            if unknown is not None:
                ok &= _bounds(unknown, axes, slice(z0, z0 + step)) == 0
            cz, cy, cx = np.nonzero(ok)  # only the candidate cells are kept
            where.append(np.ravel_multi_index((cz + z0, cy, cx), grid))
            weights.append(axes[0][1][cz + z0] * axes[1][1][cy] * axes[2][1][cx])
        self.largest_fraction = [v / self.patch_voxels for v in largest]
        where = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
        weights = np.concatenate(weights) if weights else np.zeros(0, dtype=np.int64)
        self._cells = (axes, grid, where, np.cumsum(weights))

    @property
    def candidates(self) -> int:
        """Origins proposed from: a superset of the acceptable ones."""
        cum = self._cells[3]
        return int(cum[-1]) if len(cum) else 0

    def propose(self, rng) -> tuple:
        """A patch origin (global voxels), uniform over the candidates."""
        axes, grid, where, cum = self._cells
        cell = np.unravel_index(where[draw(rng, cum)], grid)
        origin = tuple(int(axes[a][0][c] + rng.integers(axes[a][1][c])) for a, c in enumerate(cell))
        self.proposed += 1
        return origin

    def accepts(self, labels: np.ndarray, channels: bool) -> bool:
        """The exact test (torch-em's MinForegroundSampler): more than `min_fraction` non-zero voxels,
        in every channel where `channels` (the first axis)."""
        self.voxels_read += labels.size
        planes = labels if channels else labels[None]
        ok = all(np.count_nonzero(p) > f * p.size for p, f in zip(planes, self.min_fraction))
        self.accepted += ok
        return ok


def _summed_area(counts: np.ndarray) -> np.ndarray:
    table = np.zeros(tuple(n + 1 for n in counts.shape), dtype=np.int64)
    table[1:, 1:, 1:] = counts.cumsum(0).cumsum(1).cumsum(2)
    return table


def _bounds(table: np.ndarray, axes, zs: slice) -> np.ndarray:
    """For the cells of `axes` (z cells `zs`), the sum of the counts over the blocks their patches
    overlap, from the summed-area `table` of the counts."""
    n = [s - 1 for s in table.shape]
    (_, _, fz, lz), (_, _, fy, ly), (_, _, fx, lx) = axes
    fz, lz = np.minimum(fz[zs], n[0])[:, None, None], np.minimum(lz[zs], n[0])[:, None, None]
    fy, ly = np.minimum(fy, n[1])[None, :, None], np.minimum(ly, n[1])[None, :, None]
    fx, lx = np.minimum(fx, n[2])[None, None, :], np.minimum(lx, n[2])[None, None, :]
    return (table[lz, ly, lx] - table[fz, ly, lx] - table[lz, fy, lx] - table[lz, ly, fx]
            + table[fz, fy, lx] + table[fz, ly, fx] + table[lz, fy, fx] - table[fz, fy, fx])


class CachedForeground:
    """Foreground proposals over the shards cached so far, for a dataset over a store filled while
    it is used (lazy=True): the counts of each newly cached shard are read from its record, those
    of an evicted one dropped, and the proposals remade when the cached set changed (at most once
    per `refresh_seconds` while candidates exist). Uniform over the acceptable patches that lie in
    cached shards, as the lazy pool is uniform over the windows that do."""

    def __init__(self, cache, names, shape, box, patch, min_fraction, refresh_seconds: float = 1.0):
        from ..store.foreground import block_grid
        self.cache, self.names, self.shape = cache, list(names), tuple(shape)
        self.box, self.patch, self.min_fraction = box, tuple(patch), list(min_fraction)
        self.refresh_seconds = refresh_seconds
        self.counts = [np.zeros(block_grid(shape), dtype=np.int32) for _ in self.names]
        self.known = np.zeros(block_grid(shape), dtype=bool)
        self.seen, self.current, self._made = frozenset(), None, 0.0
        self.proposed = self.accepted = self.voxels_read = 0

    def __getstate__(self):  # a loader worker rebuilds its own from the records
        state = dict(self.__dict__)
        state.update(seen=frozenset(), current=None, _made=0.0)
        return state

    def refresh(self, cached: frozenset, force: bool = False) -> "ForegroundProposals":
        """The proposals over `cached` shards (indices shared by every array of the dataset)."""
        import time
        now = time.monotonic()
        if self.current is not None and (cached == self.seen or not force and now - self._made < self.refresh_seconds
                                         and self.current.candidates):
            return self.current
        from ..store.foreground import index_shard, recorded_counts, shard_blocks
        for index in cached - self.seen:
            found = [recorded_counts(self.cache, name, index, self.shape) for name in self.names]
            if any(f is None for f in found):  # a shard written before the index
                found = [index_shard(self.cache, name, index, self.shape) for name in self.names]
            if any(f is None for f in found):
                continue  # evicted meanwhile
            for counts, f in zip(self.counts, found):
                counts[shard_blocks(index, self.shape)] = f
            self.known[shard_blocks(index, self.shape)] = True
        for index in self.seen - cached:
            self.known[shard_blocks(index, self.shape)] = False
            for counts in self.counts:
                counts[shard_blocks(index, self.shape)] = 0
        self.seen, self._made = cached, now
        self.current = ForegroundProposals(self.counts, self.shape, self.box, self.patch, self.min_fraction,
                                           known=self.known)
        return self.current

    @property
    def candidates(self) -> int:
        return self.current.candidates if self.current is not None else 0

    @property
    def largest_fraction(self) -> list:
        return self.current.largest_fraction if self.current is not None else [0.0] * len(self.names)

    def propose(self, rng) -> tuple:
        origin = self.current.propose(rng)
        self.proposed += 1
        return origin

    def accepts(self, labels: np.ndarray, channels: bool) -> bool:
        ok = self.current.accepts(labels, channels)
        self.voxels_read += labels.size
        self.accepted += ok
        return ok
