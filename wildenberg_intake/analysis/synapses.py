"""The per-synapse table of a store: PSD components, sizes, centroids, partners and vesicle clouds.

Definitions (DEFINITION_VERSION; exact enough that an independent implementation gets the same
table, see tests/test_synapses.py):

- A synapse is a 26-connected component of the PSD mask (psd != 0) within the store. `synapse_id`
  numbers them 1..N in C order (z, then y, then x) of each component's first voxel.
- `psd_voxels`, `psd_volume_um3`: its voxel count and volume (voxel volume from the label layer's
  resolution).
- `centroid_z_nm`, `centroid_y_nm`, `centroid_x_nm`: the mean of its voxel centres in the frame of
  the package's xarray coordinates (lower corner of the store's voxel 0 + (index + 0.5) x voxel size).
- `bbox_z0` .. `bbox_x1`: its bounding box in store voxel indices, half-open.
- `touches_box_edge`: the bounding box reaches a face of the store (the synapse may be cut).
- `post_segment`: the non-zero saturated id covering most of its voxels (ties to the lower id; 0 if none).
- The paired vesicle cloud: among the 26-connected components of the vesicle-cloud mask, the one
  with the most voxels inside the PSD's bounding box grown by ceil(200 nm / voxel size) voxels on
  every side (17 in y and x, 5 in z at 12 x 12 x 40 nm) and clipped to the store; ties go to the
  component whose first voxel comes first in C order. `vesicle_cloud_voxels` and
  `vesicle_cloud_volume_um3` are that whole component's size, `pre_segment` the non-zero saturated
  id covering most of it (ties to the lower id). All three are 0 when no vesicle cloud is in the box.

Computed blockwise (`components.py`): two passes over blocks, never a whole volume in memory,
on local worker processes (or threads) or on a dask.distributed cluster with identical output, reading
through the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import uuid

import numpy as np
from tqdm.auto import tqdm

from ..catalog import check_count
from ..store.format import SHARDS
from ..store.files import durable_write, make_dirs
from ..store.liveness import remove_if_dead, try_lock
from ..store.engine import DEFAULT_CONNECTIONS, DEFAULT_WORKERS, cache_for
from ..store.runners import run_on_dask, run_processes, run_threads
from ..store.lazy import ReadThroughArray, shards_touching
from ..store.plan import StorePlan
from .components import Components, block_summary, blocks, label_block, slim, value_counts, winners

DEFINITION_VERSION = 1
READER_CACHE_MB = 32
PROCESS_MIN_VOXELS = 2 * 128 * 512 * 512  # two output shards: below, threads (measured: processes 0.5 s slower)
GROW_NM = 200.0
ARRAYS = {"psd": "labels/psd", "vesicle_cloud": "labels/vesicle_cloud", "saturated": "labels/saturated"}
COLUMNS = ["synapse_id", "experiment", "psd_voxels", "psd_volume_um3", "centroid_z_nm", "centroid_y_nm",
           "centroid_x_nm", "bbox_z0", "bbox_z1", "bbox_y0", "bbox_y1", "bbox_x0", "bbox_x1", "touches_box_edge",
           "post_segment", "vesicle_cloud_voxels", "vesicle_cloud_volume_um3", "pre_segment"]


def _window(arr):
    def read(start, stop):
        return arr[tuple(slice(a, b) for a, b in zip(start, stop))]
    return read


def summarise_block(arrays: dict, start, stop, spill=None) -> tuple[dict, dict]:
    """Pass 1 of one block: the PSD and vesicle-cloud summaries, with saturated ids per label
    (saturated is read only where the block has a PSD or vesicle-cloud voxel). Where the block has
    vesicle clouds, their labels are also written to the file `spill`, for pass 2 (one labelling
    per block)."""
    shape = arrays["psd"].shape
    summaries = []
    for name in ("psd", "vesicle_cloud"):
        labels, halo, fg = label_block(_window(arrays[name]), shape, start, stop)
        summaries.append(block_summary(labels, halo, start, stop, shape, fg))
        del labels  # one block's labels at a time
    if spill is not None and summaries[1]["n"]:
        clouds = summaries[1]
        # Flat indices in the block (its C order, so ascending): pass 2 bisects them by z.
        flat = np.ravel_multi_index(clouds["where"], tuple(b - a for a, b in zip(start, stop)))
        with open(spill, "wb") as f:  # scratch of this run: pass 2 reads it, the run removes it
            np.savez(f, flat=flat, lab=clouds["lab"].astype(np.uint32))
    if any(len(s["lab"]) for s in summaries):
        segments = _window(arrays["saturated"])(start, stop)
    else:  # not needed here, but recorded, so that the table's key (every array's checksum) exists
        segments = None
        for index in shards_touching(start, stop):
            arrays["saturated"].ensure(index)
    for s in summaries:
        s["values"] = value_counts(s, segments)
    return slim(summaries[0]), slim(summaries[1])


def count_clouds_in_boxes(spill, start, stop, nodes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Pass 2 of one block: for each (synapse, lo z y x, hi z y x) row of `boxes`, how many voxels of
    each vesicle-cloud component lie in the box's part of this block. The block's vesicle labels are
    pass 1's (its file `spill`), `nodes` maps them to global components. Rows (synapse, component, count)."""
    # The labels made dense only over the z range of the block the boxes reach (the voxels are in
    # C order: that range is one run of them, found by bisection, and written in order).
    plane = (stop[1] - start[1]) * (stop[2] - start[2])
    z_lo = max(int(boxes[:, 1].min()), start[0]) - start[0]
    z_hi = max(min(int(boxes[:, 4].max()), stop[0]) - start[0], z_lo)
    with np.load(spill) as saved:
        flat, lab = saved["flat"], saved["lab"]
    first, last = np.searchsorted(flat, (z_lo * plane, z_hi * plane))
    core = np.zeros((z_hi - z_lo, stop[1] - start[1], stop[2] - start[2]), np.uint32)
    core.reshape(-1)[flat[first:last] - z_lo * plane] = lab[first:last]
    reach_lo = np.array([z_lo, 0, 0])
    rows = []
    for syn, *box in boxes:
        lo = np.maximum(box[:3], start) - start
        hi = np.minimum(box[3:], stop) - start
        if np.any(hi <= lo):
            continue
        lo, hi = lo - reach_lo, hi - reach_lo
        part = core[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        found, counts = np.unique(part[part > 0], return_counts=True)
        # Labels of one block may belong to one component (joined through other blocks): summed.
        comps = nodes[found.astype(np.int64)]
        for c in np.unique(comps):
            rows.append((syn, c, counts[comps == c].sum()))
    return np.array(rows, np.int64).reshape(-1, 3)


def _apply(fn, i, args):
    return fn(*args)


def check_block_shape(value) -> tuple:
    """Voxels (z, y, x) per task: three positive integers; None is the store's shard shape."""
    if value is None:
        return tuple(SHARDS)
    try:
        shape = tuple(value)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                  for v in shape):
        raise ValueError(f"block_shape={value!r} is not valid; allowed: three positive voxel counts (z, y, x)")
    return tuple(int(v) for v in shape)


