"""One budget for every byte, at a cost that does not grow with the store: the size ledger, eviction,
bounded descriptors, scratch of killed runs."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store import lazy
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.ledger import Ledger, shard_key
from wildenberg_intake.store.lazy import enforce_limit

from conftest import all_layers, expected_window

SHARD_BYTES = 1000


def _write(cache: StoreCache, i: int, z: int = 0):
    index = (z, i // 64, i % 64)
    body = np.random.default_rng(i).bytes(SHARD_BYTES - 4)
    cache.write_shard("raw", index, [body, b"\0\0\0\0"])
    cache.mark_done("raw", index, "content")
    return index


def _filesystem_calls(monkeypatch) -> Counter:
    calls = Counter()
    for name in ("stat", "lstat", "listdir", "scandir"):
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(os, name, counted)
    return calls


def test_stat_and_listdir_calls_per_shard_written_under_a_limit_are_constant_from_16_to_1024_shards(tmp_path,
                                                                                                   monkeypatch):
    per_write = {}
    for n in (16, 1024):
        cache = StoreCache(tmp_path / str(n), "p14-test")
        (cache.root / "data.zarr").mkdir(parents=True)
        for i in range(n):
            _write(cache, i)
        limit = n * SHARD_BYTES  # full: each new shard evicts the least recently used one
        with monkeypatch.context() as m:
            calls = _filesystem_calls(m)
            for i in range(8):  # into a new folder, as much a new one at either size
                _write(cache, i, z=1)
                assert enforce_limit(cache, limit) == 1
        per_write[n] = sum(calls.values()) / 8
        assert not cache.is_done("raw", (0, 0, 7)) and cache.is_done("raw", (0, 0, 8))  # the 8 oldest went
        assert all(cache.is_done("raw", (1, 0, i)) for i in range(8))
        assert cache.ledger.total == limit
    assert per_write[16] == per_write[1024], per_write


def test_the_ledger_agrees_with_the_folder_across_processes_and_when_rebuilt(tmp_path):
    cache = StoreCache(tmp_path, "p14-test")
    (cache.root / "data.zarr").mkdir(parents=True)
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from test_budget import _write; "
            "from wildenberg_intake.store.cache import StoreCache; "
            "c = StoreCache(sys.argv[1], 'p14-test'); [_write(c, i) for i in range(int(sys.argv[2]), int(sys.argv[2]) + 40)]; "
            "[c.evict('raw', (0, i // 64, i % 64)) for i in range(int(sys.argv[2]), int(sys.argv[2]) + 40, 3)]")
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start), here]) for start in (0, 40)]
    assert [p.wait() for p in procs] == [0, 0]
    on_disk = sum(p.stat().st_size for p in (cache.zarr_path / "raw" / "c").rglob("*") if p.is_file())
    assert on_disk == 80 * SHARD_BYTES - 28 * SHARD_BYTES
    followed = Ledger(cache.root)  # a fresh view reading the log both processes appended to
    followed.refresh()
    assert followed.total == on_disk
    assert {key for _, key in followed.entries} == {shard_key("raw", i) for i in cache.done_shards("raw")}
    cache.ledger.path.unlink()  # lost (or a store of an older version): rebuilt from the records
    rebuilt = Ledger(cache.root)
    rebuilt.refresh()
    assert rebuilt.total == on_disk and set(rebuilt.entries) == set(followed.entries)


def test_a_lazy_read_holds_one_shard_at_a_time_and_fetches_the_missing_side_by_side(wide, catalog, tmp_path,
                                                                                    monkeypatch):
    held, most, threads = [0], [0], set()
    real_hold, real_close = StoreCache.hold, lazy.close_lock_fd

    def hold(self, name, index, touch=False):
        fd = real_hold(self, name, index, touch)
        if fd is not None:
            held[0] += 1
            most[0] = max(most[0], held[0])
        return fd

    def close(fd):
        held[0] -= 1
        real_close(fd)
    real_write = lazy.ReadThroughArray.ensure

    def ensure(self, index):
        import threading
        threads.add(threading.current_thread().name)
        return real_write(self, index)
    monkeypatch.setattr(StoreCache, "hold", hold)
    monkeypatch.setattr(lazy, "close_lock_fd", close)
    monkeypatch.setattr(lazy.ReadThroughArray, "ensure", ensure)
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        raw = src.arrays()["raw"]
        assert raw.total_shards == 6
        got = raw[:]
    np.testing.assert_array_equal(got, expected_window(wide, "p14", "em_aligned", 1, [-1e9, 1e9] * 3,
                                                       all_layers("p14"))[0])
    assert most[0] == 1 and held[0] == 0
    assert len({t for t in threads if t.startswith("wildenberg-read")}) >= 2


def test_shards_and_staged_chunks_stay_within_the_limit_in_a_lazy_run_over_an_unaligned_box(wide, catalog,
                                                                                           tmp_path):
    bbox = [500, 13000, 500, 6000, 0, 640]  # nm: chunks straddle the output shards
    with MirrorServer(wide.root) as server:
        probe = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "probe"), progress=False,
                                bbox_nm=bbox)
        probe.materialise()
        probe_cache = StoreCache(tmp_path / "probe", probe.plan.name)
        largest = max(probe_cache.shard_bytes(n, i) for n in ("raw", "labels/psd")
                      for i in probe_cache.done_shards(n))
        limit = 2 * largest
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "lim"), progress=False,
                              bbox_nm=bbox, cache_limit=limit)
        raw, labels = src.arrays()["raw"], src.arrays()["labels"]
        cache = StoreCache(tmp_path / "lim", src.plan.name)
        want_raw = expected_window(wide, "p14", "em_aligned", 1, bbox, all_layers("p14"))[0]
        want_labels = expected_window(wide, "p14", "psd_autoseg", 0, bbox, all_layers("p14"))[0]
        rng = np.random.default_rng(0)
        peak = 0
        for _ in range(12):
            y, x = int(rng.integers(0, raw.shape[1] - 64)), int(rng.integers(0, raw.shape[2] - 64))
            window = (slice(0, raw.shape[0]), slice(y, y + 64), slice(x, x + 64))
            np.testing.assert_array_equal(raw[window], want_raw[window])
            np.testing.assert_array_equal(labels[window], want_labels[window])
            shards = [p for p in cache.zarr_path.rglob("*") if p.is_file() and "c" in p.relative_to(cache.zarr_path).parts]
            staged = [p for p in (cache.root / "staging").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
            kept = shards + staged
            peak = max(peak, sum(p.stat().st_size for p in kept))
        assert raw.total_shards >= 3 and peak <= limit + largest, (peak, limit)
        assert cache.ledger.total <= limit


DEAD_RUN = """
import sys, time
from pathlib import Path
from wildenberg_intake.store.liveness import try_lock
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
(folder / "0.npz").write_bytes(b"x" * 1000)
held = try_lock(folder.with_name(folder.name + ".lock"))
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_synapse_runs_scratch_is_removed_by_the_next_run_and_a_live_ones_kept(server, catalog, tmp_path):
    src = catalog.p14_synapses(base_url=server.base_url, cache_dir=str(tmp_path), progress=False, workers=1)
    store = StoreCache(tmp_path, src.plan.name)
    tables = store.root / "staging" / "tables"
    runs = {}
    for name in ("dead", "alive"):
        proc = subprocess.Popen([sys.executable, "-c", DEAD_RUN, str(tables / name)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        runs[name] = proc
    runs["dead"].kill()
    runs["dead"].wait()
    (tables / "1234-0123abcd").mkdir()  # an older version's scratch (no lock file): nobody's
    try:
        table = src.table().compute()
        assert len(table) > 0
        assert sorted(p.name for p in tables.iterdir() if p.is_dir()) == ["alive"]
    finally:
        runs["alive"].kill()
        runs["alive"].wait()
    assert not any(p.is_dir() for p in tables.iterdir() if p.name != "alive")


@pytest.mark.parametrize("kind", ["shard", "staged"])
def test_the_ledger_ignores_a_line_cut_by_a_power_loss(tmp_path, kind):
    ledger = Ledger(tmp_path)
    ledger.add(kind, "raw:0.0.0" if kind == "shard" else "staging/raw/0.0.0", 100)
    with open(ledger.path, "ab") as f:
        f.write(b"+ shard raw:0.0.1 12")  # no end of line: being appended, or cut
    fresh = Ledger(tmp_path)
    fresh.refresh()
    assert fresh.total == 100 and len(fresh.entries) == 1


def test_a_store_this_process_cannot_write_gets_its_ledger_in_memory(tmp_path, monkeypatch):
    """A store of an older version (no ledger) on a read-only mount: the view is built from the
    records in memory, once; nothing is written and nothing raises."""
    import errno
    from wildenberg_intake.store import ledger as ledger_module
    cache = StoreCache(tmp_path, "p14-test")
    (cache.root / "data.zarr").mkdir(parents=True)
    for i in range(5):
        _write(cache, i)
    cache.ledger.path.unlink()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(ledger_module, "durable_write", read_only)
    view = Ledger(cache.root)
    assert view.shards("raw") == cache.done_shards("raw") and view.total == 5 * SHARD_BYTES
    assert not view.path.exists()
