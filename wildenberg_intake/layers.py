"""Remote layer access: a precomputed layer's geometry from its info file, and reads in physical (z, y, x).

cloud-volume indexes (x, y, z); p105's EM layer additionally has x and y transposed. Everything
outside this module sees physical (z, y, x) only: the swap is undone here, once.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass

import numpy as np

SUPPORTED_DTYPES = ("uint8", "uint16", "uint32", "uint64")
SUPPORTED_ENCODINGS = ("raw", "jpeg", "png", "compressed_segmentation")
MAX_LAYER_VOXELS = 10**14  # far beyond any real layer; catches a hostile or broken info file


class LayerError(ValueError):
    """A layer's info file or data is unusable."""


@dataclass(frozen=True)
class LayerInfo:
    """One layer at one mip, in physical (z, y, x) order."""

    url: str
    mip: int
    swap_xy: bool
    dtype: str
    encoding: str
    resolution_zyx: tuple  # nm per voxel
    offset_zyx: tuple  # voxels
    size_zyx: tuple  # voxels
    n_mips: int
    info_sha256: str  # hash of the whole info file, canonical JSON

    @property
    def start_nm_zyx(self) -> np.ndarray:
        return np.multiply(self.offset_zyx, self.resolution_zyx)

    @property
    def stop_nm_zyx(self) -> np.ndarray:
        return np.multiply(np.add(self.offset_zyx, self.size_zyx), self.resolution_zyx)

    def voxel_window(self, start_nm_zyx, stop_nm_zyx):
        """nm box -> voxel box of this layer: the start rounds down, the end rounds up."""
        res = np.asarray(self.resolution_zyx, dtype=float)
        start = np.floor(np.asarray(start_nm_zyx, dtype=float) / res).astype(int)
        stop = np.ceil(np.asarray(stop_nm_zyx, dtype=float) / res).astype(int)
        lo, hi = np.asarray(self.offset_zyx), np.add(self.offset_zyx, self.size_zyx)
        return np.clip(start, lo, hi), np.clip(stop, lo, hi)


def _canonical_sha256(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_info(url: str, info: dict, mip: int, swap_xy: bool, param: str = "mip") -> LayerInfo:
    """Validate an info file and describe mip `mip`; errors name the layer and the bad field."""
    try:
        scales = info["scales"]
        dtype = str(info["data_type"])
        n_channels = int(info.get("num_channels", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise LayerError(f"layer {url}: info file lacks or mangles {e}") from None
    if not isinstance(scales, list) or not scales:
        raise LayerError(f"layer {url}: info file has no scales")
    if dtype not in SUPPORTED_DTYPES:
        raise LayerError(f"layer {url}: data_type {dtype!r} is not supported; allowed: {SUPPORTED_DTYPES}")
    if n_channels != 1:
        raise LayerError(f"layer {url}: num_channels={n_channels}; only single-channel layers are supported")
    if not 0 <= mip < len(scales):
        raise ValueError(f"{param}={mip} does not exist for layer {url}; allowed: {list(range(len(scales)))}")
    scale = scales[mip]
    try:
        res = [float(v) for v in scale["resolution"]]
        off = [int(v) for v in scale["voxel_offset"]]
        size = [int(v) for v in scale["size"]]
        encoding = str(scale["encoding"])
    except (KeyError, TypeError, ValueError) as e:
        raise LayerError(f"layer {url}: scale {mip} lacks or mangles {e}") from None
    if len(res) != 3 or len(off) != 3 or len(size) != 3:
        raise LayerError(f"layer {url}: scale {mip} resolution/voxel_offset/size must have 3 values")
    if not all(math.isfinite(r) and r > 0 for r in res):
        raise LayerError(f"layer {url}: scale {mip} resolution {res} must be positive")
    if min(size) <= 0 or math.prod(size) > MAX_LAYER_VOXELS:
        raise LayerError(f"layer {url}: scale {mip} size {size} is empty or implausibly large")
    if encoding not in SUPPORTED_ENCODINGS:
        raise LayerError(f"layer {url}: encoding {encoding!r} is not supported; allowed: {SUPPORTED_ENCODINGS}")
    order = (1, 0, 2) if swap_xy else (0, 1, 2)  # cloud-volume axis holding physical x, y, z
    return LayerInfo(
        url=url, mip=mip, swap_xy=swap_xy, dtype=dtype, encoding=encoding,
        resolution_zyx=tuple(res[order[a]] for a in (2, 1, 0)),
        offset_zyx=tuple(off[order[a]] for a in (2, 1, 0)),
        size_zyx=tuple(size[order[a]] for a in (2, 1, 0)),
        n_mips=len(scales), info_sha256=_canonical_sha256(info),
    )


class Layer:
    """Reads one layer at one mip through cloud-volume, returning physical (z, y, x) arrays.

    Safe to share between threads: each thread gets its own CloudVolume over the same info.
    """

    def __init__(self, url: str, mip: int, swap_xy: bool, param: str = "mip", info: dict | None = None):
        from cloudvolume import CloudVolume

        self.url = url
        self._local = threading.local()
        if info is None:
            try:
                info = CloudVolume(url, mip=0, progress=False, parallel=1).info
            except Exception as e:  # cloud-volume raises many types for a missing or bad layer
                raise LayerError(f"layer {url}: could not read its info file: {e}") from e
        self._info_dict = info
        self.info = parse_info(url, info, mip, swap_xy, param)

    def _cv(self):
        cv = getattr(self._local, "cv", None)
        if cv is None:
            from cloudvolume import CloudVolume
            # fill_missing: a chunk the server answers 404 for is empty (zeros), as on BossDB.
            cv = CloudVolume(self.url, mip=self.info.mip, info=self._info_dict, provenance={},
                             fill_missing=True, progress=False, parallel=1, cache=False)
            self._local.cv = cv
        return cv

    def read(self, start_zyx, stop_zyx) -> np.ndarray:
        """Voxels [start, stop) in this layer's physical voxel coordinates, as a C-order (z, y, x) array."""
        (z0, y0, x0), (z1, y1, x1) = (int(v) for v in start_zyx), (int(v) for v in stop_zyx)
        if self.info.swap_xy:
            block = self._cv()[y0:y1, x0:x1, z0:z1]
            order = (2, 0, 1)  # cloud-volume (phys y, phys x, z) -> (z, y, x)
        else:
            block = self._cv()[x0:x1, y0:y1, z0:z1]
            order = (2, 1, 0)
        block = np.asarray(block)
        if block.ndim == 4:
            block = block[..., 0]
        expected = (z1 - z0, y1 - y0, x1 - x0)
        out = np.ascontiguousarray(block.transpose(order), dtype=self.info.dtype)
        if out.shape != expected:
            raise LayerError(f"layer {self.url}: read {out.shape} voxels for a box of {expected}")
        return out
