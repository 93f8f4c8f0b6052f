"""Synthetic neuropil for the test mirror: a dense segmentation, membranes and synapses.

The content is a function of physical position (nm), so every layer and mip samples one tissue:
- neurites are the cells of a Voronoi partition of jittered seeds (one per 720 x 720 x 480 nm cell),
  so the segmentation is dense (every voxel in some segment, distinct uint32 ids above 255) and
  segments span many chunks and shards;
- membranes are the voxels within 10 nm of a face between two segments (dark in the EM);
- a synapse joins two touching segments: its PSD is a disc-shaped plate up to 40 nm thick on the
  postsynaptic side of their shared face, its vesicle cloud a ball inside the presynaptic segment
  next to it (both darker in the EM). Placement is random, so boxes cut some PSDs and some straddle
  chunk and shard faces.
"""

from __future__ import annotations

import itertools

import numpy as np

CELL_NM = np.array([720.0, 720.0, 480.0])  # seed spacing, x y z
MEMBRANE_NM = 10.0  # half the membrane's thickness
PSD_NM = 40.0  # how far a PSD reaches into the postsynaptic segment
SYNAPSE_RATE = 0.6  # synapses per seed
_OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)))  # (dx, dy, dz)


class Tissue:
    """Seeds and synapses over the physical box [lo_nm, hi_nm) (x, y, z), drawn from `rng`."""

    def __init__(self, lo_nm, hi_nm, rng: np.random.Generator, synapse_rate: float = SYNAPSE_RATE):
        lo, hi = np.asarray(lo_nm, float), np.asarray(hi_nm, float)
        self.origin = (np.floor(lo / CELL_NM) - 2) * CELL_NM  # two cells of margin: +-1 never leaves the grid
        self.cells = (np.ceil(hi / CELL_NM) + 2 - np.floor(lo / CELL_NM) + 2).astype(int)  # x, y, z
        n = int(np.prod(self.cells))
        cx, cy, cz = np.unravel_index(np.arange(n), self.cells[::-1])[::-1]
        corner = self.origin + np.stack([cx, cy, cz], axis=1) * CELL_NM
        self.seeds = corner + rng.uniform(0.15, 0.85, size=(n, 3)) * CELL_NM  # (n, 3) x y z
        self.ids = (1000 + 7919 * np.arange(n)).astype(np.uint32)
        self.synapses = self._synapses(rng, synapse_rate)

    def _index(self, cx, cy, cz):
        return (cz * self.cells[1] + cy) * self.cells[0] + cx

    def _synapses(self, rng, rate: float) -> list[dict]:
        """Pairs of neighbouring seeds (pre, post) with a contact disc on their bisecting plane."""
        out, seen = [], set()
        n = len(self.seeds)
        for pre in rng.choice(n, size=int(rate * n), replace=False):
            cz, rem = divmod(int(pre), self.cells[0] * self.cells[1])
            cy, cx = divmod(rem, self.cells[0])
            dx, dy, dz = _OFFSETS[rng.integers(len(_OFFSETS))]
            px, py, pz = cx + dx, cy + dy, cz + dz
            if (dx, dy, dz) == (0, 0, 0) or not (0 <= px < self.cells[0] and 0 <= py < self.cells[1]
                                                 and 0 <= pz < self.cells[2]):
                continue
            post = int(self._index(px, py, pz))
            if frozenset((int(pre), post)) in seen:
                continue
            seen.add(frozenset((int(pre), post)))
            a, b = self.seeds[pre], self.seeds[post]
            normal = (b - a) / np.linalg.norm(b - a)
            centre = (a + b) / 2
            radius = rng.uniform(120, 300)
            cloud_r = rng.uniform(100, 220)
            cloud = centre - normal * (cloud_r + 25)
            reach = radius + PSD_NM
            box = [np.minimum(centre - reach, cloud - cloud_r), np.maximum(centre + reach, cloud + cloud_r)]
            out.append({"pre": int(pre), "post": post, "centre": centre, "normal": normal, "radius": radius,
                        "cloud": cloud, "cloud_r": cloud_r, "box": box})
        return out

    def nearest(self, cell, xs, ys, zs):
        """For the points xs x ys x zs (nm) inside cell `cell` (x, y, z indices): the nearest seed,
        the second nearest, and the distance (nm) from the plane between the two (the face of the
        two segments), each (z, y, x). The candidates are the seeds of the 27 cells around the cell
        (jittered seeds keep the nearest among them)."""
        cand = np.array([self._index(cell[0] + dx, cell[1] + dy, cell[2] + dz) for dx, dy, dz in _OFFSETS])
        s = self.seeds[cand]
        d = ((xs[None, None, None, :] - s[:, 0, None, None, None]) ** 2
             + (ys[None, None, :, None] - s[:, 1, None, None, None]) ** 2
             + (zs[None, :, None, None] - s[:, 2, None, None, None]) ** 2)
        k1 = d.argmin(axis=0)
        d1 = np.take_along_axis(d, k1[None], 0)[0]
        np.put_along_axis(d, k1[None], np.inf, 0)
        k2 = d.argmin(axis=0)
        d2 = np.take_along_axis(d, k2[None], 0)[0]
        i1, i2 = cand[k1], cand[k2]
        gap = np.linalg.norm(s[k2] - s[k1], axis=-1)
        return i1, i2, (d2 - d1) / (2 * gap)

    def render(self, resolution_xyz, offset_xyz, size_xyz) -> dict:
        """The tissue sampled at voxel centres of a grid (voxel k spans [offset + k, offset + k + 1)
        x resolution): segment ids (uint32), membrane, psd and vesicle_cloud masks, each (z, y, x).
        Computed one seed cell at a time."""
        res, off = np.asarray(resolution_xyz, float), np.asarray(offset_xyz, float)
        axes = [(np.arange(int(n)) + o + 0.5) * r for n, o, r in zip(size_xyz, off, res)]
        shape = tuple(len(a) for a in axes[::-1])
        out = {"segments": np.empty(shape, np.uint32), "membrane": np.empty(shape, bool),
               "psd": np.zeros(shape, np.uint8), "vesicle_cloud": np.zeros(shape, np.uint8)}
        # Each axis cut at cell faces: the voxels of one cell along that axis.
        cuts = []
        for a, pts in enumerate(axes):
            first = int(np.floor((pts[0] - self.origin[a]) / CELL_NM[a]))
            last = int(np.floor((pts[-1] - self.origin[a]) / CELL_NM[a]))
            cuts.append([(c, slice(*np.searchsorted(pts, self.origin[a] + CELL_NM[a] * np.array([c, c + 1]))))
                         for c in range(first, last + 1)])
        boxes = np.array([s["box"] for s in self.synapses], float).reshape(-1, 2, 3)  # (n, lo/hi, x y z) nm
        for (cz, sz), (cy, sy), (cx, sx) in itertools.product(cuts[2], cuts[1], cuts[0]):
            xs, ys, zs = axes[0][sx], axes[1][sy], axes[2][sz]
            i1, i2, h = self.nearest((cx, cy, cz), xs, ys, zs)
            win = (sz, sy, sx)
            out["segments"][win] = self.ids[i1]
            out["membrane"][win] = h < MEMBRANE_NM
            lo, hi = np.array([xs[0], ys[0], zs[0]]), np.array([xs[-1], ys[-1], zs[-1]])
            near = np.nonzero(np.all(boxes[:, 0] <= hi, axis=1) & np.all(boxes[:, 1] >= lo, axis=1))[0]
            for k in near:
                self._paint(self.synapses[k], xs, ys, zs, i1, i2, h, out["psd"][win], out["vesicle_cloud"][win])
        return out

    @staticmethod
    def _window(centre, reach, xs, ys, zs):
        return [slice(*np.searchsorted(a, [c - reach, c + reach])) for a, c in zip((xs, ys, zs), centre)]

    def _paint(self, syn, xs, ys, zs, i1, i2, h, psd, cloud):
        sx, sy, sz = self._window(syn["centre"], syn["radius"] + PSD_NM, xs, ys, zs)
        if sx.stop > sx.start and sy.stop > sy.start and sz.stop > sz.start:
            px, py, pz = xs[sx][None, None, :], ys[sy][:, None][None], zs[sz][:, None, None]
            rel = [px - syn["centre"][0], py - syn["centre"][1], pz - syn["centre"][2]]
            along = rel[0] * syn["normal"][0] + rel[1] * syn["normal"][1] + rel[2] * syn["normal"][2]
            radial2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along ** 2
            win = (sz, sy, sx)
            inside = ((i1[win] == syn["post"]) & (i2[win] == syn["pre"]) & (h[win] < PSD_NM)
                      & (radial2 < syn["radius"] ** 2))
            psd[win][inside] = 1
        sx, sy, sz = self._window(syn["cloud"], syn["cloud_r"], xs, ys, zs)
        if sx.stop > sx.start and sy.stop > sy.start and sz.stop > sz.start:
            d2 = ((xs[sx][None, None, :] - syn["cloud"][0]) ** 2 + (ys[sy][None, :, None] - syn["cloud"][1]) ** 2
                  + (zs[sz][:, None, None] - syn["cloud"][2]) ** 2)
            win = (sz, sy, sx)
            cloud[win][(d2 < syn["cloud_r"] ** 2) & (i1[win] == syn["pre"])] = 1


