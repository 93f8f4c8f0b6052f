"""Materialisation: every shard of a store's arrays and their pyramids, as one queue of resumable tasks.

The tasks are those of `shards.ShardWriter` (a fetched shard) and `pyramid.LevelWriter` (a level
shard assembled from the quarters its shards below staged). They run on threads or on a
dask.distributed cluster (`client=`, over a shared filesystem) through `runners.py`, ordered so
that each level shard follows the shards under it (`pyramid_order`): every voxel is fetched,
decoded and downsampled once, and staged quarters live only briefly.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections import deque
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..catalog import check_count
from .format import SHARDS
from .layout import array_path, ome_multiscale, shard_box, shard_grid
from .cache import COMPLETE_MEANING, StoreCache
from .plan import ArraySource, StorePlan, pyramid_levels, split_level
from .pyramid import LevelWriter, parents_of
from .resources import default_workers
from .runners import run_on_dask, run_threads
from .shards import DEFAULT_CONNECTIONS, ShardWriter, cache_for  # noqa: F401  (re-exported)

DEFAULT_WORKERS = default_workers()  # the CPUs the scheduler grants (affinity, cgroup quota, SLURM), at least 2


def ome_levels(plan: StorePlan, name: str) -> list:
    """(path within its image group, voxel size, lower corner of voxel 0) of each level of `name`."""
    out = []
    for level_name in plan.with_levels([name]):
        src = plan.source(level_name)
        path = array_path(level_name)
        resolution = src.layer.resolution_zyx if level_name == name else src.resolution_zyx
        out.append((path.rsplit("/", 1)[-1], resolution, src.origin_nm_zyx))
    return out


def writer_for(plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS, stage_quarters: bool = False):
    """The task that writes array `name`'s shards: fetched (`ShardWriter`) or a pyramid level
    (`LevelWriter`). stage_quarters: also stage each shard's quarter of the level above."""
    if "@" in name:
        return LevelWriter(plan, name, connections, stage_quarters)
    return ShardWriter(plan, name, connections, stage_quarters)


def store_attributes(plan: StorePlan, store_name: str) -> dict:
    """Root attributes of a store: what it is and where it came from."""
    req = plan.request
    return {"ome": {"version": "0.5", "multiscales": [ome_multiscale("raw", ome_levels(plan, "raw"))]},
            "experiment": req.experiment, "bossdb_experiment": req.bossdb_experiment,
            "bbox_nm": list(plan.bbox_nm), "em_mip": req.em_mip, "seg_mip": req.seg_mip,
            "em_url": req.em_url, "citation": req.citation, "wildenberg_intake_store": store_name,
            "wildenberg_intake": {"complete_arrays": [], "meaning": COMPLETE_MEANING}}


def array_attributes(src) -> dict:
    """Attributes of a cache array: where it comes from, its voxel size and where voxel 0 lies
    (`origin_nm_zyx`: its lower corner; `voxel_0_centre_nm_zyx`: its centre, OME-Zarr's translation)."""
    if isinstance(src, ArraySource):
        res = src.layer.resolution_zyx
        out = {"source_url": src.layer.url, "mip": src.layer.mip, "source_start_voxel_zyx": list(src.start_zyx)}
    else:  # a pyramid level
        res = src.resolution_zyx
        out = {"downsampled_from": src.base.name, "level": src.level,
               "downsampling": "mode of 2 x 2 in y, x" if src.is_label else "mean of 2 x 2 in y, x"}
    return {**out, "wildenberg_intake_complete": False, "resolution_nm_zyx": list(res), "origin_nm_zyx": list(src.origin_nm_zyx),
            "voxel_0_centre_nm_zyx": [o + r / 2 for o, r in zip(src.origin_nm_zyx, res)]}


def materialise(plan: StorePlan, names=None, workers: int = DEFAULT_WORKERS, progress: bool = True,
                connections: int = DEFAULT_CONNECTIONS, client=None, cache_limit: int | None = None,
                pyramid: bool = True) -> Path:
    """Make arrays `names` (default: raw and the request's label) complete in the store; return its path.

    Arrays already complete are not touched; shards already recorded are not fetched again.
    workers: shard tasks at once (CPU-bound); connections: chunk requests in flight per process.
    client: a dask.distributed Client or scheduler address: run the shard tasks on its workers
        (the cache folder must be on a filesystem they share).
    cache_limit: bytes the store may use on disk; a materialisation that cannot fit is refused up front.
    pyramid: also make each array's pyramid levels (False: level 0 alone, as benchmarks compare).
    """
    workers, connections = check_count("workers", workers), check_count("connections", connections)
    names = list(names) if names is not None else ["raw", plan.label_name]
    for name in names:
        if name not in plan.arrays:
            raise ValueError(f"array {name!r} is unknown; allowed: {sorted(plan.arrays)}")
    if pyramid:
        names = plan.with_levels(names)  # and their pyramids, made on transfer
    cache = prepare(plan, names)
    if all(cache.is_complete(n) for n in names):
        return cache.zarr_path  # nothing to write: works on a read-only cache too
    if cache_limit is not None:
        _check_fits(cache, plan, names, cache_limit)
    todo = [name for name in names if not cache.is_complete(name)]
    # A shard stages its quarter of the level above only when that level is to be made.
    writers = [writer_for(plan, name, connections, stage_quarters=_next_level(name) in todo) for name in todo]
    _fill_arrays(cache, writers, workers, progress, client)
    return cache.zarr_path


