"""Training on sparse synapses: torch-em's rejection sampler against the package's foreground sampler.

    .venv/bin/python benchmarks/sampling.py [--size 1400 1400 80] [--seconds 6] [--labels psd vesicle_cloud]
                                            [--patches 32,256,256 16,128,128] [--thresholds 0.001 0.01 0.05]

Writes the realistic p105 mirror, caches p105_psd and p105_vesicle_cloud (timing the
materialisation with and without the foreground index, each in its own process, wall and CPU
seconds, best of 4 alternating), then
for each label, patch shape and `min_foreground`, side by side over the same store and the same
reader (the package's dataset, torch-em's default transforms):
- rejection: `MinForegroundSampler(min_fraction)` as torch-em applies it (uniform origins, read,
  count, retry up to 500 times), i.e. `get_dataset(..., sampler="rejection")`;
- foreground: the package's `min_foreground` (origins proposed from the foreground index, accepted
  by the exact count).
Reported: accepted patches per second in one process and through a loader with 2 workers (batches
of 4, counted after the first), voxels read and decoded per accepted patch (raw and labels:
rejection reads both for every patch it tries, the package the labels of every proposal and raw
only for the accepted ones), patches read per accepted patch, and "max attempts"
failures (torch-em's RuntimeError after 500 rejections, one process and loader together), each over
`--seconds` seconds. A threshold no patch can meet is refused by the package when the dataset is made.
Also the index's size against the label's bytes (on disk and uncompressed).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FETCH = r"""
import json, sys, time, intake, wildenberg_intake
from wildenberg_intake.store import shards
if sys.argv[3] == "without":  # the same run without the foreground index: counts never made
    class NoCounts:
        def __init__(self, shape): pass
        def add(self, slab, z0): pass
        def record(self): return None
    shards.ShardCounts = NoCounts
cat = intake.open_catalog(wildenberg_intake.catalog_path())
t, cpu = time.perf_counter(), time.process_time()
for label in sys.argv[4:]:
    cat["p105_" + label](base_url=sys.argv[1], cache_dir=sys.argv[2], progress=False).materialise()
print(json.dumps({"s": time.perf_counter() - t, "cpu": time.process_time() - cpu}))
"""

SAMPLE = r"""
import json, sys, time, warnings
import numpy as np, torch
warnings.filterwarnings("ignore")
import wildenberg_intake
from torch_em.data import MinForegroundSampler
base, cache, label, patch, threshold, sampler, workers, seconds = sys.argv[1:9]
patch, threshold, workers, seconds = tuple(json.loads(patch)), float(threshold), int(workers), float(seconds)
BATCH = 4  # a loader's per-batch cost (collation, worker-to-main transfer) is not what is compared
np.random.seed(0); torch.manual_seed(0)
kwargs = dict(base_url=base, cache_dir=cache, progress=False, min_foreground=threshold, sampler=sampler,
              n_samples=10**6)
calls = {"n": 0}
if sampler == "rejection":  # count torch-em's sampler calls: one per patch read
    class Counting(MinForegroundSampler):
        def __call__(self, x, y=None):
            calls["n"] += 1
            return super().__call__(x, y)
    kwargs["sampler"] = Counting(threshold)
    kwargs.pop("min_foreground")
try:
    if workers:
        loader = wildenberg_intake.get_loader(["p105_" + label], patch, batch_size=BATCH, num_workers=workers,
                                              multiprocessing_context="fork", **kwargs)
        it, n, failures = iter(loader), 0, 0
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:  # the workers' start is not counted: the steady rate is
            try:
                next(it)
                break
            except RuntimeError as e:
                if "attempts" not in str(e):
                    raise
                failures += 1
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            try:
                next(it)
                n += BATCH
            except RuntimeError as e:  # a worker's "Could not sample a valid batch in 500 attempts"
                if "attempts" not in str(e):
                    raise
                failures += 1
        print(json.dumps({"accepted": n, "s": time.perf_counter() - t, "failures": failures}))
        sys.exit(0)
    ds = wildenberg_intake.get_dataset(["p105_" + label], patch, **kwargs)
except (ValueError, RuntimeError) as e:
    print(json.dumps({"error": str(e)[:200]}))
    sys.exit(0)
inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
n, failures, t = 0, 0, time.perf_counter()
while time.perf_counter() - t < seconds:
    try:
        ds[n % len(ds)]
        n += 1
    except RuntimeError:  # torch-em: "Could not sample a valid batch in 500 attempts"
        failures += 1
elapsed = time.perf_counter() - t
voxels = int(np.prod(patch))
if sampler == "rejection":  # raw and labels of every patch tried
    reads = calls["n"]
    voxels_read = 2 * reads * voxels
else:  # the labels of every proposal, raw of the accepted ones
    reads = inner._foreground.proposed
    voxels_read = (reads + n) * voxels
print(json.dumps({"accepted": n, "s": elapsed, "failures": failures, "reads": reads,
                  "voxels_per_accepted": voxels_read / max(n, 1), "reads_per_accepted": reads / max(n, 1)}))
