"""The synapse table: equal to one computed independently in memory (scipy.ndimage.label over the
whole box) from the mirror's own arrays; the same on threads and on a dask cluster; crash-safe and
cached by content."""

import signal
import subprocess
import sys
import textwrap

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from wildenberg_intake.analysis.synapses import COLUMNS, SynapseTable
from wildenberg_intake.drivers import entry_source
from wildenberg_intake.mirror import LABEL_CHANNELS, MirrorServer, build_mirror

from conftest import all_layers, expected_window

BLOCK = (6, 70, 90)  # smaller than the box in every axis: components merge across faces, edges, corners
CUBE = np.ones((3, 3, 3), bool)  # 26-connectivity


def independent_table(psd, clouds, segments, origin_zyx, resolution_zyx, experiment):
    """The definitions of analysis/synapses.py, computed in memory with scipy over the whole box."""
    big = np.iinfo(np.int64).max

    def components(mask):
        lab, n = ndimage.label(mask != 0, structure=CUBE)
        flat = lab.ravel()
        where = np.flatnonzero(flat)
        first = np.full(n + 1, big, np.int64)
        np.minimum.at(first, flat[where], where)
        order = np.argsort(first[1:], kind="stable") + 1  # labels in C order of their first voxel
        renumber = np.zeros(n + 1, np.int64)
        renumber[order] = np.arange(1, n + 1)
        return renumber[lab], n

    def majority(values):
        values = values[values != 0]
        if values.size == 0:
            return 0
        ids, counts = np.unique(values, return_counts=True)
        return int(ids[np.argmax(counts)])  # np.unique sorts: the first maximum is the lowest id

    psd_lab, n = components(psd)
    cloud_lab, _ = components(clouds)
    cloud_size = np.bincount(cloud_lab.ravel())
    grow = np.ceil(200.0 / np.asarray(resolution_zyx)).astype(int)
    voxel_um3 = float(np.prod(resolution_zyx)) / 1e9
    rows = []
    for k, box in enumerate(ndimage.find_objects(psd_lab), start=1):
        voxels = np.argwhere(psd_lab[box] == k) + [s.start for s in box]
        lo, hi = voxels.min(axis=0), voxels.max(axis=0) + 1
        centre = np.asarray(origin_zyx) + (voxels.mean(axis=0) + 0.5) * np.asarray(resolution_zyx)
        g_lo, g_hi = np.maximum(lo - grow, 0), np.minimum(hi + grow, psd.shape)
        near = cloud_lab[g_lo[0]:g_hi[0], g_lo[1]:g_hi[1], g_lo[2]:g_hi[2]]
        ids, counts = np.unique(near[near > 0], return_counts=True)
        cloud = int(ids[np.argmax(counts)]) if ids.size else 0  # ties: lowest number = first in C order
        rows.append({
            "synapse_id": k, "experiment": experiment, "psd_voxels": len(voxels),
            "psd_volume_um3": len(voxels) * voxel_um3,
            "centroid_z_nm": centre[0], "centroid_y_nm": centre[1], "centroid_x_nm": centre[2],
            "bbox_z0": lo[0], "bbox_z1": hi[0], "bbox_y0": lo[1], "bbox_y1": hi[1], "bbox_x0": lo[2], "bbox_x1": hi[2],
            "touches_box_edge": bool(np.any(lo == 0) or np.any(hi == psd.shape)),
            "post_segment": majority(segments[tuple(voxels.T)]),
            "vesicle_cloud_voxels": int(cloud_size[cloud]) if cloud else 0,
            "vesicle_cloud_volume_um3": (int(cloud_size[cloud]) if cloud else 0) * voxel_um3,
            "pre_segment": majority(segments[cloud_lab == cloud]) if cloud else 0,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def mirror_arrays(mirror, experiment, bbox_nm):
    layers = all_layers(experiment)
    return {label: expected_window(mirror, experiment, channel, 0, bbox_nm, layers)[0]
            for label, (channel, _) in LABEL_CHANNELS.items()}


def assert_same(got, want):
    assert list(got.columns) == COLUMNS and len(got) == len(want) > 0
    exact = [c for c in COLUMNS if not c.startswith("centroid") and not c.endswith("um3")]
    for column in exact:
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy(), err_msg=column)
    for column in ("centroid_z_nm", "centroid_y_nm", "centroid_x_nm"):
        np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-6, err_msg=column)
    for column in ("psd_volume_um3", "vesicle_cloud_volume_um3"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-12, err_msg=column)


