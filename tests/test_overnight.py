"""Overnight runs on shared clusters: outages waited out, Retry-After honoured, cores and memory as
the scheduler grants them, locks that a live writer keeps, forked loader workers."""

import os
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.mirror.server import Faults
from wildenberg_intake.source.transfer import Fetcher, RetryPolicy, TransferError
from wildenberg_intake.store import resources

from conftest import all_layers, expected_window

ALL = [-1e9, 1e9] * 3


def test_a_30_second_outage_mid_fetch_is_waited_out_with_the_default_policy(wide, catalog, tmp_path):
    """Without and with Retry-After, the two runs side by side (an outage is wall time, not work)."""
    def fetch_through_an_outage(retry_after):
        faults = Faults(outage_after=12, outage_seconds=30, retry_after=retry_after)
        with MirrorServer(wide.root, faults=faults) as server:
            src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / str(retry_after)), progress=False)
            start = time.monotonic()
            src.materialise()
            elapsed = time.monotonic() - start
            return faults, elapsed, src.read()

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(fetch_through_an_outage, [None, 4]))
    raw = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0]
    labels = expected_window(wide, "p14", "psd_autoseg", 0, ALL, all_layers("p14"))[0]
    for faults, elapsed, ds in runs:
        assert faults.injected["outage"] > 0 and elapsed >= 30
        np.testing.assert_array_equal(ds["raw"].values, raw)
        np.testing.assert_array_equal(ds["labels"].values, labels)


def test_a_server_down_for_good_ends_the_run_within_the_patience_naming_the_url(wide, catalog, tmp_path):
    faults = Faults(outage_after=0, outage_seconds=1e9)
    with MirrorServer(wide.root, faults=faults) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False,
                              retry={"patience": 3, "backoff": 0.5, "max_wait": 1})
        start = time.monotonic()
        with pytest.raises(TransferError, match=r"GET http://127.0.0.1:\d+/wildenberg2023/\S+ failed \d+ times "
                                                r"over [34] s \(retry patience 3 s\); last failure: HTTP 503"):
            src.materialise()
        elapsed = time.monotonic() - start
    assert 3 <= elapsed <= 3 + 1 + 3  # the patience, one wait, and the run's requests cut at once
    assert not src.verify()["labels/psd"]["complete"]


def _a_chunk(root: Path) -> tuple[str, bytes]:
    """(URL path, bytes) of one EM chunk of the mirror."""
    folder = root / "wildenberg2023" / "mouse_v1_l4_p14" / "em_aligned"
    path = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("info", "provenance"))
    data = path.read_bytes()
    if path.suffix == ".gz":
        data, path = zlib.decompress(data, 47), path.with_suffix("")
    return "/" + str(path.relative_to(root / "wildenberg2023")), data  # base_url ends in /wildenberg2023


def test_429_with_retry_after_is_waited_for(wide):
    url, data = _a_chunk(wide.root)
    faults = Faults(outage_after=0, outage_seconds=0.5, outage_status=429, retry_after=2)
    with MirrorServer(wide.root, faults=faults) as server:
        fetcher = Fetcher(RetryPolicy(backoff=0.01, max_wait=0.05))
        waits = []
        fetcher.on_wait = lambda url, failure, wait, left: waits.append((failure, wait))
        start = time.monotonic()
        assert fetcher.get(server.base_url + url) == data
        elapsed = time.monotonic() - start
    assert elapsed >= 2 and waits and waits[0][0] == "HTTP 429 (Retry-After 2 s)" and waits[0][1] >= 2


@pytest.mark.parametrize("value,message", [({"attempts": 0}, "attempts=0"), ({"patience": -1}, "patience=-1"),
                                           ({"max_wait": "1"}, "max_wait='1'")])
def test_bad_retry_values_are_named(value, message):
    with pytest.raises(ValueError, match=f"retry {message} is not valid; allowed"):
        RetryPolicy(**value)


