"""Reliability under faults: a materialisation under 10% 5xx, 5% resets and 5% truncated bodies, and a
run killed at random points and resumed, each compared byte for byte with a clean run.

    .venv/bin/python benchmarks/faults.py [--shape 1100 1040 32] [--kills 10] [--seed 0]
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import intake

import wildenberg_intake
from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.mirror import Faults, MirrorServer, build_mirror

FETCH = """
import sys, intake, wildenberg_intake
cat = intake.open_catalog(wildenberg_intake.catalog_path())
print(cat.p14_psd(base_url=sys.argv[1], cache_dir=sys.argv[2], progress=False).materialise())
"""


def tree(path):
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


def fetch(base_url, cache_dir, **kw):
    """Raw and all three label channels of p14."""
    from wildenberg_intake.store.engine import materialise
    src = intake.open_catalog(wildenberg_intake.catalog_path()).p14_psd(
        base_url=base_url, cache_dir=str(cache_dir), progress=False, **kw)
    return Path(materialise(src.plan, list(src.plan.arrays), progress=False)), src.plan.fetcher.stats


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(1100, 1040, 32))
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mirror = build_mirror(tmp / "mirror", shape_xyz=args.shape, experiments=("p14",))
        with MirrorServer(mirror.root) as server:
            port = server._server.server_address[1]  # later servers reuse it: same URLs, same store
            clean, _ = fetch(server.base_url, tmp / "clean")
            chunks = [p for p in server.requests if not p.endswith(("/info", "/provenance"))]
            print(f"p14 raw + 3 label channels, {args.shape} label voxels: {len(chunks)} source chunks, "
                  f"{sum(1 for _ in clean.rglob('c/*/*/*'))} shard files")

        faults = Faults(error_rate=0.10, reset_rate=0.05, truncate_rate=0.05, seed=args.seed)
        with MirrorServer(mirror.root, faults=faults, port=port) as server:
            t = time.perf_counter()
            faulty, stats = fetch(server.base_url, tmp / "faulty", retry={"backoff": 0.05, "max_wait": 1.0})
            took = time.perf_counter() - t
        print("\n== faults: 10% 5xx, 5% resets, 5% truncated bodies ==")
        print(f"faults injected: {dict(faults.injected)} (total {sum(faults.injected.values())})")
        print(f"requests {stats['requests']}, retries {stats['retries']}, 404s {stats['missing']}, {took:.1f} s")
        print(f"bytes equal to a clean run: {tree(faulty) == tree(clean)}")
        del faulty

        with MirrorServer(mirror.root, latency=1.0, port=port) as server:  # slow enough for kills to land
            cache = tmp / "killed"
            kills = 0
            for _ in range(args.kills):
                proc = subprocess.Popen([sys.executable, "-c", FETCH, server.base_url, str(cache)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                time.sleep(rng.uniform(0.8, 3.0))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                proc.wait()
            done = subprocess.run([sys.executable, "-c", FETCH, server.base_url, str(cache)],
                                  capture_output=True, text=True, check=True)
            requests = server.requests
        data = Counter({p: n for p, n in requests.items() if not p.endswith(("/info", "/provenance"))})
        clean_psd = {k: v for k, v in tree(clean).items() if k.startswith(("raw", "labels/psd", "zarr.json"))}
        print(f"\n== {args.kills} runs killed with SIGKILL at random points, then one to the end ==")
        print(f"kills survived: {kills}")
        print(f"source chunks: {len(data)}, fetches: {sum(data.values())}, "
              f"chunks fetched again after a kill: {sum(n - 1 for n in data.values())}")
        resumed = {k: v for k, v in tree(Path(done.stdout.strip())).items()
                   if k.startswith(("raw", "labels/psd", "zarr.json"))}
        print(f"bytes equal to a clean run (raw and psd): {resumed == clean_psd}")
        for key in sorted(set(resumed) ^ set(clean_psd)) + [k for k in resumed if resumed[k] != clean_psd.get(k)]:
            print("  differs:", key)


if __name__ == "__main__":
    main()
