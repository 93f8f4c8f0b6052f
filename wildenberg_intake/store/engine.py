"""Materialisation engine: fill a store's arrays shard by shard, each source chunk fetched once, resumably.

- One task owns one output shard: it gathers the source chunks the shard needs, writes the whole
  shard (zarr rewrites a shard on any partial write, so two writers in one shard would lose data)
  and only then records it done. Work already recorded is skipped, so a killed run resumes where
  it stopped and ends with exactly the bytes of an uninterrupted one.
- Each source chunk is fetched once. The output shards rarely line up with the source chunks, so
  a chunk is often needed by two to eight shards: such a shared chunk is staged on disk
  (`staging/` in the store's folder, as it came over the wire) by whichever task fetches it first
  and deleted once every shard that needs it is recorded. Staged files are renamed into place
  whole, so they too survive a kill; a staged chunk is never fetched again.
- Requests in flight (`connections`, one pool per process) are independent of the shard tasks
  (`workers`, CPU-bound: compression releases the GIL). A task sends all its shard's requests at
  once; I/O threads decode and place chunks as they arrive, at most a few inflated at a time (the
  gate), so memory is bounded by the tasks in flight, not by the latency or the volume. A shard
  larger than SLAB_BYTES (uint32: 128 MB) is assembled and encoded one 64-slice z-slab at a time.
- The same tasks run on a dask.distributed cluster (`client=`) over a shared filesystem.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
import uuid
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cache import (CHUNKS, SHARDS, StoreCache, array_path, assemble_shard, durable_write, encode_chunks, make_dirs, ome_multiscale,
                    shard_box, shard_grid)
from ..source.layers import Layer, LayerError, place
from .plan import ArraySource, StorePlan
from ..source.transfer import NO_GATE, Cancelled, TooLarge, inflate

DEFAULT_WORKERS = max(2, os.cpu_count() or 2)
DEFAULT_CONNECTIONS = 16
LOCK_STALE_SECONDS = 600  # a lock older than this, or whose process is gone, is taken over
# Inflated chunk bytes held at once per array by the I/O threads, however many requests are in
# flight: 8 uint8 or 2 uint32 chunks of 512 x 512 x 16 (64 MB measured no faster, ~30 MB more).
BODY_BYTES = 32 * 2**20
# Largest shard assembled whole: a uint8 shard (32 MB) is; a uint32 shard (128 MB) is assembled and
# encoded one 64-slice slab at a time (two tasks holding whole uint32 shards peaked above 600 MB).
SLAB_BYTES = 64 * 2**20


def ome_levels(plan: StorePlan, name: str) -> list:
    """(path within its image group, voxel size, lower corner of voxel 0) of each level of `name`."""
    out = []
    for level_name in plan.with_levels([name]):
        src = plan.source(level_name)
        path = array_path(level_name)
        resolution = src.layer.resolution_zyx if level_name == name else src.resolution_zyx
        out.append((path.rsplit("/", 1)[-1], resolution, src.origin_nm_zyx))
    return out


def writer_for(plan: StorePlan, name: str, connections: int = 16):
    """The task that writes array `name`'s shards: fetched (`ShardWriter`) or a pyramid level (`LevelWriter`)."""
    if "@" in name:
        from .pyramid import LevelWriter
        return LevelWriter(plan, name, connections)
    return ShardWriter(plan, name, connections)


def store_attributes(plan: StorePlan) -> dict:
    """Root attributes of a store: what it is and where it came from."""
    req = plan.request
    return {"ome": {"version": "0.5", "multiscales": [ome_multiscale("raw", ome_levels(plan, "raw"))]},
            "experiment": req.experiment, "bossdb_experiment": req.bossdb_experiment,
            "bbox_nm": list(plan.bbox_nm), "em_mip": req.em_mip, "seg_mip": req.seg_mip,
            "em_url": req.em_url, "citation": req.citation, "wildenberg_intake_store": plan.name}


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
    return {**out, "resolution_nm_zyx": list(res), "origin_nm_zyx": list(src.origin_nm_zyx),
            "voxel_0_centre_nm_zyx": [o + r / 2 for o, r in zip(src.origin_nm_zyx, res)]}


def cache_for(plan: StorePlan) -> StoreCache:
    return StoreCache(plan.request.cache_dir, plan.name)


# -- locks that a killed process cannot leave behind for ever --------------------------------------

