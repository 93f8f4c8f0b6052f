"""The foreground index and the sampler built on it: the index equals counts computed from the
mirror's arrays wherever a shard is recorded, however the shard got there; patches proposed from
it and accepted by their exact count follow the distribution of plain rejection sampling."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.torch
from scipy.stats import chisquare

from wildenberg_intake import cli, get_dataset, get_loader
from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store.engine import cache_for
from wildenberg_intake.store.foreground import BLOCK, array_counts
from wildenberg_intake.training.sampling import ForegroundProposals

from conftest import all_layers, expected_window

EVERYTHING = [-1e9, 1e9] * 3


def _counts(labels: np.ndarray) -> np.ndarray:
    """Non-zero voxels per BLOCK, computed plainly (padded, reshaped, summed)."""
    pad = [(0, -n % b) for n, b in zip(labels.shape, BLOCK)]
    nz = np.pad(labels != 0, pad)
    (z, y, x), (bz, by, bx) = nz.shape, BLOCK
    return nz.reshape(z // bz, bz, y // by, by, x // bx, bx).sum(axis=(1, 3, 5))


def _check_index(cache, name, labels, shards=None):
    counts, known = array_counts(cache, name, labels.shape)
    want = _counts(labels)
    recorded = cache.done_shards(name) if shards is None else shards
    assert recorded, "nothing recorded to check"
    for index in recorded:
        at = tuple(slice(i * s // b, (i + 1) * s // b) for i, s, b in zip(index, (128, 512, 512), BLOCK))
        assert known[at].all(), index
        np.testing.assert_array_equal(counts[at], want[at])
    assert known.sum() == sum(known[tuple(slice(i * s // b, (i + 1) * s // b) for i, s, b in
                                        zip(index, (128, 512, 512), BLOCK))].size for index in recorded)


def _labels(mirror, channel):
    return expected_window(mirror, "p14", channel, 0, EVERYTHING, all_layers("p14"))[0]


def test_the_index_equals_the_mirrors_counts_after_a_fetch_a_repair_a_lazy_read_and_a_scan(wide, catalog, tmp_path,
                                                                                           capsys):
    psd, saturated = _labels(wide, "psd_autoseg"), _labels(wide, "saturated_autoseg")
    with MirrorServer(wide.root) as server:
        # lazily, as shards arrive: only theirs
        lazy = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "lazy"), progress=False)
        lazy.to_dask().isel(x=slice(600, 1050))["labels"].values
        cache = cache_for(lazy.plan)
        assert cache.done_shards("labels/psd") == {(0, 0, 1), (0, 0, 2), (0, 1, 1), (0, 1, 2)}
        _check_index(cache, "labels/psd", psd)
        # a fetch, psd and the saturated segmentation (uint64, many ids) into one store
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "full"), progress=False)
        src.materialise()
        catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path / "full"), progress=False).materialise()
        cache = cache_for(src.plan)
        _check_index(cache, "labels/psd", psd)
        _check_index(cache, "labels/saturated", saturated)
        assert "foreground" not in cache.record("raw", (0, 0, 0))  # labels only
        # a repair rewrites a lost shard with its index
        victim = max(cache.done_shards("labels/psd"), key=lambda i: cache.record("labels/psd", i)["bytes"])
        cache.shard_file("labels/psd", victim).unlink()
        src.repair()
        _check_index(cache, "labels/psd", psd)
        # a store written before the index: the one-time scan, which keeps each record's last use
        for index in cache.done_shards("labels/psd"):
            path = cache.record_path("labels/psd", index)
            record = json.loads(path.read_text())
            del record["foreground"]
            path.write_text(json.dumps(record))
            os.utime(path, (1e9, 1e9 + sum(index)))
        assert not array_counts(cache, "labels/psd", psd.shape)[1].any()
        code = cli.main(["index", "p14_psd", "--base-url", server.base_url, "--cache-dir", str(tmp_path / "full"),
                         "--quiet"])
        assert code == 0
        assert f"p14_psd: indexed 6 shards of labels/psd in {cache.root}" in capsys.readouterr().out
        _check_index(cache, "labels/psd", psd)
        assert {cache.record_path("labels/psd", i).stat().st_mtime for i in cache.done_shards("labels/psd")} == \
            {1e9 + sum(i) for i in cache.done_shards("labels/psd")}


KILLED_FETCH = """
import sys, intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], workers=1, progress=False).materialise()
"""


def test_the_index_of_a_killed_and_resumed_fetch_equals_the_mirrors_counts(wide, catalog, tmp_path):
    psd = _labels(wide, "psd_autoseg")
    cache_dir = tmp_path / "killed"
    with MirrorServer(wide.root, latency=0.1) as server:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, server.base_url, str(cache_dir)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not [p for p in cache_dir.glob("wildenberg2023/*/progress/labels/psd/*")
                                                   if p.name.count(".") == 2 and p.name.replace(".", "").isdigit()]:
            time.sleep(0.005)  # killed once its first label shard is recorded
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(cache_dir), progress=False)
        cache = cache_for(src.plan)
        assert 0 < len(cache.done_shards("labels/psd")) < 6
        src.materialise()
    _check_index(cache, "labels/psd", psd)


def _exact_fractions(labels, patch, box):
    """The foreground fraction of the patch at every origin torch-em draws in `box` (summed-area table)."""
    table = np.zeros(np.add(labels.shape, 1), dtype=np.int64)
    table[1:, 1:, 1:] = (labels != 0).cumsum(0).cumsum(1).cumsum(2)
    (z0, y0, x0), (z1, y1, x1) = box
    pz, py, px = patch
    z, y, x = np.meshgrid(np.arange(z0, z1 - pz), np.arange(y0, y1 - py), np.arange(x0, x1 - px), indexing="ij")
    Z, Y, X = z + pz, y + py, x + px
    total = (table[Z, Y, X] - table[z, Y, X] - table[Z, y, X] - table[Z, Y, x]
             + table[z, y, X] + table[z, Y, x] + table[Z, y, x] - table[z, y, x])
    return np.stack([z, y, x], -1).reshape(-1, 3), total.ravel() / (pz * py * px)


def _sparse_labels(seed=3, shape=(48, 160, 192)):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(14):  # synapse-like blobs of several sizes
        c, r = rng.integers(0, shape), rng.integers(2, 9, size=3)
        labels[max(c[0] - r[0] // 2, 0):c[0] + r[0] // 2, max(c[1] - 2 * r[1], 0):c[1] + 2 * r[1],
               max(c[2] - 2 * r[2], 0):c[2] + 2 * r[2]] = rng.integers(1, 4)
    return labels


def test_foreground_proposals_accepted_by_the_exact_count_follow_rejection_samplings_distribution():
    """Uniform over the acceptable origins: the sampler's accepted origins, binned by foreground
    fraction and by position, match the exact enumeration (chi-square), as plain rejection
    sampling does, while a sampler that prefers dense patches fails the same test."""
    from wildenberg_intake.store.foreground import block_counts
    labels, patch, box, threshold = _sparse_labels(), (8, 40, 40), ((4, 0, 0), (44, 160, 192)), 0.01
    origins, fractions = _exact_fractions(labels, patch, box)
    acceptable = fractions > threshold
    assert 0.02 < acceptable.mean() < 0.5, acceptable.mean()
    edges = np.quantile(fractions[acceptable], np.linspace(0, 1, 11)[1:-1])
    expected = np.bincount(np.digitize(fractions[acceptable], edges), minlength=10) / acceptable.sum()
    zbins = np.bincount(origins[acceptable][:, 0] // 8, minlength=5) / acceptable.sum()
    exact = dict(zip(map(tuple, origins), fractions))

    def draws(propose, n=40000, seed=0):
        rng, out = np.random.default_rng(seed), []
        while len(out) < n:
            origin = propose(rng)
            if exact[origin] > threshold:
                out.append(origin)
        return np.array(out)

    def p_values(sample):
        f = np.array([exact[tuple(o)] for o in sample])
        by_fraction = np.bincount(np.digitize(f, edges), minlength=10)
        by_z = np.bincount(sample[:, 0] // 8, minlength=5)
        return (chisquare(by_fraction, expected * len(sample)).pvalue,
                chisquare(by_z[zbins > 0], zbins[zbins > 0] * len(sample)).pvalue)

    fg = ForegroundProposals([block_counts(labels).astype(np.int32)], labels.shape, box, patch, [threshold])
    assert acceptable.sum() <= fg.candidates < len(origins)  # a superset, narrower than everything
    ours = draws(fg.propose)
    assert min(p_values(ours)) > 1e-3, p_values(ours)
    rejection = draws(lambda rng: tuple(int(rng.integers(lo, hi - p)) for lo, hi, p in zip(*box, patch)))
    assert min(p_values(rejection)) > 1e-3, p_values(rejection)
    weights = np.where(acceptable, fractions, 0) / np.where(acceptable, fractions, 0).sum()  # prefers dense

    def dense(rng):
        return tuple(origins[rng.choice(len(origins), p=weights)])
    assert min(p_values(draws(dense, n=4000))) < 1e-6
    # every acceptable origin is a candidate: none is ever out of reach
    candidates = set()
    axes, grid, where, _ = fg._cells
    for k in where:
        cell = np.unravel_index(k, grid)
        ranges = [range(axes[a][0][c], axes[a][0][c] + axes[a][1][c]) for a, c in enumerate(cell)]
        candidates |= {(z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]}
    assert {tuple(o) for o in origins[acceptable]} <= candidates and len(candidates) == fg.candidates


@pytest.fixture(scope="module")
def psd_store(wide, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("fg")
    with MirrorServer(wide.root) as server:
        yield server, str(cache_dir)


def test_datasets_with_min_foreground_give_patches_above_it_per_split_and_per_label(wide, psd_store):
    server, cache_dir = psd_store
    common = dict(base_url=server.base_url, cache_dir=cache_dir, progress=False)
    np.random.seed(0)
    ds = get_dataset(["p14_psd"], (8, 128, 128), min_foreground=0.01, split="train", **common)
    inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
    for i in range(20):
        raw, labels = ds[i]
        assert (labels.numpy() != 0).mean() > 0.01
    fg = inner._foreground
    assert fg.accepted == 20 and fg.proposed >= 20 and fg.voxels_read == fg.proposed * 8 * 128 * 128
    # several labels: every channel above its own threshold
    multi = get_dataset(["p14_psd"], (8, 128, 128), labels=["psd", "vesicle_cloud"], min_foreground=[0.005, 0.01],
                        **common)
    for i in range(10):
        _, labels = multi[i]
        assert (labels[0] != 0).float().mean() > 0.005 and (labels[1] != 0).float().mean() > 0.01
    # foreground_weight: the rest drawn from everywhere (background too)
    mixed = get_dataset(["p14_psd"], (8, 128, 128), min_foreground=0.01, foreground_weight=0.3, **common)
    fractions = [(mixed[i][1].numpy() != 0).mean() for i in range(40)]
    assert sum(f <= 0.01 for f in fractions) >= 10 and sum(f > 0.01 for f in fractions) >= 5


def test_a_threshold_no_patch_meets_is_refused_at_construction_naming_the_largest(wide, psd_store):
    server, cache_dir = psd_store
    with pytest.raises(ValueError, match=r"min_foreground=0\.5: no \(8, 128, 128\) patch of p14_psd \(val split\) "
                                         r"can hold that much foreground; the most any holds is at most \{'p14_psd': \[0\.0\d+\]\}"):
        get_dataset(["p14_psd"], (8, 128, 128), min_foreground=0.5, split="val", base_url=server.base_url,
                    cache_dir=cache_dir, progress=False)
    for bad, message in ((1.5, r"min_foreground=1\.5 is not valid; allowed: a fraction in \[0, 1\)"),
                         ("x", r"min_foreground='x' is not valid")):
        with pytest.raises(ValueError, match=message):
            get_dataset(["p14_psd"], (8, 128, 128), min_foreground=bad, base_url=server.base_url, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"sampler='foreground' needs min_foreground"):
        get_dataset(["p14_psd"], (8, 128, 128), sampler="foreground", base_url=server.base_url, cache_dir=cache_dir)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_loader_workers_under_every_start_method_give_patches_above_the_threshold(wide, psd_store, context, lazy,
                                                                                   tmp_path):
    server, cache_dir = psd_store
    loader = get_loader(["p14_psd"], (8, 128, 128), batch_size=2, min_foreground=0.01, num_workers=2,
                        multiprocessing_context=context, base_url=server.base_url,
                        cache_dir=str(tmp_path) if lazy else cache_dir, lazy=lazy, progress=False)
    seen = 0
    for _, labels in loader:
        assert all((labels[b] != 0).float().mean() > 0.01 for b in range(labels.shape[0]))
        seen += 1
        if seen == 3:
            break
    assert seen == 3


def test_a_lazy_dataset_proposes_only_where_shards_are_cached_and_accepts_by_the_exact_count(wide, catalog, tmp_path):
    """lazy=True: origins come from the shards cached so far (their records' counts), each patch
    lies in cached shards and holds more than min_foreground; the counts it used equal the mirror's."""
    psd = _labels(wide, "psd_autoseg")
    with MirrorServer(wide.root) as server:
        np.random.seed(1)
        ds = get_dataset(["p14_psd"], (8, 128, 128), min_foreground=0.01, lazy=True, base_url=server.base_url,
                         cache_dir=str(tmp_path), progress=False, warmup=1)
        inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
        windows, sample = [], inner._sample_bounding_box

        def recording():
            bb = sample()
            windows.append((bb, inner._foreground.seen if inner._proposing else None))
            return bb
        inner._sample_bounding_box = recording
        for i in range(12):
            _, labels = ds[i]
            assert (labels.numpy() != 0).mean() > 0.01
        fg = inner._foreground
        assert fg.accepted == 12 and fg.proposed == len(windows)
        for bb, seen in windows:  # inside shards that were cached when it was proposed
            shards = {(0, j, k) for j in range(bb[1].start // 512, (bb[1].stop - 1) // 512 + 1)
                      for k in range(bb[2].start // 512, (bb[2].stop - 1) // 512 + 1)}
            assert shards <= set(seen), (bb, seen)
        known = fg.known
        np.testing.assert_array_equal(fg.counts[0][known], _counts(psd)[known])
        if inner.prefetcher is not None:
            inner.prefetcher.stop()


def test_several_entries_are_weighted_by_their_acceptable_patches(mirror, tmp_path):
    """p105 and p14 together: accepted patches come from each store in proportion to its
    acceptable patches (enumerated exactly from the mirror), as one rejection sampler over both
    would give, not in proportion to the stores' sizes."""
    from conftest import expected_window as window
    patch, threshold = (8, 64, 64), 0.01
    acceptable = {}
    for experiment in ("p105", "p14"):
        labels = window(mirror, experiment, "psd_autoseg", 0, EVERYTHING, all_layers(experiment))[0]
        shape = labels.shape
        _, fractions = _exact_fractions(labels, patch, ((0, 0, 0), shape))
        acceptable[experiment] = int((fractions > threshold).sum())
    assert min(acceptable.values()) > 0
    with MirrorServer(mirror.root) as server:
        np.random.seed(2)
        ds = get_dataset(["p105_psd", "p14_psd"], patch, min_foreground=threshold, base_url=server.base_url,
                         cache_dir=str(tmp_path), progress=False)
        inner = ds.datasets
        sources = []
        for d, experiment in zip(inner, ("p105", "p14")):
            real = d._foreground_patch

            def tagged(real=real, experiment=experiment):
                found = real()
                if found is not None:
                    sources.append(experiment)
                return found
            d._foreground_patch = tagged
        for i in range(1200):
            ds[i % len(ds)]
    counts = [sources.count(e) for e in ("p105", "p14")]
    total = sum(acceptable.values())
    expected = [acceptable[e] / total * len(sources) for e in ("p105", "p14")]
    assert chisquare(counts, expected).pvalue > 1e-3, (counts, expected, acceptable)
