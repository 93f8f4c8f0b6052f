"""Fetched shards: one task writes one output shard of a fetched array (level 0), each source chunk fetched once.

- One task owns one output shard: it gathers the source chunks the shard needs, writes the whole
  shard (zarr rewrites a shard on any partial write, so two writers in one shard would lose data)
  and only then records it done. Work already recorded is skipped, so a killed run resumes where
  it stopped and ends with exactly the bytes of an uninterrupted one.
- Each source chunk is fetched once: a chunk that several shards need is staged on disk
  (`staging.ChunkStage`) by whichever task fetches it first and deleted once every shard that
  needs it is recorded.
- The pyramid is made on transfer: while a shard's voxels are in memory, the task also makes its
  quarter of the next level's shard (`downsample.quarter_chunks`) and stages it
  (`staging.QuarterStage`) before recording the shard; `pyramid.LevelWriter` assembles levels
  from those quarters.
- Requests in flight (`connections`, one pool per process) are independent of the shard tasks
  (`workers`, CPU-bound: compression releases the GIL). A task sends all its shard's requests at
  once; I/O threads decode and place chunks as they arrive, at most a few inflated at a time (the
  gate), so memory is bounded by the tasks in flight, not by the latency or the volume. A shard
  larger than SLAB_BYTES (uint32: 128 MB) is assembled and encoded one 64-slice z-slab at a time.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import threading
import warnings

import numpy as np

from .format import CHUNKS, ContentDigest, SHARDS, assemble_shard, encode_chunks
from .layout import shard_box
from .cache import StoreCache
from .downsample import quarter_chunks, warm_up
from .foreground import ShardCounts
from .plan import StorePlan, pyramid_levels
from .staging import ChunkStage, QuarterStage
from ..source.layers import Layer, place

DEFAULT_CONNECTIONS = 16
# Inflated chunk bytes held at once per array by the I/O threads, however many requests are in
# flight: 8 uint8 or 2 uint32 chunks of 512 x 512 x 16 (64 MB measured no faster, ~30 MB more).
BODY_BYTES = 32 * 2**20
# Largest shard assembled whole: a uint8 shard (32 MB) is; a uint32 shard (128 MB) is assembled and
# encoded one 64-slice slab at a time (two tasks holding whole uint32 shards peaked above 600 MB).
SLAB_BYTES = 64 * 2**20


def cache_for(plan: StorePlan) -> StoreCache:
    """The cache folder of the store `plan` describes: named by what the source serves, so a
    restarted server (new port or token) or another route to the same data finds it."""
    return StoreCache(plan.request.cache_dir, plan.name)


def finish_array(cache: StoreCache, name: str, shape) -> list:
    """Mark array `name` complete (every shard is recorded) and drop its staged chunks and the
    quarters staged for it; returns the source chunks recorded as answered 404."""
    missing = cache.mark_complete(name, shape)
    for folder in (cache.root / "staging" / name, QuarterStage(cache.root, name).folder):
        shutil.rmtree(folder, ignore_errors=True)
        cache.ledger.remove_under(str(folder.relative_to(cache.root)))
    return missing


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
# peak memory for uint32 labels (README). Set by the command line, which owns its process; opt-in
# elsewhere (WILDENBERG_INTAKE_TUNE_MALLOC=1).
MALLOC_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc(libc=None, owned: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds to MALLOC_THRESHOLD for this process; returns whether it did.

    The thresholds are the whole process's, not only the package's threads': set where the package
    owns the process (`owned`: the command line, a dask worker's task), or where a user asks with
    WILDENBERG_INTAKE_TUNE_MALLOC=1; never with WILDENBERG_INTAKE_TUNE_MALLOC=0, nor where the
    environment sets glibc's malloc itself (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES)."""
    libc = libc or _LIBC
    wanted = os.environ.get("WILDENBERG_INTAKE_TUNE_MALLOC", "1" if owned else "0") == "1"
    if libc is None or not wanted or any(name in os.environ for name in _MALLOC_ENV):
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


def shard_buffer(shape, dtype, zeroed: bool) -> np.ndarray:
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


class ShardTask:
    """What the writers of a store's shards share: picklable by their constructor's arguments
    (dask workers and loader workers rebuild them, with connections and locks of their own)."""

    plan: StorePlan
    name: str
    connections: int
    stage_quarters: bool

    def __getstate__(self):
        return {"plan": self.plan, "name": self.name, "connections": self.connections,
                "stage_quarters": self.stage_quarters}

    def __setstate__(self, state):
        self.__init__(**state)


