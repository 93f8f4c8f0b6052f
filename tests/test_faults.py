"""Faults, kills, concurrency and corruption: never lose or invent a voxel."""

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.source.layers import LayerError, parse_info
from wildenberg_intake.mirror import Faults, MirrorServer, build_mirror
from wildenberg_intake.source.transfer import TransferError

from conftest import all_layers, expected_window

FAST = {"attempts": 8, "backoff": 0.01, "max_wait": 0.05, "read_timeout": 5}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """p14 with 3 x 2 output shards per array."""
    return build_mirror(tmp_path_factory.mktemp("mirror-faults"), shape_xyz=(1100, 520, 16), experiments=("p14",))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


def _equal_to_mirror(ds, mirror, label="psd", channel="psd_autoseg"):
    raw, _ = expected_window(mirror, "p14", "em_aligned", 1, ds.attrs["bbox_nm"], all_layers("p14"))
    lab, _ = expected_window(mirror, "p14", channel, 0, ds.attrs["bbox_nm"], all_layers("p14"))
    np.testing.assert_array_equal(ds["raw"].values, raw)
    np.testing.assert_array_equal(ds["labels"].values, lab)


def test_faults_are_retried_and_never_become_zeros(big, catalog, tmp_path):
    faults = Faults(error_rate=0.15, reset_rate=0.15, truncate_rate=0.15, slow_rate=0.05, slow_seconds=0.2, seed=3)
    with MirrorServer(big.root, faults=faults) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), retry=FAST, progress=False)
        ds = src.read()
        stats = src.plan.fetcher.stats
    assert faults.injected["error"] > 0 and faults.injected["reset"] > 0 and faults.injected["truncate"] > 0
    assert stats["retries"] >= sum(faults.injected[k] for k in ("error", "reset", "truncate"))
    _equal_to_mirror(ds, big)
    meta = json.loads((Path(ds.attrs["store"]) / "raw" / "zarr.json").read_text())["attributes"]
    assert meta["missing_source_chunks"]["count"] == 0, "no fault may be recorded as an empty chunk"


def test_exhausted_retries_name_the_url_and_record_nothing_of_that_shard(big, catalog, tmp_path):
    victim = sorted((big.root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40").glob("*.gz"))[-1].name[:-3]
    with MirrorServer(big.root, faults=Faults(fail_paths=(victim,))) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), retry=FAST, progress=False)
        with pytest.raises(TransferError, match=rf"GET http://127.0.0.1:\d+/.*/{victim} failed 8 times over \d+ s \(retry patience \d+ s, attempts 8\); "
                                                r"last failure: HTTP 503"):
            src.materialise()
        cache = StoreCache(tmp_path, src.plan.name)
        assert not cache.is_complete("raw")
        done = cache.done_shards("raw")
        assert len(done) < 6
        for index in done:  # whatever was recorded does not contain the failed chunk
            assert victim not in json.dumps(cache.record("raw", index))
        server.set_faults(None)
        ds = src.read()  # resumes and completes once the server recovers
    _equal_to_mirror(ds, big)


def test_404_chunks_are_recorded_in_the_store_metadata(big, catalog, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(big.root, root)
    chunk_dir = root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40"
    gone = sorted(p.name[:-3] for p in chunk_dir.glob("*.gz"))[:2]
    for name in gone:
        (chunk_dir / f"{name}.gz").unlink()
    with MirrorServer(root) as server:
        ds = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "c"), progress=False).read()
    meta = json.loads((Path(ds.attrs["store"]) / "raw" / "zarr.json").read_text())["attributes"]
    assert meta["missing_source_chunks"]["count"] == 2
    assert meta["missing_source_chunks"]["chunks"] == gone


