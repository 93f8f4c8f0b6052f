"""Materialisation speed, fetch amplification and memory: this package against torch-em's reference module.

    .venv/bin/python benchmarks/materialise.py [--size 1400 1400 80] [--experiments p105 p14] [--latency 0 0.03] [--bandwidth-mbit 200]
                                               [--scales 0.5 1 2] [--scale-case p14_psd] [--cases p105_psd p105_saturated p14_psd]
                                               [--codec zstd6] [--tensorstore] [--repeats 3]

Writes a BossDB-layout mirror, serves it on 127.0.0.1 (with optional per-request latency and
per-response bandwidth) and, for each case, runs the reference `get_wildenberg_data` and this
package's catalog entry side by side, each in its own process, on the same box, best of
`--repeats` runs each (a fresh cache every run). Prints MB/s of
output (raw plus labels, uncompressed), requests and bytes fetched against the minimum (the source
chunks the box touches), peak RSS, the ratios to the reference, and the CPU floor: the CPU seconds
of decoding, downsampling and encoding alone, divided by the cores. "package" is a full
materialisation (level 0 and the pyramid, made on transfer), "level 0" the package without the
pyramid (what the reference writes); each row's "% floor" is against the floor of what it writes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.mirror import MirrorServer, build_mirror

RUN = r"""
import json, os, sys, time
kind, exp, label, base, cache, box, codec = sys.argv[1:8]
# glibc malloc tuned as `wildenberg-intake fetch` does (a library user opts in with this variable).
os.environ.setdefault("WILDENBERG_INTAKE_TUNE_MALLOC", "1")
box = json.loads(box)
if kind == "tensorstore":
    import intake, numpy as np, tensorstore as ts, wildenberg_intake, zarr
    from wildenberg_intake.store.format import CHUNKS, CODECS, SHARDS, shuffle_of
    from wildenberg_intake.source.layers import http_url
    cat = intake.open_catalog(wildenberg_intake.catalog_path())
elif kind == "reference":
    from torch_em.data.datasets.electron_microscopy import wildenberg as ref
    ref.WILDENBERG_S3_BASE = "precomputed://" + base
    import tqdm, functools
    ref.tqdm = functools.partial(tqdm.tqdm, disable=True)
else:
    import intake, wildenberg_intake
    cat = intake.open_catalog(wildenberg_intake.catalog_path())
t = time.perf_counter()
if kind == "reference":
    path = ref.get_wildenberg_data(cache, exp, label, bounding_box=box, download=True)
