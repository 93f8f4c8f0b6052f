"""Neuroglancer over the cache: the cache served with byte ranges and CORS, shards made as a viewer asks.

`View(sources)` serves the cache folder of catalog sources on 127.0.0.1 and, for every request of a
shard of one of their arrays, first makes that shard through the read-through arrays of
`store.lazy` (fetched once, written with its done record, like any lazy read): a box of hundreds of
GB can be looked at without fetching it. Its layers are the stores' overview groups
(`overview.py`): zoomed out, the viewer draws tiles made from the source chunks of the slice shown.
It then starts a viewer from neuroglancer's PyPI package (the `viewer` extra) with raw as an image layer and each label of the
store as a segmentation layer, x/y across the screen, nm units, centred on the box.

    with View([src]) as view:
        print(view.url)          # open in a browser
"""

from __future__ import annotations

import re
from pathlib import Path

from ..store.cache import StoreCache, has_file
from ..store.format import SHARDS
from ..store.layout import array_path
from ..store.engine import cache_for
from ..store.lazy import ReadThroughArray

SCREEN_PIXELS = (1000, 800)  # the canvas a first view is fitted to (x, y)
# Synapse labels in clear colours over the EM; the dense segmentation is hidden at first (its layer
# checkbox, or `layer.visible = True` in a script, shows it).
LABEL_COLOURS = {"psd": "#ff3030", "vesicle_cloud": "#30c0ff"}
LABEL_ALPHA = 0.45
_SHARD = re.compile(r"^/wildenberg2023/(?P<store>[^/]+)/data\.zarr/(?P<array>.+)/c/(?P<z>\d+)/(?P<y>\d+)/(?P<x>\d+)$")
_OVERVIEW = re.compile(r"^/wildenberg2023/(?P<store>[^/]+)/overview/(?P<group>[^/]+)\.zarr/(?P<level>\d+)/c/"
                       r"(?P<z>\d+)/(?P<y>\d+)/(?P<x>\d+)$")


def store_layers(url: str, zarr_path: Path) -> list[tuple[str, str, str]]:
    """(layer name, kind, neuroglancer source URL) of a store served at `url` (the address of its
    data.zarr): the OME image group (raw, with its levels) and one image-label group per label."""
    base = f"zarr3://{url}"
    layers = [("raw", "image", f"{base}/")] if (zarr_path / "zarr.json").is_file() else []
    labels = zarr_path / "labels"
    if labels.is_dir():
        layers += [(p.name, "segmentation", f"{base}/labels/{p.name}/") for p in sorted(labels.iterdir())
                   if (p / "zarr.json").is_file()]
    return layers


class LazyShards:
    """The `before` hook of the server: a request for a shard of a known array makes that shard
    first; a request for a tile of an overview group (see `overview.py`) makes that tile (level 0:
    the store's shard it links to)."""

    def __init__(self, sources, connections: int | None = None, overviews=()):
        self.arrays = {}  # (store folder name, array path) -> ReadThroughArray
        for src in sources:
            plan = src.plan
            for name in plan.with_levels(plan.arrays):  # every array and its pyramid levels
                arr = ReadThroughArray(plan, name, connections or src.connections, src.cache_limit)
                self.arrays[(arr.cache.root.name, array_path(name))] = arr
        self.overview_levels = {}  # (store folder name, group name, level) -> make(index)
        for ov in overviews:
            store = ov.cache.root.name
            for name in ["raw"] + ov.labels:
                group = ov.group(name).name.removesuffix(".zarr")
                self.overview_levels[(store, group, 0)] = _shard_maker(self.arrays[(store, array_path(name))])
                for k in range(1, ov.levels + 1):
                    self.overview_levels[(store, group, k)] = _tile_maker(ov, name, k)

    def absent(self, path: str) -> int:
        """A shard's file is absent when the server came to send it (evicted after it was made, or
        deleted): made again (200: send it now); 503 if it still is not there; 404 for the rest."""
        match = _SHARD.match(path)
        arr = None if match is None else self.arrays.get((match["store"], match["array"]))
        if arr is None:
            return 404
        index = (int(match["z"]), int(match["y"]), int(match["x"]))
        if not _in_grid(arr, index):
            return 404
        record = arr.cache.record(arr.name, index)
        if record is not None and not has_file(record):
            return 404  # an all-zero shard: zarr writes no file, and a 404 is read as its fill value
        arr.ensure(index)
        return 200

    def __call__(self, path: str):
        match = _SHARD.match(path)
        if match is not None:
            arr = self.arrays.get((match["store"], match["array"]))
            if arr is not None:  # else a label of the store that no given entry plans: served as it is
                _shard_maker(arr)((int(match["z"]), int(match["y"]), int(match["x"])))
            return
        match = _OVERVIEW.match(path)
        if match is not None:
            make = self.overview_levels.get((match["store"], match["group"], int(match["level"])))
            if make is not None:
                make((int(match["z"]), int(match["y"]), int(match["x"])))


def recorded_shard_status(folder, path: str) -> int:
    """For `serve`: the status of a request for an absent file. 503 when it is a shard a store under
    `folder` records as written (its file deleted or evicted: damage to report, never zeros); 404
    otherwise (a shard never fetched, or one that is all zeros: no file, as zarr writes none)."""
    from ..store.layout import array_name
    match = _SHARD.match(path)
    if match is None:
        return 404
    try:
        name = array_name(match["array"])
    except ValueError:
        return 404
    record = StoreCache(folder, match["store"]).record(name, (int(match["z"]), int(match["y"]), int(match["x"])))
    return 503 if record is not None and has_file(record) else 404


