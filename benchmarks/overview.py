"""Overviews of a whole slice: `preview` and `view` zoomed out to the whole box, side by side in one run.

    .venv/bin/python benchmarks/overview.py [--full DIR] [--realistic DIR]

Two mirrors: the full-extent mirror of `benchmarks/scale.py` (p105's real geometry, data in one small
region, every other chunk 404: bookkeeping and requests at ~3,600 shards per array) and a realistic
one (dense tissue everywhere, 1400 x 1400 x 80 label voxels of p14, written once). For each:
- `preview` of the box's middle slice, at most 1024 (realistic) or 2048 pixels wide (an overview: EM from the source's coarsest mip not coarser than a
  pixel, labels by the pyramid's mode, both from the source chunks of the slice's z-row);
- `view` zoomed out to the whole box in headless Chromium (neuroglancer draws the overview tiles),
  timed until the screenshot (every visible chunk drawn), against the same view drawn from the store's
  own pyramid (the route before: each coarse shard made from every level-0 shard under it);
- the bytes of the level-0 layer under the slice (every source chunk, EM at the store's mip and the
  label, of the 128-slice shard row holding it), as the server has them: what drawing from level 0
  would fetch at least.
Prints seconds, requests and bytes sent by the mirror server for each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import full_extent_mirror  # noqa: E402

from wildenberg_intake.drivers import entry_source  # noqa: E402
from wildenberg_intake.mirror import MirrorServer, build_mirror  # noqa: E402
from wildenberg_intake.store.format import SHARDS


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--window-size=1100,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def zoomed_out(src, driver, before: bool, timeout: float = 900) -> float:
    """Seconds until neuroglancer has drawn the whole box at the slice `src`'s view opens on."""
    from wildenberg_intake.viewer.view import View, store_layers
    from wildenberg_intake.store.engine import cache_for

    class Before(View):  # the route before: the store's own multiscale (its pyramid levels)
        def layers(self):
            cache = cache_for(self.sources[0].plan)
            return store_layers(f"{self.data_url}/{cache.root.name}/data.zarr", cache.zarr_path)

    t = time.perf_counter()
    with (Before if before else View)([src]) as view:
        driver.get(view.url)
        with view.viewer.config_state.txn() as s:
            s.show_ui_controls, s.show_panel_borders, s.viewer_size = False, False, [1000, 800]
        done = threading.Event()
        view.viewer.async_screenshot(lambda reply: done.set())
        if not done.wait(timeout):
            raise RuntimeError("neuroglancer drew nothing in time")
    return time.perf_counter() - t


def layer_bytes(mirror_root: Path, src, z: int) -> int:
    """Bytes on the server of every source chunk of the 128-slice shard row holding slice `z`, EM at
    the store's mip and the entry's label, inside the box."""
    plan = src.plan
    total = 0
    for name in ("raw", plan.label_name):
        arr, layer = plan.arrays[name], plan.layers[name]
        z_nm = plan.arrays[plan.label_name].origin_nm_zyx[0] + (z + 0.5) * 40
        zi = int(np.floor(z_nm / arr.layer.resolution_zyx[0])) - arr.start_zyx[0]
        z0 = zi // SHARDS[0] * SHARDS[0]
        lo = np.add(arr.start_zyx, (z0, 0, 0))
        hi = np.add(arr.start_zyx, (min(z0 + SHARDS[0], arr.shape[0]),) + tuple(arr.shape[1:]))
        root = mirror_root / layer.url[layer.url.index("wildenberg2023/"):]
        for grid in layer.info.chunks_in(lo, hi):
            path = root / layer.info.scale_key / layer.chunk_name(grid)
            for candidate in (path, path.with_name(path.name + ".gz")):
                if candidate.is_file():
                    total += candidate.stat().st_size
    return total


def measure(name: str, root: Path, entry: str, bbox, tmp: Path, driver, max_size: int = 2048) -> dict:
    out = {"mirror": name}
    with MirrorServer(root) as server:
        def run(label, fn):
            before, sent = sum(server.requests.values()), server.bytes_sent
            t = time.perf_counter()
            extra = fn()
            out[label] = {"seconds": extra if extra is not None else time.perf_counter() - t,
                          "requests": sum(server.requests.values()) - before,
                          "bytes": server.bytes_sent - sent}
            print(name, label, json.dumps(out[label]), flush=True)

        def source(folder):
            params = {"bbox_nm": bbox} if bbox else {}
            return entry_source(entry, base_url=server.base_url, cache_dir=str(tmp / folder), progress=False,
                                **params)
        probe = source("probe")
        out["shape"] = probe.plan.arrays[probe.plan.label_name].shape
        z = out["shape"][0] // 2  # the slice the view opens on: the box's middle
        out["level0_layer_bytes"] = layer_bytes(root, probe, z)

        def preview():
            done = subprocess.run([sys.executable, "-m", "wildenberg_intake.cli.main", "preview", entry, "--z", str(z),
                                   "-o", str(tmp / f"{name}.png"), "--base-url", server.base_url,
                                   "--cache-dir", str(tmp / f"preview-{name}"), "--max-size", str(max_size)] +
                                  (["--bbox-nm", *map(str, bbox)] if bbox else []), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-2000:])
        run("preview", preview)
        run("view (overview tiles)", lambda: zoomed_out(source(f"view-{name}"), driver, before=False))
        run("view before (store pyramid)", lambda: zoomed_out(source(f"before-{name}"), driver, before=True))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", type=Path, help="the full-extent mirror (written by scale.py, or here)")
    p.add_argument("--realistic", type=Path, help="the realistic mirror folder (written here if missing)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = full_extent_mirror(args.full or tmp / "full")
        realistic = args.realistic or tmp / "realistic"
        if not (realistic / "wildenberg2023").exists():
            build_mirror(realistic, shape_xyz=(1400, 1400, 80), experiments=("p14",))
        driver = browser()
        try:
            # --max-size 1024: the realistic box (1400 px wide) previewed as an overview (level 1).
            results = [measure("realistic p14", realistic, "p14_psd", None, tmp, driver, max_size=1024),
                       measure("full-extent p105", full, "p105_psd", None, tmp, driver)]
        finally:
            driver.quit()
    print(f"\n{'mirror':18s} {'label shape':>18s} {'what':28s} {'s':>7s} {'requests':>9s} {'MB sent':>8s} "
          f"{'/ level-0 layer':>15s}")
    for r in results:
        for what in ("preview", "view (overview tiles)", "view before (store pyramid)"):
            m = r[what]
            print(f"{r['mirror']:18s} {str(tuple(r['shape'])):>18s} {what:28s} {m['seconds']:7.1f} {m['requests']:9d} "
                  f"{m['bytes'] / 1e6:8.2f} {m['bytes'] / max(r['level0_layer_bytes'], 1):15.4f}")
        print(f"{'':18s} {'':>18s} {'level-0 layer under the slice':28s} {'':>7s} {'':>9s} "
              f"{r['level0_layer_bytes'] / 1e6:8.2f}")


if __name__ == "__main__":
    main()
