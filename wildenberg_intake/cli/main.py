"""Command line: `wildenberg-intake list | describe | fetch | verify | index | du | lock | preview | view |
synapses | mirror | serve | demo`.

Every command has --help. A user's mistake (a bad value, an unknown entry, an unreachable server)
prints one line on stderr and exits 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_MISMATCH = 1


def _entry_args(p, many=True):
    p.add_argument("entries" if many else "entry", nargs=many if isinstance(many, str) else ("+" if many else None),
                   metavar="ENTRY",
                   help="catalog entry, e.g. p105_psd (see `wildenberg-intake list`)")
    _param_args(p)


def _param_args(p):
    p.add_argument("--bbox-nm", nargs=6, metavar=("X0", "X1", "Y0", "Y1", "Z0", "Z1"),
                   help="box in nm (default: the annotated box)")
    p.add_argument("--em-mip", help="EM mip (0: 6 nm, 1: 12 nm, 2: 24 nm; default 1)")
    p.add_argument("--seg-mip", help="label mip (default 0)")
    p.add_argument("--raw-codec", help="Blosc codec of the cached raw EM (default zstd1)")
    p.add_argument("--cache-dir", help="cache folder (default $WILDENBERG_INTAKE_CACHE or ~/.cache/wildenberg-intake)")
    p.add_argument("--base-url", help="BossDB base URL: a mirror or an offline copy (default $WILDENBERG_BOSSDB_URL or BossDB)")


def _params(args, **extra) -> dict:
    out = {k: getattr(args, k) for k in ("em_mip", "seg_mip", "raw_codec", "cache_dir", "base_url")
           if getattr(args, k, None) is not None}
    if getattr(args, "bbox_nm", None):
        out["bbox_nm"] = list(args.bbox_nm)
    return {**out, **extra}


def _source(name, args, voxels=False, **extra):
    """Catalog entry `name` with the command's parameters; `voxels`: refuse the table entries."""
    from ..drivers import SynapseTableSource, entry_source
    src = entry_source(name, **_params(args, **extra))
    if voxels and isinstance(src, SynapseTableSource):
        raise ValueError(f"entry {name!r} is a synapse table; allowed here: a voxel entry such as "
                         f"{src.request.experiment}_psd (for tables: `wildenberg-intake synapses`)")
    return src


def cmd_list(args):
    from ..catalog import load_catalog_yaml
    cat = load_catalog_yaml()
    print(f"{'entry':20s} {'experiment':10s} {'label':14s} {'dtype':7s} {'annotated box (nm) x0 x1 y0 y1 z0 z1':40s} full size (z, y, x) at 12 nm")
    for name, entry in cat["sources"].items():
        ds, label = entry["args"]["dataset"], entry["args"].get("label")
        box = ds["annotated_bbox_nm"]
        res = ds["resolutions_nm"]["labels_mip0_nm"]
        size = [int((box[5] - box[4]) / res[2]), int((box[3] - box[2]) / res[1]), int((box[1] - box[0]) / res[0])]
        kind = ds["label_channels"][label]["dtype"] if label else "table"
        print(f"{name:20s} {ds['experiment']:10s} {label or '(synapses)':14s} {kind:7s} "
              f"{' '.join(str(v) for v in box):40s} {tuple(size)}")


def cmd_describe(args):
    from ..catalog import load_catalog_yaml
    src = _source(args.entry, args, progress=False)
    meta = src.discover()["metadata"]
    entry = load_catalog_yaml()["sources"][args.entry]
    out = {"entry": args.entry, "description": entry.get("description"), "catalog": entry["args"]["dataset"],
           "label": entry["args"].get("label"), "resolved": meta,
           "layers": {name: {"url": l.url, "mip": l.info.mip, "encoding": l.info.encoding, "dtype": l.info.dtype,
                             "resolution_nm_zyx": l.info.resolution_zyx, "voxel_offset_zyx": l.info.offset_zyx,
                             "size_zyx": l.info.size_zyx, "chunk_zyx": l.info.chunk_zyx,
                             "sharded": l.info.sharding is not None, "mips": list(l.info.mips),
                             "info_sha256": l.info.info_sha256}
                      for name, l in src.plan.layers.items()}}
    print(json.dumps(out, indent=2, default=list))


