"""A run killed with SIGKILL half way and rerun ends byte-identical to an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.mirror import MirrorServer, build_mirror

FETCH = """
import sys, intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
src = cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], workers=1, progress=False)
print(src.materialise())
"""


def _run(base_url, cache_dir):
    return subprocess.Popen([sys.executable, "-c", FETCH, base_url, str(cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_mirror(tmp_path_factory):
    # 1100 x 520 x 16 label voxels: 3 x 2 output shards per array.
    return build_mirror(tmp_path_factory.mktemp("mirror-big"), shape_xyz=(1100, 520, 16),
                        experiments=("p14",))


def test_sigkill_half_way_then_rerun_is_byte_identical(big_mirror, tmp_path):
    # Latency stretches the run so that the kill lands with some shards done and some not.
    with MirrorServer(big_mirror.root, latency=0.15) as server:
        clean = _run(server.base_url, tmp_path / "clean")
        out, err = clean.communicate(timeout=300)
        assert clean.returncode == 0, err
        clean_store = Path(out.strip())
        clean_requests = server.requests
        em_chunks = [p for p in clean_requests if "/em_aligned/12_12_40/" in p]
        # Each source chunk is fetched exactly once, though the output shards cut through them.
        assert em_chunks and all(clean_requests[p] == 1 for p in em_chunks)

        killed_cache = tmp_path / "killed"
        proc = _run(server.base_url, killed_cache)
        progress = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = [p for p in killed_cache.glob("wildenberg2023/*/progress/raw/*")
                     if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
            if len(found) >= 2:
                progress = found[0].parent.parent
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert progress is not None, "the run never recorded two shards"
        name = progress.parent.name
        cache = StoreCache(killed_cache, name)
        assert not cache.is_complete("raw") and not cache.is_complete("labels/psd")
        done_before = cache.done_shards("raw")
        assert 2 <= len(done_before) < 6

        killed_requests = server.requests - clean_requests
        rerun = _run(server.base_url, killed_cache)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
        resumed_requests = server.requests - clean_requests - killed_requests

    resumed_store = Path(out.strip())
    assert resumed_store.name == clean_store.name and resumed_store.parent.name == clean_store.parent.name
    assert cache.is_complete("raw") and cache.is_complete("labels/psd")
    assert _tree(resumed_store) == _tree(clean_store)
    # Staged chunks and recorded shards survive the kill: the two runs together fetch each EM chunk
    # about once (only chunks in flight at the kill are fetched again).
    both = killed_requests + resumed_requests
    refetched = sum(both[p] for p in em_chunks) - len(em_chunks)
    assert sum(resumed_requests[p] for p in em_chunks) < len(em_chunks)
    assert 0 <= refetched <= 8  # at most one shard's chunks were in flight


def test_shards_assembled_in_z_slabs_have_the_bytes_of_whole_assembly(catalog, tmp_path, monkeypatch):
    """A shard above SLAB_BYTES (a uint32 one: 128 MB) is fetched, assembled and encoded 64 z-slices
    at a time: its file, its record and its voxels are those of a whole assembly, and each source
    chunk is still fetched once (one that spans two slabs goes through the stage)."""
    from wildenberg_intake.store import shards as engine
    from conftest import all_layers, expected_window
    mirror = build_mirror(tmp_path / "mirror", shape_xyz=(300, 260, 150), experiments=("p14",))
    with MirrorServer(mirror.root) as server:
        whole = Path(catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path / "whole"),
                                           progress=False).materialise())
        monkeypatch.setattr(engine, "SLAB_BYTES", 1)  # every shard deeper than 64 slices in slabs
        assert engine._slabs((150, 260, 300), 4) == [(0, 64), (64, 128), (128, 150)]
        before = server.requests
        src = catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path / "slabs"), progress=False)
        slabbed = Path(src.materialise())
        fetched = server.requests - before
        ds = src.read()
    assert _tree(slabbed) == _tree(whole)
    assert _tree(slabbed.parent / "progress") == _tree(whole.parent / "progress")  # content sha256 too
    bbox = ds.attrs["bbox_nm"]
    raw, _ = expected_window(mirror, "p14", "em_aligned", 1, bbox, all_layers("p14"))
    labels, _ = expected_window(mirror, "p14", "saturated_autoseg", 0, bbox, all_layers("p14"))
    assert ds["raw"].shape[0] > 128  # two shards in z, the first one in two slabs
    np.testing.assert_array_equal(ds["raw"].values, raw)
    np.testing.assert_array_equal(ds["labels"].values, labels)
    chunks = [p for p in fetched if not p.endswith(("/info", "/provenance"))]
    assert chunks and all(fetched[p] == 1 for p in chunks), "each chunk fetched once"
