"""Where a materialisation's CPU goes: thread CPU time of the package's own functions in one run.

    .venv/bin/python benchmarks/breakdown.py MIRROR_DIR [--cases p105_saturated p105_psd]

MIRROR_DIR: a mirror written by `benchmarks/materialise.py --mirror DIR` (or `wildenberg-intake
mirror`). Runs each case's full materialisation (level 0 and the pyramid) in this process, with
the functions below wrapped to add their thread CPU time (the outermost wrapped call counts, so
nothing is counted twice), and prints them against the process's CPU time. The mirror server runs
in this process too: its share is in "rest", with the package's Python glue (planning, records,
the ledger, locks, task scheduling).
"""

import argparse
import collections
import functools
import os
import tempfile
import threading
import time

os.environ.setdefault("WILDENBERG_INTAKE_TUNE_MALLOC", "1")  # as `wildenberg-intake fetch` does

import intake  # noqa: E402
import wildenberg_intake  # noqa: E402
from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store import format as fmt, downsample as ds, staging, files, shards, pyramid, cache as cachemod, foreground
from wildenberg_intake.source import layers, transfer
acc = collections.Counter()
local = threading.local()


def wrap(owner, name, label):
    f = getattr(owner, name)
    @functools.wraps(f)
    def g(*a, **k):
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        t = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            local.depth = depth
            if depth == 0:
                acc[label] += time.thread_time() - t
    setattr(owner, name, g)


wrap(ds, "downsample", "downsample")
wrap(fmt, "encode_chunks", "encode chunks (copy + blosc + crc32c)")
wrap(shards, "encode_chunks", "encode chunks (copy + blosc + crc32c)")
wrap(ds, "encode_chunks", "encode chunks (copy + blosc + crc32c)")
wrap(ds, "decode_into", "decode staged quarters")
wrap(pyramid, "decode_into", "decode staged quarters")
wrap(fmt.ContentDigest, "update", "content digest (xxh3)")
wrap(foreground.ShardCounts, "add", "foreground counts")
wrap(files, "durable_write", "durable writes")
wrap(staging, "durable_write", "durable writes")
wrap(cachemod, "durable_write", "durable writes")
wrap(transfer, "inflate", "inflate")
wrap(staging, "inflate", "inflate")
wrap(layers.Layer, "decode_chunk", "decode chunk")
wrap(layers, "place", "place chunk in shard")
wrap(shards, "place", "place chunk in shard")
wrap(fmt, "assemble_shard", "assemble shard")
wrap(shards, "assemble_shard", "assemble shard")
wrap(pyramid, "assemble_shard", "assemble shard")
wrap(staging.QuarterStage, "get", "quarter read back")
wrap(layers.Layer, "fetch_chunk", "http fetch")
wrap(layers.Layer, "fetch_chunk_with_wire", "http fetch")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("mirror")
parser.add_argument("--cases", nargs="+", default=("p105_saturated", "p105_psd"))
args = parser.parse_args()
cat = intake.open_catalog(wildenberg_intake.catalog_path())
with MirrorServer(args.mirror) as server, tempfile.TemporaryDirectory() as tmp:
    for case in args.cases:
        acc.clear()
        src = cat[case](base_url=server.base_url, cache_dir=os.path.join(tmp, case), progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        src.materialise()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{case}: wall {wall:.2f} s, process CPU {cpu:.2f} s (the mirror server's included)")
        for k, v in acc.most_common():
            print(f"  {k:40s} {v:5.2f}")
        print(f"  {'rest':40s} {cpu - sum(acc.values()):5.2f}")
