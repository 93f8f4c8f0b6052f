"""Lock files: pin catalog entries to exactly the bytes they gave once.

    wildenberg-intake lock p105_psd p14_psd --bbox-nm ... -o wildenberg.lock
    wildenberg-intake verify --lock wildenberg.lock --cache-dir ...
    cat.p105_psd(lock="wildenberg.lock").read()     # refuses data that differs

A lock records the catalog version, each entry's resolved parameters (requested and clipped box,
mips, raw codec) and layer URLs, a hash of each layer's info file, and a checksum of each
materialised array's voxels (independent of compression: `content_xxh3`; locks made before
layout 5 pin `content_sha256`, checked by reading the voxels). The base URL and cache folder are
not pinned: the same bytes may come from BossDB, a mirror or an offline copy.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .catalog import load_catalog_yaml

LOCK_FORMAT = 1


class LockMismatch(ValueError):
    """Data or parameters differ from what a lock file pins."""


def _arrays(plan):
    return {"raw": plan.arrays["raw"], "labels": plan.arrays[plan.label_name]}


def entry_lock(name: str, source) -> dict:
    """What a lock pins for one materialised entry."""
    from .store.engine import cache_for
    source.materialise()
    cache, req = cache_for(source.plan), source.request
    arrays = _arrays(source.plan)
    return {
        "parameters": {"bbox_nm": list(req.bbox_nm), "em_mip": req.em_mip, "seg_mip": req.seg_mip,
                       "raw_codec": req.raw_codec},
        "clipped_bbox_nm": list(source.plan.bbox_nm),
        "urls": {k: a.layer.url.removeprefix(f"precomputed://{req.base_url}/") for k, a in arrays.items()},
        "info_sha256": {k: a.layer.info_sha256 for k, a in arrays.items()},
        "shapes": {k: list(a.shape) for k, a in arrays.items()},
        "dtypes": {k: a.dtype for k, a in arrays.items()},
        "content_xxh3": {k: cache.content_checksum(a.name, a.shape) for k, a in arrays.items()},
    }


def make_lock(sources: dict) -> dict:
    """A lock for {entry name: source}; every entry is materialised first."""
    return {"wildenberg_intake_lock": LOCK_FORMAT,
            "catalog_version": load_catalog_yaml()["metadata"]["catalog_version"],
            "package_version": __version__,
            "entries": {name: entry_lock(name, src) for name, src in sources.items()}}


def write_lock(path, lock: dict):
    Path(path).write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def read_lock(path) -> dict:
    """Load and check a lock file; errors name the file."""
    try:
        lock = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"lock={str(path)!r} does not exist; allowed: a file written by `wildenberg-intake lock`") from None
    except ValueError as e:
        raise ValueError(f"lock={str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(lock, dict) or lock.get("wildenberg_intake_lock") != LOCK_FORMAT:
        raise ValueError(f"lock={str(path)!r} is not a wildenberg-intake lock file (format {LOCK_FORMAT})")
    return lock


def check_plan(entry: str, pinned: dict, plan):
    """Refuse a store plan whose parameters or layer info files differ from the lock (no voxels read)."""
    req = plan.request
    now = {"bbox_nm": list(req.bbox_nm), "em_mip": req.em_mip, "seg_mip": req.seg_mip, "raw_codec": req.raw_codec}
    if now != pinned["parameters"]:
        raise LockMismatch(f"{entry}: parameters {now} differ from the lock's {pinned['parameters']}")
    for key, array in _arrays(plan).items():
        if array.layer.info_sha256 != pinned["info_sha256"][key]:
            raise LockMismatch(f"{entry}: the info file of {array.layer.url} changed since the lock was made "
                               f"(sha256 {array.layer.info_sha256[:12]}..., locked {pinned['info_sha256'][key][:12]}...)")
    if [round(v, 6) for v in plan.bbox_nm] != [round(v, 6) for v in pinned["clipped_bbox_nm"]]:
        raise LockMismatch(f"{entry}: the clipped box {list(plan.bbox_nm)} differs from the lock's "
                           f"{pinned['clipped_bbox_nm']}")


def check_content(entry: str, pinned: dict, source, recompute: bool = False) -> dict:
    """Compare the cached arrays' voxel checksums with the lock; raise LockMismatch if any differs.
    A lock made before layout 5 pins sha256 digests, which stores no longer record: those are
    computed from the voxels (the whole arrays are read)."""
    from .store.engine import cache_for
    from .store.integrity import recompute_content_checksum
    cache = cache_for(source.plan)
    field, algorithm = ("content_xxh3", "xxh3_128") if "content_xxh3" in pinned else ("content_sha256", "sha256")
    found = {}
    for key, array in _arrays(source.plan).items():
        found[key] = (recompute_content_checksum(cache, array.name, algorithm) if recompute or algorithm == "sha256"
                      else cache.content_checksum(array.name, array.shape))
        if found[key] != pinned[field][key]:
            raise LockMismatch(f"{entry}: {key} in {cache.zarr_path / array.name} does not hold the locked bytes "
                               f"({field} {found[key][:12]}..., locked {pinned[field][key][:12]}...)")
    return found


def open_locked(path, **overrides) -> dict:
    """{entry: source} for every entry of a lock, with its pinned parameters (plus base_url/cache_dir...)."""
    from .drivers import entry_source
    lock = read_lock(path)
    out = {}
    for name, pinned in lock["entries"].items():
        out[name] = entry_source(name, **{**pinned["parameters"], **overrides, "lock": str(path)})
    return out
