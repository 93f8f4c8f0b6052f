"""Locks that no process id can fool: a holder is alive while it holds the kernel's flock (this
host, or hosts that share NFS locks), or while it refreshes its lease (hosts that do not)."""

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.source.transfer import Cancelled
from wildenberg_intake.store import liveness
from wildenberg_intake.store.cache import StoreCache

from conftest import all_layers, expected_window

HOLD = """
import sys, time
from pathlib import Path
from wildenberg_intake.store.liveness import try_lock
held = try_lock(Path(sys.argv[1]))
print("held" if held else "refused", flush=True)
time.sleep(600)
"""


def _holder(path) -> subprocess.Popen:
    """A live process holding lock `path` (it says so before returning)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _token(pid: int, host=None, boot=None, start="1") -> str:
    host_now, boot_now, _, _ = liveness.identity()
    return f"{host or host_now} {boot or boot_now} {pid} {start} deadbeef"


def test_a_lock_naming_a_live_pid_that_is_not_its_holder_is_taken_over(tmp_path):
    """The pid a lock file names proves nothing: this process's own (a container restarted with the
    same small pid), a live child's (a reused pid), or an older version's pid-only token."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        for i, text in enumerate([_token(os.getpid()), _token(child.pid), f"{socket.gethostname()} {child.pid} abc",
                                  ""]):
            path = tmp_path / f"{i}.lock"
            path.write_text(text)
            held = liveness.try_lock(path)
            assert held is not None, text
            assert path.read_text() == held.token and held.token.split()[2] == str(os.getpid())
            held.release()
            assert not path.exists()
    finally:
        child.kill()
        child.wait()


def test_a_live_holder_keeps_its_lock_however_old_until_it_dies(tmp_path):
    path = tmp_path / "0.0.0.lock"
    proc = _holder(path)
    try:
        old = time.time() - 3600
        os.utime(path, (old, old))  # a shard that takes an hour; and a lease not refreshed
        assert liveness.try_lock(path) is None
        assert liveness.holder(path)["pid"] == str(proc.pid)
        # Its token rewritten to name a dead process changes nothing: the flock is what counts.
        path.write_text(_token(999_999_999))
        assert liveness.try_lock(path) is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    held = liveness.try_lock(path)  # the kernel took its flock away with it: no wait, whatever the pid
    assert held is not None
    held.release()


def test_two_threads_of_one_process_exclude_each_other_and_a_release_never_removes_a_successor(tmp_path):
    path = tmp_path / "x.lock"
    first = liveness.try_lock(path)
    assert first is not None and liveness.try_lock(path) is None
    os.unlink(path)  # its file replaced behind its back (another host took over an unrefreshed lease)
    second = liveness.try_lock(path)
    assert second is not None
    first.release()  # the first holder's clean-up leaves the new holder's file alone
    assert path.read_text() == second.token
    second.release()
    assert not path.exists()


def test_another_hosts_lease_is_kept_while_refreshed_and_taken_over_once_when_not(tmp_path, monkeypatch):
    monkeypatch.setattr(liveness, "LOCK_STALE_SECONDS", 5)
    path = tmp_path / "lease.lock"
    # Another host's holder: its flock does not reach us (NFS with local locks), its lease does.
    for foreign in (_token(1, host="node-b"), _token(1, boot="another-boot")):
        path.write_text(foreign)
        assert liveness.try_lock(path) is None
        old = time.time() - 6
        os.utime(path, (old, old))
        held = liveness.try_lock(path)
        assert held is not None and path.read_text() == held.token
        held.release()


def _take(path, barrier, results):
    barrier.wait()
    held = liveness.try_lock(Path(path))
    results.put(None if held is None else held.token)
    time.sleep(1)  # keep it while the other tries