class ShardWriter(ShardTask):
    """Everything one array's shard tasks need; picklable, so dask workers can run `write`."""

    def __init__(self, plan: StorePlan, name: str, connections: int = DEFAULT_CONNECTIONS,
                 stage_quarters: bool = False):
        self.plan, self.name, self.connections = plan, name, connections
        self.src = plan.arrays[name]
        # Make and stage each shard's quarter of pyramid level 1 while its voxels are in memory.
        self.stage_quarters = stage_quarters and pyramid_levels(self.src.shape) >= 1
        self.level_codec = plan.source(f"{name}@1").codec if self.stage_quarters else None
        if self.stage_quarters:
            warm_up(int(np.prod(self.src.shape)))
        # Whether source chunks that other shards need too are staged for them (fetched once). Under a
        # disk budget (lazy reads with cache_limit) they are not: they would pile up beyond it while a
        # shard is written, and the shards that need them may never be read; they are fetched again.
        self.stage_shared = True
        self._io, self._io_pid = None, os.getpid()
        # Chunks of this array held inflated at once by the I/O threads (BODY_BYTES of them).
        chunk_bytes = int(np.prod(self.src.layer.chunk_zyx)) * np.dtype(self.src.dtype).itemsize
        self._gate_size = max(2, BODY_BYTES // chunk_bytes)
        self._gate, self._gate_pid = threading.BoundedSemaphore(self._gate_size), os.getpid()
        tune_malloc()  # only if asked for (WILDENBERG_INTAKE_TUNE_MALLOC=1): the process is the user's

    @property
    def cache(self) -> StoreCache:
        return cache_for(self.plan)

    @property
    def layer(self) -> Layer:
        return self.plan.layers[self.name]

    @property
    def stage(self) -> ChunkStage:
        return ChunkStage(self.cache.root / "staging" / self.name, self.layer, self.cache.ledger)

    @property
    def gate(self) -> threading.BoundedSemaphore:
        """The semaphore bounding inflated chunks in memory; made anew in a forked child (a torch
        loader worker), where permits held by the parent's I/O threads would never come back."""
        if self._gate_pid != os.getpid():
            self._gate, self._gate_pid = threading.BoundedSemaphore(self._gate_size), os.getpid()
        return self._gate

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
            decoded = self.stage.get(grid, self.gate, token)  # decoded (validated) before it was staged
        else:
            data = layer.fetch_chunk(grid, self.gate, token)
            try:
                decoded = None if data is None else layer.decode_chunk(grid, data)
            except BaseException:
                if data is not None:
                    self.gate.release()
                raise
        try:
            place(out, out_start, layer.info.chunk_box(grid)[0],
                  decoded if decoded is not None else layer.decode_chunk(grid, None))
        finally:
            if decoded is not None:
                self.gate.release()
        if decoded is None:
            return True
        if decoded.nbytes >= 8 * 2**20:
            del decoded
            _trim()
        return False

    def write(self, index) -> int:
        """Fetch, assemble and write output shard `index`, then record it. Returns bytes written."""
        cache, layer, src = self.cache, self.layer, self.src
        with cache.own_shard(self.name, index, self.layer.fetcher.cancelled.is_set) as needed:
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
                      if (self.stage_shared and len(self.shards_of_chunk(grid)) > 1)
                      or _spans(layer.info.chunk_box(grid), cuts)]
            missing, encoded, digest = set(), {}, ContentDigest()
            quarter = {} if self.stage_quarters else None
            counts = ShardCounts(shape) if src.is_label else None  # the foreground index, on the way
            for slab in slabs:
                missing |= self._assemble(index, slab, g_start, g_stop, shared, encoded, digest, quarter, counts)
            try:
                if quarter is not None:  # staged before the shard is recorded: a recorded shard's quarter exists
                    QuarterStage(cache.root, f"{self.name}@1").put(index, quarter)
                cache.write_shard(self.name, index, assemble_shard(encoded))
                # Recorded only after the shard's bytes are in place.
                cache.mark_done(self.name, index, digest.hexdigest(), missing,
                                foreground=counts.record() if counts is not None else None)
            except OSError as e:
                raise OSError(e.errno, f"writing shard {index} of {self.name} under {cache.root} failed: "
                                       f"{e.strerror or e}. The store is incomplete; free space or fix the "
                                       "folder and run again to resume.") from e
        for grid in shared:  # a few record look-ups, not a listing of every record
            if not self.stage_shared or all(cache.is_done(self.name, s) for s in self.shards_of_chunk(grid)):
                self.stage.release(grid)
        _trim()
        return int(np.prod(shape)) * np.dtype(src.dtype).itemsize

    def _assemble(self, index, slab, g_start, g_stop, shared, encoded: dict, digest, quarter: dict | None,
                  counts: ShardCounts | None = None) -> set:
        """Fetch, decode and place the chunks of z-slab `slab` of shard `index`, then encode its inner
        chunks into `encoded`, its voxels into `digest` and, unless `quarter` is None, its quarter of
        the next level into `quarter`, and count its foreground into `counts` (labels). Returns the
        names of the chunks the server lacks."""
        layer, src = self.layer, self.src
        z0, z1 = slab
        s_start = (g_start[0] + z0, g_start[1], g_start[2])
        s_stop = (g_start[0] + z1, g_stop[1], g_stop[2])
        grids = layer.info.chunks_in(s_start, s_stop)
        shape = tuple(b - a for a, b in zip(s_start, s_stop))
        # Every voxel is overwritten by its chunk (a missing chunk places zeros), so the buffer is
        # zeroed only if the chunks do not tile the slab: no stale voxels of the previous one.
        out = shard_buffer(shape, src.dtype, zeroed=_voxels_covered(layer.info, grids, s_start, s_stop)
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
        # Where every chunk is absent the slab is zeros, with no chunk to store at any level.
        zeros = len(missing) == len(grids)
        digest.update(out, zeros)  # slabs split the shard along z: in order they are its C-order bytes
        if not zeros:
            if counts is not None:
                counts.add(out, z0)
            encoded.update(encode_chunks(out, src.codec, src.is_label, first=(z0 // CHUNKS[0], 0, 0)))
            if quarter is not None:
                quarter.update(quarter_chunks(out, index, z0 // CHUNKS[0], src.is_label, self.level_codec))
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