elif kind == "tensorstore":
    # The same arrays (box, chunks, shards, codecs) written by tensorstore: it reads precomputed
    # over HTTP and writes sharded zarr v3 in C++, reading straight into (z, y, x).
    plan = cat[f"{exp}_{label}"](bbox_nm=box, base_url=base, cache_dir=cache, raw_codec=codec).plan
    path = os.path.join(cache, "tensorstore.zarr")
    zarr.open_group(path, mode="w")
    context = ts.Context({"cache_pool": {"total_bytes_limit": 128 << 20},
                          "data_copy_concurrency": {"limit": os.cpu_count()}})
    for name, out in (("raw", "raw"), (plan.label_name, "labels")):
        src, layer = plan.arrays[name], plan.layers[name]
        source = ts.open({"driver": "neuroglancer_precomputed", "kvstore": http_url(layer.url) + "/",
                          "scale_index": layer.info.mip}, context=context, read=True).result()
        lo, hi = layer.info_axes(src.start_zyx), layer.info_axes(np.add(src.start_zyx, src.shape))
        view = source[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2], 0]
        view = view.transpose([2, 0, 1] if layer.info.swap_xy else [2, 1, 0]).translate_to[0, 0, 0]
        cname, level = CODECS[src.codec]
        inner = [{"name": "bytes", "configuration": {"endian": "little"}},
                 {"name": "blosc", "configuration": {"cname": cname, "clevel": level, "blocksize": 0,
                  "shuffle": shuffle_of(src.is_label), "typesize": np.dtype(src.dtype).itemsize}}]
        target = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, out)},
                          "metadata": {"shape": list(src.shape), "data_type": src.dtype, "fill_value": 0,
                                       "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(SHARDS)}},
                                       "codecs": [{"name": "sharding_indexed", "configuration": {
                                           "chunk_shape": list(CHUNKS), "codecs": inner, "index_location": "end",
                                           "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                                            {"name": "crc32c"}]}}]},
                          "create": True, "delete_existing": True}, context=context).result()
        target.write(view).result()
elif kind == "level 0":  # the package without its pyramid: what the reference writes
    from wildenberg_intake.store.engine import materialise
    src = cat[f"{exp}_{label}"](bbox_nm=box, base_url=base, cache_dir=cache, progress=False, raw_codec=codec)
    path = str(materialise(src.plan, pyramid=False, progress=False))
else:
    src = cat[f"{exp}_{label}"](bbox_nm=box, base_url=base, cache_dir=cache, progress=False, raw_codec=codec)
    path = src.materialise()
seconds = time.perf_counter() - t
# VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, kept across exec).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": seconds, "maxrss_mb": int(hwm) / 1024, "path": path}))
"""


def run(kind, exp, label, base, cache, box, codec="zstd1"):
    out = subprocess.run([sys.executable, "-c", RUN, kind, exp, label, base, str(cache), json.dumps(box), codec],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def output_bytes(path):
    import zarr
    g = zarr.open_group(path, mode="r")
    arrays = [g["raw"], g["labels"]] if "labels" in g and hasattr(g["labels"], "shape") else None
    if arrays is None:
        return None
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)


def same_voxels(ts_path, package_path, label):
    import zarr
    ours = zarr.open_group(str(StoreCache.at(package_path).label_view(label)), mode="r")
    theirs = zarr.open_group(ts_path, mode="r")
    return all(np.array_equal(ours[k][z:z + 64], theirs[k][z:z + 64])
               for k in ("raw", "labels") for z in range(0, ours[k].shape[0], 64))


def chunk_files(mirror_root, plan, name):
    """(grid, file) of every source chunk array `name` of the box touches; file is None for a missing chunk."""
    src, layer = plan.arrays[name], plan.layers[name]
    folder = Path(mirror_root) / layer.url.split("127.0.0.1")[1].split("/", 1)[1] / layer.info.scale_key
    for grid in layer.info.chunks_in(src.start_zyx, np.add(src.start_zyx, src.shape)):
        path = folder / layer.chunk_name(grid)
        gz = path.with_name(path.name + ".gz")
        yield grid, path if path.exists() else gz if gz.exists() else None


def minimum_fetch(mirror_root, plan, label_name):
    """Source chunks the box touches, and their bytes on the server."""
    n, size = 0, 0
    for name in ("raw", label_name):
        for _, path in chunk_files(mirror_root, plan, name):
            n += 1
            size += path.stat().st_size if path is not None else 0
    return n, size


def cpu_floor(mirror_root, plan, label_name, codec, cores, repeats=3):
    """The work the format requires, timed alone in one thread, best of `repeats`: decoding every
    source chunk once (gzip inflation and the precomputed decode into a C-order (z, y, x) array, from
    bytes already in memory), downsampling each pyramid level once from the level below (the
    package's documented mean / mode, with the best kernel available: the package's compiled one),
    Blosc-encoding every non-empty output chunk of every level with the codec the format gives it
    (edge chunks padded, as zarr stores them) and its crc32c (zarr's crc32c codec), and the content
    digest of level 0's voxels that locks and synapse tables read. No HTTP, no server, no copies
    into shards, no file writes: those are the pipeline's overhead, which the floor must not hide.
    Returns CPU seconds (decode, downsample, encode level 0, encode levels >= 1, level 0 digest),
    and beside them numpy's downsampling and the compiled kernels' load (import and first calls) in
    wall seconds."""
    import google_crc32c
    import numcodecs.blosc
    from wildenberg_intake.store.format import CHUNKS, blosc_codec, new_digest
    from wildenberg_intake.store.downsample import downsample
    from wildenberg_intake.store.plan import pyramid_levels
    from wildenberg_intake.source.layers import place
    from wildenberg_intake.source.transfer import inflate
    numcodecs.blosc.use_threads = False  # thread_time below sees this thread only
    decode = down = down_numpy = enc0 = enc_levels = digest = 0.0
    t = time.perf_counter()
    from wildenberg_intake.store import kernels

    def compiled_downsample(block, is_label):
        out = np.empty((block.shape[0], -(-block.shape[1] // 2), -(-block.shape[2] // 2)), block.dtype)
        kernel = kernels.mode if is_label else kernels.mean_narrow if block.itemsize <= 2 else kernels.mean_wide
        return kernel(block, out)

    for dtype in (np.uint8, np.uint32, np.uint64):
        compiled_downsample(np.zeros((1, 2, 2), dtype), True)
    compiled_downsample(np.zeros((1, 2, 2), np.uint8), False)
    load = time.perf_counter() - t

    def chunks_of(out):
        chunks = []
        for z in range(0, out.shape[0], CHUNKS[0]):
            for y in range(0, out.shape[1], CHUNKS[1]):
                for x in range(0, out.shape[2], CHUNKS[2]):
                    part = out[z:z + CHUNKS[0], y:y + CHUNKS[1], x:x + CHUNKS[2]]
                    if part.any():  # zarr writes no empty chunk, nor does the package
                        chunk = np.zeros(CHUNKS, dtype=out.dtype)  # edge chunks padded, as zarr stores them
                        chunk[:part.shape[0], :part.shape[1], :part.shape[2]] = part
                        chunks.append(chunk)
        return chunks

    def best_of(fn):
        best = float("inf")
        for _ in range(repeats):
            t = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t)
        return best

    for name in ("raw", label_name):
        src, layer = plan.arrays[name], plan.layers[name]
        files = [(grid, path.read_bytes() if path else None, path and path.suffix == ".gz")
                 for grid, path in chunk_files(mirror_root, plan, name)]
        out = np.zeros(src.shape, dtype=src.dtype)
        best = float("inf")
        for _ in range(repeats):
            seconds = 0.0
            for grid, body, gz in files:
                t = time.thread_time()
                decoded = np.ascontiguousarray(layer.decode_chunk(grid, inflate(body) if gz else body))
                seconds += time.thread_time() - t
                place(out, src.start_zyx, layer.info.chunk_box(grid)[0], decoded)
            best = min(best, seconds)
        decode += best
        levels = [out]
        for _ in range(pyramid_levels(src.shape)):
            levels.append(downsample(levels[-1], src.is_label))
        # The best kernel: the compiled loops (loaded before they are timed); numpy's, which the
        # package uses on boxes this small (loading the compiled ones costs more), beside them.
        down += best_of(lambda: [compiled_downsample(level, src.is_label) for level in levels[:-1]])
        down_numpy += best_of(lambda: [downsample(level, src.is_label) for level in levels[:-1]])
        digest += best_of(lambda: new_digest().update(out))
        for k, level in enumerate(levels):
            chunks = chunks_of(level)
            blosc = blosc_codec(plan.source(name if k == 0 else f"{name}@{k}").codec, src.is_label)
            seconds = best_of(lambda: [google_crc32c.value(blosc.encode(c)) for c in chunks])
            if k == 0:
                enc0 += seconds
            else:
                enc_levels += seconds
        out = levels = None  # free before the next array
    return (decode, down, enc0, enc_levels, digest), (down_numpy, load)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=(1400, 1400, 80), help="mirror label voxels x y z")
    parser.add_argument("--latency", type=float, nargs="+", default=(0.0, 0.03), help="seconds per request")
    parser.add_argument("--bandwidth-mbit", type=float, default=0, help="per response; 0 = unlimited")
    parser.add_argument("--cases", nargs="+", default=("p105_psd", "p105_saturated", "p14_psd"))
    parser.add_argument("--scales", type=float, nargs="*", default=(0.25, 0.5, 1.0),
                        help="box sizes (fractions of the mirror's xy) for the cost-per-GB sweep; none: no sweep")
    parser.add_argument("--scale-case", default="p14_psd", help="the case of the cost-per-GB sweep")
    parser.add_argument("--codec", default="zstd1", help="raw codec for this package (zstd6 = the reference's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each implementation per case (best kept)")
    parser.add_argument("--mirror", type=Path, help="reuse (or write once) a mirror in this folder")
    parser.add_argument("--experiments", nargs="+", default=("p105", "p14"),
                        help="experiments the mirror holds (a deep mirror of p14 alone needs less memory)")
    parser.add_argument("--tensorstore", action="store_true",
                        help="also write the same arrays with tensorstore (pip install tensorstore) and "
                             "compare its voxels with the package's")
    args = parser.parse_args()
    cores = os.cpu_count()
    import intake
    import wildenberg_intake
    cat = intake.open_catalog(wildenberg_intake.catalog_path())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        if args.mirror and (args.mirror / "wildenberg2023").exists():
            from types import SimpleNamespace
            mirror = SimpleNamespace(root=args.mirror)
            print(f"mirror reused from {args.mirror}; {cores} cores\n")
        else:
            mirror = build_mirror(args.mirror or tmp / "mirror", shape_xyz=args.size, experiments=args.experiments)
            print(f"mirror of {args.size} label voxels written in {time.perf_counter() - t:.0f} s; {cores} cores\n")
        header = (f"{'case':16s} {'latency':>7s} {'impl':9s} {'MB out':>7s} {'s':>6s} {'MB/s':>7s} {'x ref':>6s} "
                  f"{'requests':>9s} {'req/min':>7s} {'MB fetched':>10s} {'fetch/min':>9s} {'peak RSS MB':>11s} "
                  f"{'floor s':>7s} {'% floor':>7s}")
        print(header)
        print("-" * len(header))
        for latency in args.latency:
            bw = args.bandwidth_mbit * 1e6 / 8
            for case in args.cases:
                exp, label = case.split("_", 1)
                with MirrorServer(mirror.root, latency=latency, bandwidth=bw) as server:
                    src = cat[case](base_url=server.base_url, cache_dir=str(tmp / "probe"), progress=False,
                                    raw_codec=args.codec)
                    box = list(src.plan.bbox_nm)
                    n_min, bytes_min = minimum_fetch(mirror.root, src.plan, src.plan.label_name)
                    (dec, down, enc0, enc_levels, dig), (down_numpy, load) = cpu_floor(
                        mirror.root, src.plan, src.plan.label_name, args.codec, cores)
                    floor0, floor_all = (dec + enc0 + dig) / cores, (dec + down + enc0 + enc_levels + dig) / cores
                    results = {}
                    kinds = ("reference", "package", "level 0") + (("tensorstore",) if args.tensorstore else ())
                    for kind in kinds:
                        runs = []
                        for attempt in range(args.repeats):  # each into a fresh cache; the fastest kept
                            before, sent = server.requests, server.bytes_sent
                            r = run(kind, exp, label, server.base_url, tmp / f"{kind}-{case}-{latency}-{attempt}",
                                    box, args.codec)
                            fetched = server.requests - before
                            r["requests"] = sum(n for p, n in fetched.items()
                                                if not p.endswith(("/info", "/provenance")))
                            r["bytes"] = server.bytes_sent - sent
                            runs.append(r)
                        r = min(runs, key=lambda r: r["seconds"])
                        view = r["path"] if kind in ("reference", "tensorstore") else \
                            StoreCache.at(r["path"]).label_view(label)
                        r["out"] = output_bytes(str(view))
                        results[kind] = r
                    ref = results["reference"]
                    for kind, r in results.items():
                        floor = floor_all if kind == "package" else floor0  # the work each writes
                        mbps = r["out"] / r["seconds"] / 1e6
                        print(f"{case:16s} {latency * 1000:5.0f}ms {kind:9s} {r['out'] / 1e6:7.0f} {r['seconds']:6.1f} "
                              f"{mbps:7.1f} {ref['seconds'] / r['seconds']:6.2f} {r['requests']:9d} "
                              f"{r['requests'] / n_min:7.2f} {r['bytes'] / 1e6:10.1f} {r['bytes'] / bytes_min:9.2f} "
                              f"{r['maxrss_mb']:11.0f} {floor:7.1f} {100 * floor / r['seconds']:6.0f}%")
                        if kind == "level 0":
                            print(f"{'':16s} the pyramid adds {100 * (results['package']['seconds'] / r['seconds'] - 1):.0f}% "
                                  "to level 0 alone")
                    if args.tensorstore:
                        print(f"{'':16s} tensorstore voxels equal the package's: "
                              f"{same_voxels(results['tensorstore']['path'], results['package']['path'], label)}")
                    print(f"{'':16s} floor: decode {dec:.2f} + downsample {down:.2f} + encode level 0 {enc0:.2f} "
                          f"+ encode levels {enc_levels:.2f} + level 0 digest {dig:.2f} CPU s over {cores} cores; "
                          f"minimum {n_min} requests, {bytes_min / 1e6:.1f} MB")
                    print(f"{'':16s} downsampling: compiled {down:.2f} CPU s (+ {load:.2f} s to load them), "
                          f"numpy {down_numpy:.2f} CPU s")

        if not args.scales:
            return
        print(f"\ncost per GB and memory against box size ({args.scale_case}, this package, no latency):")
        exp, label = args.scale_case.split("_", 1)
        with MirrorServer(mirror.root) as server:
            full = cat[args.scale_case](base_url=server.base_url, cache_dir=str(tmp / "probe"),
                                        progress=False).plan.bbox_nm
            for scale in args.scales:
                box = list(full)
                box[1] = box[0] + (box[1] - box[0]) * scale
                box[3] = box[2] + (box[3] - box[2]) * scale
                r = run("package", exp, label, server.base_url, tmp / f"scale-{scale}", box, args.codec)
                out = output_bytes(str(StoreCache.at(r["path"]).label_view(label)))
                print(f"  box x/y scale {scale:4.2f}: {out / 1e6:7.0f} MB out, {r['seconds'] / (out / 1e9):6.1f} s/GB, "
                      f"peak RSS {r['maxrss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