def cmd_fetch(args):
    extra = {"workers": args.workers} if args.workers is not None else {}
    if args.lock:
        from ..lock import open_locked
        sources = open_locked(args.lock, **_params(args, progress=not args.quiet, **extra))
    elif args.entries:
        sources = {name: _source(name, args, progress=not args.quiet, **extra) for name in args.entries}
    else:
        raise ValueError("fetch needs ENTRY names or --lock FILE")
    for name, src in sources.items():
        t = time.perf_counter()
        if args.repair:
            repaired = src.repair()
            print(f"{name}: fetched again {sum(map(len, repaired.values()))} damaged shards "
                  f"({', '.join(repaired) or 'none'})")
        path = src.materialise(client=args.scheduler)
        print(f"{name}: {path} ({time.perf_counter() - t:.1f} s)")


def cmd_verify(args):
    from ..store.cache import StoreCache
    bad = 0
    if args.lock:
        return _verify_lock(args)
    if args.target is None:
        raise ValueError("verify needs PATH or ENTRY, or --lock FILE")
    from ..catalog import entry_names
    target = Path(args.target)
    if target.exists():
        cache = StoreCache.at(target)
    elif args.target in entry_names():
        # Never fetches: the store these parameters name is checked as far as it is cached.
        from ..store.engine import cache_for
        cache = cache_for(_source(args.target, args, progress=False).plan)
        if not cache.zarr_path.is_dir():
            print(f"{args.target}: nothing cached for these parameters (no store at {cache.root}); "
                  "nothing was fetched")
            return 0
    else:
        raise ValueError(f"{args.target!r} is neither a store folder (no such path) nor a catalog entry; "
                         f"allowed: a path <cache_dir>/wildenberg2023/<store>, its data.zarr, or one of {entry_names()}")
    report = cache.verify()
    if not report:  # nothing checked is not a pass
        raise ValueError(f"store {cache.root} holds no arrays yet; nothing to verify (fetch an entry into it first)")
    checked = 0
    for name, entry in report.items():
        state = "complete" if entry["complete"] else f"incomplete ({len(entry['unfetched'])} shards not fetched yet)"
        problems = [f"missing {entry['missing']}"] * bool(entry["missing"]) + \
                   [f"corrupt {entry['corrupt']}"] * bool(entry["corrupt"])
        bad += bool(problems)
        checked += entry["checked"]
        print(f"{name}: {state}; " + ("; ".join(problems) if problems else "every recorded shard is intact"))
    print(f"{cache.root}: checked {checked} recorded shards of {len(report)} arrays; "
          + (f"{bad} arrays damaged" if bad else "all intact"))
    return EXIT_MISMATCH if bad else 0


def cmd_index(args):
    """Index each entry's cached label shards that lack the foreground index (never fetches)."""
    from ..store.engine import cache_for
    from ..store.foreground import index_array
    for name in args.entries:
        src = _source(name, args, voxels=True, progress=False)
        cache, label = cache_for(src.plan), src.plan.label_name
        if not cache.done_shards(label):
            raise ValueError(f"{name}: nothing cached at {cache.root} for {label}; fetch it first "
                             f"(`wildenberg-intake fetch {name}`)")
        done = index_array(cache, label, src.plan.arrays[label].shape, progress=not args.quiet)
        print(f"{name}: indexed {done} shards of {label} in {cache.root} "
              f"({len(cache.done_shards(label))} recorded; the others had their index)")
    return 0


