"""Remote layer access: a precomputed layer's geometry, its chunk grid, and chunk reads in physical (z, y, x).

cloud-volume indexes (x, y, z); p105's EM layer additionally has x and y transposed. Everything
outside this module sees physical (z, y, x) only: the swap is undone here, once.

Chunks are fetched through `transfer.Fetcher` (404 = empty chunk, faults retried and never zeros)
and decoded with cloud-volume's codecs, so every encoding cloud-volume reads (raw, jpeg, png,
compressed_segmentation; gzip Content-Encoding; the sharded format) is read the same way.
Fetching and decoding are separate steps so that the engine can fetch each chunk once and keep
its encoded bytes until every shard that needs it is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from .transfer import NO_GATE, Fetcher, TransferError, inflate

SUPPORTED_DTYPES = ("uint8", "uint16", "uint32", "uint64")
SUPPORTED_ENCODINGS = ("raw", "jpeg", "png", "compressed_segmentation")
MAX_LAYER_VOXELS = 10**14  # far beyond any real layer; catches a hostile or broken info file
MAX_CHUNK_VOXELS = 2**28  # 256 Mi voxels: no real chunk comes near; refused before allocating
MAX_INFO_BYTES = 16 * 2**20  # an info file is a few kB; a larger one is refused unread
# A scale key is one relative path of plain segments: no "..", no leading "/", no scheme, query or fragment.
_KEY = re.compile(r"[A-Za-z0-9_.,-]+(/[A-Za-z0-9_.,-]+)*")


class LayerError(ValueError):
    """A layer's info file or data is unusable; the message names the layer."""


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
    chunk_zyx: tuple  # voxels
    mips: tuple  # the mips the layer holds (a box copy: the source mips it copied)
    info_sha256: str  # hash of the whole info file, canonical JSON
    scale_key: str = ""
    sharding: dict | None = field(default=None, compare=False)
    cseg_block_size: tuple | None = None

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

    def chunks_in(self, start_zyx, stop_zyx) -> list[tuple]:
        """Grid indices (z, y, x) of the chunks that intersect voxel box [start, stop)."""
        ranges = []
        for a in range(3):
            lo = (int(start_zyx[a]) - self.offset_zyx[a]) // self.chunk_zyx[a]
            hi = -(-(int(stop_zyx[a]) - self.offset_zyx[a]) // self.chunk_zyx[a])
            ranges.append(range(max(lo, 0), hi))
        return list(itertools.product(*ranges))

    def chunk_bytes(self, grid) -> int:
        """The most bytes chunk `grid` may take, encoded or inflated: twice its voxels' bytes plus
        64 kB (compressed_segmentation of noise can exceed the voxels; headers). A body or an
        inflation beyond it is refused before it is allocated."""
        start, stop = self.chunk_box(grid)
        return 2 * math.prod(b - a for a, b in zip(start, stop)) * np.dtype(self.dtype).itemsize + 2**16

    def chunk_box(self, grid) -> tuple:
        """(start, stop) voxels (z, y, x) of chunk `grid`, clipped at the layer's edge."""
        start = tuple(o + g * c for o, g, c in zip(self.offset_zyx, grid, self.chunk_zyx))
        stop = tuple(min(s + c, o + n) for s, c, o, n in zip(start, self.chunk_zyx, self.offset_zyx, self.size_zyx))
        return start, stop


def _canonical_sha256(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _ints(url, mip, name, value, n=3):
    try:
        out = [int(v) for v in value]
        if len(out) != n or any(float(v) != o for v, o in zip(value, out)):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise LayerError(f"layer {url}: scale {mip} {name} {value!r} is not {n} integers") from None


COPY_KEY = "wildenberg_intake_copy"  # in a box copy's info files: what the copy holds


def held_scales(info: dict) -> list[tuple[int, dict]]:
    """(mip, scale) of every scale an info file holds. A box copy's info lists only the scales it
    copied, so that cloud-volume and neuroglancer see exactly what it holds; the package still
    numbers each by its source mip (the copy's `mips`), as the catalog's em_mip and seg_mip do."""
    scales = info["scales"]
    copy = info.get(COPY_KEY)
    if isinstance(copy, dict) and isinstance(copy.get("mips"), list) and len(copy["mips"]) == len(scales):
        return list(zip(copy["mips"], scales))
    return list(enumerate(scales))  # a source, or a copy made before 0.x that kept every scale


def parse_info(url: str, info: dict, mip: int, swap_xy: bool, param: str = "mip") -> LayerInfo:
    """Validate an info file and describe mip `mip`; errors name the layer and the bad field."""
    if not isinstance(info, dict):
        raise LayerError(f"layer {url}: info file is not a JSON object")
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
    copy = info.get(COPY_KEY)
    if isinstance(copy, dict) and mip not in copy.get("mips", []):
        raise ValueError(f"{param}={mip}: layer {url} is a box copy of {copy.get('source')} that holds mip "
                         f"{copy.get('mips')} only (box {copy.get('bbox_nm')} nm); copy mip {mip} too "
                         "(`wildenberg-intake mirror --source ...`), or read the source")
    held = dict(held_scales(info))
    if mip not in held:
        raise ValueError(f"{param}={mip} does not exist for layer {url}; allowed: {sorted(held)}")
    scale = held[mip]
    if not isinstance(scale, dict):
        raise LayerError(f"layer {url}: scale {mip} is not a JSON object")
    for key in ("resolution", "voxel_offset", "size", "encoding", "chunk_sizes", "key"):
        if key not in scale:
            raise LayerError(f"layer {url}: scale {mip} lacks '{key}'")
    try:
        res = [float(v) for v in scale["resolution"]]
    except (TypeError, ValueError):
        raise LayerError(f"layer {url}: scale {mip} resolution {scale['resolution']!r} is not 3 numbers") from None
    off = _ints(url, mip, "voxel_offset", scale["voxel_offset"])
    size = _ints(url, mip, "size", scale["size"])
    chunks = scale["chunk_sizes"]
    chunk = _ints(url, mip, "chunk_sizes[0]", chunks[0] if isinstance(chunks, list) and chunks else chunks)
    encoding = str(scale["encoding"])
    key = scale["key"]
    if not isinstance(key, str) or not _KEY.fullmatch(key) or any(p in (".", "..") for p in key.split("/")):
        raise LayerError(f"layer {url}: scale {mip} key {key!r} is not valid; allowed: a relative path of plain "
                         "segments (letters, digits, _ . , -), no '..', no leading '/', no scheme, query or fragment")
    if len(res) != 3 or not all(math.isfinite(r) and r > 0 for r in res):
        raise LayerError(f"layer {url}: scale {mip} resolution {res} must be 3 positive numbers")
    if min(size) <= 0 or math.prod(size) > MAX_LAYER_VOXELS:
        raise LayerError(f"layer {url}: scale {mip} size {size} is empty or implausibly large")
    if min(chunk) <= 0 or math.prod(chunk) > MAX_CHUNK_VOXELS:
        raise LayerError(f"layer {url}: scale {mip} chunk size {chunk} is empty or implausibly large")
    if encoding not in SUPPORTED_ENCODINGS:
        raise LayerError(f"layer {url}: encoding {encoding!r} is not supported; allowed: {SUPPORTED_ENCODINGS}")
    block = None
    if encoding == "compressed_segmentation":
        block = tuple(_ints(url, mip, "compressed_segmentation_block_size",
                            scale.get("compressed_segmentation_block_size")))
    sharding = scale.get("sharding")
    if sharding is not None and not (isinstance(sharding, dict)
                                     and sharding.get("@type") == "neuroglancer_uint64_sharded_v1"):
        raise LayerError(f"layer {url}: scale {mip} sharding {sharding!r} is not neuroglancer_uint64_sharded_v1")
    order = (1, 0, 2) if swap_xy else (0, 1, 2)  # cloud-volume axis holding physical x, y, z

    def zyx(v):
        return tuple(v[order[a]] for a in (2, 1, 0))
    return LayerInfo(url=url, mip=mip, swap_xy=swap_xy, dtype=dtype, encoding=encoding,
                     resolution_zyx=zyx(res), offset_zyx=zyx(off), size_zyx=zyx(size), chunk_zyx=zyx(chunk),
                     mips=tuple(held), info_sha256=_canonical_sha256(info), scale_key=str(scale["key"]),
                     sharding=sharding, cseg_block_size=block)


def http_url(url: str) -> str:
    return url.removeprefix("precomputed://").rstrip("/")


def fetch_info(url: str, fetcher: Fetcher) -> dict:
    """A layer's info file, parsed; errors name the layer."""
    try:
        body = fetcher.get(f"{http_url(url)}/info", max_bytes=MAX_INFO_BYTES)
    except TransferError as e:
        raise LayerError(f"layer {url}: could not read its info file: {e}") from e
    if body is None:
        raise LayerError(f"layer {url}: no info file (404); is the base URL right?")
    try:
        return json.loads(body)
    except RecursionError:
        raise LayerError(f"layer {url}: info file is nested too deeply to be an info file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LayerError(f"layer {url}: info file is not valid JSON: {e}") from None


class Layer:
    """One layer at one mip: fetch and decode chunks, or read a box, in physical (z, y, x).

    Safe to share between threads. Picklable (for dask workers): it carries the info, not connections.
    """

    def __init__(self, url: str, mip: int, swap_xy: bool, param: str = "mip", info: dict | None = None,
                 fetcher: Fetcher | None = None):
        self.url = url
        self.fetcher = fetcher or Fetcher()
        self._info_dict = info if info is not None else fetch_info(url, self.fetcher)
        self.info = parse_info(url, self._info_dict, mip, swap_xy, param)
        self._minishards = {}
        self._lock, self._lock_pid = threading.Lock(), os.getpid()

    @property
    def info_dict(self) -> dict:
        """A copy of the layer's info file as it was read."""
        return json.loads(json.dumps(self._info_dict))

    @property
    def lock(self) -> threading.Lock:
        """The lock of the minishard cache; made anew in a forked child (a parent's thread may hold it)."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._lock

    def __getstate__(self):
        return {"url": self.url, "info": self._info_dict, "mip": self.info.mip, "swap_xy": self.info.swap_xy,
                "policy": self.fetcher.policy}

    def __setstate__(self, state):
        self.__init__(state["url"], state["mip"], state["swap_xy"], info=state["info"],
                      fetcher=Fetcher(state["policy"]))

    # -- cloud-volume's axis order for one chunk ---------------------------------------------------
    def info_axes(self, zyx):
        """A (z, y, x) triple in the order of the layer's info file and chunk names (cloud-volume's x, y, z)."""
        z, y, x = zyx
        return (y, x, z) if self.info.swap_xy else (x, y, z)

    def chunk_name(self, grid) -> str:
        """The chunk's file name in the unsharded layout, e.g. '0-512_0-512_0-16' (cloud-volume axes)."""
        start, stop = self.info.chunk_box(grid)
        a, b = self.info_axes(start), self.info_axes(stop)
        return "_".join(f"{lo}-{hi}" for lo, hi in zip(a, b))

    def fetch_chunk(self, grid, gate=NO_GATE, token=None) -> bytes | None:
        """The chunk's encoded bytes, or None if the server has no such chunk (an empty chunk).

        gate: see `Fetcher.get_with_wire`: held on return when bytes are returned."""
        return self.fetch_chunk_with_wire(grid, gate, token)[0]

    def fetch_chunk_with_wire(self, grid, gate=NO_GATE, token=None) -> tuple:
        """(`fetch_chunk`, its gzip stream as it came over the wire or None where it came uncompressed)."""
        base = f"{http_url(self.url)}/{self.info.scale_key}"
        if self.info.sharding is None:
            return self.fetcher.get_with_wire(f"{base}/{self.chunk_name(grid)}", gate=gate,
                                              max_bytes=self.info.chunk_bytes(grid), token=token)
        return self._fetch_sharded(base, grid, gate, token)

    def decode_chunk(self, grid, data: bytes | None) -> np.ndarray:
        """Decoded chunk as a (z, y, x) array; zeros for a missing chunk.

        A read-only view of the decoded buffer, C-contiguous only where the source's axis order
        allows: callers copy it into place once, so an axis swap costs no extra pass."""
        start, stop = self.info.chunk_box(grid)
        shape_zyx = tuple(b - a for a, b in zip(start, stop))
        if data is None:  # a zero-stride view: no allocation, placed as a fill
            return np.broadcast_to(np.zeros((), dtype=self.info.dtype), shape_zyx)
        cv_shape = (*self.info_axes(shape_zyx), 1)
        try:
            if self.info.encoding == "raw":  # the common case, without importing cloud-volume (~1 s)
                arr = np.frombuffer(data, dtype=np.dtype(self.info.dtype).newbyteorder("<")).reshape(cv_shape, order="F")
            else:
                from cloudvolume import chunks
                if data.lstrip()[:1] in (b"<", b"{"):
                    raise ValueError("the body is an HTML/XML/JSON document, not chunk data")
                if self.info.encoding == "compressed_segmentation":
                    # Untrusted bytes never reach the C decoder unchecked (see cseg.py).
                    from .cseg import check
                    check(data, cv_shape[:3], self.info.cseg_block_size, self.info.dtype)
                arr = chunks.decode(data, self.info.encoding, shape=cv_shape, dtype=self.info.dtype,
                                    block_size=self.info.cseg_block_size)
        except Exception as e:  # each codec raises its own types for a corrupt chunk
            raise LayerError(f"layer {self.url}: chunk {self.chunk_name(grid)} does not decode to "
                             f"{cv_shape} {self.info.dtype}: {type(e).__name__}: {e}") from None
        arr = np.asarray(arr)
        if arr.ndim == 3:
            arr = arr[..., None]
        if tuple(arr.shape) != cv_shape:
            raise LayerError(f"layer {self.url}: chunk {self.chunk_name(grid)} decoded to {arr.shape}, "
                             f"its box is {cv_shape}")
        return arr[..., 0].transpose((2, 0, 1) if self.info.swap_xy else (2, 1, 0)).astype(self.info.dtype, copy=False)

    def read(self, start_zyx, stop_zyx) -> np.ndarray:
        """Voxels [start, stop) of this layer's physical voxel grid (zeros outside it), C-order (z, y, x)."""
        start, stop = np.asarray(start_zyx, int), np.asarray(stop_zyx, int)
        out = np.zeros(tuple(stop - start), dtype=self.info.dtype)
        for grid in self.info.chunks_in(start, stop):
            place(out, start, self.info.chunk_box(grid)[0], self.decode_chunk(grid, self.fetch_chunk(grid)))
        return out

    # -- the sharded format --------------------------------------------------------------------
    def _fetch_sharded(self, base: str, grid, gate=NO_GATE, token=None) -> tuple:
        from cloudvolume.datasource.precomputed.common import compressed_morton_code
        from cloudvolume.datasource.precomputed.sharding import ShardingSpecification
        spec = ShardingSpecification.from_dict(self.info.sharding)
        grid_size = self.info_axes(tuple(-(-n // c) for n, c in zip(self.info.size_zyx, self.info.chunk_zyx)))
        code = int(compressed_morton_code(self.info_axes(grid), grid_size))
        loc = spec.compute_shard_location(code)
        url = f"{base}/{loc.shard_number}.shard"
        index = self._minishard_index(url, spec, int(loc.minishard_number))
        if index is None:
            return None, None
        rows = index[index[:, 0] == code]
        if len(rows) == 0:
            return None, None  # not in the shard: an empty chunk
        offset, size = int(rows[0, 1]), int(rows[0, 2])
        if size > self.info.chunk_bytes(grid):
            raise LayerError(f"layer {self.url}: shard {url} lists chunk {code} as {size} bytes; at most "
                             f"{self.info.chunk_bytes(grid)} fit it")
        data = self.fetcher.get_with_wire(url, (offset, offset + size), gate=gate, token=token)[0]
        if data is None or len(data) != size:
            if data is not None:
                gate.release()
            raise LayerError(f"layer {self.url}: shard {url} lost chunk {code} between index and data reads")
        if spec.data_encoding != "gzip":
            return data, None
        try:
            return inflate(data, self.info.chunk_bytes(grid)), data
        except Exception as e:
            gate.release()
            raise LayerError(f"layer {self.url}: chunk {code} of shard {url} does not inflate within "
                             f"{self.info.chunk_bytes(grid)} bytes: {e}") from None

    def _minishard_index(self, url, spec, minishard):
        key = (url, minishard)
        with self.lock:
            if key in self._minishards:
                return self._minishards[key]
        raw = self.fetcher.get(url, (minishard * 16, minishard * 16 + 16))
        index = None
        if raw is not None:
            start, end = (int(v) + spec.index_length() for v in np.frombuffer(raw, dtype="<u8"))
            if end > start:
                data = self.fetcher.get(url, (start, end))
                if data is None:
                    raise LayerError(f"layer {self.url}: shard {url} vanished while being read")
                if spec.minishard_index_encoding == "gzip":
                    data = inflate(data)
                table = np.frombuffer(data, dtype="<u8").reshape(3, -1).T.copy()
                table[:, 0] = np.cumsum(table[:, 0])
                table[:, 1] = np.cumsum(table[:, 1])
                table[1:, 1] += np.cumsum(table[:-1, 2])
                table[:, 1] += spec.index_length()
                index = table
        with self.lock:
            self._minishards[key] = index
        return index


def place(out: np.ndarray, out_start, src_start, src: np.ndarray):
    """Copy the part of `src` (placed at global `src_start`) that falls inside `out` (at `out_start`)."""
    out_start, src_start = np.asarray(out_start), np.asarray(src_start)
    lo = np.maximum(out_start, src_start)
    hi = np.minimum(out_start + out.shape, src_start + src.shape)
    if np.any(hi <= lo):
        return
    out[tuple(slice(a, b) for a, b in zip(lo - out_start, hi - out_start))] = \
        src[tuple(slice(a, b) for a, b in zip(lo - src_start, hi - src_start))]