def _try_lock(path: Path) -> bool:
    """Create lock file `path` exclusively; take it over if its holder is gone or it is stale."""
    me = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _stale(path: Path) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
        host, pid, _ = path.read_text().split()
    except FileNotFoundError:
        return True  # vanished
    except ValueError:  # being written right now, or written only in part by a killed process
        return age > 10
    if age > LOCK_STALE_SECONDS:
        return True
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


@contextlib.contextmanager
def owning(cache: StoreCache, name: str, index):
    """Own shard `index` of array `name` while writing it: its lock, waited for while another task or
    process holds it (a killed holder's lock is taken over). Yields whether it still needs writing
    (False once another has recorded it)."""
    lock = cache.progress / name / (".".join(map(str, index)) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while not _try_lock(lock):
        if cache.is_done(name, index):
            yield False
            return
        time.sleep(0.05)
    try:
        yield not cache.is_done(name, index)
    finally:
        lock.unlink(missing_ok=True)


# -- staged chunks --------------------------------------------------------------------------------

class ChunkStage:
    """Source chunks that several shards need: fetched once, kept on disk until all are written.

    A chunk is kept as it came over the wire: its gzip stream where the server compressed it (a
    uint32 label chunk is 16 MB inflated and a few hundred kB compressed; writing it inflated cost
    more CPU than the whole HTTP layer), its bytes otherwise, a marker for a chunk the server
    does not have."""

    MISSING = b"\x00wildenberg-intake:404\x00"  # a chunk the server does not have (read as zeros)

    def __init__(self, folder: Path, layer: Layer):
        self.folder = folder
        self.layer = layer

    def _path(self, grid, gzipped: bool = False) -> Path:
        return self.folder / (".".join(str(g) for g in grid) + (".gz" if gzipped else ""))

    def _read(self, grid, gate):
        """(True, decoded chunk or None for a missing one) if staged, else (False, None). `gate` is
        held on return when an array is returned. A staged file that no longer decodes (damaged
        on disk) is deleted, so that the chunk is fetched again."""
        for gzipped in (False, True):
            path = self._path(grid, gzipped)
            if not path.exists():
                continue
            gate.acquire()
            try:
                data = path.read_bytes()
                data = inflate(data, self.layer.info.chunk_bytes(grid)) if gzipped \
                    else None if data == self.MISSING else data
                decoded = None if data is None else self.layer.decode_chunk(grid, data)
            except FileNotFoundError:  # released meanwhile: fetched again below
                gate.release()
                continue
            except (LayerError, TooLarge, zlib.error, ValueError):
                gate.release()
                path.unlink(missing_ok=True)
                return False, None
            except BaseException:
                gate.release()
                raise
            if decoded is None:
                gate.release()
            return True, decoded
        return False, None

    def get(self, grid, gate=NO_GATE, token=None):
        """The decoded chunk ((z, y, x) array; None: the server lacks it), fetched by whichever task
        asks first. Nothing is staged before it decodes to the chunk's shape and dtype.

        gate: see `Fetcher.get_with_wire`: held on return when an array is returned."""
        plain = self._path(grid)
        lock = plain.with_name(plain.name + ".lock")
        while True:
            staged, decoded = self._read(grid, gate)
            if staged:
                return decoded
            make_dirs(self.folder)
            if _try_lock(lock):
                try:
                    staged, decoded = self._read(grid, gate)
                    if staged:
                        return decoded
                    data, wire = self.layer.fetch_chunk_with_wire(grid, gate, token)
                    try:
                        decoded = None if data is None else self.layer.decode_chunk(grid, data)
                        if wire is not None and len(wire) * 4 > len(data):
                            wire = None  # compressed less than 4x: re-inflating costs more than writing it whole
                        path = self._path(grid, gzipped=wire is not None)
                        durable_write(path, self.MISSING if data is None else data if wire is None else wire)
                    except BaseException:
                        if data is not None:
                            gate.release()
                        raise
                    return decoded
                finally:
                    lock.unlink(missing_ok=True)
            time.sleep(0.01)  # another task is fetching it

    def release(self, grid):
        for gzipped in (False, True):
            self._path(grid, gzipped).unlink(missing_ok=True)


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc's
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_LIBC = _libc()
# glibc's malloc: blocks above its mmap threshold are mapped afresh at every allocation, and free
# heap above its trim threshold is handed back at every free; both cost page faults on the next
# allocation. A fetch allocates and frees inflated chunks (4-16 MB), Blosc/zstd workspaces and
# encoded chunks all the time: with both thresholds at 64 MB it measured 8-15% faster at the same
# peak memory for uint32 labels (README). Set by every shard writer, unless the user set them.
MALLOC_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc(libc=None) -> bool:
    """Set glibc's mmap and trim thresholds to MALLOC_THRESHOLD for this process; returns whether it did.

    Not done where the environment sets glibc's malloc itself (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), nor with WILDENBERG_INTAKE_TUNE_MALLOC=0."""
    libc = libc or _LIBC
    if libc is None or os.environ.get("WILDENBERG_INTAKE_TUNE_MALLOC", "1") == "0" \
            or any(name in os.environ for name in _MALLOC_ENV):
        return False
    # A few calls per run: cheaper than a flag. The trim threshold alone (which also stops glibc
    # from raising its mmap threshold itself) measured 2x slower: set only if glibc took the first.
    if not libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD))


