"""lazy=True torch datasets: patches start before the store is cached, equal the mirror's arrays at
their coordinates, are reproducible by seed, respect the split and the disk budget."""

import itertools
import time

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("torch_em")

from wildenberg_intake import training  # noqa: E402
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.mirror import MirrorServer  # noqa: E402

from tests_helpers import locate as _locate  # noqa: E402
from conftest import all_layers, expected_window, record_windows  # noqa: E402

PATCH = (8, 128, 128)
ALL = [-1e9, 1e9] * 3


def identity(x):
    return x


def identity2(x, y):
    return x, y


def _expected(mirror, channel, mip):
    return expected_window(mirror, "p14", channel, mip, ALL, all_layers("p14"))[0]


def _lazy(server, cache_dir, **kwargs):
    return training.get_dataset("p14_saturated", PATCH, base_url=server.base_url, cache_dir=str(cache_dir),
                                progress=False, lazy=True, raw_transform=identity, transform=identity2,
                                label_transform=None, label_dtype=torch.int64, n_samples=40, **kwargs)


def test_first_patch_before_the_store_is_cached_and_patches_equal_the_mirror(wide, tmp_path):
    raw_all, lab_all = _expected(wide, "em_aligned", 1), _expected(wide, "saturated_autoseg", 0)
    # 0.3 s a request: a shard takes ~0.6 s (raw, then labels), the store ~4 s with one prefetch thread.
    with MirrorServer(wide.root, latency=0.3) as server:
        t = time.perf_counter()
        ds = _lazy(server, tmp_path, workers=1)
        inner, windows = record_windows(ds)
        raw, labels = ds[0]
        first = time.perf_counter() - t
        cache = StoreCache(tmp_path, inner._lazy["plan"].name)
        cached_at_first = len(cache.done_shards("raw"))
        assert 1 <= cached_at_first < 6, "the first patch must not wait for the whole store"
        assert first < 60
        # Every patch is the mirror at its window, including those drawn while the pool grows.
        for i in range(12):
            raw, labels = ds[i]
            bb = windows[-1]
            np.testing.assert_array_equal(raw.numpy()[0], raw_all[bb])
            np.testing.assert_array_equal(labels.numpy()[0], lab_all[bb])
        while inner.prefetcher.running:
            time.sleep(0.05)
        assert inner.prefetcher.error is None
        assert len(cache.done_shards("raw")) == 6 and cache.is_complete("labels/saturated")
        # Once all is cached, windows come from the whole box, shard seams included.
        for i in range(40):
            ds[i]
        touched = {(y, x) for bb in windows for y in {bb[1].start // 512, (bb[1].stop - 1) // 512}
                   for x in {bb[2].start // 512, (bb[2].stop - 1) // 512}}
        assert {(0, 0), (0, 1), (0, 2)} <= touched
        assert any(bb[2].start // 512 != (bb[2].stop - 1) // 512 for bb in windows), "no window crossed a seam"
        requests = {p: n for p, n in server.requests.items() if not p.endswith(("/info", "/provenance"))}
    assert set(requests.values()) == {1}


def test_same_seed_and_cache_state_give_the_same_patches(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        first = _lazy(server, tmp_path, seed=7, warmup=1.0)  # wait for every shard: a fixed cache state
        a_inner, a = record_windows(first)
        seq_a = [first[i][0] for i in range(10)]
        a_inner.prefetcher.stop()
        second = _lazy(server, tmp_path, seed=7, warmup=1.0)
        b_inner, b = record_windows(second)
        seq_b = [second[i][0] for i in range(10)]
        other = _lazy(server, tmp_path, seed=8, warmup=1.0)
        _, c = record_windows(other)
        [other[i] for i in range(10)]
    assert a == b and all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert c != a


def test_a_partial_pool_only_yields_cached_windows(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        src = training.resolve_sources("p14_saturated", base_url=server.base_url, cache_dir=str(tmp_path),
                                       progress=False)[0]
        arrays = src.arrays()
        for arr in arrays.values():  # cache two neighbouring shards by hand
            arr[0:1, 0:1, 0:1]
            arr[0:1, 0:1, 600:601]
        ds = _lazy(server, tmp_path, workers=1)
        inner, windows = record_windows(ds)
        inner.prefetcher.stop()  # the pool stays as it is
        for i in range(30):
            ds[i]
    cached = {(0, 0, 0), (0, 0, 1)}
    for bb in windows:
        shards = {(bb[0].start // 128, y, x) for y in range(bb[1].start // 512, (bb[1].stop - 1) // 512 + 1)
                  for x in range(bb[2].start // 512, (bb[2].stop - 1) // 512 + 1)}
        assert shards <= cached, bb


def test_split_and_loader_workers(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        loader = training.get_loader("p14_psd", (2, 128, 128), batch_size=2, base_url=server.base_url,
                                     cache_dir=str(tmp_path), progress=False, lazy=True, split="val",
                                     num_workers=2, n_samples=8, raw_transform=identity, transform=identity2)
        batches = list(loader)
        inner = loader.dataset.datasets[0] if hasattr(loader.dataset, "datasets") else loader.dataset
        z0 = inner.roi[0].start
        inner.prefetcher.stop()
    assert len(batches) == 4 and batches[0][0].shape == (2, 1, 2, 128, 128)
    assert z0 == round(0.85 * 16)
    raw_all = _expected(wide, "em_aligned", 1)
    for raw, _ in batches:  # each patch is the mirror at some window of the val part of the box
        for patch in raw.numpy()[:, 0].astype(np.uint8):
            found = _locate(patch, raw_all)
            assert found and all(z >= z0 for z, _, _ in found)


def test_disk_budget_holds_while_training(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        probe = training.resolve_sources("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path / "p"),
                                         progress=False)[0]
        for arr in probe.arrays().values():
            arr[:, :, :]
        pc = StoreCache(tmp_path / "p", probe.plan.name)
        full = sum(pc.disk_usage(n)[1] for n in ("raw", "labels/psd"))
        largest = max(pc.shard_bytes(n, i) for n in ("raw", "labels/psd") for i in pc.done_shards(n))
        limit = full // 2
        ds = training.get_dataset("p14_psd", PATCH, base_url=server.base_url, cache_dir=str(tmp_path / "c"),
                                  progress=False, lazy=True, raw_transform=identity, transform=identity2,
                                  n_samples=20, cache_limit=limit, workers=1)
        inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
        cache = StoreCache(tmp_path / "c", inner._lazy["plan"].name)
        raw_all = _expected(wide, "em_aligned", 1)
        inner, windows = record_windows(ds)
        for i in range(20):
            raw, _ = ds[i]
            np.testing.assert_array_equal(raw.numpy()[0], raw_all[windows[-1]])
            # Between reads, beyond the budget only the shard the prefetcher is writing right now.
            assert sum(cache.disk_usage(n)[1] for n in ("raw", "labels/psd")) <= limit + largest
        inner.prefetcher.stop()
        assert sum(cache.disk_usage(n)[1] for n in ("raw", "labels/psd")) <= limit
        assert 0 < len(cache.done_shards("raw")) < 6
    assert inner.prefetcher.error is None


def _independent_window_count(lo, hi, patch, cached) -> int:
    """Windows of `patch` inside [lo, hi) whose every shard is in `cached`: per axis the starts grouped
    by the (first, last) shard their window spans, then every combination checked."""
    from wildenberg_intake.store.format import SHARDS
    axes = []
    for a, b, p, n in zip(lo, hi, patch, SHARDS):
        starts = np.arange(a, b - p + 1)
        spans, counts = np.unique(np.stack([starts // n, (starts + p - 1) // n], 1), axis=0, return_counts=True)
        axes.append(list(zip(map(tuple, spans), counts)))
    total = 0
    for combo in itertools.product(*axes):
        ranges = [range(f, l + 1) for (f, l), _ in combo]
        if all(s in cached for s in itertools.product(*ranges)):
            total += int(np.prod([c for _, c in combo]))
    return total


def test_the_window_table_follows_shards_cached_and_evicted_and_numbers_every_window_once():
    from wildenberg_intake.store.format import SHARDS
    from wildenberg_intake.store.lazy import ShardPool
    lo, hi, patch = (100, 300, 200), (300, 1300, 1400), (16, 300, 256)
    pool = ShardPool([], lo, hi, patch)
    rng = np.random.default_rng(1)
    cached = set()
    for step in range(40):
        for s in pool.shards:  # shards cached and evicted at random, a few at a time
            if rng.random() < 0.15:
                cached ^= {s}
        table = pool._table(frozenset(cached))
        assert table.total == _independent_window_count(lo, hi, patch, cached), step
        if table.total:
            numbers = rng.choice(table.total, size=min(200, table.total), replace=False)
            starts = {table.locate(int(k)) for k in numbers}
            assert len(starts) == len(numbers)  # one window per number
            for start in starts:
                assert all(a <= s <= b - p for s, a, b, p in zip(start, lo, hi, patch))
                spans = [range(s // n, (s + p - 1) // n + 1) for s, p, n in zip(start, patch, SHARDS)]
                assert all(shard in cached for shard in itertools.product(*spans))


def test_a_dataset_type_the_package_cannot_read_through_is_refused(wide, tmp_path, monkeypatch):
    """torch-em returning another dataset type (its own zarr-python reads) would read a lazy store's
    unfetched shards as zeros: refused with the type named, before any patch."""
    import torch_em

    class OtherDataset(torch_em.data.SegmentationDataset):
        pass
    real = torch_em.default_segmentation_dataset

    def other(*args, **kwargs):
        ds = real(*args, **kwargs)
        for inner in getattr(ds, "datasets", [ds]):
            inner.__class__ = OtherDataset
        return ds
    monkeypatch.setattr(torch_em, "default_segmentation_dataset", other)
    with MirrorServer(wide.root) as server:
        with pytest.raises(TypeError, match=r"torch-em built a OtherDataset, whose reads the package cannot replace"):
            _lazy(server, tmp_path, workers=1)
        from wildenberg_intake import get_dataset  # a complete store too: never a silent zarr-python read
        with pytest.raises(TypeError, match=r"torch-em built a OtherDataset, whose reads the package cannot replace"):
            get_dataset(["p14_psd"], (8, 64, 64), base_url=server.base_url, cache_dir=str(tmp_path / "full"),
                        progress=False)
