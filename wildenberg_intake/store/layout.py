"""Names and metadata of a store: where each array lives in the zarr store, its shard grid, and the
zarr.json and OME-Zarr documents a store's preparation writes (written without zarr-python)."""

from __future__ import annotations

import itertools

import numpy as np

from .format import CHUNKS, CODECS, SHARDS, shuffle_of

def array_metadata(shape, dtype: str, is_label: bool, codec: str, attributes: dict, chunk_shape=None) -> dict:
    """zarr.json of a cache array: zarr v3, sharded (SHARDS of CHUNKS), Blosc `codec` with
    `shuffle_of(is_label)`, fill value 0, dims z, y, x. Written without zarr-python, whose import
    (~0.1 s on one core) held up the first shard of every fetch; a test checks it equals zarr's.
    With `chunk_shape`: unsharded chunks of that shape, each encoded as an inner chunk is."""
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r} is not supported; allowed: {list(CODECS)}")
    cname, clevel = CODECS[codec]
    itemsize = np.dtype(dtype).itemsize
    inner_bytes = {"name": "bytes"} if itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    blosc = {"name": "blosc", "configuration": {"typesize": itemsize, "cname": cname, "clevel": clevel,
                                                "shuffle": shuffle_of(is_label), "blocksize": 0}}
    chunk_codecs = [inner_bytes, blosc, {"name": "crc32c"}]
    codecs = chunk_codecs if chunk_shape is not None else [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": list(CHUNKS), "codecs": chunk_codecs,
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "index_location": "end"}}]
    return {"shape": [int(n) for n in shape], "data_type": str(np.dtype(dtype)),
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [int(n) for n in (chunk_shape if chunk_shape is not None else SHARDS)]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": codecs,
            "attributes": attributes, "dimension_names": ["z", "y", "x"],
            "zarr_format": 3, "node_type": "array", "storage_transformers": []}


def group_metadata(attributes: dict) -> dict:
    """zarr.json of a zarr v3 group (a test checks it equals zarr-python's)."""
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def array_path(name: str) -> str:
    """Where array `name` lives in the zarr store: raw at `raw` (its pyramid levels `raw@<k>` at
    `raw_s<k>`, beside it in the root image group), label <l> at `labels/<l>/0` (OME-Zarr puts each
    label in an image-label group of its own; its level k at `labels/<l>/<k>`)."""
    base, _, level = name.partition("@")
    if base.startswith("labels/"):
        return f"{base}/{level or 0}"
    return f"{base}_s{level}" if level else base


def array_name(path: str) -> str:
    """The array name of a path inside the zarr store: the inverse of `array_path`
    ("raw_s2" -> "raw@2", "labels/psd/0" -> "labels/psd", "labels/psd/1" -> "labels/psd@1")."""
    parts = str(path).strip("/").split("/")
    if len(parts) == 3 and parts[0] == "labels" and parts[2].isdigit():
        return f"labels/{parts[1]}" + (f"@{parts[2]}" if parts[2] != "0" else "")
    if len(parts) == 1:
        base, sep, level = parts[0].rpartition("_s")
        return f"{base}@{level}" if sep and level.isdigit() and base else parts[0]
    raise ValueError(f"path={path!r} is not an array of a wildenberg-intake store; allowed: raw, raw_s<k>, "
                     "labels/<label>/<k>")


def ome_multiscale(name: str, levels) -> dict:
    """An OME-Zarr 0.5 multiscales entry, axes z, y, x in nanometres; `levels`: (path, voxel size,
    lower corner of voxel 0) per level, finest first. OME-Zarr (and neuroglancer, napari) place
    voxel 0's centre at the translation: half a voxel past its lower corner."""
    return {"name": name, "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [{"path": path, "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) for v in resolution]},
                {"type": "translation", "translation": [float(o) + float(r) / 2 for o, r in zip(origin, resolution)]}]}
                for path, resolution, origin in levels]}


def shard_grid(shape) -> list[tuple]:
    """Indices (i, j, k) of the output shards covering an array of `shape`."""
    counts = [-(-int(n) // s) for n, s in zip(shape, SHARDS)]
    return list(itertools.product(*(range(c) for c in counts)))


def shard_box(index, shape):
    """(start, stop) voxels of shard `index` in an array of `shape`, clipped at the array's edge."""
    start = tuple(i * s for i, s in zip(index, SHARDS))
    stop = tuple(min(a + s, n) for a, s, n in zip(start, SHARDS, shape))
    return start, stop