def test_cpus_and_memory_come_from_the_cgroup_tree(tmp_path, monkeypatch, catalog, server):
    monkeypatch.setenv("WILDENBERG_INTAKE_CGROUP_ROOT", str(tmp_path))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    host_cpus = len(os.sched_getaffinity(0))
    assert resources.available_cpus() == host_cpus  # no limit in the tree
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert resources.available_cpus() == host_cpus
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU (cgroup v2)
    assert resources.available_cpus() == 1 and resources.default_workers() == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one CPU
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert resources.available_cpus() == 1
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert resources.available_cpus() == host_cpus
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert resources.available_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert resources.available_memory() == physical
    (tmp_path / "memory.max").write_text("max\n")
    assert resources.available_memory() == physical
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    assert resources.available_memory() == 2**30
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory.limit_in_bytes").write_text(f"{2**31}\n")  # v1
    assert resources.available_memory() == 2**31
    # read()'s guard follows the job's limit, not the node's memory.
    (tmp_path / "memory.limit_in_bytes").write_text("100000\n")
    src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(MemoryError):
        src.read()


def test_cpu_affinity_set_in_a_child_is_the_default():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from wildenberg_intake.store.resources import available_cpus; print(available_cpus())")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"


def _identity(x):
    return x


def _identity2(x, y):
    return x, y


@pytest.mark.torch
def test_a_loader_forked_while_the_prefetcher_fetches_produces_its_batches(wide, tmp_path):
    pytest.importorskip("torch")
    from wildenberg_intake import training
    from tests_helpers import locate
    raw_all = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0]
    for attempt in range(3):  # each time the workers fork while requests are in flight
        with MirrorServer(wide.root, latency=0.05) as server:
            loader = training.get_loader("p14_psd", (4, 128, 128), batch_size=2, base_url=server.base_url,
                                         cache_dir=str(tmp_path / str(attempt)), progress=False, lazy=True,
                                         warmup=2, num_workers=2, n_samples=8, timeout=120,
                                         raw_transform=_identity, transform=_identity2)
            inner = loader.dataset.datasets[0] if hasattr(loader.dataset, "datasets") else loader.dataset
            batches = list(loader)
            inner.prefetcher.stop()
            assert inner.prefetcher.error is None
        assert len(batches) == 4
        for raw, _ in batches:
            for patch in raw.numpy()[:, 0].astype(np.uint8):
                assert locate(patch, raw_all)


def test_cancel_from_another_thread_ends_a_run_waiting_out_retry_after_100_within_2_s(wide, catalog, tmp_path):
    """A library caller stops a run (from another thread) while every request waits out a
    `Retry-After: 100`: the run ends within 2 s with `Cancelled`, and a rerun ends exact."""
    import threading
    from wildenberg_intake.source.transfer import Cancelled
    faults = Faults(outage_after=12, outage_seconds=1e9, retry_after=100)
    outcome = {}
    with MirrorServer(wide.root, faults=faults) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)

        def run():
            try:
                src.materialise()
            except BaseException as e:
                outcome["error"] = e
            outcome["ended"] = time.monotonic()
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while faults.injected["outage"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert faults.injected["outage"] >= 1  # the run waits on Retry-After: 100 now
        time.sleep(0.5)
        asked = time.monotonic()
        src.cancel()
        thread.join(30)
        assert not thread.is_alive() and outcome["ended"] - asked < 2
        assert isinstance(outcome["error"], Cancelled)
        faults.outage_after = None  # the outage ends; the same server (same URL, same store) again
        ds = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False).read()
    np.testing.assert_array_equal(ds["raw"].values, expected_window(wide, "p14", "em_aligned", 1, ALL,
                                                                    all_layers("p14"))[0])
    np.testing.assert_array_equal(ds["labels"].values, expected_window(wide, "p14", "psd_autoseg", 0, ALL,
                                                                       all_layers("p14"))[0])


def test_retry_waits_never_overflow_and_a_zero_backoff_is_refused():
    policy = RetryPolicy(backoff=0.25, max_wait=60)
    assert 30 <= policy.wait(10_000) <= 60  # 0.25 * 2 ** 10000 overflowed a float
    with pytest.raises(ValueError, match=r"retry backoff=0 is not valid; allowed: a number of seconds > 0"):
        RetryPolicy(backoff=0)