def test_an_array_whose_every_chunk_is_404_is_recorded_as_zeros_at_every_level(big, catalog, tmp_path):
    """Slabs with no chunk on the server are zeros: nothing is encoded or downsampled for them, and
    level 0 and the pyramid are recorded complete, read as zeros, with no shard file; the labels
    beside them are whole."""
    root = tmp_path / "mirror"
    shutil.copytree(big.root, root)
    chunk_dir = root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40"
    for path in chunk_dir.glob("*.gz"):
        path.unlink()
    with MirrorServer(root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "c"), progress=False)
        with pytest.warns(UserWarning, match="every source chunk of .* answered 404: array raw of"):
            store = Path(src.materialise())
    cache = StoreCache(tmp_path / "c", store.parent.name)
    group = zarr.open_group(str(store), mode="r")
    for name in ("raw", "raw_s1", "raw_s2"):
        assert cache.is_complete(name.replace("_s", "@")) and not group[name][:].any(), name
        assert not list((store / name).rglob("c/*/*/*")), f"{name}: no shard file for zeros"
    labels = expected_window(big, "p14", "psd_autoseg", 0, src.plan.bbox_nm, all_layers("p14"))[0]
    np.testing.assert_array_equal(group["labels/psd/0"][:], labels)


FETCH = """
import sys, intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
src = cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], workers=int(sys.argv[3]), progress=False)
print(src.materialise())
"""


def _start(base_url, cache_dir, workers=1):
    # SIGINT back to its default in the child: a test run started in the background by a shell
    # inherits it ignored, and Python would then never raise KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-c", FETCH, base_url, str(cache_dir), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ten_sigkills_at_spread_points_then_rerun_is_byte_identical(big, tmp_path):
    with MirrorServer(big.root, latency=0.03) as server:
        clean = _start(server.base_url, tmp_path / "clean", 2)
        out, err = clean.communicate(timeout=300)
        assert clean.returncode == 0, err
        clean_store = Path(out.strip())
        cache_dir = tmp_path / "killed"
        for delay in np.linspace(0.6, 3.0, 10):
            proc = _start(server.base_url, cache_dir, 2)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        final = _start(server.base_url, cache_dir, 2)
        out, err = final.communicate(timeout=300)
        assert final.returncode == 0, err
    assert _tree(Path(out.strip())) == _tree(clean_store)
    staged = [p for p in (Path(out.strip()).parent / "staging").rglob("*") if p.is_file()]
    assert not staged, "staged chunks and pyramid quarters are cleaned up"


HALTED_WRITE = """
import os, sys, time
from pathlib import Path
from wildenberg_intake.store import files
def halt(*args):
    print("written", flush=True)
    time.sleep(600)
os.replace = halt  # the write stops between its fsync and its rename
files.durable_write(Path(sys.argv[1]), os.urandom(1000))
"""


def test_a_killed_writers_temporary_file_is_removed_and_a_live_writers_kept(big, catalog, tmp_path):
    with MirrorServer(big.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        store = Path(src.read().attrs["store"])
        shard = store / "raw" / "c" / "0" / "0" / "0"
        writers = [subprocess.Popen([sys.executable, "-c", HALTED_WRITE, str(shard)], stdout=subprocess.PIPE, text=True)
                   for _ in range(2)]
        try:
            assert [w.stdout.readline() for w in writers] == ["written\n"] * 2
            leftovers = sorted(shard.parent.glob(".0.*.tmp"))
            assert len(leftovers) == 2 and all(p.stat().st_size == 1000 for p in leftovers)
            writers[0].kill()
            writers[0].wait()
            (store.parent / "progress" / "raw" / "COMPLETE").unlink()  # so the next read completes it again
            catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False).materialise()
            kept = sorted(shard.parent.glob(".0.*.tmp"))
            assert len(kept) == 1, "the killed writer's file is removed, the live one's kept"
            assert (store.parent / "progress" / "raw" / "COMPLETE").is_file()
        finally:
            for w in writers:
                w.kill()
                w.wait()


