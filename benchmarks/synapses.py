"""The synapse table's speed and memory, side by side in one run.

    .venv/bin/python benchmarks/synapses.py [--size 1024 1024 64] [--mirror DIR] [--workers 2]

For three boxes (a quarter, half and all of a p14 mirror's label volume, cached first), each in a
fresh process so that its peak memory is its own:
- table: `SynapseTable.compute()` (one labelling per block, shard-sized blocks) with its default
  (`--workers` worker processes), and the same on 1 process and on `--workers` threads;
- floor: reading the same three label arrays (psd, vesicle_cloud, saturated) block by block through
  the same reader and threads, doing nothing with them: what any blockwise computation pays;
- scipy: what a user would write with the box in memory: read the arrays whole, scipy.ndimage.label
  (26-connected) the PSD and vesicle-cloud masks, then one vectorised reduction per column (sizes,
  centroids, boxes, majority segment; the vesicle-cloud pairing is left out, so it is a lower bound).
Prints seconds, voxels per second and peak resident memory (VmHWM) per box, and the ratios; then
the full box on first use (nothing cached: floor and table both fetch through the cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARRAYS = ("labels/psd", "labels/vesicle_cloud", "labels/saturated")


class TreePeak:
    """Peak resident memory of this process and all its descendants (worker processes included),
    sampled every 20 ms, in MB; this process's own VmHWM is a floor under it."""

    def __init__(self):
        import psutil
        import threading
        self.me, self.peak, self.stop = psutil.Process(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        import psutil
        while not self.stop.wait(0.02):
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        own = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
        return max(self.peak, own)


MODES = {"floor": {}, "table": {}, "table 1 proc": {"workers": 1, "processes": False},
         "table threads": {"processes": False}, "scipy": {}}


def child(mode: str, base_url: str, cache_dir: str, bbox: list, workers: int) -> dict:
    """One measurement in this (fresh) process."""
    from wildenberg_intake.analysis.synapses import SynapseTable, _run, _window
    from wildenberg_intake.analysis.components import blocks
    from wildenberg_intake.drivers import entry_source
    from wildenberg_intake.store.format import SHARDS
    src = entry_source("p14_synapses", base_url=base_url, cache_dir=cache_dir, bbox_nm=bbox, progress=False)
    options = {"workers": workers, **MODES[mode]}
    table = SynapseTable(src.plan, progress=False, **options)
    shape = table.shape
    peak = TreePeak()
    t = time.perf_counter()
    if mode.startswith("table"):
        rows = len(table.compute())
    elif mode == "floor":
        def read_all(start, stop):
            return sum(int(_window(table.arrays[k])(start, stop).size) for k in ("psd", "vesicle_cloud", "saturated"))
        _run(read_all, blocks(shape, SHARDS), workers, None, False, "")
        rows = 0
    else:
        rows = _scipy_table(table)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "voxels": int(np.prod(shape)), "rows": rows, "peak_mb": peak.done()}


