"""A BossDB-layout test mirror: synthetic Wildenberg-like precomputed volumes (served by `server.py`).

BossDB cannot be reached from every machine (CI, compute nodes, this project's sandbox), so the
package writes volumes with the same layout, names, dtypes, resolutions and quirks as the real
ones (p105's EM layer has x and y transposed; EM and label layers have different offsets and
extents) and serves them over HTTP on 127.0.0.1. Everything downstream then runs the same code
path as against BossDB: cloud-volume over HTTP.

The content looks like the data (`tissue.py`): saturated is a dense segmentation of neurites, the
EM shows their membranes, each PSD is a thin plate on the postsynaptic side of a contact between two
segments and each vesicle cloud a ball inside the presynaptic segment next to it. It is also built
so that mistakes show: EM and labels are sampled from one tissue at the same physical place (a
wrong offset or axis order separates them), the EM background has a gradient along x (a transpose
is visible), the saturated ids are distinct and larger than 255 (a truncation to uint8 is
visible), and every EM mip has noise of its own (a wrong mip gives different data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tissue import Tissue, em_image

CHUNK_SIZE_XYZ = (512, 512, 16)
LABEL_RESOLUTION_XYZ = (12, 12, 40)
EM_RESOLUTION_XYZ = (6, 6, 40)
EM_MIPS = 3

# Where the synthetic layers sit, in voxels (x, y, z) of their own mip 0. EM mip-0 offsets are
# multiples of 4 in x and y so that mips 1 and 2 start on whole voxels too.
EXPERIMENTS = {
    "p105": dict(bossdb="mouse_v1_l4_p105", em_channel="em", swap_xy=True,
                 label_offset=(50, 52, 5), em_offset=(96, 108, 4)),
    "p14": dict(bossdb="mouse_v1_l4_p14", em_channel="em_aligned", swap_xy=False,
                label_offset=(3, 5, 2), em_offset=(0, 8, 1)),
}
LABEL_CHANNELS = {
    "psd": ("psd_autoseg", "uint8"),
    "vesicle_cloud": ("vesicle_autoseg", "uint8"),
    "saturated": ("saturated_autoseg", "uint32"),
}
EM_ENCODINGS = ("raw", "jpeg")
LABEL_ENCODINGS = ("raw", "compressed_segmentation")


@dataclass
class MirrorLayer:
    """One written layer: what the mirror was written from, per mip, in physical (z, y, x) order."""

    path: str  # relative to the mirror root, e.g. "wildenberg2023/mouse_v1_l4_p105/em"
    resolution_xyz: dict  # mip -> physical (x, y, z) nm
    offset_zyx: dict  # mip -> physical voxel offset (z, y, x)
    data: dict  # mip -> np.ndarray (z, y, x)

    def expected(self, mip: int, start_zyx, stop_zyx) -> np.ndarray:
        """The voxels of global physical box [start, stop) at `mip`, zeros outside the layer."""
        arr, off = self.data[mip], np.asarray(self.offset_zyx[mip])
        start, stop = np.asarray(start_zyx), np.asarray(stop_zyx)
        out = np.zeros(tuple(stop - start), dtype=arr.dtype)
        lo = np.maximum(start, off)
        hi = np.minimum(stop, off + arr.shape)
        if np.all(hi > lo):
            src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, off))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
            out[dst] = arr[src]
        return out


@dataclass
class Mirror:
    """A mirror written on disk: its root folder and the arrays each layer was written from."""

    root: Path
    layers: dict = field(default_factory=dict)  # relative path -> MirrorLayer

    def layer(self, experiment: str, channel: str) -> MirrorLayer:
        return self.layers[f"wildenberg2023/{EXPERIMENTS[experiment]['bossdb']}/{channel}"]


def _label_grid_index(resolution_xyz, offset_xyz, size_xyz) -> list[np.ndarray]:
    """Per axis (x, y, z): the 12 x 12 x 40 nm label-grid voxel under each voxel centre of a grid."""
    return [np.floor((np.arange(n) + o + 0.5) * r / lr).astype(np.int64)
            for n, o, r, lr in zip(size_xyz, offset_xyz, resolution_xyz, LABEL_RESOLUTION_XYZ)]


def _write_layer(root, rel_path, layer_type, dtype, encoding, scales, swap_xy, sharded):
    """Write one precomputed layer with cloud-volume.

    scales: list of (resolution_xyz, offset_xyz, array_zyx), all in physical axis order.
    swap_xy: store cloud-volume's x as physical y, like p105's EM on BossDB.
    """
    from cloudvolume import CloudVolume
    from cloudvolume.datasource.precomputed.sharding import compute_shard_params_for_image

    def cv_order(xyz):
        xyz = [int(v) for v in xyz]
        return [xyz[1], xyz[0], xyz[2]] if swap_xy else xyz

    info = {"type": layer_type, "data_type": dtype, "num_channels": 1, "scales": []}
    for res, off, arr in scales:
        size_xyz = (arr.shape[2], arr.shape[1], arr.shape[0])
        scale = {
            "key": "_".join(str(int(r)) for r in cv_order(res)),
            "resolution": cv_order(res),
            "voxel_offset": cv_order(off),
            "size": cv_order(size_xyz),
            "chunk_sizes": [list(CHUNK_SIZE_XYZ)],
            "encoding": encoding,
        }
        if encoding == "compressed_segmentation":
            scale["compressed_segmentation_block_size"] = [8, 8, 8]
        if sharded:
            spec = compute_shard_params_for_image(
                dataset_size=scale["size"], chunk_size=CHUNK_SIZE_XYZ, encoding=encoding,
                dtype=dtype)  # test-sized layers fit one shard: cloud-volume writes whole shards only
            scale["sharding"] = spec.to_dict()
        info["scales"].append(scale)

    layer_dir = Path(root) / rel_path
    layer_dir.mkdir(parents=True, exist_ok=True)
    # S3 serves BossDB's raw chunks gzip-compressed; our server adds Content-Encoding for .gz files.
    compress = "gzip" if (encoding != "jpeg" and not sharded) else False
    for mip, (_, off, arr) in enumerate(scales):
        cv = CloudVolume(f"file://{layer_dir}", mip=mip, info=info, progress=False,
                         compress=compress, parallel=1)
        if mip == 0:
            cv.commit_info()
        cv_arr = arr.transpose(1, 2, 0) if swap_xy else arr.transpose(2, 1, 0)
        lo = cv_order(off)
        cv[lo[0]:lo[0] + cv_arr.shape[0], lo[1]:lo[1] + cv_arr.shape[1],
           lo[2]:lo[2] + cv_arr.shape[2]] = np.asfortranarray(cv_arr[..., None])  # (x, y, z, channel)
    return info


def _read_back(root, rel_path, mip, swap_xy):
    """Decode a written layer with cloud-volume from disk (the truth for lossy jpeg)."""
    from cloudvolume import CloudVolume
    cv = CloudVolume(f"file://{Path(root) / rel_path}", mip=mip, progress=False, parallel=1)
    arr = np.asarray(cv[cv.bounds])[..., 0]
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if swap_xy else arr.transpose(2, 1, 0))


def build_mirror(root, shape_xyz=(300, 260, 20), experiments=("p105", "p14"),
                 labels=tuple(LABEL_CHANNELS), em_encoding="raw", label_encoding="raw",
                 sharded=False, seed=0, synapse_rate: float | None = None) -> Mirror:
    """Write a synthetic BossDB-layout mirror under `root` and return what it was written from.

    shape_xyz: size of the label layers in voxels at 12 x 12 x 40 nm; EM at 6 nm is about twice
        that in x and y, with a slightly different offset and extent.
    em_encoding: "raw" (gzip-served) or "jpeg". label_encoding: "raw" or "compressed_segmentation".
    sharded: write the sharded precomputed format instead of one file per chunk.
    synapse_rate: synapses per segment (default `tissue.SYNAPSE_RATE`; 0 for a box without any).
    """
    if em_encoding not in EM_ENCODINGS:
        raise ValueError(f"em_encoding={em_encoding!r} is not supported; allowed: {EM_ENCODINGS}")
    if label_encoding not in LABEL_ENCODINGS:
        raise ValueError(f"label_encoding={label_encoding!r} is not supported; allowed: {LABEL_ENCODINGS}")
    nx, ny, nz = (int(v) for v in shape_xyz)
    if min(nx, ny, nz) < 1:
        raise ValueError(f"shape_xyz={shape_xyz!r} must be three positive voxel counts")
    root = Path(root)
    mirror = Mirror(root=root)
    for e_i, name in enumerate(experiments):
        if name not in EXPERIMENTS:
            raise ValueError(f"experiment={name!r} is unknown; allowed: {sorted(EXPERIMENTS)}")
        exp = EXPERIMENTS[name]
        rng = np.random.default_rng(seed * 100 + e_i)
        lab_off = exp["label_offset"]
        base = f"wildenberg2023/{exp['bossdb']}"
        # EM: a little wider in x, a little shorter in y and one slice deeper than the labels.
        em_size0 = (2 * nx + 24, 2 * ny - 8, nz + 1)
        grids = {"labels": (LABEL_RESOLUTION_XYZ, tuple(lab_off), (nx, ny, nz))}
        for mip in range(EM_MIPS):
            f = 2 ** mip
            grids[mip] = ((EM_RESOLUTION_XYZ[0] * f, EM_RESOLUTION_XYZ[1] * f, EM_RESOLUTION_XYZ[2]),
                          (exp["em_offset"][0] // f, exp["em_offset"][1] // f, exp["em_offset"][2]),
                          (-(-em_size0[0] // f), -(-em_size0[1] // f), em_size0[2]))
        # One rendering of the tissue on the 12 nm label grid, covering every layer; each grid takes
        # the label-grid voxel under each of its voxel centres (EM at 6 nm: 2 x 2 voxels each).
        picks = {key: _label_grid_index(*grid) for key, grid in grids.items()}
        lo = np.min([[p[a].min() for a in range(3)] for p in picks.values()], axis=0)
        hi = np.max([[p[a].max() + 1 for a in range(3)] for p in picks.values()], axis=0)
        tissue = Tissue(lo * LABEL_RESOLUTION_XYZ, hi * LABEL_RESOLUTION_XYZ, rng,
                        **({} if synapse_rate is None else {"synapse_rate": synapse_rate}))
        parts = tissue.render(LABEL_RESOLUTION_XYZ, lo, hi - lo)

        em_scales = []
        for mip in range(EM_MIPS):
            res, off, size = grids[mip]
            ix, iy, iz = (p - o for p, o in zip(picks[mip], lo))
            xs_nm = (np.arange(size[0]) + off[0] + 0.5) * res[0]
            ys_nm = (np.arange(size[1]) + off[1] + 0.5) * res[1]
            em_scales.append((res, off, em_image(parts, (iz, iy, ix), xs_nm, ys_nm, rng)))
        em_path = f"{base}/{exp['em_channel']}"
        _write_layer(root, em_path, "image", "uint8", em_encoding, em_scales, exp["swap_xy"], sharded)
        em_data = {m: s[2] for m, s in enumerate(em_scales)}
        if em_encoding == "jpeg":
            em_data = {m: _read_back(root, em_path, m, exp["swap_xy"]) for m in range(EM_MIPS)}
        mirror.layers[em_path] = MirrorLayer(
            em_path, {m: s[0] for m, s in enumerate(em_scales)},
            {m: (s[1][2], s[1][1], s[1][0]) for m, s in enumerate(em_scales)}, em_data)

        crop = tuple(slice(o - l, o - l + n) for o, l, n in zip(lab_off[::-1], lo[::-1], (nz, ny, nx)))
        for label in labels:
            channel, dtype = LABEL_CHANNELS[label]
            arr = np.ascontiguousarray(parts["segments" if label == "saturated" else label][crop]).astype(dtype)
            path = f"{base}/{channel}"
            # compressed_segmentation exists for 32- and 64-bit ids only, as in precomputed itself.
            encoding = label_encoding if dtype in ("uint32", "uint64") else "raw"
            _write_layer(root, path, "segmentation", dtype, encoding,
                         [(LABEL_RESOLUTION_XYZ, lab_off, arr)], False, sharded)
            mirror.layers[path] = MirrorLayer(path, {0: LABEL_RESOLUTION_XYZ},
                                              {0: (lab_off[2], lab_off[1], lab_off[0])}, {0: arr})
    return mirror


def copy_box(source_base_url: str, output, entry: str, bbox_nm=None, workers: int = 8, progress: bool = False) -> int:
    """Copy the chunks of a box of one entry's experiment (EM and every label layer, at the entry's
    default mips) from any precomputed source into a BossDB-layout folder that `MirrorServer` or a
    file:// base URL can serve: for clusters whose compute nodes cannot reach BossDB.

    The copy says what it holds: its info files declare only the copied box (clipped to the source,
    aligned to its chunks) at the copied mip, and name the copy (`wildenberg_intake_copy`), so a
    read at another mip, or of a box beyond the copy, fails naming the copy and what it lacks
    instead of reading as empty. Chunks are fetched once each, `workers` at a time, written whole
    (renamed into place), uncompressed, one file each (a sharded source is copied unsharded); a
    killed copy resumes where it stopped (chunks on disk are kept, a chunk it was writing is
    removed), and the info files are written last, so an unfinished copy cannot be read. Returns the chunks copied (present upstream).
    """
    import concurrent.futures as cf
    import copy as copy_module
    import json
    from tqdm.auto import tqdm
    from ..drivers import entry_source
    from ..source.layers import COPY_KEY, held_scales
    from ..store.files import durable_write, make_dirs
    params = {"base_url": source_base_url}
    if bbox_nm is not None:
        params["bbox_nm"] = list(bbox_nm)
    source = entry_source(entry, **params)
    plan = source.plan
    out_root = Path(output) / "wildenberg2023" / source.request.bossdb_experiment
    infos, tasks = {}, []
    for name, layer in plan.layers.items():
        src = plan.arrays[name]
        channel = layer.url.rstrip("/").rsplit("/", 1)[1]
        folder = out_root / channel / layer.info.scale_key
        make_dirs(folder)
        grids = layer.info.chunks_in(src.start_zyx, np.add(src.start_zyx, src.shape))
        tasks += [(layer, folder, grid) for grid in grids]
        # The copied extent: the union of the copied chunks (chunk-aligned, clipped to the source).
        boxes = [layer.info.chunk_box(g) for g in grids]
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
        original = layer.info_dict
        info = copy_module.deepcopy(original)
        scale = dict(held_scales(info))[layer.info.mip]
        info["scales"] = [scale]  # only what the copy holds: other readers see exactly the copy
        scale.pop("sharding", None)
        scale["voxel_offset"] = [int(v) for v in layer.info_axes(lo)]
        scale["size"] = [int(v) for v in layer.info_axes(hi - lo)]
        x0, x1, y0, y1, z0, z1 = plan.bbox_nm
        info[COPY_KEY] = {"source": layer.url, "entry": entry, "mips": [layer.info.mip],
                          "bbox_nm": [x0, x1, y0, y1, z0, z1],
                          "meaning": "a box copy made by `wildenberg-intake mirror --source`: only these mips "
                                     "(its scales, in this order), only this extent; the source's info file is "
                                     "kept beside as source_info.json"}
        infos[out_root / channel / "info"] = info
        infos[out_root / channel / "source_info.json"] = original

    def copy(task) -> int:
        layer, folder, grid = task
        target = folder / layer.chunk_name(grid)
        if target.exists():  # written whole by an earlier run
            return 1
        data = layer.fetch_chunk(grid)
        if data is None:  # missing upstream: stays missing (read as empty, as from the source)
            return 0
        durable_write(target, data)
        return 1

    copied = 0
    with cf.ThreadPoolExecutor(max(1, int(workers))) as pool, \
            tqdm(total=len(tasks), unit="chunk", disable=not progress, desc=f"copy {entry}") as bar:
        for n in pool.map(copy, tasks):
            copied += n
            bar.update(1)
    # A killed run's temporary files (a chunk it was writing) are not data: removed once all is copied.
    for folder in {task[1] for task in tasks}:
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    for path, info in sorted(infos.items(), key=lambda item: item[0].name == "info"):
        # last, `info` after the rest: a copy without its info files is not a layer yet
        durable_write(path, json.dumps(info, indent=1).encode())
    return copied
