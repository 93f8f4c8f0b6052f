"""intake drivers: one catalog entry (experiment + label channel) as an xarray Dataset over the cache.

    src = intake.open_catalog(wildenberg_intake.catalog_path()).p105_psd(bbox_nm=[...])
    src.discover()      # shape, dtypes, voxel size, clipped box, bytes: info files only
    src.read()          # load into memory, fetching only the shards not cached yet
    src.to_dask()       # at once: a lazy Dataset whose chunks are the store's shards, fetched when computed
    src.materialise()   # fetch every shard not cached yet, return the zarr store path
"""

from __future__ import annotations

import inspect


import numpy as np
from intake.source.base import DataSource, Schema

from . import __version__
from .catalog import USER_PARAMETERS, check_count, check_names, checked_keywords, make_request
from .store.engine import DEFAULT_CONNECTIONS, DEFAULT_WORKERS, cache_for, materialise
from .store.lazy import ReadThroughArray, parse_size
from .store.plan import StorePlan, plan_store
from .source.transfer import RetryPolicy


def entry_source(name: str, **parameters):
    """Catalog entry `name` of the packaged catalog, configured with `parameters`."""
    import intake
    from .catalog import catalog_path, unknown_name
    cat = intake.open_catalog(catalog_path())
    if name not in cat:
        raise ValueError(unknown_name("entry", name, list(cat)))
    return cat[name](**parameters)


def source_keywords() -> list[str]:
    """Every keyword a catalog entry takes: the user parameters and the drivers' options."""
    options = set(USER_PARAMETERS)
    for driver in (WildenbergSource, SynapseTableSource):
        options |= {n for n, p in inspect.signature(driver.__init__).parameters.items()
                    if p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("self", "dataset", "label", "parameters",
                                                                        "metadata")}
    return sorted(options)


def cache_state(plan: StorePlan, names) -> dict:
    """How much of each array is cached: shards recorded / total and bytes of their files on disk."""
    from .store.layout import shard_grid
    cache = cache_for(plan)
    out = {}
    for name in names:
        done, nbytes = cache.disk_usage(name)
        out[name] = {"shards_cached": done, "shards_total": len(shard_grid(plan.arrays[name].shape)),
                     "bytes_on_disk": nbytes, "complete": cache.is_complete(name)}
    return out


def _memory_bytes() -> int:
    """Memory this process may use: physical memory or its cgroup's limit, whichever is less."""
    from .store.resources import available_memory
    try:
        return available_memory()
    except (ValueError, OSError):
        return 8 * 2**30


class _StoreSource(DataSource):
    """What every entry shares: a validated request for one experiment and box, the retry policy,
    the parallelism, and the store plan (read from the layers' info files once)."""

    version = __version__
    partition_access = False

    def __init__(self, dataset: dict, label: str, parameters: dict | None, user: dict,
                 workers: int = DEFAULT_WORKERS, progress: bool = True, connections: int = DEFAULT_CONNECTIONS,
                 retry: dict | None = None, cache_limit=None, metadata=None):
        # `dataset`: the experiment's declared fields; `parameters`: the user parameters as the
        # catalog rendered them; `user`: the same given directly (they win). A misspelled name is
        # refused: silently ignored, it would describe the whole annotated box.
        options = [n for n in inspect.signature(type(self).__init__).parameters
                   if n not in ("self", "dataset", "label", "parameters", "user", "metadata")]
        check_names(user, [*USER_PARAMETERS, *options])
        self.request = make_request(**dataset, label=label, **{**(parameters or {}), **user})
        self.workers = check_count("workers", workers)
        self.connections = check_count("connections", connections)
        self.retry = RetryPolicy(**(retry or {})) if not isinstance(retry, RetryPolicy) else retry
        self.progress = progress
        self.cache_limit = parse_size(cache_limit)
        self._plan = None
        self.lock = None
        super().__init__(metadata=metadata)

    @property
    def plan(self) -> StorePlan:
        """The store layout: reads the layers' info files once, no voxel data."""
        if self._plan is None:
            plan = plan_store(self.request, self.retry)
            if self.lock is not None:
                from .lock import check_plan
                check_plan(self.entry_name, self.lock, plan)
            self._plan = plan
        return self._plan


    def cancel(self):
        """Stop this entry's work running in other threads (`materialise()`, `read()`, a table):
        requests in flight are cut, and waits for a retry (a `Retry-After` included), for a staged
        chunk or for another process's shard end within a second; the call raises `Cancelled`.
        What was recorded stays, and the next call resumes from there."""
        self.plan.fetcher.cancel()  # one fetcher serves every layer of the store


