"""Blockwise 26-connected components of a mask too large for memory, as igneous and daisy do it.

Each block is labelled on its own (connected-components-3d) together with a one-voxel halo on its
low sides. Voxels of the halo belong to the neighbouring blocks, which report the labels of their
foreground voxels on their high faces: joining the two on the voxel's global index gives the pairs
of block labels that touch across a face, edge or corner, and scipy.sparse.csgraph merges them. A block's
result is small (per label: voxel count, sums, bounding box, first voxel; face voxels), so the
whole volume is never held; labelling a block again gives the same labels, which a second pass
uses to map voxels to global components.
"""

from __future__ import annotations

import itertools

import cc3d
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def blocks(shape, block_shape) -> list[tuple]:
    """(start, stop) of each block of `block_shape` tiling an array of `shape`, in C order."""
    counts = [-(-n // b) for n, b in zip(shape, block_shape)]
    out = []
    for index in itertools.product(*(range(c) for c in counts)):
        start = tuple(i * b for i, b in zip(index, block_shape))
        out.append((start, tuple(min(s + b, n) for s, b, n in zip(start, block_shape, shape))))
    return out


def foreground(mask: np.ndarray) -> np.ndarray:
    """Flat C-order indices of the non-zero voxels of a contiguous array: np.flatnonzero, ~5x faster on
    sparse one-byte masks by skipping eight all-zero bytes at a time."""
    flat = mask.reshape(-1)
    if mask.dtype.itemsize != 1 or flat.size < 64:
        return np.flatnonzero(flat)
    n = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:n].view(np.uint64))
    idx = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    return np.concatenate([idx[flat[idx] != 0], np.flatnonzero(flat[n:]) + n])


def label_block(mask_reader, shape, start, stop):
    """Label block [start, stop) of the mask read by `mask_reader(start, stop)` (a boolean or
    integer array; non-zero is foreground) with its low-side halo. Returns (labels of the extended
    block, halo width per axis, flat C-order indices of its foreground voxels in the extended block)."""
    halo = tuple(1 if s > 0 else 0 for s in start)
    ext_start = tuple(s - h for s, h in zip(start, halo))
    mask = np.ascontiguousarray(mask_reader(ext_start, stop))
    fg = foreground(mask)
    if not fg.size:  # most blocks of a sparse mask: nothing to label
        return np.zeros(mask.shape, np.uint32), halo, fg
    labels = cc3d.connected_components(mask, connectivity=26, binary_image=True, out_dtype=np.uint32)
    return labels, halo, fg


def _linear(shape, coords) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.asarray(c, np.int64) for c in coords), shape)


def block_summary(labels: np.ndarray, halo, start, stop, shape, fg: np.ndarray | None = None) -> dict:
    """What one block contributes: per label over the block's own voxels (not its halo) the voxel
    count, coordinate sums, bounding box and first voxel (C order); and the labels of its
    foreground voxels on its high faces (`exports`) and in its halo (`imports`), by global voxel
    index. `fg`: the extended block's foreground as flat indices (`label_block`'s), found if not given.
    The block's own foreground voxels (`where`, C order) and their labels (`lab`) are kept for
    `value_counts`."""
    if fg is None:
        fg = np.flatnonzero(labels)
    ext_lab = labels.reshape(-1)[fg].astype(np.int64)
    n = int(ext_lab.max()) if fg.size else 0
    ez, ey, ex = np.unravel_index(fg, labels.shape)
    in_core = (ez >= halo[0]) & (ey >= halo[1]) & (ex >= halo[2])
    # C order of the extended block restricted to the core is C order of the core.
    z, y, x = ez[in_core] - halo[0], ey[in_core] - halo[1], ex[in_core] - halo[2]
    lab = ext_lab[in_core]
    gz, gy, gx = z + start[0], y + start[1], x + start[2]
    count = np.bincount(lab, minlength=n + 1)
    out = {"n": n, "count": count, "sum": np.stack([np.bincount(lab, weights=g, minlength=n + 1)
                                                   for g in (gz, gy, gx)]).astype(np.float64)}
    big = np.iinfo(np.int64).max
    lo, hi = np.full((3, n + 1), big, np.int64), np.full((3, n + 1), -1, np.int64)
    for axis, g in enumerate((gz, gy, gx)):
        np.minimum.at(lo[axis], lab, g)
        np.maximum.at(hi[axis], lab, g)
    position = np.full(n + 1, big, np.int64)
    np.minimum.at(position, lab, np.arange(len(lab)))
    first = np.full(n + 1, big, np.int64)
    seen = position < big
    first[seen] = _linear(shape, (gz[position[seen]], gy[position[seen]], gx[position[seen]]))
    out.update(lo=lo, hi=hi + 1, first=first, where=(z, y, x), lab=lab)
    # High faces (the voxels neighbours' halos hold), deduplicated where faces meet.
    on = np.zeros(len(lab), bool)
    for axis, local in enumerate((z, y, x)):
        if stop[axis] < shape[axis]:
            on |= local == stop[axis] - start[axis] - 1
    out["exports"] = np.stack([_linear(shape, (gz[on], gy[on], gx[on])), lab[on]])
    # The halo: its foreground voxels, each once, by global index.
    ext_start = [s - h for s, h in zip(start, halo)]
    out_halo = ~in_core
    out["imports"] = np.stack([_linear(shape, (ez[out_halo] + ext_start[0], ey[out_halo] + ext_start[1],
                                               ex[out_halo] + ext_start[2])), ext_lab[out_halo]])
    return out