def _run(fn, calls: list, workers: int, client, progress: bool, desc: str, processes: bool = False) -> list:
    """fn(*args) for each args of `calls`, on `workers` threads, processes or a dask client (the
    engine's runners); results in the order of `calls`."""
    results = [None] * len(calls)
    jobs = [(fn, i, args) for i, args in enumerate(calls)]
    with tqdm(total=len(calls), desc=desc, unit="block", disable=not progress) as bar:
        def finished(job, result):
            results[job[1]] = result
            bar.update()
        if client is not None:
            run_on_dask(client, _apply, jobs, finished)
        elif processes:
            run_processes(_apply, jobs, workers, finished)
        else:
            run_threads(_apply, jobs, workers, finished)
    return results


class SynapseTable:
    """The synapse table of the store of `plan` (any entry of an experiment and box).

    block_shape: voxels (z, y, x) per task (default: the store's shards); workers: tasks at once;
    processes: run them in forked worker processes or threads (default: processes when workers > 1
    and the box holds at least PROCESS_MIN_VOXELS, where the work outweighs starting them);
    client: a dask.distributed Client or scheduler address (the cache folder shared with its workers);
    connections, cache_limit: as for lazy reads; progress: bars over blocks.
    """

    def __init__(self, plan: StorePlan, block_shape=None, workers: int = DEFAULT_WORKERS, client=None,
                 connections: int = DEFAULT_CONNECTIONS, cache_limit: int | None = None, progress: bool = True,
                 processes: bool | None = None):
        missing = [n for n in ARRAYS.values() if n not in plan.arrays]
        if missing:
            raise ValueError(f"the store of {plan.request.experiment} lacks {missing}; a synapse table needs "
                             f"{sorted(ARRAYS.values())}")
        block_shape, workers = check_block_shape(block_shape), check_count("workers", workers)
        self.plan, self.block_shape, self.workers, self.client = plan, block_shape, workers, client
        self.progress = progress
        # Blocks are read once (their halo planes twice): a small chunk cache keeps memory flat.
        self.arrays = {k: ReadThroughArray(plan, name, connections, cache_limit, cache_mb=READER_CACHE_MB)
                       for k, name in ARRAYS.items()}
        self.cache = cache_for(plan)
        src = plan.arrays[ARRAYS["psd"]]
        self.shape = src.shape
        # Worker processes by default: connected-components-3d holds the GIL, so threads label one
        # block at a time; on a small box starting them costs more than it saves.
        big = int(np.prod(self.shape)) >= PROCESS_MIN_VOXELS
        self.processes = (workers > 1 and big) if processes is None else bool(processes)
        self.resolution = np.array(src.layer.resolution_zyx, float)
        self.origin = np.array(src.origin_nm_zyx, float)

    # -- the cache of tables --------------------------------------------------------------------
    def key(self) -> str | None:
        """Content key of the table: the definition version and the voxel checksums of the three
        label arrays (None while any of their shards is not recorded)."""
        try:
            sums = {k: self.cache.content_checksum(name, self.shape) for k, name in ARRAYS.items()}
        except RuntimeError:
            return None
        text = json.dumps({"definition": DEFINITION_VERSION, "arrays": sums, "shape": list(self.shape),
                           "resolution_nm_zyx": list(self.resolution), "origin_nm_zyx": list(self.origin)},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str):
        return self.cache.root / "tables" / f"synapses-v{DEFINITION_VERSION}-{key[:16]}.parquet"

    def cached(self):
        """The cached table if there is one for the store's current content, else None."""
        import pandas as pd
        key = self.key()
        if key is not None and self.path(key).is_file():
            return pd.read_parquet(self.path(key))
        return None

    def read(self):
        """The table as a pandas DataFrame: from the cache when this content's table is there, else
        computed and cached (written whole, then renamed: a killed run leaves no table)."""
        table = self.cached()
        if table is not None:
            return table
        table = self.compute()
        key = self.key()  # the arrays are all recorded now (unless cache_limit evicted some)
        if key is not None:
            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            make_dirs(self.path(key).parent)
            durable_write(self.path(key), buffer.getvalue())
        return table

    # -- the computation -------------------------------------------------------------------------
    def compute(self):
        """The table, computed (not cached): pass 1 labels every block once, pass 2 pairs PSDs with
        vesicle clouds from pass 1's labels, kept in a scratch folder of this run under the store's
        staging/tables/ (removed at the end)."""
        tables = self.cache.root / "staging" / "tables"
        make_dirs(tables)
        for folder in tables.iterdir():  # killed runs' scratch: its run's lock is free
            if folder.is_dir():
                remove_if_dead(folder, folder.with_name(folder.name + ".lock"))
        scratch = tables / uuid.uuid4().hex
        held = try_lock(scratch.with_name(scratch.name + ".lock"))  # this run's, for as long as it lives
        make_dirs(scratch)
        try:
            return self._compute(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            held.release()

    def _compute(self, scratch):
        import pandas as pd
        tiles = blocks(self.shape, self.block_shape)
        exp = self.plan.request.experiment
        spills = [str(scratch / f"{b}.npz") for b in range(len(tiles))]
        first = _run(summarise_block, [(self.arrays, a, b, f) for (a, b), f in zip(tiles, spills)], self.workers,
                     self.client, self.progress, f"{exp} synapses: components", self.processes)
        psd = Components([s[0] for s in first])
        clouds = Components([s[1] for s in first])
        n = psd.n
        voxel_um3 = float(np.prod(self.resolution)) / 1e9
        grow = np.array(grow_voxels(self.resolution), np.int64)
        lo_g = np.maximum(psd.lo.T - grow, 0)
        hi_g = np.minimum(psd.hi.T + grow, self.shape)
        boxes = np.concatenate([np.arange(n)[:, None], lo_g, hi_g], axis=1)
        # Pass 2 over blocks that hold a vesicle cloud and meet a grown PSD box.
        calls = []
        for b, ((start, stop), s) in enumerate(zip(tiles, first)):
            if s[1]["n"] == 0 or n == 0:
                continue
            meets = np.all(lo_g < stop, axis=1) & np.all(hi_g > start, axis=1)
            if meets.any():
                calls.append((spills[b], start, stop, clouds.of_block(b), boxes[meets]))
        counted = _run(count_clouds_in_boxes, calls, self.workers, self.client, self.progress,
                       f"{exp} synapses: vesicle clouds", self.processes)
        rows = np.concatenate(counted, axis=0) if counted else np.zeros((0, 3), np.int64)
        # Most voxels in the box, ties to the component whose first voxel comes first: components are
        # numbered by first voxel, so the lower number.
        cloud = winners(rows[:, 0], rows[:, 1], rows[:, 2], n, missing=-1)
        post = psd.majority_value()
        pre_of_cloud = clouds.majority_value()
        paired = cloud >= 0
        cloud_voxels = np.where(paired, clouds.count[np.maximum(cloud, 0)] if clouds.n else 0, 0)
        centroid = self.origin[:, None] + (psd.sum / np.maximum(psd.count, 1) + 0.5) * self.resolution[:, None]
        touches = np.any(psd.lo == 0, axis=0) | np.any(psd.hi == np.array(self.shape)[:, None], axis=0)
        table = pd.DataFrame({
            "synapse_id": np.arange(1, n + 1, dtype=np.int64),
            "experiment": pd.Series([exp] * n, dtype="string"),
            "psd_voxels": psd.count.astype(np.int64),
            "psd_volume_um3": psd.count * voxel_um3,
            "centroid_z_nm": centroid[0], "centroid_y_nm": centroid[1], "centroid_x_nm": centroid[2],
            "bbox_z0": psd.lo[0], "bbox_z1": psd.hi[0], "bbox_y0": psd.lo[1], "bbox_y1": psd.hi[1],
            "bbox_x0": psd.lo[2], "bbox_x1": psd.hi[2],
            "touches_box_edge": touches.astype(bool),
            "post_segment": post.astype(np.int64),
            "vesicle_cloud_voxels": cloud_voxels.astype(np.int64),
            "vesicle_cloud_volume_um3": cloud_voxels * voxel_um3,
            "pre_segment": np.where(paired, pre_of_cloud[np.maximum(cloud, 0)] if clouds.n else 0, 0).astype(np.int64),
        }, columns=COLUMNS)
        table.attrs.update({"definition_version": DEFINITION_VERSION, "store": str(self.cache.root),
                            "bbox_nm": list(self.plan.bbox_nm),
                            "box_volume_um3": box_volume_um3(self.shape, self.resolution)})
        return table


def box_volume_um3(shape_zyx, resolution_nm_zyx) -> float:
    """The volume of a store of `shape_zyx` voxels of `resolution_nm_zyx` nm, in µm³."""
    return float(np.prod(shape_zyx) * np.prod(resolution_nm_zyx) / 1e9)


def grow_voxels(resolution_zyx) -> list[int]:
    """ceil(200 nm / voxel size) per axis: how far the vesicle-cloud search box reaches past a PSD."""
    return [math.ceil(GROW_NM / r) for r in resolution_zyx]