class WildenbergSource(_StoreSource):
    """A Wildenberg 2023 experiment with one label channel, cached as a zarr v3 store.

    Arguments are the catalog entry's declared fields (`dataset`: experiment, URLs, dtypes, box,
    axis swap; `label`) plus the user parameters bbox_nm, em_mip, seg_mip, cache_dir and base_url;
    `workers` sets the shard tasks at once (CPU), `connections` the chunk requests in flight,
    `retry` the retry policy for transient faults (fields of `source.transfer.RetryPolicy`), `lock` a
    lock file whose pinned info files, box and voxel checksums the data must match,
    `cache_limit` the bytes the store's shards may use on disk in lazy use (an integer or a
    string such as "50GB"; least recently used shards are evicted; None: no limit),
    `check_hashes` whether reads check every byte of each cached shard the first time this
    process reads it (its index crc32c against its record, and the crc32c of its index and of every
    chunk, which cover the whole file; otherwise its size and index, and each chunk as it is
    decoded),
    and `progress` the progress bars.
    """

    name = "wildenberg"
    container = "xarray"

    def __init__(self, dataset: dict, label: str, parameters: dict | None = None,
                 workers: int = DEFAULT_WORKERS, progress: bool = True,
                 connections: int = DEFAULT_CONNECTIONS, retry: dict | None = None, lock: str | None = None,
                 cache_limit=None, check_hashes: bool = False, metadata=None, **user):
        super().__init__(dataset, label, parameters, user, workers, progress, connections, retry, cache_limit,
                         metadata)
        self.check_hashes = bool(check_hashes)
        self.entry_name = f"{self.request.experiment}_{self.request.label}"
        if lock:
            from .lock import read_lock
            entries = read_lock(lock)["entries"]
            if self.entry_name not in entries:
                raise ValueError(f"lock={str(lock)!r} does not pin {self.entry_name}; it pins {sorted(entries)}")
            self.lock = entries[self.entry_name]

    def for_label(self, label: str) -> "WildenbergSource":
        """The same source (experiment, box, mips, cache, URLs, options) for another label channel
        (`psd`, `vesicle_cloud` or `saturated`); its lock, if any, is not carried over."""
        kwargs = {k: v for k, v in self._captured_init_kwargs.items() if k not in ("lock", "metadata")}
        return type(self)(**{**kwargs, "label": label})

    def _get_schema(self):
        plan = self.plan
        raw, labels = plan.arrays["raw"], plan.arrays[plan.label_name]
        cache = cache_for(plan)
        self._schema = Schema(
            dtype={"raw": raw.dtype, "labels": labels.dtype},
            shape=labels.shape,
            npartitions=1,
            extra_metadata={
                "experiment": self.request.experiment, "label": self.request.label,
                "label_kind": self.request.channel().kind,
                "dims": ("z", "y", "x"),
                "shapes": {"raw": raw.shape, "labels": labels.shape},
                "voxel_size_nm_zyx": {"raw": raw.layer.resolution_zyx, "labels": labels.layer.resolution_zyx},
                "bbox_nm": plan.bbox_nm, "requested_bbox_nm": self.request.bbox_nm,
                "estimated_bytes": raw.nbytes + labels.nbytes,
                "urls": {"raw": raw.layer.url, "labels": labels.layer.url},
                "store": str(cache.zarr_path),
                "cached": cache.is_complete("raw") and cache.is_complete(plan.label_name),
                "cache_state": cache_state(plan, ["raw", plan.label_name]),
            },
        )
        return self._schema

    def _load_metadata(self):
        if self._schema is None:
            self._schema = self._get_schema()
            self.dtype, self.shape, self.npartitions = self._schema.dtype, self._schema.shape, 1
            self.metadata = {**(self.metadata or {}), **self._schema.extra_metadata}

    @checked_keywords
    def materialise(self, client=None) -> str:
        """Fetch what is missing (raw and this label) into the cache; return the zarr store path.

        client: a dask.distributed Client (or scheduler address) to run the shard tasks on its
        workers; the cache folder must be on a filesystem they share.
        """
        path = materialise(self.plan, ["raw", self.plan.label_name], self.workers, self.progress,
                           self.connections, client, self.cache_limit)
        if self.lock is not None:
            from .lock import check_content
            check_content(self.entry_name, self.lock, self)
        self._schema = None  # `cached` in the metadata has changed
        return str(path)

    @checked_keywords
    def verify(self) -> dict:
        """Reread the cached store and report missing and corrupted shards by array and position
        (see `StoreCache.verify`); nothing is fetched."""
        cache = cache_for(self.plan)
        return cache.verify() if cache.zarr_path.exists() else {}

    @checked_keywords
    def repair(self) -> dict:
        """Refetch only the shards `verify` finds missing or corrupted; returns what was repaired."""
        cache = cache_for(self.plan)
        bad = {}
        for name, entry in self.verify().items():
            shards = entry["missing"] + entry["corrupt"]
            if shards:
                cache.invalidate(name, shards)
                bad[name] = shards
        names = [n for n in cache.arrays() if n in self.plan.arrays] if cache.zarr_path.exists() else None
        materialise(self.plan, names, self.workers, self.progress, self.connections)
        self._schema = None
        return bad

    @checked_keywords
    def arrays(self) -> dict:
        """{"raw": ..., "labels": ...}: the entry's arrays read through the cache (`store.lazy.ReadThroughArray`):
        numpy-style windows that fetch only the shards they touch."""
        plan = self.plan
        return {var: ReadThroughArray(plan, name, self.connections, self.cache_limit, check_hashes=self.check_hashes)
                for var, name in (("raw", "raw"), ("labels", plan.label_name))}

    @checked_keywords
    def to_dask(self):
        """The entry as an xarray Dataset of dask arrays whose chunks are the store's output shards.

        Returns at once for any box (info files only, no voxel request). Computing a part fetches
        only the shards it touches, writes them into the cache with their done records (the same
        shards a `materialise()` writes, which then skips them) and reads them from the cache."""
        return self._dataset({var: arr.to_dask() for var, arr in self.arrays().items()})

    @checked_keywords
    def read(self):
        """The entry loaded into memory as an xarray Dataset (refused if it would not fit), fetching
        only the shards not cached yet, `workers` at a time."""
        import dask
        self._load_metadata()
        need = self.metadata["estimated_bytes"]
        limit = _memory_bytes() // 2
        if need > limit:
            raise MemoryError(
                f"bbox_nm={list(self.request.bbox_nm)!r} selects {need / 2**30:.1f} GiB, more than half of this "
                f"machine's memory ({limit / 2**30:.1f} GiB). Use to_dask() for a lazy Dataset, or a smaller bbox_nm.")
        if self.lock is not None:  # the locked voxel checksums cover whole arrays: fetch and check them
            self.materialise()
        with dask.config.set(scheduler="threads", num_workers=self.workers):
            ds = self.to_dask().load()
        self._schema = None  # `cached` in the metadata has changed
        return ds

    def _dataset(self, arrays):
        import xarray as xr
        plan = self.plan
        variables, coords = {}, {}
        raw, labels = plan.arrays["raw"], plan.arrays[plan.label_name]
        for var, src in (("raw", raw), ("labels", labels)):
            # Raw at another mip than the labels keeps its own dims ("y_raw", ...) where grids differ.
            dims = tuple(d if var == "labels" or (raw.shape[a] == labels.shape[a] and raw.layer.resolution_zyx[a]
                                                  == labels.layer.resolution_zyx[a]) else f"{d}_raw"
                         for a, d in enumerate(("z", "y", "x")))
            for dim, n, res, origin in zip(dims, src.shape, src.layer.resolution_zyx, src.origin_nm_zyx):
                # Voxel centres, as xarray/CF users expect and OME-Zarr's translation places them.
                coords[dim] = xr.Variable(dim, origin + res * (np.arange(n) + 0.5),
                                          attrs={"units": "nm", "long_name": f"{dim[0]} (voxel centre)"})
            variables[var] = xr.Variable(dims, arrays[var], attrs={
                "source_url": src.layer.url, "mip": src.layer.mip,
                "resolution_nm_zyx": list(src.layer.resolution_zyx)})
        req = self.request
        return xr.Dataset(variables, coords=coords, attrs={
            "experiment": req.experiment, "label": req.label, "label_kind": req.channel().kind,
            "resolution_nm_zyx": list(labels.layer.resolution_zyx), "bbox_nm": list(plan.bbox_nm),
            "em_mip": req.em_mip, "seg_mip": req.seg_mip,
            "source_urls": [raw.layer.url, labels.layer.url], "citation": req.citation,
            "store": str(cache_for(plan).zarr_path)})