def value_counts(summary: dict, values: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (label, value) as a (2, k) array, their voxel counts) over the block's own foreground
    voxels, for non-zero `values` (an array over the block, e.g. segment ids; None: none)."""
    if values is None or not len(summary["lab"]):
        return np.zeros((2, 0), np.int64), np.zeros(0, np.int64)
    v = values[summary["where"]].astype(np.int64)
    keep = v != 0
    keys, counts = np.unique((summary["lab"][keep] << 32) | v[keep], return_counts=True)
    return np.stack([keys >> 32, keys & 0xFFFFFFFF]), counts


def slim(summary: dict) -> dict:
    """The summary without its block-sized parts, as it is returned and kept."""
    return {k: v for k, v in summary.items() if k not in ("where", "lab")}


class Components:
    """The global components of a blockwise labelling, made from the blocks' summaries in block
    order: `of_block(b)` maps a block's labels to global components, and the per-component
    arrays (count, sum, lo, hi, first, values) are indexed by component 0..N-1, numbered in C order
    of their first voxel. Node numbers are packed two to an int64 key: fewer than 2**31 labels in all."""

    def __init__(self, summaries: list[dict]):
        self.offsets = np.cumsum([0] + [s["n"] + 1 for s in summaries])  # label 0 kept per block
        total = int(self.offsets[-1])
        # Halo voxels named by their owners: join on the global voxel index; every pair of block
        # labels that touch is an edge of a graph whose connected components (scipy's csgraph, no
        # Python loop per node or pair) are the global components.
        exports = np.concatenate([np.stack([s["exports"][0], s["exports"][1] + self.offsets[b]])
                                  for b, s in enumerate(summaries)], axis=1)
        order = np.argsort(exports[0], kind="stable")
        exp_idx, exp_node = exports[0][order], exports[1][order]
        ends = [np.zeros((2, 0), np.int64)]
        for b, s in enumerate(summaries):
            idx, lab = s["imports"]
            if idx.size == 0:
                continue
            pos = np.searchsorted(exp_idx, idx)
            ok = (pos < len(exp_idx)) & (exp_idx[np.minimum(pos, len(exp_idx) - 1)] == idx)
            ends.append(np.stack([lab[ok] + self.offsets[b], exp_node[pos[ok]]]))
        a, c = np.concatenate(ends, axis=1)
        graph = coo_matrix((np.ones(len(a), np.int8), (a, c)), shape=(total, total))
        n_roots, roots = connected_components(graph, directed=False)
        roots = roots.astype(np.int64)
        count = np.concatenate([s["count"] for s in summaries])
        real = np.zeros(total, bool)
        for b, s in enumerate(summaries):
            real[self.offsets[b] + 1:self.offsets[b + 1]] = True
        # Per root: sums of counts and coordinates, bounding boxes, first voxels.
        root_count = np.bincount(roots, weights=count * real, minlength=n_roots)
        keep = np.nonzero(root_count > 0)[0]
        big = np.iinfo(np.int64).max
        first = np.full(n_roots, big, np.int64)
        np.minimum.at(first, roots, np.concatenate([s["first"] for s in summaries]))
        order = keep[np.argsort(first[keep], kind="stable")]  # components numbered by first voxel
        self.n = len(order)
        self.component_of_root = np.full(n_roots, -1, np.int64)
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

    def of_block(self, block: int) -> np.ndarray:
        """The global component (0..N-1; -1 for background) of each label 0..n of block `block`."""
        return self.component[self.offsets[block]:self.offsets[block + 1]]

    def majority_value(self) -> np.ndarray:
        """Per component: the non-zero value covering most of its voxels, ties to the lower value, 0 if none."""
        if self.values is None:
            return np.zeros(self.n, np.int64)
        return winners(*self.values, self.n, missing=0)


def winners(groups, values, counts, n: int, missing: int) -> np.ndarray:
    """Per group 0..n-1: the value with the largest count (the counts of a repeated (group, value)
    summed), ties to the lower value; `missing` where a group has none. Groups below 2**31, values
    below 2**32."""
    out = np.full(n, missing, np.int64)
    if len(groups) == 0:
        return out
    keys, inverse = np.unique((np.asarray(groups, np.int64) << 32) | np.asarray(values, np.int64),
                              return_inverse=True)
    totals = np.bincount(inverse.ravel(), weights=counts, minlength=len(keys))
    group, value = keys >> 32, keys & 0xFFFFFFFF
    order = np.lexsort((value, -totals, group))
    head = np.ones(len(order), bool)
    head[1:] = group[order][1:] != group[order][:-1]
    out[group[order][head]] = value[order][head]
    return out
