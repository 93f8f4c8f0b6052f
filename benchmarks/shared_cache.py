"""A month of a lab's shared cache in minutes: many processes on one cache folder, killed at random.

On one cache folder, for a fixed time: two fetchers (p14_psd and p14_vesicle_cloud: one store, raw
shared; each pass forgets a few shards, as a repair would, and fetches again), two lazy readers of
another box under a `cache_limit` smaller than it (one of them a second "host": another host name in
its locks, refreshing leases), and a verifier running `verify` and the ledger's breakdown in a loop.
Every few seconds one of them is SIGKILLed, every lock it held rewritten to name a live process
(its pid reused), and it is started again; midway the server is down for 30 s. Time is scaled: a
lease is taken over after 20 s unrefreshed (10 minutes in the package), refreshed every 5 s.

At the end the users' next run (a fetch of each entry), then: `verify` clean, the fetched store
equal to the mirror voxel for voxel, every lazy patch read equal to the mirror, the lazy store's
bytes (shards and staged files) never above the limit plus one shard per process, no lock or staged
file of a dead process left in the fetched store.

    .venv/bin/python benchmarks/shared_cache.py [--minutes 10] [--kill-every 6] [--seed 0]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import intake

import wildenberg_intake
from wildenberg_intake.mirror import Faults, MirrorServer, build_mirror
from wildenberg_intake.store import liveness
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.engine import cache_for

LAZY_BOX = [500, 13000, 500, 12000, 0, 1200]  # nm: another store than the fetchers' whole box
WORKER = r"""
import json, os, random, socket, sys, time
role, base, cache_dir, out, host, deadline, limit = sys.argv[1:8]
if host != "-":
    socket.gethostname = lambda: host  # a second host on the shared folder
from wildenberg_intake.store import liveness
liveness.LOCK_STALE_SECONDS, liveness.HEARTBEAT_SECONDS = 20, 5  # a month in minutes
import numpy as np, intake, wildenberg_intake
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.engine import cache_for
cat = intake.open_catalog(wildenberg_intake.catalog_path())
log = open(out, "a", buffering=1)
rng = random.Random(os.getpid())
deadline, box = float(deadline), json.loads(os.environ["LAZY_BOX"])
while time.time() < deadline:
    if role.startswith("fetch"):
        src = getattr(cat, "p14_" + role.split("-", 1)[1])(base_url=base, cache_dir=cache_dir, progress=False)
        try:
            src.materialise()
        except Exception as e:  # an outage longer than the patience: the next pass resumes
            log.write(json.dumps({"error": f"{type(e).__name__}: {e}"[:200]}) + "\n")
            continue
        store, label = cache_for(src.plan), "labels/" + role.split("-", 1)[1]
        done = sorted(store.done_shards(label))  # its own label: a repair of what it fetched
        store.invalidate(label, rng.sample(done, min(2, len(done))))
        log.write(json.dumps({"op": "fetch"}) + "\n")
    elif role.startswith("lazy"):
        src = cat.p14_psd(base_url=base, cache_dir=cache_dir, progress=False, bbox_nm=box, cache_limit=int(limit))
        arrays, want = src.arrays(), {k: np.load(os.environ["EXPECTED_" + k], mmap_mode="r") for k in ("raw", "labels")}
        while time.time() < deadline:
            shape = arrays["raw"].shape
            z, y, x = (rng.randrange(0, max(1, n - p)) for n, p in zip(shape, (8, 200, 200)))
            window = (slice(z, z + 8), slice(y, y + 200), slice(x, x + 200))
            try:
                bad = [k for k in ("raw", "labels") if not np.array_equal(arrays[k][window], want[k][window])]
            except Exception as e:
                log.write(json.dumps({"error": f"{type(e).__name__}: {e}"[:200]}) + "\n")
                continue
            log.write(json.dumps({"op": "patch", "bad": bad, "fds": len(os.listdir("/proc/self/fd"))}) + "\n")
    else:
        for store in os.listdir(os.path.join(cache_dir, "wildenberg2023")):
            cache = StoreCache.at(os.path.join(cache_dir, "wildenberg2023", store))
            report = cache.verify()
            cache.ledger.by_kind()
            log.write(json.dumps({"op": "verify", "damaged": sum(len(e["missing"]) + len(e["corrupt"])
                                                                 for e in report.values())}) + "\n")
        time.sleep(1)
