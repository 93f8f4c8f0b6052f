"""Absence is never data: a shard file that is missing, truncated or another shard's is refused by
every read path (or fetched again), the pyramid is made in one pass and never from a missing
parent, and COMPLETE, eviction and the label list cannot interleave."""

import multiprocessing
import threading
import time

import numpy as np
import pytest
import zarr

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store.layout import array_path, shard_box
from wildenberg_intake.store.cache import DamagedShard, StoreCache, has_file
from wildenberg_intake.store.engine import cache_for
from wildenberg_intake.store.reader import ShardedArrayReader

from conftest import all_layers, expected_window

ALL = [-1e9, 1e9] * 3


@pytest.fixture(scope="module")
def wide_server(wide):
    with MirrorServer(wide.root) as server:
        yield server


def _labelled_shard(cache, name):
    """A recorded shard of `name` that has a file (holds voxels), with the most bytes."""
    done = [i for i in cache.done_shards(name) if has_file(cache.record(name, i))]
    return max(done, key=lambda i: cache.record(name, i)["bytes"])


@pytest.mark.torch
def test_a_deleted_shard_file_is_refused_by_every_read_path_and_repaired(wide, wide_server, catalog, tmp_path):
    pytest.importorskip("torch")
    from wildenberg_intake import training
    src = catalog.p14_psd(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    src.materialise()
    cache = cache_for(src.plan)
    name = "labels/psd"
    index = _labelled_shard(cache, name)
    shard = cache.shard_file(name, index)
    shard.unlink()

    reader = ShardedArrayReader(cache.zarr_path / array_path(name))
    start, stop = shard_box(index, reader.shape)
    with pytest.raises(DamagedShard, match=r"shard \(%d, %d, %d\).*its file is missing" % index):
        reader[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    with pytest.raises(DamagedShard, match="its file is missing"):
        src.read()
    with pytest.raises(DamagedShard, match="its file is missing"):
        src.to_dask()["labels"].values
    # The torch-em dataset over the complete store (not lazy): a window over the whole box.
    ds = training.get_dataset("p14_psd", tuple(reader.shape), base_url=wide_server.base_url,
                              cache_dir=str(tmp_path), progress=False)
    with pytest.raises(DamagedShard, match="its file is missing"):
        ds[0]
    report = src.verify()
    assert report[name]["missing"] == [index] and not report[name]["corrupt"]

    assert src.repair() == {name: [index]}
    expected = expected_window(wide, "p14", "psd_autoseg", 0, ALL, all_layers("p14"))[0]
    assert expected[tuple(slice(a, b) for a, b in zip(start, stop))].any()  # the shard held PSDs
    np.testing.assert_array_equal(src.read()["labels"].values, expected)
    np.testing.assert_array_equal(ShardedArrayReader(cache.zarr_path / array_path(name))[:], expected)


def test_truncated_swapped_and_unrecorded_shards_are_damaged(wide_server, catalog, tmp_path):
    src = catalog.p14_saturated(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    src.materialise()
    cache = cache_for(src.plan)
    name = "labels/saturated"
    # a: the largest shard, b: another, smaller one (its file fits in a's recorded size).
    by_size = sorted((cache.record(name, i)["bytes"], i) for i in cache.done_shards(name) if has_file(cache.record(name, i)))
    b, a = by_size[0][1], by_size[-1][1]
    path = cache.zarr_path / array_path(name)

    def read(index):
        reader = ShardedArrayReader(path)
        start, stop = shard_box(index, reader.shape)
        return reader[tuple(slice(x, y) for x, y in zip(start, stop))]

    good = read(a)
    # Another shard's file in its place, padded to the recorded size: only the index crc tells.
    blob_b = cache.shard_file(name, b).read_bytes()
    size_a = cache.record(name, a)["bytes"]
    saved = cache.shard_file(name, a).read_bytes()
    body, tail = blob_b[:-(16 * 32 + 4)], blob_b[-(16 * 32 + 4):]
    assert len(blob_b) < size_a
    cache.shard_file(name, a).write_bytes(body + b"\0" * (size_a - len(blob_b)) + tail)
    with pytest.raises(DamagedShard, match="another shard's file"):
        read(a)
    cache.shard_file(name, a).write_bytes(blob_b if len(blob_b) != size_a else blob_b + b"\0")
    with pytest.raises(DamagedShard, match=r"bytes on disk, %d recorded" % size_a):
        read(a)
    cache.shard_file(name, a).write_bytes(saved[:len(saved) // 2])
    with pytest.raises(DamagedShard, match="recorded"):
        read(a)
    cache.shard_file(name, a).write_bytes(saved)
    np.testing.assert_array_equal(read(a), good)
    cache.record_path(name, a).unlink()  # as if evicted: not recorded
    with pytest.raises(DamagedShard, match="not recorded as written"):
        read(a)


def test_the_pyramid_is_made_in_one_pass_without_reading_level_0_back(wide, wide_server, catalog, tmp_path,
                                                                       monkeypatch):
    from tests_helpers import independent_pyramid
    reads = []
    original = ShardedArrayReader.__getitem__
    monkeypatch.setattr(ShardedArrayReader, "__getitem__", lambda self, key: reads.append(self.path) or original(self, key))
    src = catalog.p14_saturated(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    path = src.materialise()
    assert reads == []  # no level read back from the level below
    cache = cache_for(src.plan)
    assert not (cache.root / "staging" / "quarters").exists() or not any(
        p.is_file() for p in (cache.root / "staging" / "quarters").rglob("*"))  # every quarter used and released
    monkeypatch.setattr(ShardedArrayReader, "__getitem__", original)
    store = zarr.open_group(path, mode="r")
    raw = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0]
    labels = expected_window(wide, "p14", "saturated_autoseg", 0, ALL, all_layers("p14"))[0]
    for prefix, base, is_label in (("raw_s", raw, False), ("labels/saturated/", labels, True)):
        for level, want in enumerate(independent_pyramid(base[:3], is_label, 2), start=1):
            np.testing.assert_array_equal(store[f"{prefix}{level}"][:3], want)


def test_a_parent_evicted_before_its_level_shard_is_made_is_written_again_not_read_as_zeros(
        wide, wide_server, catalog, tmp_path, monkeypatch):
    """Deterministic eviction race: the level shard's quarters are gone (used, then the level shard
    evicted), and a hook evicts its parent between the writer's done check and its read."""
    from wildenberg_intake.store.pyramid import LevelWriter
    from tests_helpers import independent_pyramid
    src = catalog.p14_psd(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    src.materialise()
    cache = cache_for(src.plan)
    level = "labels/psd@1"
    target = (0, 0, 0)
    assert cache.evict(level, target)
    parent = (0, 0, 0)
    evicted = []
    real_hold = StoreCache.hold

    def hold(self, name, index, touch=False):
        if name == "labels/psd" and index == parent and not evicted:
            evicted.append(self.evict(name, index))  # evicted between the done check and the read
        return real_hold(self, name, index, touch)
    monkeypatch.setattr(StoreCache, "hold", hold)
    writer = LevelWriter(src.plan, level)
    assert writer.write(target) > 0
    assert evicted == [True] and cache.is_done("labels/psd", parent)
    labels = expected_window(wide, "p14", "psd_autoseg", 0, ALL, all_layers("p14"))[0]
    want = independent_pyramid(labels[:3], True, 1)[0]
    start, stop = shard_box(target, want.shape)
    got = ShardedArrayReader(cache.zarr_path / array_path(level))[tuple(slice(a, b) for a, b in zip(start, stop))]
    np.testing.assert_array_equal(got, want[tuple(slice(a, b) for a, b in zip(start, stop))])
    assert want[tuple(slice(a, b) for a, b in zip(start, stop))].any()
    assert all(not e["missing"] and not e["corrupt"] for e in cache.verify().values())


@pytest.mark.parametrize("when", ["unlocked scan", "locked re-check"])
@pytest.mark.parametrize("forget", ["evict", "invalidate"])
def test_complete_is_never_written_over_a_shard_forgotten_meanwhile(wide_server, catalog, tmp_path, monkeypatch,
                                                                    when, forget):
    """Another process evicts (or invalidates) a shard while `mark_complete` checks the records:
    during its first, unlocked scan, the re-check under the array lock refuses; during that locked
    re-check, the eviction waits for the lock and removes COMPLETE after it. Either way COMPLETE
    never stands over a forgotten shard."""
    src = catalog.p14_psd(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    src.materialise()
    cache = cache_for(src.plan)
    name = "labels/psd"
    shape = src.plan.arrays[name].shape
    victim = sorted(cache.done_shards(name))[0]
    (cache.progress / name / "COMPLETE").unlink()
    threads, scans = [], []
    real = StoreCache.done_shards

    def done_shards(self, array):
        found = real(self, array)
        if array == name:
            scans.append(1)
            if len(scans) == (1 if when == "unlocked scan" else 2):
                action = (lambda: self.evict(name, victim)) if forget == "evict" else \
                    (lambda: self.invalidate(name, [victim]))
                t = threading.Thread(target=action)
                t.start()
                threads.append(t)
                if when == "unlocked scan":
                    t.join()  # it ends before the re-check: nothing holds the array lock yet
                else:
                    time.sleep(0.3)  # it waits for the array lock we hold
        return found
    monkeypatch.setattr(StoreCache, "done_shards", done_shards)
    if when == "unlocked scan":
        with pytest.raises(RuntimeError, match="1 shards are not recorded"):
            cache.mark_complete(name, shape)
    else:
        cache.mark_complete(name, shape)
    threads[0].join()
    assert not cache.is_done(name, victim)
    assert not cache.is_complete(name)


def _add_label(cache_dir, store, label, delay):
    import wildenberg_intake.store.cache as cm
    real = cm.durable_write

    def slow(path, *parts):
        if path.name == "zarr.json" and path.parent.name == "labels":
            time.sleep(delay)  # widen the read-modify-write window of the label list
        return real(path, *parts)
    cm.durable_write = slow
    cache = cm.StoreCache(cache_dir, store)
    cache.ensure_array(f"labels/{label}", (4, 4, 4), "uint8", True, {}, ome={"name": label})


def test_two_processes_adding_different_labels_both_end_up_listed(tmp_path):
    cache = StoreCache(tmp_path, "p14-test")
    cache.initialise({"test": 1}, {})
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_label, args=(tmp_path, "p14-test", label, 0.5))
             for label in ("psd", "vesicle_cloud")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    listed = zarr.open_group(str(cache.zarr_path / "labels"), mode="r").attrs["ome"]["labels"]
    assert listed == ["psd", "vesicle_cloud"]


def test_recomputing_a_content_checksum_refuses_a_recorded_shard_whose_file_is_gone(wide_server, catalog, tmp_path):
    """A lock's `--recompute` reads through the package's reader: a deleted shard is damage, not
    zeros hashed into a checksum (zarr-python reads it as the fill value)."""
    from wildenberg_intake.store.integrity import recompute_content_checksum
    src = catalog.p14_psd(base_url=wide_server.base_url, cache_dir=str(tmp_path), progress=False)
    src.materialise()
    cache = cache_for(src.plan)
    name = "labels/psd"
    assert recompute_content_checksum(cache, name) == cache.content_checksum(name, src.plan.arrays[name].shape)
    index = next(i for i in sorted(cache.done_shards(name)) if has_file(cache.record(name, i)))
    cache.shard_file(name, index).unlink()
    with pytest.raises(DamagedShard, match=r"shard \(%d, %d, %d\) is damaged" % index):
        recompute_content_checksum(cache, name)