def cmd_du(args):
    """What each store of a cache folder keeps on disk: the ledger's breakdown (shards by array,
    staged files) beside a walk of the folder (tables, views, overview tiles, and any byte the
    ledger does not count)."""
    from ..store.cache import StoreCache
    target = Path(args.folder).resolve()
    if (target / "data.zarr" / "zarr.json").is_file() or target.name == "data.zarr":
        stores = [StoreCache.at(target)]
    elif (target / "wildenberg2023").is_dir():
        stores = [StoreCache.at(p) for p in sorted((target / "wildenberg2023").iterdir())
                  if (p / "data.zarr" / "zarr.json").is_file()]
    else:
        raise ValueError(f"folder={str(target)!r} is neither a cache folder (no wildenberg2023/ in it) nor a store; "
                         "allowed: the cache_dir of the catalog, or <cache_dir>/wildenberg2023/<store>")
    for cache in stores:
        groups = cache.ledger.by_kind()
        counted = sum(size for _, size in groups.values())
        on_disk = sum(p.stat().st_size for p in cache.root.rglob("*") if p.is_file() and not p.is_symlink())
        print(f"{cache.root}: {_size(on_disk)} on disk, {_size(counted)} in the ledger (what cache_limit holds)")
        for group, (files, size) in sorted(groups.items()):
            print(f"  {group:<28} {files:>7} files {_size(size):>10}")
        print(f"  {'not in the ledger':<28} {'':>13} {_size(on_disk - counted):>10}  "
              "(records, metadata, tables, views, overview tiles)")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _verify_lock(args) -> int:
    """Every entry of a lock: nothing cached is a usage error naming the fetch command; damaged
    shards are listed as `verify ENTRY` lists them (exit 1); else the voxels are recomputed and
    compared with the pinned checksums (exit 1 on a difference)."""
    from ..lock import check_content, open_locked
    from ..store.engine import cache_for
    bad = 0
    for name, src in open_locked(args.lock, **_params(args, progress=False)).items():
        cache = cache_for(src.plan)  # checks parameters and info files against the lock
        arrays = ["raw", src.plan.label_name]
        if not all(cache.is_complete(a) for a in arrays):
            where = f" --cache-dir {args.cache_dir}" if args.cache_dir else ""
            raise ValueError(f"{name}: not fetched completely in {cache.root}; fetch it first with "
                             f"`wildenberg-intake fetch --lock {args.lock}{where}`")
        report = cache.verify()
        damaged = {a: report[a]["missing"] + report[a]["corrupt"] for a in arrays if a in report}
        if any(damaged.values()):
            bad += 1
            listed = "; ".join(f"{a}: shards {sorted(s)} damaged" for a, s in damaged.items() if s)
            where = f" --cache-dir {args.cache_dir}" if args.cache_dir else ""
            print(f"{name}: {listed} in {cache.root}; fetch them again with "
                  f"`wildenberg-intake fetch --lock {args.lock}{where} --repair`")
            continue
        found = check_content(name, src.lock, src, recompute=True)
        print(f"{name}: matches the lock (raw {found['raw'][:12]}..., labels {found['labels'][:12]}...)")
    return EXIT_MISMATCH if bad else 0


def cmd_lock(args):
    from ..lock import make_lock, write_lock
    sources = {name: _source(name, args, voxels=True, progress=not args.quiet) for name in args.entries}
    write_lock(args.output, make_lock(sources))
    print(f"wrote {args.output} pinning {', '.join(sources)}")


def cmd_preview(args):
    from ..viewer.preview import render
    folder = Path(args.output).resolve().parent
    if not folder.is_dir():  # said before any fetch, not as a bare [Errno 2] after it
        raise ValueError(f"-o {args.output}: the folder {folder} does not exist; allowed: a file in an existing folder")
    src = _source(args.entry, args, voxels=True, progress=False)
    level = render(src, args.z, args.output, args.max_size, int(args.max_fetch))
    print(f"wrote {args.output}" + (f" (overview at level {level}: EM from the source's mip, labels from "
                                    "the slice's source chunks)" if level else ""))