"""


def run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=(1400, 1400, 80), help="mirror label voxels x y z")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--labels", nargs="+", default=("psd", "vesicle_cloud"))
    parser.add_argument("--patches", nargs="+", default=("32,256,256", "16,128,128"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=(0.001, 0.01, 0.05))
    parser.add_argument("--mirror", type=Path, help="reuse (or write once) a mirror in this folder")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per row (best kept)")
    parser.add_argument("--index-only", action="store_true", help="the index's cost and size, no sampling")
    args = parser.parse_args()
    import intake
    import wildenberg_intake
    from wildenberg_intake.mirror import MirrorServer, build_mirror
    from wildenberg_intake.store.engine import cache_for
    cat = intake.open_catalog(wildenberg_intake.catalog_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.mirror and (args.mirror / "wildenberg2023").exists():
            from types import SimpleNamespace
            mirror = SimpleNamespace(root=args.mirror)
        else:
            mirror = build_mirror(args.mirror or tmp / "mirror", shape_xyz=args.size, experiments=("p105",))
        with MirrorServer(mirror.root) as server:
            base = server.base_url
            timings = {"with": [], "without": []}
            for attempt in range(4):
                for mode in ("without", "with"):
                    folder = tmp / f"fetch-{mode}-{attempt}"
                    timings[mode].append(run(FETCH, base, folder, mode, *args.labels))
            cache_dir = tmp / "fetch-with-3"
            best = {k: min(r["s"] for r in v) for k, v in timings.items()}
            cpu = {k: min(r["cpu"] for r in v) for k, v in timings.items()}
            print(f"materialise p105 {' + '.join(args.labels)} (raw, labels, pyramids), best of 4: "
                  f"{best['without']:.2f} s without the index, {best['with']:.2f} s with it "
                  f"({100 * (best['with'] / best['without'] - 1):+.1f}%); CPU {cpu['without']:.2f} s and "
                  f"{cpu['with']:.2f} s ({100 * (cpu['with'] / cpu['without'] - 1):+.1f}%)")
            for label in args.labels:
                src = cat["p105_" + label](base_url=base, cache_dir=str(cache_dir), progress=False)
                cache, name = cache_for(src.plan), src.plan.label_name
                shape = src.plan.arrays[name].shape
                index_bytes = sum(len(cache.record(name, i)["foreground"]["counts"]) for i in cache.done_shards(name))
                disk = sum(cache.record(name, i)["bytes"] for i in cache.done_shards(name))
                raw = int(np.prod(shape)) * np.dtype(src.plan.arrays[name].dtype).itemsize
                from wildenberg_intake.store.foreground import array_counts
                counts, _ = array_counts(cache, name, shape)
                from wildenberg_intake.store.foreground import block_counts
                from wildenberg_intake.store.layout import array_path, shard_box, shard_grid
                from wildenberg_intake.store.reader import ShardedArrayReader
                reader = ShardedArrayReader(cache.zarr_path / array_path(name))
                count_s = 0.0
                for index in shard_grid(shape):  # as a shard task counts: each shard's voxels in memory
                    start, stop = shard_box(index, shape)
                    voxels = reader[tuple(slice(a, b) for a, b in zip(start, stop))]
                    t = time.perf_counter()
                    block_counts(voxels)
                    count_s += time.perf_counter() - t
                print(f"{label}: {shape} voxels, {100 * counts.sum() / np.prod(shape):.3f}% foreground; index "
                      f"{index_bytes / 1e3:.1f} kB = {100 * index_bytes / disk:.3f}% of the label's {disk / 1e6:.2f} MB "
                      f"on disk, {100 * index_bytes / raw:.4f}% of its {raw / 1e6:.0f} MB uncompressed; counting "
                      f"its shards took {count_s:.3f} CPU s ({100 * count_s / cpu['with']:.1f}% of the "
                      "materialisation's CPU)")
            if args.index_only:
                return
            print()
            header = (f"{'label':14s} {'patch':12s} {'min fg':>6s} {'sampler':10s} {'acc/s':>7s} {'acc/s 2w':>8s} "
                      f"{'x':>5s} {'x 2w':>5s} {'Mvox/acc':>8s} {'x fewer':>7s} {'reads/acc':>9s} {'failures':>8s}")
            print(header)
            print("-" * len(header))
            for label in args.labels:
                for patch in args.patches:
                    patch = [int(v) for v in patch.split(",")]
                    for threshold in args.thresholds:
                        rows = {}
                        for attempt in range(args.rounds):  # alternating rounds, the best of each kept
                            for sampler in ("rejection", "foreground"):
                                one = run(SAMPLE, base, cache_dir, label, json.dumps(patch), threshold, sampler, 0,
                                          args.seconds)
                                two = run(SAMPLE, base, cache_dir, label, json.dumps(patch), threshold, sampler,
                                          2, args.seconds) if "error" not in one else one
                                if sampler in rows:
                                    one, two = (max(new, old, key=lambda r: r.get("accepted", 0) / r.get("s", 1))
                                                for new, old in zip((one, two), rows[sampler]))
                                rows[sampler] = (one, two)
                        ref = rows["rejection"]
                        for sampler, (one, two) in rows.items():
                            if "error" in one:
                                print(f"{label:14s} {str(tuple(patch)):12s} {threshold:6.3f} {sampler:10s} "
                                      f"refused: {one['error'][:110]}")
                                continue
                            rate, rate2 = one["accepted"] / one["s"], two.get("accepted", 0) / two.get("s", 1)
                            r_rate = ref[0]["accepted"] / ref[0]["s"] if "error" not in ref[0] else float("nan")
                            r_rate2 = ref[1].get("accepted", 0) / ref[1].get("s", 1)
                            r_vox = ref[0].get("voxels_per_accepted", float("nan"))
                            print(f"{label:14s} {str(tuple(patch)):12s} {threshold:6.3f} {sampler:10s} {rate:7.1f} "
                                  f"{rate2:8.1f} {rate / max(r_rate, 1e-9):5.1f} {rate2 / max(r_rate2, 1e-9):5.1f} "
                                  f"{one['voxels_per_accepted'] / 1e6:8.2f} "
                                  f"{r_vox / max(one['voxels_per_accepted'], 1):7.1f} "
                                  f"{one['reads_per_accepted']:9.2f} {one['failures'] + two.get('failures', 0):8d}")


if __name__ == "__main__":
    main()
