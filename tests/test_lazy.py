"""Lazy, read-through access: to_dask() fetches nothing until computed, then only the shards it
touches; those are the shards a materialisation writes, so lazy reads and a later materialise()
fetch each source chunk once and end with the bytes of an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wildenberg_intake.store.format import SHARDS
from wildenberg_intake.store.layout import shard_box
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.store.liveness import close_lock_fd
from wildenberg_intake.store.lazy import parse_size, shards_touching
from wildenberg_intake.mirror import MirrorServer

from conftest import all_layers, expected_window

EM = "em_aligned"


def _expected(mirror, channel, mip=0, em_mip=1):
    """The mirror's arrays over the default (annotated) box, as the store should hold them."""
    box = [-1e9, 1e9, -1e9, 1e9, -1e9, 1e9]
    return expected_window(mirror, "p14", channel, mip, box, all_layers("p14", em_mip))[0]


def _chunk_requests(server) -> dict:
    return {p: n for p, n in server.requests.items() if not p.endswith(("/info", "/provenance"))}


def _tree(path: Path) -> dict:
    """Files and their sha256, without locks (a process killed after recording a shard leaves its lock,
    which the next owner takes over: not data)."""
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _store_bytes(root: Path, levels: bool = True) -> dict:
    """Shard files and their records: the store's data (its zarr.json files name the server's port);
    without `levels`, level 0 only (lazy reads of level 0 make no pyramid)."""
    out = {**{k: v for k, v in _tree(root / "data.zarr").items() if not k.endswith("zarr.json")},
           **{"progress/" + k: v for k, v in _tree(root / "progress").items()}}
    if not levels:
        out = {k: v for k, v in out.items() if "@" not in k and "raw_s" not in k
               and not any(f"labels/psd/{n}/" in k for n in range(1, 9))}
    return out


def _minimal_chunks(src, name, shards) -> set:
    """Source chunk names a read of `shards` of array `name` needs: those overlapping the shards."""
    arr = src.plan.arrays[name]
    layer = src.plan.layers[name]
    out = set()
    for index in shards:
        start, stop = shard_box(index, arr.shape)
        g0, g1 = np.add(arr.start_zyx, start), np.add(arr.start_zyx, stop)
        out |= {layer.chunk_name(g) for g in layer.info.chunks_in(g0, g1)}
    return out


@pytest.fixture(scope="module")
def clean_store(wide, catalog, tmp_path_factory):
    """The store an uninterrupted materialise() writes, for byte comparisons."""
    cache_dir = tmp_path_factory.mktemp("clean")
    with MirrorServer(wide.root) as server:
        path = catalog.p14_psd(base_url=server.base_url, cache_dir=str(cache_dir), progress=False).materialise()
    return Path(path).parent


