"""Lazy access: seconds to the first batch, patches per second and bytes fetched per patch, side by side.

    .venv/bin/python benchmarks/lazy.py [--size 2100 2100 64] [--latency 0 0.03 0.1] [--window 60]
                                        [--steady 30] [--cases lazy materialise reference cloudvolume tensorstore]

Writes a p14 BossDB-layout mirror at least 4 output shards wide in x and y, serves it on 127.0.0.1
with a per-request latency, and for each case, in its own process with an empty cache, builds a
loader of (32, 256, 256) patches, batch size 2, over the whole box (p14 psd, torch-em's default
raw transform and augmentations, main process) and reports:
- first batch: seconds from the call to the first batch;
- p/s first W s: patches delivered in the first `--window` seconds after the call, per second;
- p/s steady: patches per second over `--steady` batches after that window;
- kB/patch: bytes the server sent, per patch delivered (over the whole run).
Cases: `lazy` (this package, lazy=True), `materialise` (this package, materialising first),
`reference` (torch-em's module, which materialises first), `cloudvolume` (a torch-em dataset over
`CloudVolume(..., cache=True)` arrays: the hand-written alternative) and `tensorstore` (the
precomputed layers opened with tensorstore and a 1 GB cache pool, cached chunks not
rechecked with the server; `pip install tensorstore` first).
Then `to_dask()` on the whole box: seconds and requests until it returns, and the requests of one
64 x 512 x 512 window against the minimum (the source chunks of the shards it touches).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = r"""
import json, os, sys, time
kind, base, cache, box, window, steady = sys.argv[1:7]
if kind == "cloudvolume":
    from cloudvolume import CloudVolume
elif kind == "tensorstore":
    import tensorstore as ts
box, window, steady = json.loads(box), float(window), int(steady)
PATCH, N = (32, 256, 256), 10**6
import numpy as np, torch, torch_em, zarr, intake
import wildenberg_intake, wildenberg_intake.training
from torch_em.data.datasets.electron_microscopy import wildenberg as ref
torch.manual_seed(0); np.random.seed(0)
t0 = time.perf_counter()  # from the call: imports (~4 s of torch, torch-em, ...) are not counted
if kind in ("lazy", "materialise"):
    loader = wildenberg_intake.get_loader("p14_psd", PATCH, batch_size=2, bbox_nm=box, base_url=base, cache_dir=cache,
                                          progress=False, lazy=kind == "lazy", n_samples=N, num_workers=0)
elif kind == "reference":
    import functools, tqdm
    ref.WILDENBERG_S3_BASE = "precomputed://" + base
    ref.tqdm = functools.partial(tqdm.tqdm, disable=True)
    loader = ref.get_wildenberg_loader(cache, 2, PATCH, experiments=["p14"], label_choice="psd", bounding_box=box,
                                       download=True, n_samples=N, num_workers=0)
else:
    # A torch-em dataset whose arrays read the precomputed layers directly (cloud-volume with its
    # disk cache, or tensorstore with a cache pool); the package gives only the geometry.
    plan = wildenberg_intake.open_catalog(base_url=base, cache_dir=cache).p14_psd(bbox_nm=box).plan

    class Window:
        def __init__(self, name):
            src, layer = plan.arrays[name], plan.layers[name]
            self.shape, self.dtype, self.ndim = tuple(src.shape), np.dtype(src.dtype), 3
            self.start = src.start_zyx
            url = layer.url
            if kind == "cloudvolume":
                self.vol = CloudVolume(url if url.startswith("precomputed://") else "precomputed://" + url, mip=layer.info.mip, cache=os.path.join(cache, "cv"),
                                       fill_missing=True, progress=False, bounded=False)
            else:
                from wildenberg_intake.source.layers import http_url
                ctx = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 30}})
                self.vol = ts.open({"driver": "neuroglancer_precomputed", "kvstore": http_url(url) + "/",
                                    "scale_index": layer.info.mip, "recheck_cached_data": False},
                                   context=ctx, read=True).result()

        def __getitem__(self, key):
            lo = [s.start + o for s, o in zip(key, self.start)]
            hi = [s.stop + o for s, o in zip(key, self.start)]
            if kind == "cloudvolume":
                data = self.vol[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]][..., 0]
            else:
                data = self.vol[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0], 0].read().result()
            return np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0))

    raw, labels = Window("raw"), Window(plan.label_name)
    stub = os.path.join(cache, "stub.zarr")  # torch-em opens paths: a same-shaped empty store
    g = zarr.open_group(stub, mode="w")
    g.create_array("raw", shape=raw.shape, dtype="uint8", chunks=(64, 512, 512))
    g.create_array("labels", shape=labels.shape, dtype="uint8", chunks=(64, 512, 512))
    ds = torch_em.default_segmentation_dataset(stub, "raw", stub, "labels", PATCH, n_samples=N)
    ds.raw, ds.labels = raw, labels
    loader = torch_em.get_data_loader(ds, batch_size=2, num_workers=0, shuffle=True)