def cmd_mirror(args):
    if args.source:
        from ..mirror import copy_box
        n = copy_box(args.source, args.output, args.entry, args.bbox_nm)
        print(f"copied {n} chunks of {args.entry}'s layers into {args.output}")
    else:
        from ..mirror import build_mirror
        build_mirror(args.output, shape_xyz=args.shape, em_encoding=args.em_encoding,
                     label_encoding=args.label_encoding, sharded=args.sharded)
        print(f"wrote a synthetic BossDB-layout mirror to {args.output}; serve it with "
              f"`wildenberg-intake serve {args.output}`")


def cmd_serve(args):
    from ..mirror import MirrorServer
    from ..viewer.view import recorded_shard_status, store_layers
    if not Path(args.folder, "wildenberg2023").is_dir():
        raise ValueError(f"folder={args.folder!r} holds no wildenberg2023/ folder; allowed: a mirror written by "
                         "`wildenberg-intake mirror`, or a cache folder (cache_dir)")
    folder = Path(args.folder).resolve()
    with MirrorServer(folder, port=args.port, token=True, origins=args.allow_origin or (),
                      absent=lambda path: recorded_shard_status(folder, path)) as server:
        print(f"serving {args.folder} at {server.base_url} (Ctrl-C to stop); use base_url={server.base_url}",
              flush=True)
        print("  the token in these URLs keeps other web pages from using the server; browser viewers of "
              f"the origins {sorted(server.origins) or 'none (add --allow-origin URL)'} may read it", flush=True)
        for store in sorted(Path(args.folder, "wildenberg2023").glob("*/data.zarr")):  # a cache folder
            for name, kind, url in store_layers(f"{server.url}/wildenberg2023/{store.parent.name}/data.zarr", store):
                print(f"  {store.parent.name}: {kind} layer {name}: {url}", flush=True)
        _until_interrupted()


