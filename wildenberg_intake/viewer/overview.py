"""Overviews of a store's box from the source's own resolutions, shared by `preview` and `view`.

A picture coarser than the store's level 0 never makes the store's pyramid for it (each coarse
shard of that pyramid is made from every level-0 shard under it: the whole 128-slice layer):
- EM from the source's own coarser mips (BossDB serves EM at 6, 12, 24, 48 nm ...), each read
  through a store of its own (the same entry at that `em_mip`), fetched shard by shard, recorded
  and reused like any store;
- labels, which the source has at 12 nm only, from the source chunks of the one z-row holding the
  slice, reduced by the pyramid's 2 x 2 mode (`store/downsample.py`), so an overview's labels equal
  the store's own pyramid levels at that slice.

`label_slice` draws labels of one slice; `Overview` lays out, beside a store's `data.zarr`, the
multiscale groups a viewer reads (`<store>/overview/em.zarr`, `<store>/overview/<label>.zarr`):
their level 0 links to the store's arrays, the EM's coarser levels link to the mip stores' EM,
the labels' coarser levels are one-slice tiles made on request. Nothing here is part of the store
proper: a materialisation, a lock or `verify` never sees it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..store.cache import (array_metadata, array_path, durable_write, encode_chunk, group_metadata, make_dirs,
                           ome_multiscale)
from ..store.downsample import downsample_mode
from ..store.engine import cache_for

TILE = (1, 256, 256)  # a label overview chunk: one slice, so that a view at one z reads one z-row


def tile_levels(shape) -> int:
    """Label overview levels above 0 (x and y halved per level) until a slice fits one tile."""
    levels, (_, y, x) = 0, shape
    while y > TILE[1] or x > TILE[2]:
        y, x, levels = -(-y // 2), -(-x // 2), levels + 1
    return max(levels, 1)


def coarser_em_mips(plan) -> list[int]:
    """The source EM mips at the labels' z resolution and coarser in x and y than the store's EM,
    finest first."""
    raw = plan.arrays["raw"]
    z_res, xy_res = raw.layer.resolution_zyx[0], max(raw.layer.resolution_zyx[1:])
    found = []
    for mip, scale in enumerate(plan.layers["raw"].info_dict["scales"]):
        res = [float(r) for r in scale["resolution"]]  # x, y, z
        if res[2] == z_res and max(res[:2]) > xy_res:
            found.append((max(res[:2]), mip))
    return [mip for _, mip in sorted(found)]


def em_mip_source(source, mip: int):
    """The same entry, box and cache with the EM at source mip `mip`: a store of its own."""
    from ..drivers import entry_source
    req = source.request
    return entry_source(f"{req.experiment}_{req.label}", bbox_nm=list(req.bbox_nm), em_mip=mip,
                        seg_mip=req.seg_mip, cache_dir=str(req.cache_dir), base_url=req.base_url,
                        raw_codec=req.raw_codec, progress=False, connections=source.connections,
                        cache_limit=source.cache_limit)


def label_slice(plan, name: str, z: int, level: int, rows=None, cols=None) -> np.ndarray:
    """Array `name`'s labels of slice `z` at pyramid level `level` (x and y halved per level by the
    pyramid's 2 x 2 mode), over that level's `rows` and `cols` ((start, stop); default all), read
    from the source chunks of the slice's z-row, one chunk row in y at a time."""
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
        pending = np.concatenate([pending, layer.read((z0, sy + y, sx + x0), (z0 + 1, sy + stop, sx + x1))], axis=1)
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
    `overview/em.zarr` (level 0: the store's EM; then each coarser source mip's EM, each from a
    store of its own) and `overview/<label>.zarr` for each label of the entry (level 0: the store's
    label; levels 1 until a slice fits one tile: one-slice tiles made on request by `make_tile`).
    Level 0 and the mip levels are links (symlinks) to the stores' arrays: nothing is copied."""

    def __init__(self, source, labels=None):
        plan = source.plan
        self.source, self.plan = source, plan
        self.cache = cache_for(plan)
        self.root = self.cache.root / "overview"
        self.mip_sources = {mip: em_mip_source(source, mip) for mip in coarser_em_mips(plan)}
        self.labels = list(labels) if labels is not None else [plan.label_name]
        self.levels = {name: tile_levels(plan.arrays[name].shape) for name in self.labels}
        self._write_em_group()
        for name in self.labels:
            self._write_label_group(name)

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

    def _write_em_group(self):
        raw = self.plan.arrays["raw"]
        levels = [("0", raw.layer.resolution_zyx, raw.origin_nm_zyx)]
        folder = self.group("raw")
        make_dirs(folder)
        self._link(folder / "0", self.cache.zarr_path / array_path("raw"))
        for k, (mip, src) in enumerate(self.mip_sources.items(), start=1):
            arr = src.plan.arrays["raw"]
            levels.append((str(k), arr.layer.resolution_zyx, arr.origin_nm_zyx))
            from ..store.lazy import ReadThroughArray  # makes the mip store's array metadata
            ReadThroughArray(src.plan, "raw", src.connections, src.cache_limit)
            self._link(folder / str(k), cache_for(src.plan).zarr_path / array_path("raw"))
        self._write_json(folder / "zarr.json", group_metadata({"ome": {
            "version": "0.5", "multiscales": [ome_multiscale("raw (EM: store, then source mips)", levels)]}}))

    def _write_label_group(self, name: str):
        src = self.plan.arrays[name]
        res, origin = np.asarray(src.layer.resolution_zyx, float), src.origin_nm_zyx
        folder = self.group(name)
        make_dirs(folder)
        self._link(folder / "0", self.cache.zarr_path / array_path(name))
        levels = [("0", res, origin)]
        is_label = True
        for k in range(1, self.levels[name] + 1):
            shape = (src.shape[0],) + tuple(-(-n // 2 ** k) for n in src.shape[1:])
            self._write_json(folder / str(k) / "zarr.json", array_metadata(
                shape, src.dtype, is_label, "zstd3", {"level": k, "made_from": "source chunks of each slice, 2 x 2 mode"},
                chunk_shape=TILE))
            levels.append((str(k), res * [1, 2 ** k, 2 ** k], origin))
        self._write_json(folder / "zarr.json", group_metadata({"ome": {
            "version": "0.5", "multiscales": [ome_multiscale(name.split("/", 1)[1], levels)],
            "image-label": {"source": {"image": "../em.zarr"}}}}))

    # -- tiles ------------------------------------------------------------------------------------------
    def tile_file(self, name: str, level: int, index) -> Path:
        return self.group(name) / str(level) / "c" / Path(*(str(i) for i in index))

    def make_tile(self, name: str, level: int, index) -> Path:
        """Make tile `index` (z, row, column of TILE) of level `level` of label array `name`, if not
        made yet: from the source chunks of its slice; written whole (a temporary file renamed)."""
        path = self.tile_file(name, level, index)
        if not path.is_file():
            z, ty, tx = index
            plane = label_slice(self.plan, name, z, level, (ty * TILE[1], (ty + 1) * TILE[1]),
                                (tx * TILE[2], (tx + 1) * TILE[2]))
            make_dirs(path.parent)
            durable_write(path, encode_chunk(plane[None], TILE, "zstd3", True))
        return path
