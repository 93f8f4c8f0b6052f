"""Overviews of a store's box from the source's own resolutions, shared by `preview` and `view`.

A picture coarser than the store's level 0 never makes the store's pyramid for it (each coarse
shard of that pyramid is made from every level-0 shard under it: the whole 128-slice layer). An
overview level k has the labels' voxel grid with x and y 2**k times coarser, and is read from the
source chunks of the one z-row holding its slice:
- EM from the source's coarsest EM mip not coarser than a level-k pixel (BossDB serves EM at 6,
  12, 24, 48 nm ...): each pixel is the EM voxel under its centre, placed in nm;
- labels, which the source has at 12 nm only, reduced by the pyramid's 2 x 2 mode
  (`store/downsample.py`) k times, so an overview's labels equal the store's own pyramid levels.

`em_slice` and `label_slice` draw one slice (what `preview` shows); `Overview` lays out, beside a
store's `data.zarr`, the multiscale groups a viewer reads (`<store>/overview/em.zarr`,
`<store>/overview/<label>.zarr`): level 0 links to the store's arrays (fetched shard by shard as
ever), levels 1 and up are one-slice tiles made on request and kept. None of it is part of the
store proper: a materialisation, a lock or `verify` never sees it.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..source.layers import Layer, held_scales, place
from ..store.format import encode_chunk
from ..store.layout import array_metadata, array_path, group_metadata, ome_multiscale
from ..store.files import durable_write, make_dirs
from ..store.downsample import downsample_mode
from ..store.engine import cache_for

TILE = (1, 256, 256)  # an overview chunk: one slice, so that a view at one z reads one z-row


def overview_level(shape_zyx, max_size: int) -> int:
    """The finest level (x and y halved per level) whose slice fits `max_size` pixels in y and x."""
    level, (_, y, x) = 0, shape_zyx
    while max(-(-y // 2 ** level), -(-x // 2 ** level)) > max_size:
        level += 1
    return level


def tile_levels(shape) -> int:
    """Overview levels above 0 until a slice fits one tile (at least one)."""
    return max(overview_level(shape, TILE[1]), 1)


def overview_em_mip(plan, level: int) -> int:
    """The source EM mip an overview at `level` draws: the coarsest at the labels' z resolution and
    not coarser in x and y than a level pixel (2**level times the labels' resolution)."""
    label_res = plan.arrays[plan.label_name].layer.resolution_zyx
    pixel = label_res[2] * 2 ** level
    best, best_res = None, 0.0
    for mip, scale in held_scales(plan.layers["raw"].info_dict):  # a box copy: the mips it holds
        res = [float(r) for r in scale["resolution"]]  # x, y, z (an axis swap keeps x = y here)
        if res[2] == label_res[0] and max(res[:2]) <= pixel and max(res[:2]) > best_res:
            best, best_res = mip, max(res[:2])
    if best is None:
        raise ValueError(f"the EM layer {plan.layers['raw'].url} has no mip at the labels' z resolution and at "
                         f"most {2 ** level}x their x/y resolution")
    return best


def em_layer(plan, mip: int) -> Layer:
    """The store's EM layer at source mip `mip` (its info file as already read)."""
    raw = plan.layers["raw"]
    return raw if raw.info.mip == mip else Layer(raw.url, mip, raw.info.swap_xy, param="em_mip",
                                                 info=raw.info_dict, fetcher=raw.fetcher)


def _level_window(plan, level: int, rows, cols):
    """Rows and columns of `level` (default: all) and the nm of their pixel centres (y, x)."""
    src = plan.arrays[plan.label_name]
    step = 2 ** level
    r0, r1 = rows if rows is not None else (0, -(-src.shape[1] // step))
    c0, c1 = cols if cols is not None else (0, -(-src.shape[2] // step))
    r1, c1 = min(r1, -(-src.shape[1] // step)), min(c1, -(-src.shape[2] // step))
    res, origin = np.asarray(src.layer.resolution_zyx, float), np.asarray(src.origin_nm_zyx, float)
    ys = origin[1] + (np.arange(r0, r1) + 0.5) * res[1] * step
    xs = origin[2] + (np.arange(c0, c1) + 0.5) * res[2] * step
    return (r0, r1), (c0, c1), ys, xs


def em_chunks(plan, z: int, level: int, rows=None, cols=None) -> tuple:
    """(EM layer, its source chunks, the voxel indices z, rows, cols) that `em_slice` reads."""
    layer = em_layer(plan, overview_em_mip(plan, level))
    src = plan.arrays[plan.label_name]
    _, _, ys, xs = _level_window(plan, level, rows, cols)
    res = np.asarray(layer.info.resolution_zyx, float)
    z_nm = src.origin_nm_zyx[0] + (z + 0.5) * src.layer.resolution_zyx[0]
    iz, iy, ix = int(np.floor(z_nm / res[0])), np.floor(ys / res[1]).astype(int), np.floor(xs / res[2]).astype(int)
    if not (iy.size and ix.size):
        return layer, [], iz, iy, ix
    chunks = layer.info.chunks_in((iz, iy.min(), ix.min()), (iz + 1, iy.max() + 1, ix.max() + 1))
    return layer, chunks, iz, iy, ix


def _read(layer, start, stop) -> np.ndarray:
    return layer.read(start, stop)


class PlaneCache:
    """Decoded planes (one slice of a source chunk) kept across tiles: the tiles of one slice, at
    every level, share the source chunks of its z-row, fetched once while they stay in this cache
    (least recently used first out, bounded in bytes). `read` is a `layer.read` for one slice."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self._bytes = max_bytes, 0
        self._planes = OrderedDict()
        self._lock = threading.Lock()

    def read(self, layer, start, stop) -> np.ndarray:
        z = int(start[0])
        if int(stop[0]) != z + 1:
            return layer.read(start, stop)
        out = np.zeros(tuple(np.subtract(stop, start)), dtype=layer.info.dtype)
        for grid in layer.info.chunks_in(start, stop):
            key = (layer.url, layer.info.mip, tuple(grid), z)
            lo = layer.info.chunk_box(grid)[0]
            with self._lock:
                plane = self._planes.get(key)
                if plane is not None:
                    self._planes.move_to_end(key)
            if plane is None:
                plane = np.ascontiguousarray(layer.decode_chunk(grid, layer.fetch_chunk(grid))[z - lo[0]])
                with self._lock:
                    if key not in self._planes:
                        self._planes[key] = plane
                        self._bytes += plane.nbytes
                    while self._bytes > self.max_bytes and len(self._planes) > 1:
                        self._bytes -= self._planes.popitem(last=False)[1].nbytes
            place(out, start, (z,) + tuple(lo[1:]), plane[None])
        return out


def em_slice(plan, z: int, level: int, rows=None, cols=None, read=_read) -> np.ndarray:
    """The EM of slice `z` (of the labels' grid) at overview `level`, over that level's `rows` and
    `cols` ((start, stop); default all): each pixel the EM voxel under its centre at
    `overview_em_mip`, read from the source chunks of that slice's z-row (by `read(layer, start, stop)`)."""
    layer, _, iz, iy, ix = em_chunks(plan, z, level, rows, cols)
    if not (iy.size and ix.size):
        return np.zeros((iy.size, ix.size), layer.info.dtype)
    plane = read(layer, (iz, iy.min(), ix.min()), (iz + 1, iy.max() + 1, ix.max() + 1))[0]
    return plane[np.ix_(iy - iy.min(), ix - ix.min())]


def label_slice(plan, name: str, z: int, level: int, rows=None, cols=None, read=_read) -> np.ndarray:
    """Array `name`'s labels of slice `z` at pyramid level `level` (x and y halved per level by the
    pyramid's 2 x 2 mode), over that level's `rows` and `cols` ((start, stop); default all), read
    from the source chunks of the slice's z-row (by `read(layer, start, stop)`), one chunk row in y at a time."""
    src, layer = plan.arrays[name], plan.layers[name]
    step = 2 ** level
    height, width = src.shape[1:]
    r0, r1 = rows if rows is not None else (0, -(-height // step))
    c0, c1 = cols if cols is not None else (0, -(-width // step))
    y0, y1 = r0 * step, min(r1 * step, height)
    x0, x1 = c0 * step, min(c1 * step, width)
    z0, sy, sx = src.start_zyx[0] + z, src.start_zyx[1], src.start_zyx[2]
    chunk_y = layer.info.chunk_zyx[1]
    out, pending = [], np.zeros((1, 0, x1 - x0), dtype=src.dtype)
    y = y0
    while y < y1:  # bands along the source's chunk rows: each source chunk is fetched once
        lo = sy + y
        stop = min(y1, (lo // chunk_y + 1) * chunk_y - sy)
        pending = np.concatenate([pending, read(layer, (z0, sy + y, sx + x0), (z0 + 1, sy + stop, sx + x1))], axis=1)
        y = stop
        # Whole 2**level-row groups only (2 x 2 blocks never straddle two bands), the rest at the end.
        whole = pending.shape[1] if y >= y1 else pending.shape[1] // step * step
        if whole:
            part = pending[:, :whole]
            for _ in range(level):
                part = downsample_mode(part)
            out.append(part)
            pending = pending[:, whole:]
    return np.concatenate(out, axis=1)[0] if out else np.zeros((0, c1 - c0), dtype=src.dtype)


class Overview:
    """The multiscale groups a viewer reads for `source`'s store, beside its `data.zarr`:
    `overview/em.zarr` and `overview/<label>.zarr` for each of `labels` (default: the entry's).
    Level 0 links (a symlink) to the store's array; levels 1 until a slice fits one tile are
    one-slice tiles made on request by `make_tile` (see the module's docstring)."""

    def __init__(self, source, labels=None):
        plan = source.plan
        self.source, self.plan = source, plan
        self.cache = cache_for(plan)
        self.root = self.cache.root / "overview"
        self.labels = list(labels) if labels is not None else [plan.label_name]
        self.planes = PlaneCache()
        self.levels = tile_levels(plan.arrays[plan.label_name].shape)
        for name in ["raw"] + self.labels:
            self._write_group(name)

    # -- layout -------------------------------------------------------------------------------------
    def group(self, name: str) -> Path:
        """The folder of the overview group of array `name` ("raw" or "labels/<label>")."""
        return self.root / ("em.zarr" if name == "raw" else f"{name.split('/', 1)[1]}.zarr")

    def _link(self, link: Path, target: Path):
        if not link.is_symlink():
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(target, link.parent), tmp)
            os.replace(tmp, link)

    def _write_json(self, path: Path, meta: dict):
        if not path.is_file():
            make_dirs(path.parent)
            durable_write(path, json.dumps(meta, indent=2).encode())

    def _write_group(self, name: str):
        base = self.plan.arrays[name]
        grid = self.plan.arrays[self.plan.label_name]  # the levels' grid: the labels', x and y halved per level
        res, origin = np.asarray(grid.layer.resolution_zyx, float), grid.origin_nm_zyx
        folder = self.group(name)
        make_dirs(folder)
        self._link(folder / "0", self.cache.zarr_path / array_path(name))
        levels = [("0", base.layer.resolution_zyx, base.origin_nm_zyx)]
        is_label = name != "raw"
        for k in range(1, self.levels + 1):
            shape = (grid.shape[0],) + tuple(-(-n // 2 ** k) for n in grid.shape[1:])
            made_from = ("source chunks of each slice, 2 x 2 mode" if is_label else
                         f"source EM mip {overview_em_mip(self.plan, k)}, the voxel under each pixel's centre")
            self._write_json(folder / str(k) / "zarr.json", array_metadata(
                shape, base.dtype, is_label, "zstd3" if is_label else "zstd1", {"level": k, "made_from": made_from},
                chunk_shape=TILE))
            levels.append((str(k), res * [1, 2 ** k, 2 ** k], origin))
        title = "raw (EM: the store, then source mips)" if name == "raw" else name.split("/", 1)[1]
        attributes = {"ome": {"version": "0.5", "multiscales": [ome_multiscale(title, levels)]}}
        if is_label:
            attributes["ome"]["image-label"] = {"source": {"image": "../em.zarr"}}
        self._write_json(folder / "zarr.json", group_metadata(attributes))

    # -- tiles ------------------------------------------------------------------------------------------
    def tile_grid(self, level: int) -> tuple:
        """Tiles (z, rows, columns) of overview level `level`: one per slice, TILE in y and x."""
        shape = self.plan.arrays[self.plan.label_name].shape
        level_yx = [-(-n // 2 ** level) for n in shape[1:]]  # ceil: edge voxels summarise clipped blocks
        return (shape[0],) + tuple(-(-n // t) for n, t in zip(level_yx, TILE[1:]))

    def tile_file(self, name: str, level: int, index) -> Path:
        return self.group(name) / str(level) / "c" / Path(*(str(i) for i in index))

    def make_tile(self, name: str, level: int, index) -> Path:
        """Make tile `index` (z, row, column of TILE) of level `level` of array `name` ("raw" or a
        label), if not made yet: from the source chunks of its slice; written whole (renamed into place)."""
        path = self.tile_file(name, level, index)
        if not path.is_file():
            z, ty, tx = index
            window = (z, level, (ty * TILE[1], (ty + 1) * TILE[1]), (tx * TILE[2], (tx + 1) * TILE[2]))
            is_label = name != "raw"
            plane = label_slice(self.plan, name, *window, read=self.planes.read) if is_label else \
                em_slice(self.plan, *window, read=self.planes.read)
            make_dirs(path.parent)
            durable_write(path, encode_chunk(plane[None], TILE, "zstd3" if is_label else "zstd1", is_label))
        return path
