"""Hostile servers and damaged caches: never a crash, a hang, or damage handed out as data.

Each case runs against a hostile variant of the mirror server (or a mirror edited on disk, or a
cache damaged after it was written), asserts the exact error, bounded memory (measured in a
subprocess) and time, and that a rerun against a healthy server ends with the mirror's bytes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import intake
import wildenberg_intake
from wildenberg_intake.store.cache import DamagedShard, StoreCache
from wildenberg_intake.source.layers import LayerError
from wildenberg_intake.mirror import Faults, MirrorServer, build_mirror

from conftest import all_layers, expected_window

ALL = [-1e9, 1e9] * 3
FAST = {"attempts": 2, "backoff": 0.05, "read_timeout": 1.0, "connect_timeout": 1.0, "deadline": 2.0}

FETCH = """
import json, sys, time, wildenberg_intake
base, cache, entry, retry = sys.argv[1:5]
t = time.perf_counter()
out = {}
try:
    src = wildenberg_intake.open_catalog(base_url=base, cache_dir=cache)[entry]
    src = type(src)(**{**src._captured_init_kwargs, "progress": False, "retry": json.loads(retry)})
    src.materialise()
    out["ok"] = True
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds"] = time.perf_counter() - t
out["hwm_mb"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
print(json.dumps(out))
"""


def _fetch(base, cache, entry="p14_psd", retry=None, timeout=300):
    done = subprocess.run([sys.executable, "-c", FETCH, base, str(cache), entry, json.dumps(retry or {})],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the process died (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _source(base, cache, entry="p14_psd", **kw):
    return intake.open_catalog(wildenberg_intake.catalog_path())[entry](
        base_url=base, cache_dir=str(cache), progress=False, **kw)


def _equal_to_mirror(mirror, base, cache, entry="p14_psd", label_channel="psd_autoseg"):
    ds = _source(base, cache, entry).read()
    raw, _ = expected_window(mirror, "p14", "em_aligned", 1, ALL, all_layers("p14"))
    labels, _ = expected_window(mirror, "p14", label_channel, 0, ALL, all_layers("p14"))
    np.testing.assert_array_equal(ds["raw"].values, raw)
    np.testing.assert_array_equal(ds["labels"].values, labels)


def _a_chunk(mirror, channel="em_aligned", scale="12_12_40"):
    folder = Path(mirror.root) / "wildenberg2023/mouse_v1_l4_p14" / channel / scale
    return sorted(p.name.removesuffix(".gz") for p in folder.iterdir())[0]


def test_gzip_bomb_is_refused_before_it_is_inflated(wide, tmp_path):
    chunk = _a_chunk(wide)
    bomb = Faults(hostile={f"em_aligned/12_12_40/{chunk}": "bomb"}, bomb_bytes=2**30)
    with MirrorServer(wide.root, faults=bomb) as server:
        out = _fetch(server.base_url, tmp_path)
        assert "ok" not in out
        assert out["error"].startswith("TransferError: GET ") and chunk in out["error"]
        assert "gzip body inflates to more than" in out["error"] and "refused" in out["error"]
        assert out["hwm_mb"] < 600, out  # a 1 GiB inflation never happened
        assert out["seconds"] < 60
        assert server.requests[f"/wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40/{chunk}"] == 1, \
            "a bomb is not retried"
        (root,) = (tmp_path / "wildenberg2023").iterdir()
        assert not list((root / "staging").rglob(chunk + "*")), "a refused body is never staged"
        server.set_faults(None)
        _equal_to_mirror(wide, server.base_url, tmp_path)


def test_html_body_for_a_shared_chunk_is_not_staged_and_a_rerun_recovers(wide, tmp_path):
    chunk = _a_chunk(wide)
    with MirrorServer(wide.root, faults=Faults(hostile={f"em_aligned/12_12_40/{chunk}": "html"})) as server:
        out = _fetch(server.base_url, tmp_path)
        assert out["error"].startswith("LayerError: layer ") and chunk in out["error"]
        assert "does not decode" in out["error"]
        (root,) = (tmp_path / "wildenberg2023").iterdir()
        assert not list((root / "staging").rglob(chunk + "*"))
        server.set_faults(None)
        _equal_to_mirror(wide, server.base_url, tmp_path)


def test_a_damaged_staged_chunk_is_fetched_again_once(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        src = _source(server.base_url, tmp_path)
        src.arrays()["raw"][0:1, 0:1, 0:1]  # shard (0, 0, 0): its chunks shared with (0, 0, 1) are staged
        cache = StoreCache(tmp_path, src.plan.name)
        staged = [p for p in (cache.root / "staging" / "raw").iterdir() if not p.name.endswith(".lock")]
        assert staged
        for p in staged:
            p.write_bytes(b"<html>damaged on disk</html>")
        before = sum(server.requests.values())
        src.read()
        assert sum(server.requests.values()) - before >= len(staged)
        _equal_to_mirror(wide, server.base_url, tmp_path)


@pytest.fixture(scope="module")
def cseg_mirror(tmp_path_factory):
    return build_mirror(tmp_path_factory.mktemp("cseg"), shape_xyz=(300, 260, 20), experiments=("p14",),
                        label_encoding="compressed_segmentation")


def test_html_for_compressed_segmentation_chunks_is_an_error_not_a_crash(cseg_mirror, tmp_path):
    with MirrorServer(cseg_mirror.root, faults=Faults(hostile={"saturated_autoseg/12_12_40/": "html"})) as server:
        out = _fetch(server.base_url, tmp_path, "p14_saturated")  # the process must not die (SIGSEGV)
    assert out["error"].startswith("LayerError: layer ") and "HTML/XML/JSON document" in out["error"]


@pytest.mark.parametrize("damage", ["truncated", "random second half"])
def test_a_damaged_compressed_segmentation_chunk_is_an_error_never_data(cseg_mirror, tmp_path, damage):
    root = tmp_path / "mirror"
    shutil.copytree(cseg_mirror.root, root)
    folder = root / "wildenberg2023/mouse_v1_l4_p14/saturated_autoseg/12_12_40"
    import gzip
    for path in folder.iterdir():
        gz = path.name.endswith(".gz")
        data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
        half = len(data) // 2 // 4 * 4
        rng = np.random.default_rng(len(data))
        data = data[:half] if damage == "truncated" else \
            data[:half] + rng.integers(0, 256, len(data) - half, dtype=np.uint8).tobytes()
        path.write_bytes(gzip.compress(data) if gz else data)
    with MirrorServer(root) as server:
        out = _fetch(server.base_url, tmp_path / "c", "p14_saturated")
    assert out["error"].startswith("LayerError: layer ") and "does not decode" in out["error"]
    (store,) = (tmp_path / "c" / "wildenberg2023").iterdir()
    assert not (store / "progress" / "labels" / "saturated" / "COMPLETE").exists()


@pytest.mark.parametrize("key", ["../../../tmp/x/12_12_40", "../em_aligned/12_12_40", "/etc/12_12_40",
                                 "http://evil/12_12_40", "12_12_40?x=1", "12_12_40#f", "a/../12_12_40"])
def test_a_scale_key_that_leaves_the_layer_is_refused(wide, tmp_path, key):
    root = tmp_path / "mirror"
    shutil.copytree(wide.root, root)
    info_path = root / "wildenberg2023/mouse_v1_l4_p14/psd_autoseg/info"
    info = json.loads(info_path.read_text())
    info["scales"][0]["key"] = key
    info_path.write_text(json.dumps(info))
    with MirrorServer(root) as server:
        with pytest.raises(LayerError, match=r"scale 0 key .* is not valid; allowed: a relative path"):
            _source(server.base_url, tmp_path / "c").discover()


@pytest.mark.parametrize("kind", ["nested", "huge"])
def test_a_hostile_info_file_is_a_layer_error(wide, tmp_path, kind):
    root = tmp_path / "mirror"
    shutil.copytree(wide.root, root)
    info_path = root / "wildenberg2023/mouse_v1_l4_p14/psd_autoseg/info"
    if kind == "nested":
        info_path.write_text("[" * 200_000 + "]" * 200_000)
        pattern = "nested too deeply"
    else:
        info = json.loads(info_path.read_text())
        info["padding"] = "x" * (20 * 2**20)
        info_path.write_text(json.dumps(info))
        pattern = r"could not read its info file: GET .*/info answered a \d+-byte body; at most 16777216 bytes fit"
    with MirrorServer(root) as server:
        with pytest.raises(LayerError, match=pattern):
            _source(server.base_url, tmp_path / "c").discover()


def test_a_server_that_never_answers_ends_the_run_promptly(wide, tmp_path):
    with MirrorServer(wide.root, faults=Faults(hostile={"em_aligned/12_12_40/": "stall"})) as server:
        out = _fetch(server.base_url, tmp_path, retry=FAST, timeout=120)
    assert out["error"].startswith("TransferError: GET ") and "em_aligned/12_12_40/" in out["error"]
    assert "failed 2 times" in out["error"] or "cancelled" in out["error"]
    assert out["seconds"] < 20, out  # 2 attempts of 1 s read timeouts, with the others cancelled


def test_a_trickling_body_is_cut_at_the_deadline(wide, tmp_path):
    chunk = _a_chunk(wide)
    faults = Faults(hostile={f"em_aligned/12_12_40/{chunk}": "trickle"}, trickle_seconds=0.3)
    with MirrorServer(wide.root, faults=faults) as server:
        out = _fetch(server.base_url, tmp_path, retry=FAST, timeout=120)
        assert out["error"].startswith("TransferError: GET ") and chunk in out["error"]
        assert "within the 2 s deadline" in out["error"]
        assert out["seconds"] < 20, out
        server.set_faults(None)
        _equal_to_mirror(wide, server.base_url, tmp_path)


def test_a_box_where_every_chunk_answers_404_warns(wide, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(wide.root, root)
    for p in (root / "wildenberg2023/mouse_v1_l4_p14/psd_autoseg/12_12_40").iterdir():
        p.unlink()
    with MirrorServer(root) as server:
        with pytest.warns(UserWarning, match=r"every source chunk of .*psd_autoseg.* answered 404"):
            ds = _source(server.base_url, tmp_path / "c").read()
    assert not ds["labels"].values.any()


# -- a cache damaged after it was written -----------------------------------------------------------

@pytest.fixture
def complete(wide, tmp_path):
    server = MirrorServer(wide.root).start()
    src = _source(server.base_url, tmp_path)
    src.materialise()
    yield server, src, StoreCache(tmp_path, src.plan.name), wide
    server.stop()


def _fresh(server, src):
    return _source(server.base_url, src.request.cache_dir)


def test_a_flipped_byte_is_found_by_the_inner_chunk_checksum(complete):
    server, src, cache, mirror = complete
    path = cache.shard_file("raw", (0, 0, 1))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedShard, match=r"array raw, shard \(0, 0, 1\) is damaged \(inner chunk .* fails its "
                                           r"crc32c\)\. Run `wildenberg-intake verify .*` .* repair\(\)"):
        _fresh(server, src).read()
    with pytest.raises(DamagedShard, match=r"its chunk at byte \d+ fails its crc32c"):  # checked on its first read
        _source(server.base_url, src.request.cache_dir, check_hashes=True).to_dask()["raw"].values
    repaired = _fresh(server, src).repair()
    assert repaired == {"raw": [(0, 0, 1)]}
    _equal_to_mirror(mirror, server.base_url, src.request.cache_dir)


@pytest.mark.parametrize("damage", ["swapped", "emptied", "random"])
def test_damaged_shards_are_refused_when_read_naming_the_remedy(complete, damage):
    server, src, cache, mirror = complete
    a, b = cache.shard_file("raw", (0, 0, 0)), cache.shard_file("raw", (0, 0, 2))
    if damage == "swapped":
        da, db = a.read_bytes(), b.read_bytes()
        assert len(da) != len(db)
        a.write_bytes(db), b.write_bytes(da)
        pattern = r"shard \(0, 0, [02]\) is damaged \(\d+ bytes on disk, \d+ recorded\)"
    elif damage == "emptied":
        a.write_bytes(b"")
        pattern = r"shard \(0, 0, 0\) is damaged \(0 bytes on disk"
    else:
        a.write_bytes(np.random.default_rng(0).integers(0, 256, a.stat().st_size, dtype=np.uint8).tobytes())
        pattern = r"shard \(0, 0, 0\) is damaged \(its index fails its crc32c\)"
    with pytest.raises(DamagedShard, match=pattern):
        _fresh(server, src).read()
    _fresh(server, src).repair()
    _equal_to_mirror(mirror, server.base_url, src.request.cache_dir)