it = iter(loader)
next(it)
first = time.perf_counter() - t0
patches = 2
while time.perf_counter() - t0 < window:
    next(it)
    patches += 2
in_window = patches / window
t = time.perf_counter()
for _ in range(steady):
    next(it)
steady_rate = 2 * steady / (time.perf_counter() - t)
print(json.dumps({"first": first, "window": in_window, "steady": steady_rate, "patches": patches + 2 * steady}))
"""


def run_case(kind, base, cache, box, window, steady):
    out = subprocess.run([sys.executable, "-c", RUN, kind, base, str(cache), json.dumps(box), str(window),
                          str(steady)], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_dask_probe(base, cache, server):
    """to_dask() on the whole box, then one 64 x 512 x 512 window against its minimum of requests."""
    import wildenberg_intake
    from wildenberg_intake.store.layout import shard_box
    from wildenberg_intake.store.lazy import shards_touching

    def chunk_requests():
        return sum(n for p, n in server.requests.items() if not p.endswith(("/info", "/provenance")))
    before_all, before = sum(server.requests.values()), chunk_requests()
    t = time.perf_counter()
    src = wildenberg_intake.open_catalog(base_url=base, cache_dir=str(cache)).p14_psd(progress=False)
    ds = src.to_dask()
    seconds, requests = time.perf_counter() - t, sum(server.requests.values()) - before_all
    window = ds.isel(z=slice(0, 64), y=slice(600, 1112), x=slice(600, 1112))
    window.load()
    used = chunk_requests() - before
    minimum = 0
    for name in ("raw", src.plan.label_name):
        arr, layer = src.plan.arrays[name], src.plan.layers[name]
        chunks = set()
        for index in shards_touching((0, 600, 600), (64, 1112, 1112)):
            a, b = shard_box(index, arr.shape)
            chunks |= set(layer.info.chunks_in(np.add(arr.start_zyx, a), np.add(arr.start_zyx, b)))
        minimum += len(chunks)
    return seconds, requests, ds["raw"].shape, used, minimum


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=(2100, 2100, 64), help="label voxels x y z")
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.03, 0.1], help="seconds per request")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of the first-window rate")
    parser.add_argument("--steady", type=int, default=30, help="batches timed after the window")
    parser.add_argument("--cases", nargs="+", default=["lazy", "materialise", "reference", "cloudvolume",
                                                       "tensorstore"])
    parser.add_argument("--mirror", type=Path, help="reuse (or write once) a mirror here")
    args = parser.parse_args()
    from wildenberg_intake.mirror import MirrorServer, build_mirror
    import wildenberg_intake
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.mirror or tmp / "mirror"
        if not (root / "wildenberg2023").exists():
            t = time.perf_counter()
            build_mirror(root, shape_xyz=tuple(args.size), experiments=("p14",))
            print(f"mirror {tuple(args.size)} written in {time.perf_counter() - t:.0f} s")
        for latency in args.latency:
            with MirrorServer(root, latency=latency) as server:
                box = list(wildenberg_intake.open_catalog(base_url=server.base_url).p14_psd().plan.bbox_nm)
                seconds, requests, shape, used, minimum = to_dask_probe(server.base_url, tmp / f"dask-{latency}",
                                                                       server)
                print(f"\n== {latency * 1000:.0f} ms per request; p14 box {shape} (z, y, x) ==")
                print(f"to_dask() on the whole box: {seconds:.2f} s, {requests} requests (info files only); "
                      f"one 64 x 512 x 512 window: {used} chunk requests, minimum {minimum}")
                print(f"{'case':12s} {'first batch s':>13s} {'p/s first ' + str(int(args.window)) + ' s':>16s} "
                      f"{'p/s steady':>10s} {'kB/patch':>9s}")
                for kind in args.cases:
                    sent = server.bytes_sent
                    r = run_case(kind, server.base_url, tmp / f"{kind}-{latency}", box, args.window, args.steady)
                    if "error" in r:
                        print(f"{kind:12s} failed: {r['error']}")
                        continue
                    per_patch = (server.bytes_sent - sent) / r["patches"] / 1e3
                    print(f"{kind:12s} {r['first']:13.2f} {r['window']:16.1f} {r['steady']:10.1f} {per_patch:9.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