def test_to_dask_fetches_nothing_then_only_touched_shards_then_materialise_the_rest(
        wide, catalog, clean_store, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        t = time.perf_counter()
        ds = src.to_dask()
        assert time.perf_counter() - t < 30
        assert _chunk_requests(server) == {}, "to_dask() must not fetch voxels"
        shape = ds["labels"].shape
        assert ds["labels"].data.chunksize == tuple(min(s, n) for s, n in zip(SHARDS, shape))
        assert len(shards_touching((0, 0, 0), shape)) == 6  # 3 x 2 shards: the test needs several
        cache = StoreCache(tmp_path, src.plan.name)
        assert cache.done_shards("raw") == set()

        # A window inside shards (0, 0, 1) and (0, 0, 2).
        window = dict(z=slice(2, 12), y=slice(30, 300), x=slice(600, 1050))
        part = ds.isel(**window)
        np.testing.assert_array_equal(part["raw"].values, _expected(wide, EM, 1)[2:12, 30:300, 600:1050])
        np.testing.assert_array_equal(part["labels"].values, _expected(wide, "psd_autoseg")[2:12, 30:300, 600:1050])
        touched = {(0, 0, 1), (0, 0, 2)}
        assert cache.done_shards("raw") == touched and cache.done_shards("labels/psd") == touched
        lazy_requests = _chunk_requests(server)
        # Exactly the source chunks of the touched shards, each once.
        for name, channel in (("raw", EM), ("labels/psd", "psd_autoseg")):
            wanted = _minimal_chunks(src, name, touched)
            got = {p.rsplit("/", 1)[1]: n for p, n in lazy_requests.items() if f"/{channel}/" in p}
            assert set(got) == wanted and set(got.values()) == {1}, (name, got, wanted)

        # The same window again reads the cache only.
        part["labels"].values
        assert _chunk_requests(server) == lazy_requests

        src.materialise()
        total = _chunk_requests(server)
    assert set(total.values()) == {1}, "a source chunk was fetched twice across lazy reads and materialise()"
    assert cache.is_complete("raw") and cache.is_complete("labels/psd")
    assert _store_bytes(cache.root) == _store_bytes(clean_store)
    assert not (cache.root / "staging" / "raw").exists()


def test_read_and_full_compute_equal_the_mirror_and_complete_the_store(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        ds = src.read()
        np.testing.assert_array_equal(ds["raw"].values, _expected(wide, EM, 1))
        np.testing.assert_array_equal(ds["labels"].values, _expected(wide, "saturated_autoseg"))
        cache = StoreCache(tmp_path, src.plan.name)
        # Computing every shard lazily completes the arrays as a materialisation would.
        assert cache.is_complete("raw") and cache.is_complete("labels/saturated")
        state = src.discover()["metadata"]["cache_state"]
        assert state["raw"]["shards_cached"] == state["raw"]["shards_total"] == 6
        assert state["raw"]["bytes_on_disk"] == sum(p.stat().st_size for p in
                                                    (cache.zarr_path / "raw" / "c").rglob("*") if p.is_file())


def test_em_mip_0_is_lazy_on_its_own_grid(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False, em_mip=0)
        ds = src.to_dask()
        assert _chunk_requests(server) == {}
        raw = ds["raw"].isel(z_raw=slice(0, 4), y_raw=slice(500, 700), x_raw=slice(1000, 1100)) \
            if "z_raw" in ds["raw"].dims else ds["raw"].isel(z=slice(0, 4), y_raw=slice(500, 700), x_raw=slice(1000, 1100))
        np.testing.assert_array_equal(raw.values, _expected(wide, EM, 0, em_mip=0)[0:4, 500:700, 1000:1100])


def test_read_through_array_indexes_like_numpy(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        arr = src.arrays()["labels"]
        want = _expected(wide, "psd_autoseg")
        np.testing.assert_array_equal(arr[3], want[3])
        np.testing.assert_array_equal(arr[1:4, -20:, 5], want[1:4, -20:, 5])
        with pytest.raises(IndexError, match="only contiguous slices"):
            arr[::2]
        # A window beyond the data is refused naming the shape (numpy would cut it silently), and nothing is fetched.
        before = _chunk_requests(server)
        n, ny, nx = want.shape
        with pytest.raises(IndexError, match=rf"window 0:{n + 40} on axis 0 reaches outside the array of shape "
                                             rf"\({n}, {ny}, {nx}\) \(allowed: -{n} to {n}\)"):
            arr[0:n + 40, 0:10, 0:10]
        with pytest.raises(IndexError, match=rf"index {n} on axis 0 is outside the array of shape"):
            arr[n]
        assert _chunk_requests(server) == before
        np.testing.assert_array_equal(arr[-n:n, 0:ny, nx - 10:nx], want[:, :, nx - 10:])


@pytest.mark.parametrize("value, expected", [(1000, 1000), ("50GB", 50 * 10**9), ("512 MiB", 512 * 2**20),
                                             ("2e9", 2 * 10**9), (None, None)])
def test_cache_limit_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "-5GB", 0, True, "5 parsecs"])
def test_bad_cache_limit_is_named(catalog, value):
    with pytest.raises(ValueError, match=r"cache_limit=.* is not valid; allowed: a positive number of bytes"):
        catalog.p14_psd(cache_limit=value)


def test_cache_limit_evicts_least_recently_used_and_refetches_correctly(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        probe = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "probe"), progress=False)
        arr = probe.arrays()["raw"]
        arr[0:1, 0:1, :]
        probe_cache = StoreCache(tmp_path / "probe", probe.plan.name)
        # Room for any two of the three raw shards of the first row, not for all three.
        limit = sum(probe_cache.shard_bytes("raw", (0, 0, k)) for k in range(3)) - 1
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "lim"), progress=False,
                              cache_limit=limit)
        cache = StoreCache(tmp_path / "lim", src.plan.name)
        raw = src.arrays()["raw"]
        want = _expected(wide, EM, 1)
        for k in (0, 1, 2):
            np.testing.assert_array_equal(raw[0:5, 0:50, k * 512:k * 512 + 50], want[0:5, 0:50, k * 512:k * 512 + 50])
            _, used = cache.disk_usage("raw")
            assert used <= limit
        assert cache.done_shards("raw") == {(0, 0, 1), (0, 0, 2)}, "the least recently used shard goes first"
        before = _chunk_requests(server)
        np.testing.assert_array_equal(raw[0:5, 0:50, 0:50], want[0:5, 0:50, 0:50])  # evicted: fetched again
        assert sum(_chunk_requests(server).values()) > sum(before.values())
        assert cache.done_shards("raw") == {(0, 0, 0), (0, 0, 2)}
        for index in cache.done_shards("raw"):  # what is recorded is intact
            assert cache.check_shard("raw", index, hashes=True) is None
        # A full materialisation cannot fit: refused up front, naming the limit.
        with pytest.raises(ValueError, match=rf"cache_limit={limit} bytes cannot hold a full materialisation"):
            src.materialise()


def _fork_sleeper() -> int:
    """Fork a child that lives 3 s; return its pid once the child runs (its fork handlers have run)."""
    ready, signal_ready = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(signal_ready, b"x")
        time.sleep(3)
        os._exit(0)
    os.close(signal_ready)
    assert os.read(ready, 1) == b"x"
    os.close(ready)
    return child