def test_two_processes_taking_over_one_stale_lease_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(20):
        path = tmp_path / f"{attempt}.lock"
        path.write_text(_token(1, host="node-b"))
        old = time.time() - 2 * liveness.LOCK_STALE_SECONDS
        os.utime(path, (old, old))
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(str(path), barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        tokens = [results.get(timeout=30) for _ in procs]
        winners = [t for t in tokens if t is not None]
        assert len(winners) == 1, tokens
        assert path.read_text() == winners[0]
        for p in procs:
            p.join(30)


def test_waiting_for_a_live_processs_shard_stops_when_the_run_stops(tmp_path):
    cache = StoreCache(tmp_path, "p14-test")
    proc = _holder(cache.progress / "raw" / "0.0.0.lock")
    try:
        start = time.monotonic()
        with pytest.raises(Cancelled, match=r"stopped waiting for shard \(0, 0, 0\) of raw"):
            with cache.own_shard("raw", (0, 0, 0), cancelled=lambda: time.monotonic() - start > 0.3):
                pass
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_fetchs_shard_locks_whose_pid_is_reused_do_not_hold_up_the_rerun(wide, catalog, tmp_path):
    """The issue's run: a fetch SIGKILLed while it holds shard locks, its pid then alive in another
    process (here: the locks rewritten to name this test's own process). The rerun takes them over
    at once and ends exact."""
    cache_dir = tmp_path / "cache"
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(cache_dir), progress=False)
        store = StoreCache(cache_dir, Path(src.materialise()).parent.name)
        for name in ("raw", "labels/psd"):
            lost = sorted(store.done_shards(name))[:2]
            store.invalidate(name, lost)
            for index in lost:
                lock = store.progress / name / (".".join(map(str, index)) + ".lock")
                proc = _holder(lock)
                proc.kill()
                proc.wait()
                lock.write_text(_token(os.getpid()))  # the dead holder's pid, now a live process's
        start = time.monotonic()
        ds = catalog.p14_psd(base_url=server.base_url, cache_dir=str(cache_dir), progress=False).read()
        assert time.monotonic() - start < 60
    everything = [-1e9, 1e9] * 3
    raw = expected_window(wide, "p14", "em_aligned", 1, everything, all_layers("p14"))[0]
    psd = expected_window(wide, "p14", "psd_autoseg", 0, everything, all_layers("p14"))[0]
    np.testing.assert_array_equal(ds["raw"].values, raw)
    np.testing.assert_array_equal(ds["labels"].values, psd)
    assert not list(store.progress.rglob("*.lock")), "every shard lock released"


GROUP_CACHE = """
import os, sys
os.umask(0o002)
import intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
src = cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], progress=False)
src.materialise()
lazy = cat.p14_vesicle_cloud(base_url=sys.argv[1], cache_dir=sys.argv[2], progress=False, cache_limit="3MB")
lazy.to_dask().labels[:, :100, :100].compute()
"""


def test_under_umask_002_every_file_and_folder_of_the_cache_is_group_writable_and_none_executable(wide, tmp_path):
    cache_dir = tmp_path / "cache"
    with MirrorServer(wide.root) as server:
        subprocess.run([sys.executable, "-c", GROUP_CACHE, server.base_url, str(cache_dir)], check=True)
    found = {"file": 0, "dir": 0}
    for path in cache_dir.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        kind = "dir" if path.is_dir() else "file"
        assert mode == (0o775 if kind == "dir" else 0o664), (path, oct(mode))
        found[kind] += 1
    assert found["file"] > 20 and found["dir"] > 10
    assert list(cache_dir.rglob("locks/*.lock")), "the array locks are among the files checked"


def test_a_fork_never_leaves_a_child_a_lock_descriptor_it_does_not_know(tmp_path):
    """Threads take and drop a lock as fast as they can while the process forks: no child keeps a
    copy of a lock descriptor (it would hold the flock for its whole life)."""
    import threading
    path = tmp_path / "ledger.lock"
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with liveness.file_lock(path):
                pass
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            pid = os.fork()
            if pid == 0:
                leaked = 0
                for fd in os.listdir("/proc/self/fd"):
                    try:
                        leaked += os.readlink(f"/proc/self/fd/{fd}") == str(path)
                    except OSError:
                        pass
                os._exit(3 if leaked else 0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "a child inherited a lock descriptor"
    finally:
        stop.set()
        for t in threads:
            t.join()