def prepare(plan: StorePlan, names) -> StoreCache:
    """Create the store's folder, root group and the metadata of arrays `names` (no voxels, no
    requests); arrays already complete are left alone, so a complete store may be read-only."""
    cache = cache_for(plan)
    if all(cache.is_complete(n) for n in names):
        return cache
    # Every array the OME-Zarr metadata declares exists from the moment it is declared (metadata
    # only, shards to come), so zarr-python, napari, tensorstore and neuroglancer open a partly
    # fetched store without error: the root image declares raw and all its levels, a label's
    # group all of that label's.
    bases = dict.fromkeys(["raw"] + [split_level(n)[0] for n in names])
    names = plan.with_levels(bases)
    try:
        cache.initialise(plan.key(), store_attributes(plan, cache.root.name))
        for name in names:
            src = plan.source(name)
            if not cache.is_complete(name):
                ome = ome_multiscale(name, ome_levels(plan, name)) if "@" not in name else None
                cache.ensure_array(name, src.shape, src.dtype, src.is_label, array_attributes(src), src.codec, ome)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the cache folder {cache.root}: {e.strerror or e}") from e
    return cache


def _check_fits(cache: StoreCache, plan: StorePlan, names, cache_limit: int):
    """Refuse up front a full materialisation that cannot fit `cache_limit` bytes on disk.

    The store's size is estimated per array from the shards already on disk (their mean size per
    voxel, extrapolated to the whole array), or as its uncompressed size when none is."""
    need = 0
    for name in names:
        src = plan.source(name)
        done = cache.done_shards(name)
        _, on_disk = cache.disk_usage(name)
        voxels_done = sum(int(np.prod(np.subtract(*shard_box(i, src.shape)[::-1]))) for i in done)
        need += src.nbytes if not voxels_done else int(on_disk / voxels_done * np.prod(src.shape))
    if need > cache_limit:
        raise ValueError(
            f"cache_limit={cache_limit} bytes cannot hold a full materialisation of {', '.join(names)} in "
            f"{cache.root}: about {need / 1e9:.2f} GB (estimated from the shards cached so far, or "
            "uncompressed). Raise cache_limit, choose a smaller bbox_nm, or use to_dask() / lazy=True, "
            "which evict least recently used shards to stay within the limit.")


def _next_level(name: str) -> str:
    base, level = split_level(name)
    return f"{base}@{level + 1}"


