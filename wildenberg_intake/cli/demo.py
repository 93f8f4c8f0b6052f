"""The main job on the embedded default: a local BossDB-layout mirror read through the catalog.

    python -m wildenberg_intake.cli.demo [--folder demo-cache] [--shape 600 520 24] [--serve]

Writes a synthetic mirror (BossDB's public bucket is out of reach here), serves it on 127.0.0.1,
opens the packaged catalog with intake, materialises `p105_psd` into the cache, reads it back and
checks it voxel for voxel against the arrays the mirror was written from; then computes the
per-synapse tables of both experiments and prints their comparison. Run it twice: the second run
finds the stores and tables cached and fetches nothing. With --serve the mirror stays served until
Ctrl-C, and the demo prints the two environment lines with which any shell, script or notebook
reaches it through the catalog (`intake.cat.wildenberg2023.p105_psd.read()`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def run(folder: Path, shape_xyz=(600, 520, 24), entry: str = "p105_psd", serve: bool = False) -> bool:
    """The main job (see the module's docstring); returns whether the read equals the mirror.
    serve: keep serving the mirror afterwards, until Ctrl-C."""
    import intake

    from ..catalog import catalog_path
    from ..mirror import build_mirror

    folder = Path(folder)
    print(f"Writing a BossDB-layout mirror of {shape_xyz} label voxels to {folder / 'mirror'} ...")
    mirror = build_mirror(folder / "mirror", shape_xyz=shape_xyz)
    with _serve(mirror.root) as server:
        print(f"Serving it at {server.base_url}")
        cat = intake.open_catalog(catalog_path())
        source = getattr(cat, entry)(base_url=server.base_url, cache_dir=str(folder / "cache"))
        info = source.discover()
        meta = info["metadata"]
        print(f"\n{entry}: {source.description}")
        print(f"  clipped box (nm, x0 x1 y0 y1 z0 z1): {meta['bbox_nm']}")
        print(f"  shape (z, y, x): {meta['shapes']}, voxel size (nm, z y x): {meta['voxel_size_nm_zyx']['labels']}")
        print(f"  estimated bytes: {meta['estimated_bytes']:,}; cached already: {meta['cached']}\n")
        ds = source.read()
        print(ds)
        print(f"\nrequests served: {sum(server.requests.values())}, bytes: {server.bytes_sent:,}")

        # Synapses as data: the per-synapse tables of both experiments, compared.
        from ..analysis.report import format_summary, summarise
        tables = {}
        for experiment in ("p105", "p14"):
            table_source = getattr(cat, f"{experiment}_synapses")(base_url=server.base_url,
                                                                  cache_dir=str(folder / "cache"))
            tables[experiment] = (table_source.read(), table_source.discover()["metadata"]["box_volume_um3"])
        print("\nSynapse tables (p105_synapses, p14_synapses; cached as parquet beside each store):")
        print(format_summary(summarise(tables)))

        ok = _equal_to_mirror(mirror, source, ds)
        print(f"store: {ds.attrs['store']}")
        print(f"first synapses of p105:\n{tables['p105'][0].head(3).to_string()}")
        if serve:
            _keep_serving(server.base_url, folder / "cache")
    return ok


def _equal_to_mirror(mirror, source, ds) -> bool:
    """Check the read against the arrays the mirror was written from, at the store's source windows."""
    from ..mirror import EXPERIMENTS
    plan = source.plan
    exp = EXPERIMENTS[source.request.experiment]
    ok = True
    for var, name, channel in (("raw", "raw", exp["em_channel"]),
                               ("labels", plan.label_name, source.request.channel().channel)):
        src = plan.arrays[name]
        truth = mirror.layer(source.request.experiment, channel).expected(
            src.layer.mip, src.start_zyx, np.add(src.start_zyx, src.shape))
        equal = np.array_equal(ds[var].values, truth)
        ok &= equal
        print(f"{var}: voxel-for-voxel equal to the mirror: {equal}")
    labels = ds["labels"].values > 0
    if labels.any():
        print(f"mean EM under labels {ds['raw'].values[labels].mean():.1f} vs elsewhere "
              f"{ds['raw'].values[~labels].mean():.1f} (the labels sit on dark EM)")
    return ok


def _keep_serving(base_url: str, cache: Path):
    """Wait for Ctrl-C while the mirror is served, with the lines that point the catalog at it."""
    from ..catalog import BASE_URL_ENV, CACHE_ENV
    print(f"\nThe demo mirror is served at {base_url} until Ctrl-C. In another shell:\n"
          f"  export {BASE_URL_ENV}={base_url}\n"
          f"  export {CACHE_ENV}={cache.resolve()}\n"
          "  .venv/bin/python -c 'import intake; print(intake.cat.wildenberg2023.p105_psd.read())'\n"
          "(every entry, example and command then reads the demo mirror and its cache)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _serve(root, port: int = 8765):
    """Serve on a fixed port when free, so a rerun hits the same URLs and hence the same store."""
    from ..mirror import MirrorServer
    try:
        return MirrorServer(root, port=port).start()
    except OSError:
        return MirrorServer(root, port=0).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("demo-cache"), help="where the mirror and cache go")
    parser.add_argument("--shape", type=int, nargs=3, default=(600, 520, 24), metavar=("X", "Y", "Z"),
                        help="mirror size in label voxels (12 x 12 x 40 nm)")
    parser.add_argument("--entry", default="p105_psd", help="catalog entry to read")
    parser.add_argument("--serve", action="store_true", help="keep serving the mirror afterwards, until Ctrl-C")
    args = parser.parse_args(argv)
    return 0 if run(args.folder, tuple(args.shape), args.entry, args.serve) else 1


if __name__ == "__main__":
    sys.exit(main())
