"""Blockwise 26-connected components of a mask too large for memory, as igneous and daisy do it.

Each block is labelled on its own (connected-components-3d) together with a one-voxel halo on its
low sides. Voxels of the halo belong to the neighbouring blocks, which report the labels of their
foreground voxels on their high faces: joining the two on the voxel's global index gives the pairs
of block labels that touch across a face, edge or corner, and a union-find merges them. A block's
result is small (per label: voxel count, sums, bounding box, first voxel; face voxels), so the
whole volume is never held; labelling a block again gives the same labels, which a second pass
uses to map voxels to global components.
"""

from __future__ import annotations

import itertools

import cc3d
import numpy as np


def blocks(shape, block_shape) -> list[tuple]:
    """(start, stop) of each block of `block_shape` tiling an array of `shape`, in C order."""
    counts = [-(-n // b) for n, b in zip(shape, block_shape)]
    out = []
    for index in itertools.product(*(range(c) for c in counts)):
        start = tuple(i * b for i, b in zip(index, block_shape))
        out.append((start, tuple(min(s + b, n) for s, b, n in zip(start, block_shape, shape))))
    return out


def label_block(mask_reader, shape, start, stop):
    """Label block [start, stop) of the mask read by `mask_reader(start, stop)` (a boolean or
    integer array; non-zero is foreground) with its low-side halo. Returns (labels of the extended
    block, halo width per axis)."""
    halo = tuple(1 if s > 0 else 0 for s in start)
    ext_start = tuple(s - h for s, h in zip(start, halo))
    mask = mask_reader(ext_start, stop)
    labels = cc3d.connected_components(np.ascontiguousarray(mask != 0), connectivity=26, binary_image=True,
                                       out_dtype=np.uint32)
    return labels, halo


def _linear(shape, coords) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.asarray(c, np.int64) for c in coords), shape)


def block_summary(labels: np.ndarray, halo, start, stop, shape, values: np.ndarray | None = None) -> dict:
    """What one block contributes: per label over the block's own voxels (not its halo) the voxel
    count, coordinate sums, bounding box and first voxel (C order); the labels of its foreground
    voxels on its high faces (`exports`) and in its halo (`imports`), by global voxel index; and,
    given `values` over the block (e.g. segment ids), the count of each (label, non-zero value)."""
    n = int(labels.max()) if labels.size else 0
    core = labels[tuple(slice(h, None) for h in halo)]
    z, y, x = np.nonzero(core)
    lab = core[z, y, x].astype(np.int64)
    gz, gy, gx = z + start[0], y + start[1], x + start[2]
    count = np.bincount(lab, minlength=n + 1)
    out = {"n": n, "count": count, "sum": np.stack([np.bincount(lab, weights=g, minlength=n + 1)
                                                   for g in (gz, gy, gx)]).astype(np.float64)}
    big = np.iinfo(np.int64).max
    lo, hi = np.full((3, n + 1), big, np.int64), np.full((3, n + 1), -1, np.int64)
    for axis, g in enumerate((gz, gy, gx)):
        np.minimum.at(lo[axis], lab, g)
        np.maximum.at(hi[axis], lab, g)
    first = np.full(n + 1, big, np.int64)
    present, where = np.unique(lab, return_index=True)  # np.nonzero is C order: the first is the lowest
    first[present] = _linear(shape, (gz[where], gy[where], gx[where]))
    out.update(lo=lo, hi=hi + 1, first=first)
    # High faces (voxels a neighbour's halo holds) and the halo itself.
    exports = []
    for axis in range(3):
        if stop[axis] < shape[axis]:
            on = (z == stop[axis] - start[axis] - 1) if axis == 0 else (y == stop[axis] - start[axis] - 1) \
                if axis == 1 else (x == stop[axis] - start[axis] - 1)
            exports.append(np.stack([_linear(shape, (gz[on], gy[on], gx[on])), lab[on]]))
    out["exports"] = np.unique(np.concatenate(exports, axis=1), axis=1) if exports else np.zeros((2, 0), np.int64)
    ext_start = [s - h for s, h in zip(start, halo)]
    hz, hy, hx = np.nonzero(labels)
    in_halo = (hz < halo[0]) | (hy < halo[1]) | (hx < halo[2])
    hz, hy, hx = hz[in_halo], hy[in_halo], hx[in_halo]
    out["imports"] = np.stack([_linear(shape, (hz + ext_start[0], hy + ext_start[1], hx + ext_start[2])),
                               labels[hz, hy, hx].astype(np.int64)]) if hz.size else np.zeros((2, 0), np.int64)
    if values is not None:
        v = values[z, y, x].astype(np.int64)
        keep = v != 0
        pairs, counts = np.unique(np.stack([lab[keep], v[keep]]), axis=1, return_counts=True) if keep.any() \
            else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
        out["values"] = (pairs, counts)
    return out