def em_image(parts: dict, index, xs_nm, ys_nm, rng: np.random.Generator) -> np.ndarray:
    """EM-like uint8 (z, y, x) from a rendered tissue, taking `parts` at `index` (z, y, x index
    arrays into them, one per axis): bright cytoplasm with a gradient along x and a wave along y (a
    transpose shows), dark membranes, darker PSDs, speckled vesicle clouds, and noise of its own."""
    iz, iy, ix = index
    background = 110 + 80 * (xs_nm[None, :] / (xs_nm[-1] + 1)) + 20 * np.sin(ys_nm[:, None] / 900.0)
    em = np.empty((len(iz), len(iy), len(ix)), np.uint8)
    for z in range(em.shape[0]):
        part = background + rng.integers(-12, 13, size=em.shape[1:])
        pick = np.ix_(iy, ix)
        membrane = parts["membrane"][iz[z]][pick]
        part[membrane] = 45 + part[membrane] % 10
        part[(parts["vesicle_cloud"][iz[z]][pick] == 1) & (rng.random(em.shape[1:]) < 0.4)] -= 70
        psd = parts["psd"][iz[z]][pick] == 1
        part[psd] = 20 + part[psd] % 10
        em[z] = np.clip(part, 5, 250).astype(np.uint8)
    return em