def _scipy_table(table) -> int:
    """In memory: whole arrays, ndimage.label, vectorised reductions (no vesicle-cloud pairing)."""
    from scipy import ndimage
    whole = tuple(slice(0, n) for n in table.shape)
    psd, clouds, segments = (table.arrays[k][whole] for k in ("psd", "vesicle_cloud", "saturated"))
    cube = np.ones((3, 3, 3), bool)
    lab, n = ndimage.label(psd != 0, structure=cube)
    ndimage.label(clouds != 0, structure=cube)
    flat = lab.ravel()
    where = np.flatnonzero(flat)
    ids = flat[where]
    count = np.bincount(ids, minlength=n + 1)
    z, y, x = np.unravel_index(where, lab.shape)
    centroids = [np.bincount(ids, weights=c, minlength=n + 1) / np.maximum(count, 1) for c in (z, y, x)]
    boxes = ndimage.find_objects(lab)
    seg = segments.ravel()[where]
    pairs, counts = np.unique(np.stack([ids, seg.astype(np.int64)]), axis=1, return_counts=True)
    order = np.lexsort((pairs[1], -counts, pairs[0]))
    _ = (centroids, boxes, order)
    return int(n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=(1024, 1024, 64), metavar=("X", "Y", "Z"),
                   help="label voxels of the p14 mirror")
    p.add_argument("--mirror", help="an existing mirror folder (written by this script) to reuse")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode per box (median reported)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    from wildenberg_intake.drivers import entry_source
    from wildenberg_intake.mirror import MirrorServer, build_mirror
    from wildenberg_intake.store.engine import materialise
    tmp = Path(tempfile.mkdtemp(prefix="bench-synapses-"))
    root = Path(args.mirror) if args.mirror else tmp / "mirror"
    if not (root / "wildenberg2023").is_dir():
        t = time.perf_counter()
        build_mirror(root, shape_xyz=tuple(args.size), experiments=("p14",))
        print(f"mirror {tuple(args.size)} written in {time.perf_counter() - t:.0f} s", flush=True)
    cache = tmp / "cache"
    results = []
    with MirrorServer(root) as server:
        full = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(cache), progress=False).plan
        x0, x1, y0, y1, z0, z1 = full.bbox_nm
        for fraction in (0.25, 0.5, 1.0):
            bbox = [x0, x1, y0, y0 + (y1 - y0) * fraction, z0, z1]
            src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(cache), bbox_nm=bbox,
                               progress=False)
            materialise(src.plan, list(ARRAYS), progress=False)  # cached first: the table's cost alone
            row = {"fraction": fraction}
            runs = {mode: [] for mode in MODES}
            for _ in range(args.repeat):  # modes alternate; the median of each is reported
                for mode in runs:
                    spec = json.dumps({"mode": mode, "base_url": server.base_url, "cache_dir": str(cache),
                                       "bbox": bbox, "workers": args.workers})
                    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
                    if out.returncode:
                        raise RuntimeError(out.stderr)
                    runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for mode, measured in runs.items():
                middle = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]
                row[mode] = {**middle, "peak_mb": max(m["peak_mb"] for m in measured),
                             "all_seconds": [round(m["seconds"], 3) for m in measured]}
            results.append(row)
            print(json.dumps(row), flush=True)
        # First use of the full box, nothing cached: both read through the cache from the server.
        fetched = {}
        for mode in ("floor", "table"):
            spec = json.dumps({"mode": mode, "base_url": server.base_url, "cache_dir": str(tmp / f"fresh-{mode}"),
                               "bbox": bbox, "workers": args.workers})
            out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr)
            fetched[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"fetched": fetched}), flush=True)
    print(f"\np14 mirror of {full.arrays['labels/psd'].shape} label voxels (z, y, x), {args.workers} workers, cached store, each run in a fresh process, "
          f"median of {args.repeat} s (peak MB: the largest, the process and its workers)")
    names = list(MODES)
    print(f"{'box':>5s} {'Mvoxels':>8s} | " + " ".join(f"{m:>13s}" for m in names) + " | table/floor  "
          "1proc/table  threads/table  scipy/table | " + " ".join(f"{m[:9] + ' MB':>12s}" for m in names)
          + " | synapses")
    for r in results:
        tb = r["table"]
        print(f"{r['fraction']:5.2f} {tb['voxels'] / 1e6:8.1f} | " + " ".join(f"{r[m]['seconds']:13.2f}" for m in names)
              + f" | {tb['seconds'] / r['floor']['seconds']:11.2f} {r['table 1 proc']['seconds'] / tb['seconds']:12.2f} "
              f"{r['table threads']['seconds'] / tb['seconds']:14.2f} {r['scipy']['seconds'] / tb['seconds']:12.2f} | "
              + " ".join(f"{r[m]['peak_mb']:12.0f}" for m in names) + f" | {tb['rows']}")
    f, tb = fetched["floor"], fetched["table"]
    print(f"\nfull box, nothing cached (fetched from the local mirror server as it is read): floor "
          f"{f['seconds']:.2f} s, table {tb['seconds']:.2f} s, table/floor {tb['seconds'] / f['seconds']:.2f}; "
          f"peak {f['peak_mb']:.0f} / {tb['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