"""


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed since it was listed
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kill-every", type=float, default=6, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    catalog = intake.open_catalog(wildenberg_intake.catalog_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mirror = build_mirror(tmp / "mirror", shape_xyz=(1100, 1040, 32), experiments=("p14",))
        faults = Faults()
        with MirrorServer(mirror.root, faults=faults) as server:
            base, cache_dir = server.base_url, tmp / "cache"
            lazy = catalog.p14_psd(base_url=base, cache_dir=str(cache_dir), progress=False, bbox_nm=LAZY_BOX)
            env = dict(os.environ, LAZY_BOX=json.dumps(LAZY_BOX))
            for key, channel, mip in (("raw", "em_aligned", 1), ("labels", "psd_autoseg", 0)):
                src = lazy.plan.arrays["raw" if key == "raw" else "labels/psd"]
                start = np.array(src.start_zyx)
                np.save(tmp / f"{key}.npy", mirror.layer("p14", channel).expected(mip, start, start + src.shape))
                env[f"EXPECTED_{key}"] = str(tmp / f"{key}.npy")
            lazy_store = cache_for(lazy.plan)
            # The limit: a third of the lazy box's shards (probed once in another folder).
            probe = catalog.p14_psd(base_url=base, cache_dir=str(tmp / "probe"), progress=False, bbox_nm=LAZY_BOX)
            probe.materialise()
            probe_store = cache_for(probe.plan)
            sizes = [probe_store.shard_bytes(n, i) for n in ("raw", "labels/psd") for i in probe_store.done_shards(n)]
            limit, shard = sum(sizes) // 3, max(sizes)
            roles = {"fetch-psd": "-", "fetch-vesicle_cloud": "-", "lazy-0": "-", "lazy-1": "node-b", "verify": "-"}
            deadline = time.time() + args.minutes * 60
            (tmp / "ops").mkdir()

            def start(role):
                return subprocess.Popen([sys.executable, "-c", WORKER, role, base, str(cache_dir),
                                         str(tmp / "ops" / f"{role}.log"), roles[role], str(deadline), str(limit)],
                                        env=env, stderr=subprocess.DEVNULL)
            procs = {role: start(role) for role in roles}
            kills, rewritten, peak, outage_at = Counter(), 0, 0, time.time() + args.minutes * 60 * 0.4
            next_kill = time.time() + args.kill_every
            print(f"cache_limit of the lazy store: {limit / 1e6:.1f} MB (its box: {sum(sizes) / 1e6:.1f} MB); "
                  f"largest shard {shard / 1e6:.1f} MB; {len(roles)} processes for {args.minutes:g} min")
            while time.time() < deadline:
                time.sleep(0.25)
                kept = [p for folder in (lazy_store.zarr_path, lazy_store.root / "staging") if folder.exists()
                        for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".json"))]
                peak = max(peak, sum(_size(p) for p in kept))
                if outage_at and time.time() > outage_at:
                    faults.outage_seconds, faults.outage_after, outage_at = 30, 0, None
                    print("outage: the server answers 503 for 30 s")
                if time.time() > next_kill:
                    role = rng.choice(sorted(roles))
                    victim = procs[role]
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    kills[role] += 1
                    for lock in list(cache_dir.rglob("*.lock")):  # its pid reused: now a live process's
                        named = liveness.holder(lock)
                        if named and named["pid"] == str(victim.pid):
                            lock.write_text(" ".join([named["host"], named["boot_id"], str(os.getpid()),
                                                      named["start"], "reused"]))
                            rewritten += 1
                    procs[role] = start(role)
                    next_kill = time.time() + args.kill_every
            for proc in procs.values():
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            # The users' next run, then the checks.
            started = time.monotonic()
            for entry in ("p14_psd", "p14_vesicle_cloud"):
                getattr(catalog, entry)(base_url=base, cache_dir=str(cache_dir), progress=False).materialise()
            next_run = time.monotonic() - started
            full = catalog.p14_psd(base_url=base, cache_dir=str(cache_dir), progress=False)
            store = cache_for(full.plan)
        ops, errors, bad, fds, seen_damaged = Counter(), Counter(), 0, 0, 0
        for log in (tmp / "ops").iterdir():
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if "error" in event:
                    errors[event["error"][:120]] += 1
                    continue
                ops[event["op"]] += 1
                bad += len(event.get("bad", ()))
                seen_damaged += event.get("damaged", 0)
                fds = max(fds, event.get("fds", 0))
        damaged = {name: e for name, e in StoreCache.at(store.root).verify().items() if e["missing"] or e["corrupt"]}
        from wildenberg_intake.store.reader import ShardedArrayReader
        from wildenberg_intake.store.layout import array_path
        equal = True
        for name, channel, mip in (("raw", "em_aligned", 1), ("labels/psd", "psd_autoseg", 0),
                                   ("labels/vesicle_cloud", "vesicle_autoseg", 0)):
            src = full.plan.arrays[name]
            start = np.array(src.start_zyx)
            want = mirror.layer("p14", channel).expected(mip, start, start + src.shape)
            equal &= bool(np.array_equal(ShardedArrayReader(store.zarr_path / array_path(name))[:], want))
        leftovers = [p for p in list(store.progress.rglob("*.lock")) + list((store.root / "staging").rglob("*"))
                     if p.is_file()]
        lazy_locks = 0
        for lock in lazy_store.progress.rglob("*.lock"):
            if (held := liveness.try_lock(lock)) is not None:
                lazy_locks += 1
                held.release()
        print(f"operations: {dict(ops)}; errors that a later pass resumed: {dict(errors) or 'none'}")
        print(f"kills survived: {sum(kills.values())} ({dict(kills)}), locks rewritten to a live pid: {rewritten}")
        print(f"the users' next run (fetch of both entries): {next_run:.1f} s")
        print(f"verify after it: {'clean' if not damaged else damaged}; fetched store equal to the mirror: {equal}")
        print(f"lazy patches different from the mirror: {bad}; most descriptors in a lazy reader: {fds}")
        writers = sum(r.startswith("lazy") for r in roles)
        print(f"lazy store peak on disk (shards + staged): {peak / 1e6:.1f} MB, limit {limit / 1e6:.1f} MB "
              f"+ one shard per process writing there ({writers}) {writers * shard / 1e6:.1f} MB: "
              f"{'within' if peak <= limit + writers * shard else 'OVER'}")
        on_disk = Counter()
        for path in lazy_store.root.rglob("*"):
            if path.is_file():
                rel = path.relative_to(lazy_store.root).parts
                on_disk["/".join(rel[:3] if rel[0] == "data.zarr" else rel[:2])] += _size(path)
        print(f"lazy store at the end: ledger {lazy_store.ledger.by_kind()}; on disk {dict(on_disk)}")
        print(f"leftover locks or staged files in the fetched store: {len(leftovers)}; free shard-lock files "
              f"killed writers left in the lazy store (never completes; taken over when next needed): {lazy_locks}")
        print(f"shards verify saw missing or corrupt while the others ran (evicted between its record read and "
              f"its file read): {seen_damaged}")


if __name__ == "__main__":
    main()