@pytest.fixture(scope="module")
def tissue(tmp_path_factory):
    """A mirror with a few dozen synapses per box (p105 transposed EM, p14 not)."""
    m = build_mirror(tmp_path_factory.mktemp("synapse-mirror"), shape_xyz=(420, 380, 22))
    with MirrorServer(m.root) as server:
        yield m, server


@pytest.mark.parametrize("experiment, workers, processes", [("p14", 2, True), ("p105", 2, True), ("p14", 2, False),
                                                          ("p105", 1, False)])
def test_the_table_equals_an_independent_in_memory_computation(tissue, tmp_path, experiment, workers, processes,
                                                               monkeypatch):
    mirror, server = tissue
    src = entry_source(f"{experiment}_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    import hashlib
    from wildenberg_intake.analysis import components
    log, label = tmp_path / "labelled.txt", components.cc3d.connected_components

    def counting(mask, **kwargs):  # each labelling noted in a file: worker processes share it
        with open(log, "a") as f:
            f.write(hashlib.sha256(repr(mask.shape).encode() + mask.tobytes()).hexdigest() + "\n")
        return label(mask, **kwargs)
    monkeypatch.setattr(components.cc3d, "connected_components", counting)
    table = SynapseTable(src.plan, block_shape=BLOCK, workers=workers, processes=processes)
    assert table.processes is (workers > 1 and processes)
    # By default threads on a box this small (starting processes would cost more), processes on a large one.
    from wildenberg_intake.analysis import synapses
    assert SynapseTable(src.plan, workers=2).processes is False
    monkeypatch.setattr(synapses, "PROCESS_MIN_VOXELS", 1)
    assert SynapseTable(src.plan, workers=2).processes is True and SynapseTable(src.plan, workers=1).processes is False
    got = table.compute()
    # One labelling per block and mask: pass 2 pairs vesicle clouds from pass 1's labels.
    labelled = log.read_text().split()
    assert labelled and len(labelled) == len(set(labelled))
    assert list((tmp_path / "wildenberg2023").glob("*/staging/tables/*")) == []  # the scratch is removed
    plan = src.plan
    arrays = mirror_arrays(mirror, experiment, plan.bbox_nm)
    origin = plan.arrays["labels/psd"].origin_nm_zyx
    want = independent_table(arrays["psd"], arrays["vesicle_cloud"], arrays["saturated"], origin,
                             plan.arrays["labels/psd"].layer.resolution_zyx, experiment)
    assert_same(got, want)
    # The box exercises what the definitions are about.
    spans = [(got[f"bbox_{a}0"] // b) != ((got[f"bbox_{a}1"] - 1) // b) for a, b in zip("zyx", BLOCK)]
    assert (spans[0] | spans[1] | spans[2]).sum() >= 3  # synapses merged across block faces
    assert got["touches_box_edge"].any() and not got["touches_box_edge"].all()
    assert (got["vesicle_cloud_voxels"] > 0).sum() >= len(got) // 2
    # Most pair with the cloud of their own contact, across two segments (a neighbouring contact's
    # larger cloud may win the box: the definition takes the most voxels).
    assert (got["post_segment"] != got["pre_segment"]).mean() > 0.7


@pytest.mark.distributed
def test_threads_and_a_dask_cluster_give_the_same_table(tissue, tmp_path):
    distributed = pytest.importorskip("distributed")
    mirror, server = tissue
    local = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path / "a"))
    local.block_shape = BLOCK
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path / "b"))
        remote.block_shape = BLOCK
        remote.client = client
        on_dask = remote.read()
    pd.testing.assert_frame_equal(local.read(), on_dask)