def _in_grid(arr, index) -> bool:
    """Whether `index` is a shard of read-through array `arr`."""
    return all(0 <= i < -(-n // s) for i, n, s in zip(index, arr.shape, SHARDS))


def _shard_maker(arr):
    def make(index):
        if _in_grid(arr, index):
            arr.ensure(index)
    return make


def _tile_maker(overview, name: str, level: int):
    grid = overview.tile_grid(level)

    def make(index):
        if all(0 <= i < n for i, n in zip(index, grid)):
            overview.make_tile(name, level, index)
    return make


class View:
    """A neuroglancer viewer of catalog `sources` (one store each, or several entries of one store).

    port: the data server's port (0: a free one); viewer_port: neuroglancer's own server (0: free).
    `url` is the page to open; `viewer` the `neuroglancer.Viewer` (for scripting and screenshots);
    `data_url` the served cache folder. Close it (or use it as a context manager) to stop both."""

    def __init__(self, sources, port: int = 0, viewer_port: int = 0, connections: int | None = None):
        try:
            import neuroglancer
        except ImportError as e:
            raise ImportError("`view` needs neuroglancer's Python package: pip install 'wildenberg-intake[viewer]'") from e
        from ..mirror import MirrorServer
        sources = list(sources)
        if not sources:
            raise ValueError("sources=[] is empty; allowed: one or more catalog sources")
        roots = {Path(s.plan.request.cache_dir) for s in sources}
        if len(roots) != 1:
            raise ValueError(f"the sources' cache_dir differ ({sorted(map(str, roots))}); allowed: one cache_dir")
        self.sources = sources
        from .overview import Overview
        # One overview per store (its groups: level 0 linked to the store's arrays, coarser levels
        # tiles of one slice): zoomed out, the viewer reads those, never the store's own coarse levels.
        stores = {}
        for src in sources:
            stores.setdefault(cache_for(src.plan).root.name, src)
        self.overviews = {name: Overview(src, labels=[n for n in src.plan.arrays if n.startswith("labels/")])
                          for name, src in stores.items()}
        # Creates every array's metadata, fetches no voxel.
        self.hook = LazyShards(sources, connections, self.overviews.values())
        # A token in every URL, CORS for the viewer's page only, the Host checked: no other page in
        # the user's browser can make this server fetch data.
        self.server = MirrorServer(roots.pop(), port=port, before=self.hook, token=True,
                                   absent=self.hook.absent).start()
        neuroglancer.set_server_bind_address("127.0.0.1", bind_port=viewer_port)
        self.viewer = neuroglancer.Viewer()
        from urllib.parse import urlparse
        page = urlparse(self.viewer.get_viewer_url())
        self.server.allow_origin(f"{page.scheme}://{page.netloc}")
        self.server.allow_origin(f"{page.scheme}://{page.netloc.replace('127.0.0.1', 'localhost')}")
        self._show(neuroglancer)

    @property
    def data_url(self) -> str:
        return f"{self.server.url}/wildenberg2023"

    @property
    def url(self) -> str:
        return self.viewer.get_viewer_url()

    def layers(self) -> list[tuple[str, str, str]]:
        """(name, kind, source URL) of every layer shown: each store's overview groups (level 0 the
        store's own arrays; coarser levels tiles from the source's EM mips and label chunks)."""
        out = []
        for store, ov in self.overviews.items():
            prefix = f"{ov.plan.request.experiment} " if len(self.overviews) > 1 else ""
            base = f"zarr3://{self.data_url}/{store}/overview"
            out.append((prefix + "raw", "image", f"{base}/em.zarr/"))
            out += [(prefix + n.split("/", 1)[1], "segmentation", f"{base}/{n.split('/', 1)[1]}.zarr/")
                    for n in ov.labels]
        return out

    def _show(self, ng):
        plan = self.sources[0].plan
        labels = plan.arrays[plan.label_name]
        res = labels.layer.resolution_zyx  # display voxels: the labels' (the EM's may be finer)
        x0, x1, y0, y1, z0, z1 = plan.bbox_nm
        with self.viewer.txn() as s:
            s.dimensions = ng.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[res[2], res[1], res[0]])
            s.position = [(x0 + x1) / 2 / res[2], (y0 + y1) / 2 / res[1], (z0 + z1) / 2 / res[0]]
            s.layout = "xy"
            # The whole box zoomed to fill the screen: zoomed out, the viewer draws overview tiles
            # of the one slice shown, from the source's own EM mips and label chunks (overview.py).
            s.cross_section_scale = max((x1 - x0) / res[2] / SCREEN_PIXELS[0], (y1 - y0) / res[1] / SCREEN_PIXELS[1])
            for name, kind, url in self.layers():
                label = name.rsplit(" ", 1)[-1]
                if kind == "image":
                    s.layers[name] = ng.ImageLayer(source=url)
                elif label in LABEL_COLOURS:  # synapse labels: one clear colour, the EM showing through
                    s.layers[name] = ng.SegmentationLayer(source=url, segment_default_color=LABEL_COLOURS[label],
                                                          selected_alpha=LABEL_ALPHA)
                else:  # the dense segmentation: there to select segments from, hidden until asked for
                    s.layers[name] = ng.SegmentationLayer(source=url, selected_alpha=LABEL_ALPHA)
                    s.layers[name].visible = False

    def close(self):
        """Stop the data server and neuroglancer's server."""
        import neuroglancer
        self.server.stop()
        neuroglancer.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