def test_a_shards_next_write_removes_its_killed_writers_temporary_file(tmp_path):
    """A lazy store never completes: the shard's own next write clears what a killed writer left."""
    cache = StoreCache(tmp_path, "store")
    shard = cache.shard_file("raw", (0, 1, 2))
    shard.parent.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", HALTED_WRITE, str(shard)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
    finally:
        writer.kill()
        writer.wait()
    assert len(list(shard.parent.glob(".2.*.tmp"))) == 1
    cache.write_shard("raw", (0, 1, 2), [b"shard", b" bytes"])
    assert sorted(p.name for p in shard.parent.iterdir()) == ["2"] and shard.read_bytes() == b"shard bytes"


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(big, tmp_path):
    with MirrorServer(big.root, latency=0.1) as server:
        proc = _start(server.base_url, tmp_path, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [
                p for p in tmp_path.glob("wildenberg2023/*/progress/raw/*") if re.fullmatch(r"[\d.]+", p.name)]:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "run the same command again to resume" in err
        assert "Traceback" in err or "KeyboardInterrupt" in err
        rerun = _start(server.base_url, tmp_path, 1)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
    ds = zarr.open_group(out.strip(), mode="r")
    raw, _ = expected_window(big, "p14", "em_aligned", 1, ds.attrs["bbox_nm"], all_layers("p14"))
    np.testing.assert_array_equal(ds["raw"][:], raw)


def test_two_processes_on_one_store_both_finish_identical(big, tmp_path):
    with MirrorServer(big.root, latency=0.02) as server:
        procs = [_start(server.base_url, tmp_path, 2) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        requests = server.requests
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    ds = zarr.open_group(paths.pop(), mode="r")
    raw, _ = expected_window(big, "p14", "em_aligned", 1, ds.attrs["bbox_nm"], all_layers("p14"))
    np.testing.assert_array_equal(ds["raw"][:], raw)
    # Shard locks and staged chunks share the work: far fewer than two full fetches.
    em = [p for p in requests if "/em_aligned/12_12_40/" in p]
    assert sum(requests[p] for p in em) < 1.5 * len(em)


def test_a_lock_left_by_a_killed_process_does_not_block(big, catalog, tmp_path):
    with MirrorServer(big.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock = tmp_path / "wildenberg2023" / src.plan.name / "progress" / "raw" / "0.0.0.lock"
        lock.parent.mkdir(parents=True)
        import socket
        lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()} x")
        t = time.monotonic()
        ds = src.read()
        assert time.monotonic() - t < 60
    _equal_to_mirror(ds, big)


def test_verify_finds_and_repair_restores_deleted_and_truncated_shards(big, catalog, tmp_path):
    with MirrorServer(big.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        store = Path(src.materialise())
        original = _tree(store)
        cache = StoreCache.at(store)
        assert all(not e["missing"] and not e["corrupt"] for e in cache.verify().values())
        deleted, truncated = cache.shard_file("raw", (0, 0, 1)), cache.shard_file("labels/psd", (0, 1, 0))
        assert deleted.exists() and truncated.exists()
        deleted.unlink()
        truncated.write_bytes(truncated.read_bytes()[:100])
        report = src.verify()
        assert report["raw"]["missing"] == [(0, 0, 1)] and report["raw"]["corrupt"] == []
        assert report["labels/psd"]["corrupt"] == [(0, 1, 0)] and report["labels/psd"]["missing"] == []
        before = server.requests
        assert src.repair() == {"raw": [(0, 0, 1)], "labels/psd": [(0, 1, 0)]}
        fetched = server.requests - before
    assert _tree(store) == original
    # Exactly the damaged shards' source chunks were fetched again, each once.
    expected = set()
    for name, index in (("raw", (0, 0, 1)), ("labels/psd", (0, 1, 0))):
        from wildenberg_intake.store.layout import shard_box
        arr, layer = src.plan.arrays[name], src.plan.layers[name]
        start, stop = shard_box(index, arr.shape)
        expected |= {f"{layer.url.split('127.0.0.1')[1].split('/', 1)[1]}/{layer.info.scale_key}/"
                     f"{layer.chunk_name(g)}" for g in layer.info.chunks_in(np.add(arr.start_zyx, start),
                                                                           np.add(arr.start_zyx, stop))}
    data = {p.lstrip("/") for p in fetched if not p.endswith(("/info", "/provenance"))}
    assert data == expected and all(n == 1 for p, n in fetched.items() if p.lstrip("/") in data)


def test_disk_full_names_the_folder_and_leaves_a_resumable_store(big, catalog, tmp_path, monkeypatch):
    real = StoreCache.write_shard
    calls = {"n": 0}

    def full(self, name, index, data):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, index, data)

    with MirrorServer(big.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), workers=1, progress=False)
        monkeypatch.setattr(StoreCache, "write_shard", full)
        with pytest.raises(OSError, match=r"No space left on device.*incomplete.*run again to resume") as info:
            src.materialise()
        assert str(tmp_path) in str(info.value)
        monkeypatch.setattr(StoreCache, "write_shard", real)
        cache = StoreCache(tmp_path, src.plan.name)
        assert not cache.is_complete("raw") and len(cache.done_shards("raw")) == 1
        ds = src.read()
    _equal_to_mirror(ds, big)


def test_a_complete_store_reads_without_writing(big, catalog, tmp_path, monkeypatch):
    with MirrorServer(big.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        src.materialise()
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(StoreCache, "initialise", refuse)
        monkeypatch.setattr(StoreCache, "ensure_array", refuse)
        fresh = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        ds = fresh.read()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    _equal_to_mirror(ds, big)


def test_unwritable_cache_folder_is_named(big, catalog, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with MirrorServer(big.root) as server:
        # A cache folder below a file cannot be created, even by root.
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(blocker / "cache"), progress=False)
        with pytest.raises(OSError, match=r"cannot (create|write) the cache folder .*file/cache"):
            src.materialise()


GOOD = {"data_type": "uint8", "num_channels": 1, "type": "image", "scales": [
    {"key": "12_12_40", "resolution": [12, 12, 40], "voxel_offset": [0, 0, 0], "size": [100, 100, 10],
     "chunk_sizes": [[64, 64, 8]], "encoding": "raw"}]}


def _bad(path, value):
    info = json.loads(json.dumps(GOOD))
    target = info
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return info


@pytest.mark.parametrize("info,pattern", [
    (_bad(["scales"], KeyError), r"lacks or mangles 'scales'"),
    (_bad(["scales", 0, "size"], KeyError), r"scale 0 lacks 'size'"),
    (_bad(["scales", 0, "size"], [100, -5, 10]), r"size \[100, -5, 10\] is empty or implausibly large"),
    (_bad(["scales", 0, "size"], [10**6, 10**6, 10**6]), r"implausibly large"),
    (_bad(["scales", 0, "encoding"], "webp"), r"encoding 'webp' is not supported"),
    (_bad(["data_type"], "float128"), r"data_type 'float128' is not supported"),
    (_bad(["scales", 0, "resolution"], [12, 0, 40]), r"resolution .* must be 3 positive numbers"),
    (_bad(["scales", 0, "chunk_sizes"], [[2**20, 2**20, 1]]), r"chunk size .* implausibly large"),
    (_bad(["scales", 0, "voxel_offset"], ["a", 0, 0]), r"voxel_offset .* is not 3 integers"),
    ([1, 2, 3], r"info file is not a JSON object"),
], ids=["no-scales", "no-size", "negative-size", "enormous", "encoding", "dtype", "zero-resolution",
        "enormous-chunk", "offset-text", "not-object"])
def test_hostile_info_files_get_clear_errors(info, pattern):
    with pytest.raises(LayerError, match=rf"layer http://x/em: .*{pattern}"):
        parse_info("http://x/em", info, 0, False)


def test_hostile_info_and_bad_chunks_from_the_server(big, catalog, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(big.root, root)
    info_path = root / "wildenberg2023/mouse_v1_l4_p14/psd_autoseg/info"
    info = json.loads(info_path.read_text())
    info["scales"][0]["resolution"] = [12, 12, 0]
    info_path.write_text(json.dumps(info))
    # A raw chunk whose decoded size does not match its box.
    chunk = sorted((root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40").glob("*.gz"))[0]
    import gzip
    chunk.write_bytes(gzip.compress(b"\x00" * 1000))
    with MirrorServer(root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "c"), progress=False)
        with pytest.raises(LayerError, match=r"layer .*/psd_autoseg: scale 0 resolution .* must be 3 positive"):
            src.discover()
        assert not (tmp_path / "c").exists()
        info["scales"][0]["resolution"] = [12, 12, 40]
        info_path.write_text(json.dumps(info))
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "c"), progress=False)
        with pytest.raises(LayerError, match=rf"layer .*/em_aligned: chunk {chunk.name[:-3]} does not decode"):
            src.materialise()
        assert not StoreCache(tmp_path / "c", src.plan.name).is_complete("raw")


def test_the_body_gate_is_released_on_every_fault_and_held_after_each_body(big):
    """`gate` is taken only once a body arrives and stays taken only when bytes are returned: a fault
    that leaked it would stall every later fetch of the array (here: a timeout instead of a hang)."""
    import gzip
    import threading
    from wildenberg_intake.source.transfer import Fetcher, RetryPolicy

    class Gate:
        def __init__(self):
            self.semaphore, self.taken = threading.BoundedSemaphore(1), 0

        def acquire(self):
            assert self.semaphore.acquire(timeout=5), "the gate was left taken by an earlier fetch"
            self.taken += 1

        def release(self):
            self.semaphore.release()  # a BoundedSemaphore raises on a release too many

    folder = big.root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40"
    files = sorted(folder.glob("*.gz"))[:12]
    faults = Faults(error_rate=0.1, reset_rate=0.1, truncate_rate=0.1, seed=5)
    gate = Gate()
    with MirrorServer(big.root, faults=faults) as server:
        fetcher = Fetcher(RetryPolicy(**FAST))
        base = f"{server.url}/{folder.relative_to(big.root)}"
        for path in files:
            data, wire = fetcher.get_with_wire(f"{base}/{path.name[:-3]}", gate=gate)
            assert data == gzip.decompress(path.read_bytes()) and wire == path.read_bytes()
            gate.release()
        assert fetcher.get_with_wire(f"{base}/0-1_0-1_0-1", gate=gate) == (None, None)  # 404: not taken
    assert sum(faults.injected[k] for k in ("error", "reset", "truncate")) > 0
    assert gate.taken >= len(files)
    assert gate.semaphore.acquire(blocking=False), "the gate is free after the last release"


def test_redirects_are_followed_gzip_asked_for_403_fails_at_once_and_refusals_are_retried():
    import http.server
    import socket
    import threading
    from wildenberg_intake.source.transfer import Fetcher, RetryPolicy

    hits, encodings = [], set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            encodings.add(self.headers.get("Accept-Encoding"))
            status, headers, body = {
                "/moved": (307, {"Location": "/chunk"}, b""),
                "/chunk": (200, {}, b"voxels"),
                "/forbidden": (403, {}, b"<Error>AccessDenied</Error>"),
            }.get(self.path, (404, {}, b"<Error>NoSuchKey</Error>"))
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        fetcher = Fetcher(RetryPolicy(**FAST))
        assert fetcher.get(f"{base}/moved") == b"voxels"
        assert fetcher.get(f"{base}/absent") is None
        with pytest.raises(TransferError, match=r"GET .*/forbidden answered HTTP 403; only 404 means a missing"):
            fetcher.get(f"{base}/forbidden")
        assert hits == ["/moved", "/chunk", "/absent", "/forbidden"], "403 is not retried"
        assert fetcher.get(f"{base}/chunk", byte_range=(1, 4)) == b"oxe"  # a server that ignores ranges
        assert encodings == {"gzip, deflate"}, "gzip is asked for (GCS inflates stored gzip otherwise)"
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher = Fetcher(RetryPolicy(**{**FAST, "attempts": 3}))
    with pytest.raises(TransferError, match=rf"GET http://127.0.0.1:{port}/x failed 3 times over \d+ s \(retry patience \d+ s, attempts 3\); "
                                            r"last failure: NewConnectionError"):
        fetcher.get(f"http://127.0.0.1:{port}/x")
    assert fetcher.stats["retries"] == 2


def test_file_urls_read_gzip_stored_chunks_and_missing_ones(big):
    """An offline copy (`file://`) may keep chunks as `X.gz`, as S3 stores them: read inflated."""
    import gzip
    from wildenberg_intake.source.transfer import Fetcher
    folder = big.root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40"
    path = sorted(folder.glob("*.gz"))[0]
    fetcher = Fetcher()
    assert fetcher.get(f"file://{folder}/{path.name[:-3]}") == gzip.decompress(path.read_bytes())
    assert fetcher.get(f"file://{folder}/{path.name[:-3]}", byte_range=(5, 9)) == \
        gzip.decompress(path.read_bytes())[5:9]
    assert fetcher.get(f"file://{folder}/0-1_0-1_0-1") is None