def test_a_held_shard_is_not_evicted(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        arr = src.arrays()["labels"]
        arr[0:1, 0:1, 0:1]
        cache = arr.cache
        fd = cache.hold("labels/psd", (0, 0, 0))
        try:
            assert not cache.evict("labels/psd", (0, 0, 0))
            child = _fork_sleeper()  # a loader worker forked while the shard is held
        finally:
            close_lock_fd(fd)
        try:  # released by the parent, the shard can go while the child lives: it kept no copy of the hold
            assert cache.evict("labels/psd", (0, 0, 0))
        finally:
            os.waitpid(child, 0)
        assert not cache.is_done("labels/psd", (0, 0, 0)) and not cache.shard_file("labels/psd", (0, 0, 0)).exists()


WINDOWS = """
import sys, numpy as np, intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
src = cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], workers=2, progress=False)
mode = sys.argv[3]
if mode == "materialise":
    src.materialise()
else:
    ds = src.to_dask()
    x0, x1 = map(int, mode.split(":"))
    part = ds.isel(x=slice(x0, x1)).load()
    np.save(sys.argv[4], part["labels"].values)
print("done", flush=True)
"""


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-c", WINDOWS, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_lazy_readers_and_a_materialisation_share_one_cache(wide, catalog, clean_store, tmp_path):
    with MirrorServer(wide.root, latency=0.03) as server:
        procs = [_spawn(server.base_url, tmp_path / "c", "0:700", tmp_path / "a.npy"),
                 _spawn(server.base_url, tmp_path / "c", "400:1100", tmp_path / "b.npy"),
                 _spawn(server.base_url, tmp_path / "c", "materialise")]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        requests = _chunk_requests(server)
    assert requests and set(requests.values()) == {1}, "a chunk was fetched twice"
    want = _expected(wide, "psd_autoseg")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want[:, :, 0:700])
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), want[:, :, 400:1100])
    (root,) = (tmp_path / "c" / "wildenberg2023").iterdir()
    assert _store_bytes(root) == _store_bytes(clean_store)


def test_sigkill_during_a_lazy_compute_leaves_no_partial_shard_taken_as_done(wide, catalog, clean_store, tmp_path):
    cache_dir = tmp_path / "killed"
    with MirrorServer(wide.root, latency=0.2) as server:
        proc = _spawn(server.base_url, cache_dir, "0:1100", tmp_path / "x.npy")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len([p for p in cache_dir.glob("wildenberg2023/*/progress/*/*")
                    if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]) >= 2:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        (root,) = (cache_dir / "wildenberg2023").iterdir()
        cache = StoreCache(cache_dir, root.name)
        done = {n: cache.done_shards(n) for n in ("raw", "labels/psd")}
        assert 2 <= sum(map(len, done.values())) < 12
        for name, shards in done.items():
            for index in shards:
                assert cache.check_shard(name, index, hashes=True) is None
        rerun = _spawn(server.base_url, cache_dir, "0:1100", tmp_path / "x.npy")
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), _expected(wide, "psd_autoseg"))
    assert _store_bytes(root, levels=False) == _store_bytes(clean_store, levels=False)


def test_a_child_forked_while_a_thread_holds_a_lock_does_not_keep_it(tmp_path):
    """flock is released only when every descriptor of its open file description is closed: a child
    forked while a thread of the parent holds a lock (COMPLETE's, the label list's) must not hold it
    for its whole life, or the next taker waits for ever (a forked loader worker hung CI this way)."""
    import fcntl
    import threading
    from wildenberg_intake.store.liveness import file_lock
    path = tmp_path / "locks" / "raw.lock"
    inside, release = threading.Event(), threading.Event()

    def hold():
        with file_lock(path):
            inside.set()
            release.wait()
    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(10)
    child = _fork_sleeper()
    try:
        release.set()
        thread.join()
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child kept the lock
        finally:
            os.close(fd)
    finally:
        os.waitpid(child, 0)


def test_a_shard_recorded_by_a_writer_killed_before_its_ledger_line_still_lets_the_array_complete(wide, catalog,
                                                                                                   tmp_path):
    """A kill between a shard's record and its ledger line: the next lazy reads count the shard
    when they find it recorded, so the array is marked complete once every shard is (it was never
    marked before: the ledger's count stayed one short)."""
    from wildenberg_intake.store.engine import cache_for
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        src.to_dask()["raw"][0:2, 0:10, 0:10].values  # shard (0, 0, 0)
        cache = cache_for(src.plan)
        log = cache.root / "ledger.log"
        lines = log.read_text().splitlines(keepends=True)
        kept = [line for line in lines if " shard raw:0.0.0 " not in line]
        assert len(kept) == len(lines) - 1
        log.write_text("".join(kept))  # as if its writer was killed before appending its line
        # Another process reads everything lazily (this one's ledger view already counted the shard).
        rerun = _spawn(server.base_url, tmp_path, "0:1100", tmp_path / "x.npy")
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), _expected(wide, "psd_autoseg"))
    assert cache.is_complete("raw") and cache.is_complete("labels/psd")
