"""Per-shard costs at p105's real geometry: a mirror whose info files declare p105's full extent but
whose data fill one small region (every other chunk answers 404), so bookkeeping and requests are
measured at the real shard count (~3,600 output shards per array) in minutes.

    .venv/bin/python benchmarks/scale.py [--mirror DIR] [--shards 16 1000]

Prints, for the default box (the whole annotated box): seconds and requests of describe / discover,
to_dask, verify and a lazy first batch; the materialisation of boxes of about 16 and 1,000+
output shards, level 0 alone and with its pyramid (seconds per shard, requests per shard and peak
RSS); and the synapse table of boxes of about 16 and 256 shards on local worker processes (the
default) and on a 2-process dask cluster (`--table-shards` with no number: no tables).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import intake
import wildenberg_intake
from wildenberg_intake.mirror import MirrorServer, build_mirror

BOX = (576, 120576, 576, 136512, 160, 36320)  # p105's annotated box, nm (x0 x1 y0 y1 z0 z1)


def declare_full_extent(root: Path):
    """Rewrite p105's info files so that every scale covers the whole annotated box (EM's x and y
    are swapped on the server, as on BossDB); the chunks written stay where they are."""
    folder = root / "wildenberg2023" / "mouse_v1_l4_p105"
    for info_path in folder.glob("*/info"):
        info = json.loads(info_path.read_text())
        swapped = info_path.parent.name == "em"
        ends = (BOX[3], BOX[1], BOX[5]) if swapped else (BOX[1], BOX[3], BOX[5])
        for scale in info["scales"]:
            scale["size"] = [math.ceil(end / res) + 2 - off
                             for end, res, off in zip(ends, scale["resolution"], scale["voxel_offset"])]
        info_path.write_text(json.dumps(info))


def full_extent_mirror(root: Path) -> Path:
    """The full-extent mirror in `root`, written (p105's data in one small region, its info files
    declaring the whole box) unless it is there already."""
    if not (root / "wildenberg2023").exists():
        build_mirror(root, shape_xyz=(600, 600, 40), experiments=("p105",))
        declare_full_extent(root)
    return root


TABLE = r"""
import json, sys, time, resource
import intake, wildenberg_intake
base, cache, box, mode = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
cat = intake.open_catalog(wildenberg_intake.catalog_path())
client = None
if mode == "dask":
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
src = cat.p105_synapses(base_url=base, cache_dir=cache, bbox_nm=box, progress=False, client=client)
from wildenberg_intake.store.layout import shard_grid
shards = len(shard_grid(src.plan.arrays["raw"].shape))
t = time.perf_counter()
table = src.read()
seconds = time.perf_counter() - t
if client is not None:
    client.close()
    cluster.close()