def _trim():
    """Hand memory freed by a finished shard back to the OS (glibc keeps it in per-thread arenas)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_THREAD = threading.local()
_PROCESS_POOLS: dict = {}  # connections -> request pool of a process whose tasks come one by one (dask)
_PROCESS_POOLS_LOCK = threading.Lock()


def _after_fork():
    """A forked child (a torch loader worker) has none of its parent's threads: its request pools
    would take work and never run it, and a lock a parent thread held would never be released."""
    global _PROCESS_POOLS_LOCK
    _PROCESS_POOLS.clear()
    _PROCESS_POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _shard_buffer(shape, dtype, zeroed: bool) -> np.ndarray:
    """A C-contiguous array in this thread's shard buffer (grown to the largest shard it has held),
    zeroed if asked. Reusing one buffer per task thread keeps freed 32-128 MB shards from being left
    behind in malloc arenas (peak memory measured ~1.4x higher with a fresh array per shard)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = getattr(_THREAD, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        _THREAD.buffer = None  # let the smaller one go before allocating the larger
        _THREAD.buffer = buffer = np.empty(nbytes, dtype=np.uint8)
    out = buffer[:nbytes].view(dtype).reshape(shape)
    if zeroed:
        out.fill(0)
    return out


def _voxels_covered(info, grids, start, stop) -> int:
    """Voxels of the box [start, stop) that the (disjoint) chunks `grids` cover."""
    total = 0
    for grid in grids:
        lo, hi = info.chunk_box(grid)
        total += int(np.prod(np.clip(np.minimum(hi, stop) - np.maximum(lo, start), 0, None)))
    return total


# -- one shard --------------------------------------------------------------------------------------

class ShardWriter:
    """Everything one array's shard tasks need; picklable, so dask workers can run `write`."""

    def __init__(self, plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS):
        self.plan, self.name, self.connections = plan, name, connections
        self.src = plan.arrays[name]
        self._io, self._io_pid = None, os.getpid()
        # Chunks of this array held inflated at once by the I/O threads (BODY_BYTES of them).
        chunk_bytes = int(np.prod(self.src.layer.chunk_zyx)) * np.dtype(self.src.dtype).itemsize
        self._gate = threading.BoundedSemaphore(max(2, BODY_BYTES // chunk_bytes))
        tune_malloc()  # here, so that a dask worker's process is tuned too

    def __getstate__(self):
        return {"plan": self.plan, "name": self.name, "connections": self.connections}

    def __setstate__(self, state):
        self.__init__(state["plan"], state["name"], state["connections"])

    @property
    def cache(self) -> StoreCache:
        return cache_for(self.plan)

    @property
    def layer(self) -> Layer:
        return self.plan.layers[self.name]

    @property
    def stage(self) -> ChunkStage:
        return ChunkStage(self.cache.root / "staging" / self.name, self.layer)

    def io(self) -> cf.ThreadPoolExecutor:
        """The request pool: the run's (set by `materialise`), else this process's for `connections`
        (a dask worker unpickles a writer per task; a pool per task would multiply the connections)."""
        if self._io is None or self._io_pid != os.getpid():  # a pool made before a fork has no threads here
            self._io_pid = os.getpid()
            self._io = None
            with _PROCESS_POOLS_LOCK:
                if self.connections not in _PROCESS_POOLS:
                    _PROCESS_POOLS[self.connections] = cf.ThreadPoolExecutor(
                        self.connections, thread_name_prefix="wildenberg-io")
                self._io = _PROCESS_POOLS[self.connections]
        return self._io

    def finish(self):
        """Mark the array complete (every shard recorded), and warn where every source chunk of
        the box answered 404: empty data is legal, but usually a wrong base_url or box."""
        cache, src = self.cache, self.src
        missing = finish_array(cache, src.name, src.shape)
        chunks = self.layer.info.chunks_in(src.start_zyx, np.add(src.start_zyx, src.shape))
        if chunks and len(missing) >= len(chunks):
            warnings.warn(f"every source chunk of {self.layer.url} in the box answered 404: array {src.name} of "
                          f"{cache.root} is all zeros. Empty data is legal, but check base_url and bbox_nm.",
                          UserWarning, stacklevel=2)

    def shards_of_chunk(self, grid) -> list[tuple]:
        """Output shards that need source chunk `grid`."""
        start, stop = self.layer.info.chunk_box(grid)
        lo = [max(a - s, 0) // sh for a, s, sh in zip(start, self.src.start_zyx, SHARDS)]
        hi = [(min(b - s, n) - 1) // sh for b, s, n, sh in zip(stop, self.src.start_zyx, self.src.shape, SHARDS)]
        return [(i, j, k) for i in range(lo[0], hi[0] + 1) for j in range(lo[1], hi[1] + 1)
                for k in range(lo[2], hi[2] + 1)]

    def _load(self, shared: bool, grid, out, out_start, token=None) -> bool:
        """In an I/O thread: get chunk `grid` (from the stage if `shared`, else from the layer), decode
        it and copy it into `out`. Returns whether the server lacks the chunk."""
        layer = self.layer
        if shared:
            decoded = self.stage.get(grid, self._gate, token)  # decoded (validated) before it was staged
        else:
            data = layer.fetch_chunk(grid, self._gate, token)
            try:
                decoded = None if data is None else layer.decode_chunk(grid, data)
            except BaseException:
                if data is not None:
                    self._gate.release()
                raise
        try:
            place(out, out_start, layer.info.chunk_box(grid)[0],
                  decoded if decoded is not None else layer.decode_chunk(grid, None))
        finally:
            if decoded is not None:
                self._gate.release()
        if decoded is None:
            return True
        if decoded.nbytes >= 8 * 2**20:
            del decoded
            _trim()
        return False

    def write(self, index) -> int:
        """Fetch, assemble and write output shard `index`, then record it. Returns bytes written."""
        cache, layer, src = self.cache, self.layer, self.src
        with owning(cache, self.name, index) as needed:
            if not needed:
                return 0
            start, stop = shard_box(index, src.shape)
            g_start, g_stop = np.add(src.start_zyx, start), np.add(src.start_zyx, stop)
            shape = tuple(b - a for a, b in zip(start, stop))
            slabs = _slabs(shape, np.dtype(src.dtype).itemsize)
            # A chunk that other shards, or another slab of this one, need too comes through the
            # stage (fetched once, then read back from disk: the page cache, while it is in use).
            cuts = [g_start[0] + z0 for z0, _ in slabs[1:]]
            shared = [grid for grid in layer.info.chunks_in(g_start, g_stop)
                      if len(self.shards_of_chunk(grid)) > 1 or _spans(layer.info.chunk_box(grid), cuts)]
            missing, encoded, digest = set(), {}, hashlib.sha256()
            for slab in slabs:
                missing |= self._assemble(slab, g_start, g_stop, shared, encoded, digest)
            try:
                written = cache.write_shard(self.name, index, assemble_shard(encoded))
                # Recorded only after the shard's bytes are in place.
                cache.mark_done(self.name, index, written, digest.hexdigest(), missing)
            except OSError as e:
                raise OSError(e.errno, f"writing shard {index} of {self.name} under {cache.root} failed: "
                                       f"{e.strerror or e}. The store is incomplete; free space or fix the "
                                       "folder and run again to resume.") from e
        for grid in shared:  # a few record look-ups, not a listing of every record
            if all(cache.is_done(self.name, s) for s in self.shards_of_chunk(grid)):
                self.stage.release(grid)
        _trim()
        return int(np.prod(shape)) * np.dtype(src.dtype).itemsize

    def _assemble(self, slab, g_start, g_stop, shared, encoded: dict, digest) -> set:
        """Fetch, decode and place the chunks of z-slab `slab` of a shard, then encode its inner chunks
        into `encoded` and its voxels into `digest`. Returns the names of the chunks the server lacks."""
        layer, src = self.layer, self.src
        z0, z1 = slab
        s_start = (g_start[0] + z0, g_start[1], g_start[2])
        s_stop = (g_start[0] + z1, g_stop[1], g_stop[2])
        grids = layer.info.chunks_in(s_start, s_stop)
        shape = tuple(b - a for a, b in zip(s_start, s_stop))
        # Every voxel is overwritten by its chunk (a missing chunk places zeros), so the buffer is
        # zeroed only if the chunks do not tile the slab: no stale voxels of the previous one.
        out = _shard_buffer(shape, src.dtype, zeroed=_voxels_covered(layer.info, grids, s_start, s_stop)
                            != int(np.prod(shape)))
        # Every request of the slab goes out at once; each I/O thread decodes and places its own
        # chunk, holding the inflated bytes under the gate, so latency is hidden by as many
        # requests as there are connections while only a few chunks are in memory.
        token = threading.Event()  # set when this slab fails: its other requests are cut
        futures = {self.io().submit(self._load, grid in shared, grid, out, s_start, token): grid for grid in grids}
        missing = set()
        try:
            for future in cf.as_completed(futures):
                if future.result():
                    missing.add(layer.chunk_name(futures[future]))
        except BaseException:
            for future in futures:  # none may write into this thread's buffer after we leave
                future.cancel()
            # Cut this slab's other requests rather than wait for their deadlines and retries (the
            # run's other tasks are stopped by the run, see `run_threads`).
            token.set()
            cf.wait(futures)
            raise
        encoded.update(encode_chunks(out, src.codec, src.is_label, first=(z0 // CHUNKS[0], 0, 0)))
        digest.update(out)  # slabs split the shard along z: in order they are its C-order bytes
        return missing


def _spans(box, cuts) -> bool:
    """Whether chunk `box` ((start, stop) voxels, z first) lies on both sides of a z cut."""
    (z0, _, _), (z1, _, _) = box
    return any(z0 < cut < z1 for cut in cuts)


def _slabs(shape, itemsize: int) -> list:
    """z ranges in which a shard is assembled: whole if it fits SLAB_BYTES, else one inner-chunk row
    (64 z-slices) at a time, so a 128 MB uint32 shard needs a 64 MB buffer."""
    depth = shape[0] if int(np.prod(shape)) * itemsize <= SLAB_BYTES else CHUNKS[0]
    return [(z, min(z + depth, shape[0])) for z in range(0, shape[0], depth)]


def _write_on_worker(writer: ShardWriter, index) -> int:
    return writer.write(index)


# -- the whole store --------------------------------------------------------------------------------

def materialise(plan: StorePlan, names=None, workers: int = DEFAULT_WORKERS, progress: bool = True,
                connections: int = DEFAULT_CONNECTIONS, client=None, cache_limit: int | None = None) -> Path:
    """Make arrays `names` (default: raw and the request's label) complete in the store; return its path.

    Arrays already complete are not touched; shards already recorded are not fetched again.
    workers: shard tasks at once (CPU-bound); connections: chunk requests in flight per process.
    client: a dask.distributed Client or scheduler address: run the shard tasks on its workers
        (the cache folder must be on a filesystem they share).
    cache_limit: bytes the store may use on disk; a materialisation that cannot fit is refused up front.
    """
    for pname, value in (("workers", workers), ("connections", connections)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{pname}={value!r} is not valid; allowed: a positive integer")
    names = list(names) if names is not None else ["raw", plan.label_name]
    for name in names:
        if name not in plan.arrays:
            raise ValueError(f"array {name!r} is unknown; allowed: {sorted(plan.arrays)}")
    names = plan.with_levels(names)  # and their pyramids, made from them
    cache = prepare(plan, names)
    if all(cache.is_complete(n) for n in names):
        return cache.zarr_path  # nothing to write: works on a read-only cache too
    if cache_limit is not None:
        _check_fits(cache, plan, names, cache_limit)
    writers = [writer_for(plan, name, connections) for name in names if not cache.is_complete(name)]
    _fill_arrays(cache, writers, workers, progress, client)
    return cache.zarr_path


def prepare(plan: StorePlan, names) -> StoreCache:
    """Create the store's folder, root group and the metadata of arrays `names` (no voxels, no
    requests); arrays already complete are left alone, so a complete store may be read-only."""
    cache = cache_for(plan)
    if all(cache.is_complete(n) for n in names):
        return cache
    names = [n for name in names for n in _with_lower_levels(name)]  # a level is made from those below
    try:
        cache.initialise(plan.key(), store_attributes(plan))
        for name in names:
            src = plan.source(name)
            if not cache.is_complete(name):
                ome = ome_multiscale(name, ome_levels(plan, name)) if "@" not in name else None
                cache.ensure_array(name, src.shape, src.dtype, src.is_label, array_attributes(src), src.codec, ome)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the cache folder {cache.root}: {e.strerror or e}") from e
    return cache


def _with_lower_levels(name: str) -> list[str]:
    base, _, level = name.partition("@")
    return [base] + [f"{base}@{k}" for k in range(1, int(level or 0) + 1)]


def finish_array(cache: StoreCache, name: str, shape) -> list:
    """Mark array `name` complete (every shard is recorded) and drop its staged chunks; returns the
    source chunks recorded as answered 404."""
    missing = cache.mark_complete(name, shape)
    shutil.rmtree(cache.root / "staging" / name, ignore_errors=True)
    return missing


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


def _order(shards) -> list:
    # z fastest: a chunk shared across a z boundary is released one task later.
    return sorted(shards, key=lambda s: (s[1], s[2], s[0]))


def _fill_arrays(cache: StoreCache, writers: list, workers: int, progress: bool, client):
    """Write every missing shard of the writers' arrays as one queue of tasks (the next array's
    shards start while the last of the previous one finish), marking each array complete when its
    last shard is recorded."""
    jobs, left, total, bars = [], {}, {}, {}
    for position, writer in enumerate(writers):
        src = writer.src
        shards = shard_grid(src.shape)
        todo = _order(set(shards) - cache.done_shards(src.name))
        jobs += [(writer, index) for index in todo]
        left[src.name], total[src.name] = len(todo), len(shards)
        bars[src.name] = tqdm(total=src.nbytes, initial=src.nbytes - sum(_box_bytes(i, src) for i in todo),
                              unit="B", unit_scale=True, disable=not progress, position=position,
                              desc=f"{writer.plan.request.experiment} {src.name}")
        bars[src.name].set_postfix_str(f"{len(shards) - len(todo)}/{len(shards)} shards")

    def complete(writer: ShardWriter):
        writer.finish()

    def finished(writer: ShardWriter, index):
        src = writer.src
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
            try:
                run_threads(_write_on_worker, jobs, workers, lambda job, _: finished(*job),
                            cancel=lambda: [f.cancel() for f in fetchers])
            finally:
                for f in fetchers:  # the plan (and its fetcher) may be used again: a rerun, repair()
                    f.cancelled.clear()
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


def run_threads(task, jobs, workers: int, finished, cancel=lambda: None):
    """`task(*job)` for each job on `workers` threads, `finished(job, result)` as each completes.
    On the first failure `cancel()` stops the requests in flight and the waits for retries, so the
    run ends promptly with that failure (not with a task cancelled because of it)."""
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wildenberg")
    pending = {}
    queue = iter(jobs)
    try:
        while True:
            # Bounded submission keeps memory proportional to the workers, not to the volume.
            for job in queue:
                pending[pool.submit(task, *job)] = job
                if len(pending) >= workers + 1:
                    break
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                result = future.result()  # re-raises a task's error
                finished(pending.pop(future), result)
    except BaseException as first:
        for future in pending:
            future.cancel()
        cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        causes = [f.exception() for f in pending if not f.cancelled() and f.exception() is not None]
        root = next((e for e in [first, *causes] if not isinstance(e, Cancelled)), first)
        raise root
    pool.shutdown(wait=True)


def run_on_dask(client, task, jobs, finished):
    """`task(*job)` for each job on a dask.distributed cluster (a Client or a scheduler address),
    `finished(job, result)` as each completes; the rest are cancelled on the first failure."""
    from dask.distributed import Client, as_completed
    if isinstance(client, str):
        client = Client(client)
    futures = {client.submit(task, *job, pure=False, priority=-n): job for n, job in enumerate(jobs)}
    try:
        for future in as_completed(futures):
            finished(futures[future], future.result())
    except BaseException:
        client.cancel(list(futures))
        raise


def _box_bytes(index, src: ArraySource) -> int:
    start, stop = shard_box(index, src.shape)
    return int(np.prod([b - a for a, b in zip(start, stop)])) * np.dtype(src.dtype).itemsize