class SynapseTableSource(_StoreSource):
    """The per-synapse table of an experiment's box (definitions: `analysis.synapses`).

    The user parameters are the voxel entries' (bbox_nm, em_mip, seg_mip, cache_dir, base_url);
    `block_shape` sets the voxels (z, y, x) per task (default: the store's shards), `client` a
    dask.distributed Client or scheduler address to run the tasks on; `workers`, `connections`,
    `retry`, `cache_limit` and `progress` as for the voxel entries. The table is computed from the
    psd, vesicle_cloud and saturated arrays read through the cache (fetching what is missing) and
    cached as parquet beside the store, keyed by their voxel checksums and the definition version.
    """

    name = "wildenberg_synapses"
    container = "dataframe"

    def __init__(self, dataset: dict, parameters: dict | None = None, workers: int = DEFAULT_WORKERS,
                 progress: bool = True, connections: int = DEFAULT_CONNECTIONS, retry: dict | None = None,
                 cache_limit=None, block_shape=None, client=None, metadata=None, **user):
        super().__init__(dataset, "psd", parameters, user, workers, progress, connections, retry, cache_limit,
                         metadata)
        self.entry_name = f"{self.request.experiment}_synapses"
        from .analysis.synapses import check_block_shape
        self.block_shape = check_block_shape(block_shape)
        self.client = client

    @checked_keywords
    def table(self, client=None):
        """The `analysis.synapses.SynapseTable` of this entry's store (on `client`, else the entry's)."""
        from .analysis.synapses import SynapseTable
        return SynapseTable(self.plan, self.block_shape, self.workers, client or self.client, self.connections,
                            self.cache_limit, self.progress)

    def _get_schema(self):
        from .analysis.synapses import COLUMNS, DEFINITION_VERSION, box_volume_um3
        plan = self.plan
        psd = plan.arrays["labels/psd"]
        return Schema(dtype=None, shape=(None, len(COLUMNS)), npartitions=1, extra_metadata={
            "experiment": self.request.experiment, "columns": COLUMNS, "definition_version": DEFINITION_VERSION,
            "bbox_nm": plan.bbox_nm, "shape_zyx": psd.shape, "voxel_size_nm_zyx": psd.layer.resolution_zyx,
            "box_volume_um3": box_volume_um3(psd.shape, psd.layer.resolution_zyx),
            "store": str(cache_for(plan).root)})

    @checked_keywords
    def read(self):
        """The table as a pandas DataFrame (from the cache, or computed blockwise and cached)."""
        return self.table().read()

    @checked_keywords
    def materialise(self, client=None) -> str:
        """Compute and cache the table (fetching the label arrays it needs); return the parquet path."""
        table = self.table(client)
        table.read()
        key = table.key()
        if key is None:
            raise RuntimeError(f"the table of {self.entry_name} was computed but not cached: cache_limit "
                               f"evicted shards of its arrays before they were all recorded")
        return str(table.path(key))

    @checked_keywords
    def to_dask(self):
        """The table as a dask DataFrame of one partition; nothing is read or computed until it is."""
        import dask
        import dask.dataframe as dd
        import pandas as pd
        from .analysis.synapses import COLUMNS
        meta = pd.DataFrame({c: pd.Series(dtype="string" if c == "experiment" else "bool" if c == "touches_box_edge"
                                          else "float64" if c.endswith(("_nm", "_um3")) else "int64")
                             for c in COLUMNS})
        return dd.from_delayed([dask.delayed(self.read)()], meta=meta)
