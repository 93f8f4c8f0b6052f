"""Store plan: what one cached store holds and where each of its arrays comes from.

A store holds one experiment at one source geometry: raw EM once, and every label channel fetched
so far. The requested nm box is clipped to the intersection of the EM layer and *all* label layers
of the experiment (in physical coordinates), so every label shares one box and raw is never stored
twice. The store's name hashes everything that changes its bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from .format import LABEL_CODEC, LAYOUT, LAYOUT_VERSION, LEVEL_LABEL_CODEC
from typing import TYPE_CHECKING
from ..source.layers import COPY_KEY, Layer, LayerInfo
from ..source.transfer import Fetcher, RetryPolicy

if TYPE_CHECKING:  # the store layer does not import the catalog layer above it
    from ..catalog import Request


@dataclass(frozen=True)
class ArraySource:
    """One array of the store: the layer it is read from and the voxel window in that layer."""

    name: str  # "raw" or "labels/<label>"
    layer: LayerInfo
    start_zyx: tuple  # in the layer's voxel coordinates
    shape: tuple  # (z, y, x)
    dtype: str
    is_label: bool
    codec: str = LABEL_CODEC

    @property
    def origin_nm_zyx(self) -> tuple:
        return tuple(float(v) for v in np.multiply(self.start_zyx, self.layer.resolution_zyx))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def key(self) -> dict:
        """Everything about this array that changes its bytes: what the source serves (the layer's
        path below the base URL and its info file's hash), never where it is reached (a server's
        host, port or token; s3:// or https://)."""
        return {"layer": layer_path(self.layer.url), "mip": self.layer.mip, "swap_xy": self.layer.swap_xy,
                "dtype": self.dtype, "codec": self.codec, "info_sha256": self.layer.info_sha256,
                "start_zyx": list(self.start_zyx), "shape": list(self.shape)}


@dataclass(frozen=True)
class LevelSource:
    """A downsampled level of an array (`<name>@<level>`): x and y halved per level, z kept (it is
    already 40 nm), made from the level below (EM by mean, labels by mode), not fetched."""

    name: str  # "raw@1", "labels/psd@2"
    base: ArraySource
    level: int

    @property
    def shape(self) -> tuple:
        z, y, x = self.base.shape
        f = 2 ** self.level
        return (z, -(-y // f), -(-x // f))

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def is_label(self) -> bool:
        return self.base.is_label

    @property
    def codec(self) -> str:
        """The raw codec for EM levels; LEVEL_LABEL_CODEC for label levels (cheaper, small anyway)."""
        return LEVEL_LABEL_CODEC if self.is_label else self.base.codec

    @property
    def resolution_zyx(self) -> tuple:
        z, y, x = self.base.layer.resolution_zyx
        f = 2 ** self.level
        return (z, y * f, x * f)

    @property
    def origin_nm_zyx(self) -> tuple:
        """Lower corner of voxel 0: the same physical point at every level."""
        return self.base.origin_nm_zyx

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def layer_path(url: str) -> str:
    """A layer's path below its base URL, `<bossdb experiment>/<channel>` (the part the catalog
    appends to base_url): the same for BossDB's bucket over https:// or s3://, a mirror, or an
    offline copy served under any host, port or token."""
    return "/".join(url.rstrip("/").split("/")[-2:])


def pyramid_levels(shape) -> int:
    """Levels above 0 of an array of `shape`: x and y halved until the level fits one output shard."""
    from .format import SHARDS
    levels, (_, y, x) = 0, shape
    while y > SHARDS[1] or x > SHARDS[2]:
        y, x, levels = -(-y // 2), -(-x // 2), levels + 1
    return levels


def split_level(name: str) -> tuple[str, int]:
    """"labels/psd@2" -> ("labels/psd", 2); "raw" -> ("raw", 0)."""
    base, _, level = name.partition("@")
    return base, int(level or 0)


@dataclass(frozen=True)
class StorePlan:
    request: Request
    bbox_nm: tuple  # clipped (x0, x1, y0, y1, z0, z1)
    arrays: dict = field(default_factory=dict)  # name -> ArraySource
    layers: dict = field(default_factory=dict)  # name -> Layer (opened, for reading)

    def key(self) -> dict:
        """Everything the store's bytes derive from (its name hashes it; source.json holds it)."""
        return {"layout": LAYOUT_VERSION, "chunks_and_codecs": LAYOUT, "experiment": self.request.experiment,
                "bbox_nm": list(self.bbox_nm),
                "arrays": {name: src.key() for name, src in sorted(self.arrays.items())}}

    @property
    def name(self) -> str:
        """The store's folder name: the experiment and a hash of `key()`."""
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()
        return f"{self.request.experiment}-{digest[:16]}"

    @property
    def fetcher(self) -> Fetcher:
        return self.layers["raw"].fetcher

    @property
    def label_name(self) -> str:
        return f"labels/{self.request.label}"

    def source(self, name: str):
        """The ArraySource of a fetched array, or the LevelSource of a pyramid level (`<array>@<level>`)."""
        base, level = split_level(name)
        if base not in self.arrays or not 0 <= level <= pyramid_levels(self.arrays[base].shape):
            allowed = sorted(self.arrays) + [f"{n}@{k}" for n in sorted(self.arrays)
                                             for k in range(1, pyramid_levels(self.arrays[n].shape) + 1)]
            raise ValueError(f"array {name!r} is unknown; allowed: {allowed}")
        return self.arrays[base] if level == 0 else LevelSource(name, self.arrays[base], level)

    def with_levels(self, names) -> list[str]:
        """`names` and every pyramid level of each, level by level."""
        out = []
        for name in names:
            out += [name] + [f"{name}@{k}" for k in range(1, pyramid_levels(self.arrays[name].shape) + 1)]
        return out


def plan_store(request: Request, policy: RetryPolicy | None = None) -> StorePlan:
    """Read the layers' info files (no voxel data) and lay out the store for `request`."""
    from concurrent.futures import ThreadPoolExecutor
    fetcher = Fetcher(policy)
    specs = {"raw": (request.em_url, request.em_mip, request.em_axes_swapped, "em_mip")}
    for ch in request.label_channels:
        specs[f"labels/{ch.name}"] = (request.url(ch.channel), request.seg_mip, False, "seg_mip")
    with ThreadPoolExecutor(len(specs)) as pool:  # one round trip for all info files, not one each
        futures = {name: pool.submit(Layer, *spec, fetcher=fetcher) for name, spec in specs.items()}
        layers = {name: future.result() for name, future in futures.items()}

    x0, x1, y0, y1, z0, z1 = request.bbox_nm
    lo = np.array([z0, y0, x0], dtype=float)
    hi = np.array([z1, y1, x1], dtype=float)
    for layer in layers.values():
        lo = np.maximum(lo, layer.info.start_nm_zyx)
        hi = np.minimum(hi, layer.info.stop_nm_zyx)
    if np.any(hi <= lo):
        extents = {name: _fmt_extent(l.info) for name, l in layers.items()}
        raise ValueError(f"bbox_nm={list(request.bbox_nm)!r} lies outside the volume: it does not overlap the "
                         f"extent shared by all layers of {request.experiment} (nm, x0 x1 y0 y1 z0 z1): {extents}")
    copies = [l for l in layers.values() if COPY_KEY in l.info_dict]
    if copies and request.bbox_given:  # a box copy holds its box only: beyond it is missing, not empty
        want_lo, want_hi = np.array([z0, y0, x0], dtype=float), np.array([z1, y1, x1], dtype=float)
        if np.any(want_lo < lo) or np.any(want_hi > hi):
            held = [float(lo[2]), float(hi[2]), float(lo[1]), float(hi[1]), float(lo[0]), float(hi[0])]
            raise ValueError(f"bbox_nm={[float(v) for v in request.bbox_nm]} reaches beyond the box copy at "
                             f"{copies[0].url.rsplit('/', 1)[0]}, which holds (nm, x0 x1 y0 y1 z0 z1) {held}; "
                             "choose a box inside it, or copy a larger box")
    bbox = (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])

    arrays = {}
    for name, layer in layers.items():
        start, stop = layer.info.voxel_window(lo, hi)
        if name != "raw":
            expected = request.channel(name.split("/", 1)[1]).dtype
            if layer.info.dtype != expected:
                raise ValueError(f"layer {layer.url}: data_type {layer.info.dtype!r} differs from the catalog's "
                                 f"{expected!r}")
        arrays[name] = ArraySource(name=name, layer=layer.info, start_zyx=tuple(int(v) for v in start),
                                   shape=tuple(int(v) for v in stop - start), dtype=layer.info.dtype,
                                   is_label=name != "raw",
                                   codec=request.raw_codec if name == "raw" else LABEL_CODEC)
    return StorePlan(request=request, bbox_nm=tuple(float(v) for v in bbox), arrays=arrays, layers=layers)


def _fmt_extent(info: LayerInfo) -> list:
    lo, hi = info.start_nm_zyx, info.stop_nm_zyx
    return [float(lo[2]), float(hi[2]), float(lo[1]), float(hi[1]), float(lo[0]), float(hi[0])]