def _until_interrupted():
    """Serve until Ctrl-C (the servers run in their own threads)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def cmd_view(args):
    from ..viewer.view import View
    sources = [_source(name, args, voxels=True) for name in args.entries]
    with View(sources, port=args.port, viewer_port=args.viewer_port) as view:
        print(f"serving {view.data_url} (shards are fetched as the viewer asks for them)", flush=True)
        for name, kind, url in view.layers():
            print(f"  {kind} layer {name}: {url}", flush=True)
        print(f"open {view.url} (Ctrl-C to stop)", flush=True)
        _until_interrupted()


def cmd_synapses(args):
    import pandas as pd
    from ..analysis.report import bootstrap, format_comparison, format_summary, plot, size_tests, summarise
    from ..catalog import entry_names
    allowed = [name[:-len("_synapses")] for name in entry_names() if name.endswith("_synapses")]
    tables, boxes = {}, {}
    for experiment in args.experiments:
        if experiment not in allowed:
            raise ValueError(f"experiment={experiment!r} is unknown; allowed: {allowed}")
        src = _source(f"{experiment}_synapses", args, progress=not args.quiet, client=args.scheduler,
                      **({"workers": args.workers} if args.workers is not None else {}),
                      **({"block_shape": args.block_shape} if args.block_shape is not None else {}))
        table = src.read()
        tables[experiment] = (table, src.discover()["metadata"]["box_volume_um3"])
        boxes[experiment] = src.plan.bbox_nm
    summary = summarise(tables)
    print(format_summary(summary), flush=True)
    intervals = {e: bootstrap(t, boxes[e], seed=0) for e, (t, _) in tables.items()}
    tests = size_tests(tables) if len(tables) >= 2 else None
    print(format_comparison(summary, intervals, tests), flush=True)
    if args.output:
        pd.concat([t for t, _ in tables.values()], ignore_index=True).to_parquet(args.output, index=False)
        print(f"wrote {args.output}")
    if args.plot:
        plot(tables, args.plot, tests)
        print(f"wrote {args.plot}")


def cmd_demo(args):
    from .demo import run
    return 0 if run(Path(args.folder), serve=args.serve) else 1


class SuggestingParser(argparse.ArgumentParser):
    """argparse with the closest subcommand or option suggested for a mistyped one."""

    def __init__(self, *args, **kwargs):
        self.options = []  # this parser's option strings, for suggestions (-h is added by __init__)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options += action.option_strings
        return action

    def error(self, message):
        from ..catalog import did_you_mean
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = [c.strip(" '") for c in match[2].split(",")]
            message += did_you_mean(match[1], choices)
        super().error(message)

    def refuse_unknown(self, extra: list):
        """Exit 2 naming the arguments this (sub)parser does not know, with the closest option."""
        from ..catalog import did_you_mean
        hints = [did_you_mean(token.split("=")[0], self.options) for token in extra if token.startswith("-")]
        self.error(f"unrecognized arguments: {' '.join(extra)}" + next((h for h in hints if h), ""))


def parser() -> SuggestingParser:
    p = SuggestingParser(prog="wildenberg-intake", description="The Wildenberg 2023 synapse FIB-SEM "
                         "dataset from BossDB: catalog, cache, verification, previews and mirrors.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub.choices  # {name: its SuggestingParser}

    sub.add_parser("list", help="catalog entries with experiment, label, dtype and full size").set_defaults(run=cmd_list)

    d = sub.add_parser("describe", help="everything the catalog and the layers' info files say, and the cache state")
    _entry_args(d, many=False)
    d.set_defaults(run=cmd_describe)

    f = sub.add_parser("fetch", help="materialise entries (or a lock file's entries) into the cache")
    _entry_args(f, many="*")
    f.add_argument("--lock", help="fetch every entry of this lock file with its pinned parameters")
    f.add_argument("--repair", action="store_true",
                   help="first fetch again the shards `verify` finds missing or damaged")
    f.add_argument("--workers", type=int, default=None, help="shard tasks at once (default: the cores)")
    f.add_argument("--scheduler", help="dask.distributed scheduler address to run the shard tasks on")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(run=cmd_fetch)

    v = sub.add_parser("verify", help="reread a cached store and report missing or corrupted shards (never "
                                      "fetches); with --lock, prove the cache holds exactly the locked bytes")
    v.add_argument("target", nargs="?", metavar="PATH|ENTRY", help="a store folder, its data.zarr, or an entry")
    v.add_argument("--lock", help="a lock file from `wildenberg-intake lock`")
    _param_args(v)
    v.set_defaults(run=cmd_verify)

    ix = sub.add_parser("index", help="add the foreground index (non-zero voxels per block, for sampling patches "
                                      "with synapses) to a store written before it; reads the cached labels once")
    _entry_args(ix)
    ix.add_argument("--quiet", action="store_true", help="no progress bar")
    ix.set_defaults(run=cmd_index)

    du = sub.add_parser("du", help="bytes each store of a cache keeps: shards by array, staged files, the rest")
    du.add_argument("folder", metavar="CACHE|STORE", help="the cache folder (cache_dir) or one store folder")
    du.set_defaults(run=cmd_du)

    lk = sub.add_parser("lock", help="materialise entries and pin them in a lock file")
    _entry_args(lk)
    lk.add_argument("-o", "--output", required=True, help="lock file to write, e.g. wildenberg.lock")
    lk.add_argument("--quiet", action="store_true")
    lk.set_defaults(run=cmd_lock)

    pv = sub.add_parser("preview", help="PNG of an EM slice with its labels overlaid and a scale bar "
                                        "(fetches only what that slice needs)")
    _entry_args(pv, many=False)
    pv.add_argument("--z", type=int, required=True, help="slice index in the store (0 = first)")
    pv.add_argument("-o", "--output", required=True, help="PNG file to write")
    pv.add_argument("--max-size", type=int, default=2048, help="widest slice drawn at full resolution; a wider "
                    "one is an overview at the level that fits: EM from the source's own coarser mip, labels "
                    "by the pyramid's mode, both from the source chunks of the slice's z-row (default 2048 pixels)")
    pv.add_argument("--max-fetch", type=float, default=8e9, help="bytes an overview may fetch (uncompressed "
                    "estimate); a costlier one is refused with the estimate (default 8e9)")
    pv.set_defaults(run=cmd_preview)

    m = sub.add_parser("mirror", help="write a BossDB-layout mirror: synthetic, or a copy of a box of a "
                                      "precomputed source (for compute nodes without internet)")
    m.add_argument("-o", "--output", required=True, help="folder to write")
    m.add_argument("--source", help="base URL to copy from (e.g. BossDB's); omit for a synthetic mirror")
    m.add_argument("--entry", default="p105_psd", help="with --source: whose experiment's layers to copy")
    m.add_argument("--bbox-nm", nargs=6, metavar=("X0", "X1", "Y0", "Y1", "Z0", "Z1"), help="with --source: the box")
    m.add_argument("--shape", type=int, nargs=3, default=(600, 520, 24), metavar=("X", "Y", "Z"),
                   help="synthetic: label voxels at 12 x 12 x 40 nm")
    m.add_argument("--em-encoding", default="raw", help="synthetic: raw or jpeg")
    m.add_argument("--label-encoding", default="raw", help="synthetic: raw or compressed_segmentation")
    m.add_argument("--sharded", action="store_true", help="synthetic: the sharded precomputed format")
    m.set_defaults(run=cmd_mirror)

    s = sub.add_parser("serve", help="serve a mirror or a cache folder over HTTP on 127.0.0.1 (byte ranges, "
                                     "CORS: neuroglancer opens the cache's stores)")
    s.add_argument("folder")
    s.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    s.add_argument("--allow-origin", action="append", metavar="URL",
                   help="a web page origin (scheme://host:port) whose viewer may read the served files "
                        "(CORS); repeatable. Every URL also carries a token that other pages cannot guess")
    s.set_defaults(run=cmd_serve)

    vw = sub.add_parser("view", help="neuroglancer over the cache of entries (EM as an image layer, each label "
                                     "as a segmentation layer); shards are fetched as the viewer asks")
    _entry_args(vw)
    vw.add_argument("--port", type=int, default=0, help="port of the data server (default: a free one)")
    vw.add_argument("--viewer-port", type=int, default=0, help="port of neuroglancer's server (default: a free one)")
    vw.set_defaults(run=cmd_view)

    sy = sub.add_parser("synapses", help="per-synapse tables of experiments (computed blockwise, cached): "
                                         "counts, densities and sizes compared, a parquet file and a figure")
    sy.add_argument("experiments", nargs="+", metavar="EXPERIMENT", help="p105, p14")
    _param_args(sy)
    sy.add_argument("-o", "--output", help="parquet file of all the experiments' rows")
    sy.add_argument("--plot", help="PNG of PSD and vesicle-cloud volumes side by side")
    sy.add_argument("--block-shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                    help="voxels per task (default: the store's shards, 128 512 512)")
    sy.add_argument("--workers", type=int, default=None, help="worker processes (default: the cores)")
    sy.add_argument("--scheduler", help="dask.distributed scheduler address to run the blocks on")
    sy.add_argument("--quiet", action="store_true", help="no progress bars")
    sy.set_defaults(run=cmd_synapses)

    dm = sub.add_parser("demo", help="the main job: mirror, serve and read p105_psd through the catalog")
    dm.add_argument("--folder", default="demo-cache")
    dm.add_argument("--serve", action="store_true", help="keep serving the demo mirror afterwards (until Ctrl-C) "
                    "and print the lines that point the catalog at it")
    dm.set_defaults(run=cmd_demo)
    return p


def main(argv=None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        p.commands[args.command].refuse_unknown(extra)
    from ..store.shards import tune_malloc
    tune_malloc(owned=True)  # the command's process is the package's own
    from ..source.layers import LayerError
    from ..source.transfer import TransferError
    try:
        return args.run(args) or 0
    except (ValueError, LayerError, TransferError, OSError, KeyError, MemoryError) as e:
        print(f"wildenberg-intake {args.command}: error: {e}", file=sys.stderr)
        return EXIT_MISMATCH if type(e).__name__ == "LockMismatch" else EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