print(json.dumps({"seconds": seconds, "shards": shards, "rows": len(table),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD = r"""
import json, sys, time, resource
import intake, wildenberg_intake
from wildenberg_intake.store.engine import materialise
base, cache, box, pyramid = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "pyramid"
cat = intake.open_catalog(wildenberg_intake.catalog_path())
src = cat.p105_psd(base_url=base, cache_dir=cache, bbox_nm=box, progress=False)
from wildenberg_intake.store.layout import shard_grid
shards = len(shard_grid(src.plan.arrays["raw"].shape)) + len(shard_grid(src.plan.arrays["labels/psd"].shape))
t = time.perf_counter()
materialise(src.plan, pyramid=pyramid, progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "shards": shards,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def box_of(target: int) -> list:
    """A box (nm) of about `target` output shards per array: two shard rows of 128 z-slices, square
    in x and y (512 x 512 voxels a shard)."""
    side = max(1, round(math.sqrt(target / 2)))
    return [BOX[0], BOX[0] + side * 512 * 12, BOX[2], BOX[2] + side * 512 * 12, BOX[4], BOX[4] + 2 * 128 * 40]


def run_child(code: str, base_url: str, cache: Path, box: list, what: str) -> dict:
    """Run `code` in a fresh process on `box`; its last line of output, as JSON."""
    out = subprocess.run([sys.executable, "-c", code, base_url, str(cache), json.dumps(box), what],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(server, fn):
    before = sum(server.requests.values())
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, sum(server.requests.values()) - before, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", type=Path, help="reuse (or write once) the full-extent mirror in this folder")
    parser.add_argument("--shards", type=int, nargs="*", default=(16, 1000),
                        help="approximate output shards per array of the materialised boxes")
    parser.add_argument("--table-shards", type=int, nargs="*", default=(16, 256),
                        help="approximate output shards per array of the synapse tables' boxes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = full_extent_mirror(args.mirror or tmp / "mirror")
        cat = intake.open_catalog(wildenberg_intake.catalog_path())
        rows = []
        with MirrorServer(root) as server:
            src = cat.p105_psd(base_url=server.base_url, cache_dir=str(tmp / "cache"), progress=False)
            s, n, _ = timed(server, src.discover)
            rows.append(("discover (info files, shapes)", s, n))
            from wildenberg_intake.store.layout import shard_grid
            shape = src.plan.arrays["raw"].shape
            print(f"default box: raw {shape}, {len(shard_grid(shape))} output shards per array\n")
            s, n, ds = timed(server, src.to_dask)
            rows.append(("to_dask()", s, n))
            s, n, _ = timed(server, src.describe)
            rows.append(("describe()", s, n))
            s, n, _ = timed(server, src.verify)
            rows.append(("verify() (nothing cached)", s, n))
            s, n, _ = timed(server, lambda: ds["labels"][0:1, 0:512, 0:512].values)
            rows.append(("to_dask() first window", s, n))
            code = ("import time; t = time.perf_counter(); from wildenberg_intake import training; "
                    "import sys; base, cache = sys.argv[1:3]; "
                    "ds = training.get_dataset('p105_psd', (8, 256, 256), base_url=base, cache_dir=cache, "
                    "progress=False, lazy=True, warmup=1); i = time.perf_counter(); ds[0]; "
                    "print(time.perf_counter() - i, i - t)")
            before = sum(server.requests.values())
            out = subprocess.run([sys.executable, "-c", code, server.base_url, str(tmp / "lazy")],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            first, setup = (float(v) for v in out.stdout.split()[-2:])
            rows.append((f"lazy first batch (dataset made in {setup:.1f} s)", first,
                         sum(server.requests.values()) - before))
            before, sent = sum(server.requests.values()), server.bytes_sent
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "wildenberg_intake.cli.main", "preview", "p105_psd", "--z", "64",
                                  "-o", str(tmp / "overview.png"), "--base-url", server.base_url,
                                  "--cache-dir", str(tmp / "preview")], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            rows.append((f"preview of a whole slice (MB sent {(server.bytes_sent - sent) / 1e6:.0f})",
                         time.perf_counter() - t, sum(server.requests.values()) - before))
            print(f"{'step':52s} {'s':>7s} {'requests':>9s}")
            for name, s, n in rows:
                print(f"{name:52s} {s:7.2f} {n:9d}")

            print(f"\nmaterialise, per-shard cost (shards of level 0; with the pyramid, its levels' too):\n"
                  f"{'what':>14s} {'shards (raw + labels)':>22s} {'s':>7s} {'s/shard':>8s} {'requests/shard':>14s} "
                  f"{'peak RSS MB':>11s}")
            for what in ("level 0", "pyramid"):
                for target in args.shards:
                    before = sum(server.requests.values())
                    r = run_child(CHILD, server.base_url, tmp / f"m{what}{target}", box_of(target), what)
                    requests = sum(server.requests.values()) - before
                    print(f"{what:>14s} {r['shards']:22d} {r['seconds']:7.1f} {r['seconds'] / r['shards']:8.4f} "
                          f"{requests / r['shards']:14.1f} {r['maxrss_mb']:11.0f}")

            print(f"\nsynapse table (fetches its three label arrays), per-shard cost:\n{'mode':>8s} {'shards':>7s} "
                  f"{'s':>7s} {'s/shard':>8s} {'peak RSS MB':>11s}")
            for mode in ("local", "dask"):
                for target in args.table_shards:
                    r = run_child(TABLE, server.base_url, tmp / f"t{mode}{target}", box_of(target), mode)
                    print(f"{mode:>8s} {r['shards']:7d} {r['seconds']:7.1f} {r['seconds'] / r['shards']:8.4f} "
                          f"{r['maxrss_mb']:11.0f}")


if __name__ == "__main__":
    main()