class Components:
    """The global components of a blockwise labelling: `merge(summaries)` with the blocks'
    summaries in block order; then `node(b, label)` is the global component of a block label, and
    the per-component arrays (count, sum, lo, hi, first, values) are indexed by component 0..N-1,
    numbered in C order of their first voxel."""

    def __init__(self, summaries: list[dict]):
        self.offsets = np.cumsum([0] + [s["n"] + 1 for s in summaries])  # label 0 kept per block
        total = int(self.offsets[-1])
        parent = np.arange(total)

        def find(a):
            root = a
            while parent[root] != root:
                root = parent[root]
            while parent[a] != root:
                parent[a], a = root, parent[a]
            return root
        # Halo voxels named by their owners: join on the global voxel index.
        exports = np.concatenate([np.stack([s["exports"][0], s["exports"][1] + self.offsets[b]])
                                  for b, s in enumerate(summaries)], axis=1)
        order = np.argsort(exports[0], kind="stable")
        exp_idx, exp_node = exports[0][order], exports[1][order]
        for b, s in enumerate(summaries):
            idx, lab = s["imports"]
            if idx.size == 0:
                continue
            pos = np.searchsorted(exp_idx, idx)
            ok = (pos < len(exp_idx)) & (exp_idx[np.minimum(pos, len(exp_idx) - 1)] == idx)
            pairs = np.unique(np.stack([lab[ok] + self.offsets[b], exp_node[pos[ok]]]), axis=1)
            for a, c in pairs.T:
                ra, rc = find(int(a)), find(int(c))
                if ra != rc:
                    parent[max(ra, rc)] = min(ra, rc)
        roots = np.array([find(i) for i in range(total)], dtype=np.int64)
        count = np.concatenate([s["count"] for s in summaries])
        real = np.zeros(total, bool)
        for b, s in enumerate(summaries):
            real[self.offsets[b] + 1:self.offsets[b + 1]] = True
        # Per root: sums of counts and coordinates, bounding boxes, first voxels.
        root_count = np.bincount(roots, weights=count * real, minlength=total)
        keep = np.nonzero(root_count > 0)[0]
        big = np.iinfo(np.int64).max
        first = np.full(total, big, np.int64)
        np.minimum.at(first, roots, np.concatenate([s["first"] for s in summaries]))
        order = keep[np.argsort(first[keep], kind="stable")]  # components numbered by first voxel
        self.n = len(order)
        self.component_of_root = np.full(total, -1, np.int64)
        self.component_of_root[order] = np.arange(self.n)
        self.component = self.component_of_root[roots]  # per node; -1 for label 0 and halo-only nodes
        comp = self.component
        valid = comp >= 0
        self.count = np.bincount(comp[valid], weights=count[valid], minlength=self.n).astype(np.int64)
        sums = np.concatenate([s["sum"] for s in summaries], axis=1)
        self.sum = np.stack([np.bincount(comp[valid], weights=sums[a][valid], minlength=self.n) for a in range(3)])
        lo = np.concatenate([s["lo"] for s in summaries], axis=1)
        hi = np.concatenate([s["hi"] for s in summaries], axis=1)
        self.lo, self.hi = np.full((3, self.n), big, np.int64), np.zeros((3, self.n), np.int64)
        for a in range(3):
            np.minimum.at(self.lo[a], comp[valid], lo[a][valid])
            np.maximum.at(self.hi[a], comp[valid], hi[a][valid])
        self.first = first[order]
        self.values = None
        if all("values" in s for s in summaries):  # (component, value) -> count, summed over blocks
            pairs = [np.stack([comp[s["values"][0][0] + self.offsets[b]], s["values"][0][1], s["values"][1]])
                     for b, s in enumerate(summaries) if s["values"][1].size]
            self.values = np.concatenate(pairs, axis=1) if pairs else np.zeros((3, 0), np.int64)

    def node(self, block: int, labels):
        """Global component (0..N-1, -1 for background) of block `block`'s labels (an array)."""
        return self.component[np.asarray(labels, np.int64) + self.offsets[block]]

    def majority_value(self) -> np.ndarray:
        """Per component: the non-zero value covering most of its voxels, ties to the lower value, 0 if none."""
        out = np.zeros(self.n, np.int64)
        if self.values is None or self.values.shape[1] == 0:
            return out
        comp, value, count = self.values
        # Sum a value's counts across blocks, then sort by component, count descending, value ascending.
        keys, inverse = np.unique(np.stack([comp, value]), axis=1, return_inverse=True)
        totals = np.bincount(inverse.ravel(), weights=count, minlength=keys.shape[1])
        order = np.lexsort((keys[1], -totals, keys[0]))
        comps = keys[0][order]
        head = np.ones(len(order), bool)
        head[1:] = comps[1:] != comps[:-1]
        out[comps[head]] = keys[1][order][head]
        return out