def pyramid_order(shape, levels: int) -> list[tuple[int, tuple]]:
    """(level, shard index) of every shard of an array of `shape` and of its pyramid levels 1 to
    `levels`, in the order a materialisation writes them: the quadtree of levels walked depth
    first, each level shard right after the (2 x 2) shards under it, z fastest within each. So a
    staged quarter waits for at most three siblings, and a source chunk shared across a z
    boundary is released one task later."""
    def grid(k):
        y, x = -(-shape[1] // 2**k), -(-shape[2] // 2**k)
        return -(-y // SHARDS[1]), -(-x // SHARDS[2])
    nz = -(-shape[0] // SHARDS[0])
    out = []

    def visit(k, j, i):
        ny, nx = grid(k)
        if j >= ny or i >= nx:
            return
        if k > 0:
            for dj in (0, 1):
                for di in (0, 1):
                    visit(k - 1, 2 * j + dj, 2 * i + di)
        out.extend((k, (z, j, i)) for z in range(nz))

    ny, nx = grid(levels)
    for j in range(ny):
        for i in range(nx):
            visit(levels, j, i)
    return out


def _fill_arrays(cache: StoreCache, writers: list, workers: int, progress: bool, client):
    """Write every missing shard of the writers' arrays as one queue of tasks (the next array's
    shards start while the last of the previous one finish), marking each array complete when its
    last shard is recorded."""
    jobs, left, total, bars = [], {}, {}, {}
    by_name = {w.src.name: w for w in writers}
    for position, writer in enumerate(writers):
        src = writer.src
        shards = shard_grid(src.shape)
        done = cache.done_shards(src.name)
        todo = [i for i in shards if i not in done]
        left[src.name], total[src.name] = len(todo), len(shards)
        bars[src.name] = tqdm(total=src.nbytes, initial=src.nbytes - sum(_box_bytes(i, src) for i in todo),
                              unit="B", unit_scale=True, disable=not progress, position=position,
                              desc=f"{writer.plan.request.experiment} {src.name}")
        bars[src.name].set_postfix_str(f"{len(shards) - len(todo)}/{len(shards)} shards")
    # A level shard waits for the shards under it: it is queued (first) once they are all recorded,
    # so that no task sits waiting for another's lock while a core idles.
    under = {}  # (level name, index) -> shards under it not recorded yet
    for base in dict.fromkeys(split_level(w.src.name)[0] for w in writers):
        base_shape = writers[0].plan.arrays[base].shape
        for level, index in pyramid_order(base_shape, pyramid_levels(base_shape)):
            writer = by_name.get(base if level == 0 else f"{base}@{level}")
            if writer is None or cache.is_done(writer.src.name, index):
                continue
            if level and writer.parent_name in by_name:
                below = {(writer.parent_name, p) for p in parents_of(index, writer.parent.src.shape)
                         if not cache.is_done(writer.parent_name, p)}
                if below and client is None:
                    under[(writer.src.name, index)] = below
                    continue
            jobs.append((writer, index))
    ready = _Ready(jobs)
    above = {}  # shard -> the level shard it is under
    for key, below in under.items():
        for shard in below:
            above[shard] = key

    def complete(writer: ShardWriter):
        writer.finish()

    def finished(writer: ShardWriter, index):
        src = writer.src
        key = above.pop((src.name, tuple(index)), None)
        if key is not None:
            under[key].discard((src.name, tuple(index)))
            if not under[key]:
                del under[key]
                ready.release((by_name[key[0]], key[1]))
        left[src.name] -= 1
        bars[src.name].update(_box_bytes(index, src))
        bars[src.name].set_postfix_str(f"{total[src.name] - left[src.name]}/{total[src.name]} shards")
        if left[src.name] == 0:
            complete(writer)

    io = None  # this run's request pool (threads)
    try:
        for writer in writers:
            if left[writer.src.name] == 0:  # every shard was recorded by an earlier, interrupted run
                complete(writer)
        if client is not None:
            run_on_dask(client, _write_on_worker, jobs, lambda job, _: finished(*job))
        elif writers:
            # One pool of requests for the process, as `connections` promises, whichever array they serve.
            io = cf.ThreadPoolExecutor(writers[0].connections, thread_name_prefix="wildenberg-io")
            for writer in writers:
                writer._io, writer._io_pid = io, os.getpid()
            fetchers = {id(w.layer.fetcher): w.layer.fetcher for w in writers}.values()
            for f in fetchers:  # an outage being waited out shows on the bars
                f.on_wait = lambda url, failure, wait, left: _show_wait(bars, url, failure, wait, left)
            try:
                run_threads(_write_on_worker, ready, workers, lambda job, _: finished(*job),
                            cancel=lambda: [f.cancel() for f in fetchers])
            finally:
                for f in fetchers:  # the plan (and its fetcher) may be used again: a rerun, repair()
                    f.cancelled.clear()
                    f.on_wait = None
    except KeyboardInterrupt:
        for bar in bars.values():
            bar.close()
        state = ", ".join(f"{name}: {total[name] - left[name]}/{total[name]} shards" for name in total)
        print(f"\nInterrupted: recorded {state} in {cache.root}; run the same command again to resume.",
              file=sys.stderr)
        raise
    finally:
        for bar in bars.values():
            bar.close()
        if io is not None:
            io.shutdown(wait=True, cancel_futures=True)


class _Ready:
    """The queue of a threaded run: an iterator that `run_threads` asks for more after each task;
    `release` puts a job that has become ready (a level shard whose shards below are recorded)
    at its head."""

    def __init__(self, jobs):
        self.queue = deque(jobs)

    def __iter__(self):
        return self

    def __next__(self):
        if self.queue:
            return self.queue.popleft()
        raise StopIteration

    def release(self, job):
        self.queue.appendleft(job)


def _box_bytes(index, src: ArraySource) -> int:
    start, stop = shard_box(index, src.shape)
    return int(np.prod([b - a for a, b in zip(start, stop)])) * np.dtype(src.dtype).itemsize


def _show_wait(bars: dict, url: str, failure: str, wait: float, left: float):
    """Say on the progress bars what the run waits for (the next finished shard says the count again)."""
    host = url.split("/")[2] if "://" in url else url
    for bar in bars.values():
        bar.set_postfix_str(f"waiting for {host}: {failure}; retry in {wait:.0f} s, "
                            f"giving up in {left:.0f} s", refresh=True)


def _write_on_worker(writer, index) -> int:
    return writer.write(index)