def test_a_killed_computation_leaves_no_table_and_a_rerun_gives_the_same(tissue, tmp_path):
    mirror, server = tissue
    code = textwrap.dedent(f"""
        import os, signal
        from wildenberg_intake.analysis import synapses
        from wildenberg_intake.drivers import entry_source
        done = [0]
        real = synapses.count_clouds_in_boxes
        def killing(*args):
            done[0] += 1
            if done[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        synapses.count_clouds_in_boxes = killing
        src = entry_source("p14_synapses", base_url={server.base_url!r}, cache_dir={str(tmp_path)!r}, workers=1)
        src.block_shape = {BLOCK!r}
        src.read()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not list(tmp_path.glob("wildenberg2023/*/tables/*.parquet"))  # nothing taken as complete
    src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    src.block_shape = BLOCK
    again = src.read()
    fresh = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path / "fresh"))
    fresh.block_shape = BLOCK
    pd.testing.assert_frame_equal(again, fresh.read())


def test_a_rerun_reads_the_cached_table_and_another_box_gets_its_own(tissue, tmp_path, monkeypatch):
    mirror, server = tissue
    src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    first = src.read()
    tables = list(tmp_path.glob("wildenberg2023/*/tables/synapses-v1-*.parquet"))
    assert len(tables) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(tables[0]), first)
    from wildenberg_intake.analysis import synapses

    def refuse(*args):
        raise AssertionError("recomputed")
    monkeypatch.setattr(synapses, "summarise_block", refuse)
    before = sum(server.requests.values())
    pd.testing.assert_frame_equal(entry_source("p14_synapses", base_url=server.base_url,
                                               cache_dir=str(tmp_path)).read(), first)
    assert sum(server.requests.values()) - before <= 4  # the info files only
    monkeypatch.undo()
    plan = src.plan
    x0, x1, y0, y1, z0, z1 = plan.bbox_nm
    other = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path),
                         bbox_nm=[x0, (x0 + x1) / 2, y0, y1, z0, z1])
    half = other.read()
    assert len(list(tmp_path.glob("wildenberg2023/*/tables/synapses-v1-*.parquet"))) == 2
    assert 0 < len(half) < len(first)


def test_to_dask_is_lazy_and_equal(tissue, tmp_path):
    mirror, server = tissue
    src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    before = sum(server.requests.values())
    frame = src.to_dask()
    assert sum(server.requests.values()) - before <= 4  # nothing but info files until computed
    assert list(frame.columns) == COLUMNS
    pd.testing.assert_frame_equal(frame.compute().reset_index(drop=True), src.read())


def test_bad_block_shape_is_refused(tissue, tmp_path):
    mirror, server = tissue
    src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"block_shape=\(0, 10, 10\) is not valid; allowed: three positive"):
        SynapseTable(src.plan, block_shape=(0, 10, 10))
    with pytest.raises(ValueError, match=r"workers=0 is not valid; allowed: a positive integer"):
        SynapseTable(src.plan, workers=0)


def test_synapses_command_prints_the_comparison_and_writes_the_table_and_figure(tissue, tmp_path, capsys):
    from PIL import Image
    from wildenberg_intake import cli
    mirror, server = tissue
    common = ["--base-url", server.base_url, "--cache-dir", str(tmp_path), "--quiet"]
    out, png = tmp_path / "synapses.parquet", tmp_path / "synapses.png"
    assert cli.main(["synapses", "p105", "p14", *common, "-o", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    both = pd.read_parquet(out)
    for experiment in ("p105", "p14"):
        src = entry_source(f"{experiment}_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
        table = src.read()
        pd.testing.assert_frame_equal(both[both["experiment"] == experiment].reset_index(drop=True), table)
        # The printed line, recomputed here from the table and the box.
        shape, res = src.plan.arrays["labels/psd"].shape, src.plan.arrays["labels/psd"].layer.resolution_zyx
        box_um3 = np.prod(shape) * np.prod(res) / 1e9
        whole = table[~table["touches_box_edge"]]
        line = next(line for line in printed.splitlines() if line.startswith(experiment + " "))
        fields = line.split()
        assert int(fields[1]) == len(table)
        assert float(fields[2]) == pytest.approx(box_um3, abs=0.05)
        assert float(fields[3]) == pytest.approx(1000 * len(table) / box_um3, abs=0.05)
        assert float(fields[4]) == pytest.approx(whole["psd_volume_um3"].median(), abs=5e-6)
        assert f"{experiment} {table['touches_box_edge'].sum()} of {len(table)}" in printed
    image = Image.open(png)
    grey = np.asarray(image.convert("L"))
    assert image.size[0] > 800 and grey.std() > 10
    # Every title inside the figure: nothing drawn in the outer 3 pixels (a cut title touches the edge).
    assert grey[:, :3].min() == 255 and grey[:, -3:].min() == 255 and grey[:3].min() == 255, "a title is cut"
    # The comparison: the U statistics and the bootstrap intervals, recomputed here independently.
    tables = {e: entry_source(f"{e}_synapses", base_url=server.base_url, cache_dir=str(tmp_path)) for e in ("p105", "p14")}
    sizes = {}
    for column, words in (("psd_volume_um3", "PSD volumes"), ("vesicle_cloud_volume_um3", "vesicle-cloud volumes")):
        values = []
        for e, src in tables.items():
            t = src.read()
            t = t[~t["touches_box_edge"]]
            if column != "psd_volume_um3":
                t = t[t["vesicle_cloud_voxels"] > 0]
            values.append(t[column].to_numpy())
        a, b = values
        u = sum(float(x > y) + 0.5 * float(x == y) for x in a for y in b)
        line = next(line for line in printed.splitlines() if line.startswith(words + " of p105"))
        assert f"(n = {len(a)})" in line and f"(n = {len(b)})" in line and f"Mann-Whitney U = {u:.0f}," in line
        sizes[column] = (a, b)
    for e, src in tables.items():
        t = src.read()
        x0, x1, y0, y1, z0, z1 = src.plan.bbox_nm
        spans = [(z0, z1, 5120.0), (y0, y1, 6144.0), (x0, x1, 6144.0)]
        grid = [max(1, int(round((hi - lo) / b))) for lo, hi, b in spans]  # equal blocks nearest 5 x 6 x 6 µm
        size = [(hi - lo) / n for (lo, hi, _), n in zip(spans, grid)]
        vols, members = [], []
        for i in range(grid[0]):
            for j in range(grid[1]):
                for k in range(grid[2]):
                    vols.append(size[0] * size[1] * size[2] / 1e9)
                    inside = np.ones(len(t), bool)
                    for axis, c in enumerate(("centroid_z_nm", "centroid_y_nm", "centroid_x_nm")):
                        idx = np.clip(np.floor((t[c].to_numpy() - spans[axis][0]) / size[axis]).astype(int), 0,
                                      grid[axis] - 1)
                        inside &= idx == (i, j, k)[axis]
                    members.append(np.nonzero(inside)[0])
        rng = np.random.default_rng(0)
        dens = []
        for _ in range(1000):
            drawn = rng.integers(0, len(vols), len(vols))
            dens.append(1000 * sum(len(members[d]) for d in drawn) / sum(vols[d] for d in drawn))
        lo, hi = np.percentile(dens, [2.5, 97.5])
        line = next(line for line in printed.splitlines() if line.startswith(f"  {e}: density"))
        assert f"[{lo:.1f}, {hi:.1f}] per 1000 µm³" in line, (line, lo, hi)


@pytest.mark.parametrize("argv,pattern", [
    (["synapses", "p99"], r"experiment='p99' is unknown; allowed: \['p105', 'p14'\]"),
    (["preview", "p14_synapses", "--z", "0", "-o", "x.png"], r"entry 'p14_synapses' is a synapse table; allowed "
                                                              r"here: a voxel entry such as p14_psd"),
    (["synapses", "p14", "--block-shape", "0", "5", "5"], r"block_shape=\[0, 5, 5\] is not valid"),
])
def test_synapse_command_mistakes(tissue, tmp_path, capsys, argv, pattern):
    import re
    from wildenberg_intake import cli
    mirror, server = tissue
    code = cli.main(argv + ["--base-url", server.base_url, "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err), err


def test_a_box_without_synapses_gives_an_empty_table_that_is_cached(tmp_path):
    """Saturated is only read where a block has PSD or cloud voxels; here none has, yet every shard
    is recorded, so the (empty) table gets its content key and is cached."""
    from wildenberg_intake.store.engine import cache_for
    m = build_mirror(tmp_path / "mirror", shape_xyz=(200, 150, 10), experiments=("p14",), synapse_rate=0.0)
    with MirrorServer(m.root) as server:
        src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path / "cache"))
        src.block_shape = (4, 64, 64)
        table = src.read()
        assert list(table.columns) == COLUMNS and len(table) == 0
        assert cache_for(src.plan).is_complete("labels/saturated")
        assert Path(src.materialise()).is_file()
        pd.testing.assert_frame_equal(pd.read_parquet(src.materialise()), table)


def test_describe_and_fetch_a_table_entry(tissue, tmp_path, capsys):
    import json
    from wildenberg_intake import cli
    mirror, server = tissue
    common = ["--base-url", server.base_url, "--cache-dir", str(tmp_path)]
    assert cli.main(["describe", "p14_synapses", *common]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["resolved"]["columns"] == COLUMNS and described["label"] is None
    assert cli.main(["fetch", "p14_synapses", *common, "--quiet"]) == 0
    path = capsys.readouterr().out.split(": ", 1)[1].rsplit(" (", 1)[0]
    assert path.endswith(".parquet") and "tables/synapses-v1-" in path
    src = entry_source("p14_synapses", base_url=server.base_url, cache_dir=str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(path), src.read())


def test_a_server_that_fails_leaves_no_table_and_names_the_url(tissue, tmp_path):
    from wildenberg_intake.mirror import Faults
    from wildenberg_intake.source.transfer import TransferError
    mirror, _ = tissue
    with MirrorServer(mirror.root, faults=Faults(fail_paths=("vesicle_autoseg/12_12_40/",))) as failing:
        src = entry_source("p14_synapses", base_url=failing.base_url, cache_dir=str(tmp_path),
                           retry={"attempts": 2, "backoff": 0.01}, progress=False)
        with pytest.raises(TransferError, match=r"GET http://127.0.0.1:\d+/.*/vesicle_autoseg/12_12_40/\S+ failed 2 times over \d+ s \(retry patience \d+ s, attempts 2\); "
                                                r"last failure: HTTP 503"):
            src.read()
    assert not list(tmp_path.glob("wildenberg2023/*/tables/*"))


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
@pytest.mark.parametrize("block_shape", [(1, 1, 1), (2, 3, 1), (3, 4, 5), (7, 7, 7)])
def test_blockwise_components_equal_scipy_on_random_masks(density, block_shape):
    """Random masks: the blockwise components (halos, faces, edges, corners, csgraph merge) equal
    scipy.ndimage.label with 26-connectivity, voxel for voxel (both number components by their
    first voxel in C order)."""
    from scipy import ndimage
    from wildenberg_intake.analysis.components import Components, block_summary, blocks, label_block
    rng = np.random.default_rng(int(density * 100) + sum(block_shape))
    mask = rng.random((9, 11, 10)) < density
    want, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    parts = blocks(mask.shape, block_shape)
    summaries, cores = [], []
    for start, stop in parts:
        labels, halo, fg = label_block(lambda a, b: mask[tuple(slice(x, y) for x, y in zip(a, b))], mask.shape,
                                       start, stop)
        summary = block_summary(labels, halo, start, stop, mask.shape, fg)
        cores.append(labels[tuple(slice(h, None) for h in halo)])
        summaries.append(summary)
    comps = Components(summaries)
    got = np.zeros(mask.shape, np.int64)
    for b, ((start, stop), core) in enumerate(zip(parts, cores)):
        got[tuple(slice(x, y) for x, y in zip(start, stop))] = comps.of_block(b)[core] + 1
    assert comps.n == n
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(comps.count, np.bincount(want.ravel(), minlength=n + 1)[1:])


@pytest.mark.parametrize("dtype", [np.uint8, bool, np.uint32])
@pytest.mark.parametrize("size", [0, 7, 63, 64, 1001, 4099])
def test_foreground_equals_flatnonzero(dtype, size):
    from wildenberg_intake.analysis.components import foreground
    rng = np.random.default_rng(size)
    for density in (0.0, 0.003, 0.2, 1.0):
        mask = (rng.random(size) < density).astype(dtype) * (3 if dtype is not bool else 1)
        np.testing.assert_array_equal(foreground(mask.astype(dtype)), np.flatnonzero(mask))
    cube = (rng.random((5, 13, 17)) < 0.05).astype(dtype)
    np.testing.assert_array_equal(foreground(cube), np.flatnonzero(cube))


def test_pass_two_counts_the_cloud_voxels_of_each_box_in_any_part_of_a_block(tmp_path):
    """Pass 2 reads pass 1's labels of a block (its spill) only over the z range the boxes reach:
    boxes that start below the block's first slice, inside it, or that reach only its last slices
    count exactly the cloud voxels under them (all labels mapped to one component here)."""
    from wildenberg_intake.analysis.synapses import count_clouds_in_boxes, summarise_block
    rng = np.random.default_rng(5)
    shape = (24, 30, 40)
    clouds = (rng.random(shape) < 0.3).astype(np.uint8)
    arrays = {"psd": np.zeros(shape, np.uint8), "vesicle_cloud": clouds,
              "saturated": rng.integers(1, 5, size=shape).astype(np.uint32)}
    start, stop = (8, 10, 0), (20, 30, 40)
    spill = tmp_path / "block.npz"
    _, summary = summarise_block(arrays, start, stop, spill)
    nodes = np.zeros(summary["n"] + 1, np.int64)  # every label of the block: component 0
    boxes = np.array([[0, 0, 0, 0, 24, 30, 40],     # the whole block
                      [1, 15, 12, 5, 18, 25, 33],   # inside it, from slice 7 of the block
                      [2, 18, 0, 0, 24, 30, 40],    # its last two slices only
                      [3, 2, 11, 3, 9, 14, 9],      # from below the block to its first slice
                      [4, 19, 29, 39, 30, 40, 50]])  # one voxel at its far corner
    together = count_clouds_in_boxes(str(spill), start, stop, nodes, boxes)
    for box in boxes:
        lo, hi = np.maximum(box[1:4], start), np.minimum(box[4:7], stop)
        want = int(clouds[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].sum())
        alone = count_clouds_in_boxes(str(spill), start, stop, nodes, box[None])  # its own z range
        for rows in (alone, together[together[:, 0] == box[0]]):
            assert rows[:, 2].sum() == want and set(rows[:, 1]) <= {0}, (box, rows, want)
