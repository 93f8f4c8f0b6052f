"""Materialisation engine: fill a store's arrays shard by shard, resumably.

One task owns one output shard: it reads the shard's box from the source layer, writes the whole
shard (zarr rewrites a shard on any partial write, so two writers in one shard would lose data),
and only then records it done. Work already recorded is skipped, so a killed run resumes where it
stopped and ends with exactly the bytes of an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cache import StoreCache, shard_box, shard_grid
from .plan import ArraySource, StorePlan

DEFAULT_WORKERS = 8


def store_attributes(plan: StorePlan) -> dict:
    """Root attributes of a store: what it is and where it came from."""
    req = plan.request
    return {"experiment": req.experiment, "bossdb_experiment": req.bossdb_experiment,
            "bbox_nm": list(plan.bbox_nm), "em_mip": req.em_mip, "seg_mip": req.seg_mip,
            "em_url": req.em_url, "citation": req.citation, "wildenberg_intake_store": plan.name}


def array_attributes(src: ArraySource) -> dict:
    return {"source_url": src.layer.url, "mip": src.layer.mip, "resolution_nm_zyx": list(src.layer.resolution_zyx),
            "origin_nm_zyx": list(src.origin_nm_zyx), "source_start_voxel_zyx": list(src.start_zyx)}


def cache_for(plan: StorePlan) -> StoreCache:
    return StoreCache(plan.request.cache_dir, plan.name)


def materialise(plan: StorePlan, names=None, workers: int = DEFAULT_WORKERS, progress: bool = True) -> Path:
    """Make arrays `names` (default: raw and the request's label) complete in the store; return its path.

    Arrays already complete are not touched; shards already recorded are not fetched again.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is not valid; allowed: a positive integer")
    names = list(names) if names is not None else ["raw", plan.label_name]
    for name in names:
        if name not in plan.arrays:
            raise ValueError(f"array {name!r} is unknown; allowed: {sorted(plan.arrays)}")
    cache = cache_for(plan)
    if all(cache.is_complete(n) for n in names):
        return cache.zarr_path  # nothing to write: works on a read-only cache too
    cache.initialise(plan.key(), store_attributes(plan))
    for name in names:
        if not cache.is_complete(name):
            _fill_array(cache, plan, plan.arrays[name], workers, progress)
    return cache.zarr_path


def _fill_array(cache: StoreCache, plan: StorePlan, src: ArraySource, workers: int, progress: bool):
    array = cache.ensure_array(src.name, src.shape, src.dtype, src.is_label, array_attributes(src))
    layer = plan.layers[src.name]
    shards = shard_grid(src.shape)
    todo = sorted(set(shards) - cache.done_shards(src.name))

    def write_shard(index):
        start, stop = shard_box(index, src.shape)
        data = layer.read([s + a for s, a in zip(src.start_zyx, start)],
                          [s + b for s, b in zip(src.start_zyx, stop)])
        array[tuple(slice(a, b) for a, b in zip(start, stop))] = data
        cache.mark_done(src.name, index)  # only after the shard's bytes are written
        return data.nbytes

    done_bytes = src.nbytes - sum(_box_bytes(i, src) for i in todo)
    bar = tqdm(total=src.nbytes, initial=done_bytes, unit="B", unit_scale=True, disable=not progress,
               desc=f"{plan.request.experiment} {src.name}")
    done = len(shards) - len(todo)
    bar.set_postfix_str(f"{done}/{len(shards)} shards")
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wildenberg")
    pending = set()
    queue = iter(todo)
    try:
        # Bounded submission keeps memory proportional to the workers, not to the volume.
        for index in queue:
            pending.add(pool.submit(write_shard, index))
            if len(pending) >= 2 * workers:
                finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                done += _collect(finished, bar)
                bar.set_postfix_str(f"{done}/{len(shards)} shards")
        while pending:
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            done += _collect(finished, bar)
            bar.set_postfix_str(f"{done}/{len(shards)} shards")
    except BaseException as e:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if isinstance(e, KeyboardInterrupt):
            print(f"\nInterrupted: {done}/{len(shards)} shards of {src.name} are recorded in {cache.root}; "
                  "run the same command again to resume.", file=sys.stderr)
        raise
    pool.shutdown(wait=True)
    bar.close()
    cache.mark_complete(src.name, src.shape)


def _collect(finished, bar) -> int:
    for f in finished:
        bar.update(f.result())  # re-raises a task's error
    return len(finished)


def _box_bytes(index, src: ArraySource) -> int:
    start, stop = shard_box(index, src.shape)
    n = 1
    for a, b in zip(start, stop):
        n *= b - a
    return n * np.dtype(src.dtype).itemsize
