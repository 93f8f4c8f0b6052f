"""Every catalog entry read through intake over HTTP equals the arrays the mirror was written from."""

import json
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import wildenberg_intake
from wildenberg_intake.mirror import EXPERIMENTS, LABEL_CHANNELS, MirrorServer, build_mirror

from conftest import all_layers, expected_window

ENTRIES = [f"{e}_{l}" for e in ("p105", "p14") for l in ("psd", "vesicle_cloud", "saturated")]
# Not on voxel boundaries, so the rounding (start down, end up) matters.
BOX = {"p105": [1001, 3007, 805, 2503, 301, 699], "p14": [101, 2990, 95, 2777, 99, 501]}


def _check(ds, mirror, experiment, label, bbox_nm, em_mip=1):
    em_channel = EXPERIMENTS[experiment]["em_channel"]
    channel, dtype = LABEL_CHANNELS[label]
    raw, clipped = expected_window(mirror, experiment, em_channel, em_mip, bbox_nm, all_layers(experiment, em_mip))
    labels, _ = expected_window(mirror, experiment, channel, 0, bbox_nm, all_layers(experiment, em_mip))
    assert ds["raw"].dtype == np.uint8 and ds["labels"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds["raw"].values, raw)
    np.testing.assert_array_equal(ds["labels"].values, labels)
    assert tuple(ds.attrs["bbox_nm"]) == pytest.approx(clipped)
    assert ds["labels"].dims == ("z", "y", "x")


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_equals_the_mirror(entry, catalog, mirror, server, tmp_path):
    experiment, label = entry.split("_", 1)
    src = catalog[entry](bbox_nm=BOX[experiment], base_url=server.base_url, cache_dir=str(tmp_path))
    ds = src.read()
    _check(ds, mirror, experiment, label, BOX[experiment])
    assert ds.attrs["experiment"] == experiment and ds.attrs["label"] == label
    assert "doi:10.1038/s41467-023-43088-3" in ds.attrs["citation"]
    assert ds["labels"].values.any(), "the test box should hold some labels"
    # Coordinates are nm voxel centres: the first voxel's centre is half a voxel past the clipped box's start.
    assert ds["x"].values[0] == pytest.approx(ds.attrs["bbox_nm"][0] // 12 * 12 + 6)
    assert ds["z"].values[1] - ds["z"].values[0] == 40


def test_discover_reads_no_voxels_and_to_dask_stays_lazy(catalog, server, tmp_path):
    src = catalog.p14_saturated(bbox_nm=BOX["p14"], base_url=server.base_url, cache_dir=str(tmp_path))
    before = server.requests
    meta = src.discover()["metadata"]
    fetched = server.requests - before
    assert fetched and all(p.endswith(("/info", "/provenance")) for p in fetched), fetched
    assert meta["shapes"]["labels"] == meta["shapes"]["raw"]
    assert meta["voxel_size_nm_zyx"]["labels"] == (40.0, 12.0, 12.0)
    assert meta["estimated_bytes"] == int(np.prod(meta["shapes"]["raw"])) * 5
    assert meta["cached"] is False
    assert not Path(meta["store"]).exists(), "discover() must not write anything"
    lazy = src.to_dask()
    assert isinstance(lazy["labels"].data, da.Array) and isinstance(lazy["raw"].data, da.Array)
    np.testing.assert_array_equal(lazy["labels"].values, src.read()["labels"].values)
    assert src.discover()["metadata"]["cached"] is True


def test_p105_em_is_swapped_on_the_server_and_physical_in_the_store(catalog, mirror, server, tmp_path):
    info = json.loads((Path(mirror.root) / "wildenberg2023/mouse_v1_l4_p105/em/info").read_text())
    em = mirror.layer("p105", "em")
    # On the server, cloud-volume's x is physical y.
    assert info["scales"][1]["size"][:2] == [em.data[1].shape[1], em.data[1].shape[2]]
    assert info["scales"][1]["voxel_offset"][:2] == [em.offset_zyx[1][1], em.offset_zyx[1][2]]
    ds = catalog.p105_psd(base_url=server.base_url, cache_dir=str(tmp_path)).read()
    # Physical sanity that does not rely on the mirror's bookkeeping: PSDs sit on dark EM.
    under = ds["raw"].values[ds["labels"].values > 0]
    assert under.size > 500 and under.mean() < 40 < ds["raw"].values[ds["labels"].values == 0].mean()


@pytest.mark.parametrize("experiment", ["p105", "p14"])
def test_default_box_is_clipped_to_the_layers_intersection(experiment, catalog, mirror, server, tmp_path):
    src = catalog[f"{experiment}_psd"](base_url=server.base_url, cache_dir=str(tmp_path))
    annotated = src.request.bbox_nm
    ds = src.read()
    _check(ds, mirror, experiment, "psd", annotated)
    # EM and labels differ in extent: the store is smaller than either layer.
    em = mirror.layer(experiment, EXPERIMENTS[experiment]["em_channel"]).data[1]
    lab = mirror.layer(experiment, "psd_autoseg").data[0]
    assert ds["raw"].shape != em.shape and ds["raw"].shape != lab.shape
    assert all(s <= min(a, b) for s, a, b in zip(ds["raw"].shape, em.shape, lab.shape))


def test_em_mip_2_and_1_give_different_stores_and_data(catalog, mirror, server, tmp_path):
    one = catalog.p14_psd(bbox_nm=BOX["p14"], base_url=server.base_url, cache_dir=str(tmp_path))
    two = catalog.p14_psd(bbox_nm=BOX["p14"], em_mip=2, base_url=server.base_url, cache_dir=str(tmp_path))
    ds1, ds2 = one.read(), two.read()
    assert one.materialise() != two.materialise()
    assert ds2["raw"].shape[1] < ds1["raw"].shape[1] and ds2["raw"].shape[2] < ds1["raw"].shape[2]
    assert ds2["raw"].dims == ("z", "y_raw", "x_raw")
    raw2, _ = expected_window(mirror, "p14", "em_aligned", 2, BOX["p14"], all_layers("p14", em_mip=2))
    np.testing.assert_array_equal(ds2["raw"].values, raw2)
    assert ds2["y_raw"].values[1] - ds2["y_raw"].values[0] == 24


def test_second_label_reuses_raw_without_refetching(catalog, mirror, server, tmp_path):
    em_prefix = "/wildenberg2023/mouse_v1_l4_p105/em/"
    sat_prefix = "/wildenberg2023/mouse_v1_l4_p105/saturated_autoseg/"
    psd = catalog.p105_psd(bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path))
    path = psd.materialise()
    before = server.requests
    sat = catalog.p105_saturated(bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path))
    assert sat.materialise() == path, "one store per experiment and geometry"
    fetched = server.requests - before
    em_data = [p for p in fetched if p.startswith(em_prefix) and not p.endswith(("/info", "/provenance"))]
    assert em_data == [], "raw must not be fetched again for a second label"
    sat_before = sum(n for p, n in before.items() if p.startswith(sat_prefix))
    assert server.requests_under(sat_prefix) > sat_before
    import zarr
    group = zarr.open_group(path, mode="r")
    assert sorted(group["labels"].group_keys()) == ["psd", "saturated"]
    assert group["labels"].attrs["ome"]["labels"] == ["psd", "saturated"]
    _check(sat.read(), mirror, "p105", "saturated", BOX["p105"])


def test_a_404_chunk_reads_as_zeros(mirror, catalog, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(mirror.root, root)
    chunk_dir = root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/12_12_40"
    victim = sorted(chunk_dir.glob("*.gz"))[0]
    (x0, x1), (y0, y1), (z0, z1) = (map(int, r.split("-")) for r in victim.name[:-3].split("_"))
    victim.unlink()
    with MirrorServer(root) as server:
        ds = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "cache")).read()
    raw, _ = expected_window(mirror, "p14", "em_aligned", 1, ds.attrs["bbox_nm"], all_layers("p14"))
    origin = [int(v) for v in json.loads((Path(ds.attrs["store"]) / "raw" / "zarr.json").read_text())
              ["attributes"]["source_start_voxel_zyx"]]
    hole = tuple(slice(max(a - o, 0), max(b - o, 0)) for a, b, o in zip((z0, y0, x0), (z1, y1, x1), origin))
    assert ds["raw"].values[hole].size > 0
    assert not ds["raw"].values[hole].any()
    raw[hole] = 0
    np.testing.assert_array_equal(ds["raw"].values, raw)


@pytest.fixture(scope="module", params=[
    dict(em_encoding="jpeg", label_encoding="compressed_segmentation"),
    dict(sharded=True),
    dict(em_encoding="jpeg", label_encoding="compressed_segmentation", sharded=True),
], ids=["jpeg+cseg", "sharded", "sharded-jpeg+cseg"])
def variant(request, tmp_path_factory):
    m = build_mirror(tmp_path_factory.mktemp("variant"), shape_xyz=(200, 180, 18), **request.param)
    with MirrorServer(m.root) as s:
        yield m, s


@pytest.mark.parametrize("entry", ["p105_saturated", "p14_psd"])
def test_every_encoding_and_the_sharded_format(entry, variant, catalog, tmp_path):
    mirror, server = variant
    experiment, label = entry.split("_", 1)
    ds = catalog[entry](base_url=server.base_url, cache_dir=str(tmp_path)).read()
    _check(ds, mirror, experiment, label, catalog[entry](base_url=server.base_url).request.bbox_nm)


def test_open_catalog_with_overrides(mirror, server, tmp_path):
    cat = wildenberg_intake.open_catalog(base_url=server.base_url, cache_dir=str(tmp_path))
    assert sorted(cat) == sorted(ENTRIES + ["p105_synapses", "p14_synapses"])
    ds = cat.p14_vesicle_cloud(bbox_nm=BOX["p14"]).read()
    _check(ds, mirror, "p14", "vesicle_cloud", BOX["p14"])
    assert Path(ds.attrs["store"]).is_relative_to(tmp_path)


def test_raw_codec_is_an_option_with_its_own_store(catalog, mirror, server, tmp_path):
    fast = catalog.p14_psd(bbox_nm=BOX["p14"], base_url=server.base_url, cache_dir=str(tmp_path))
    ref = catalog.p14_psd(bbox_nm=BOX["p14"], raw_codec="zstd6", base_url=server.base_url, cache_dir=str(tmp_path))
    assert fast.materialise() != ref.materialise()
    def blosc(path):
        meta = json.loads((Path(path) / "zarr.json").read_text())
        return [c for c in meta["codecs"][0]["configuration"]["codecs"] if c["name"] == "blosc"][0]["configuration"]
    for src, level in ((fast, 1), (ref, 6)):
        assert blosc(Path(src.materialise()) / "raw")["clevel"] == level
        assert blosc(Path(src.materialise()) / "raw")["shuffle"] == "shuffle"
        labels = blosc(Path(src.materialise()) / "labels" / "psd" / "0")  # labels keep their own codec
        assert (labels["cname"], labels["clevel"], labels["shuffle"]) == ("zstd", 3, "noshuffle")
    np.testing.assert_array_equal(fast.read()["raw"].values, ref.read()["raw"].values)


def test_the_store_is_valid_ome_zarr_0_5(catalog, server, tmp_path):
    yaozarrs = pytest.importorskip("yaozarrs")
    src = catalog.p105_psd(bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path))
    path = src.materialise()
    catalog.p105_saturated(bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path)).materialise()
    yaozarrs.validate_zarr_store(path)
    import zarr
    root = zarr.open_group(path, mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and ms["axes"][0]["unit"] == "nanometer"
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [40.0, 12.0, 12.0]
    ds = src.read()
    assert translation["translation"] == [float(ds["z"][0]), float(ds["y"][0]), float(ds["x"][0])]
    label = zarr.open_group(path, mode="r")["labels/saturated"]
    assert "image-label" in label.attrs["ome"] and label.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"


def test_em_at_6_nm_and_labels_at_12_nm_place_a_physical_point_alike(catalog, server, tmp_path):
    """xarray coordinates and OME-Zarr translations are voxel centres: the two 6 nm EM voxels over a
    12 nm label voxel are centred on it, in the package's coordinates and in the OME metadata."""
    import zarr
    src = catalog.p105_psd(bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path), em_mip=0)
    ds = src.to_dask()
    for axis in ("y", "x"):
        fine, coarse = ds[f"{axis}_raw"].values, ds[axis].values
        assert fine[1] - fine[0] == 6 and coarse[1] - coarse[0] == 12
        n = min(len(fine) // 2, len(coarse))
        np.testing.assert_allclose((fine[0:2 * n:2] + fine[1:2 * n:2]) / 2, coarse[:n])
    store = zarr.open_group(src.materialise(), mode="r")
    (raw,) = store.attrs["ome"]["multiscales"]
    (lab,) = store["labels/psd"].attrs["ome"]["multiscales"]
    r_scale, r_shift = (raw["datasets"][0]["coordinateTransformations"][i][k] for i, k in ((0, "scale"), (1, "translation")))
    l_scale, l_shift = (lab["datasets"][0]["coordinateTransformations"][i][k] for i, k in ((0, "scale"), (1, "translation")))
    assert r_scale[1:] == [6.0, 6.0] and l_scale[1:] == [12.0, 12.0]
    for a in (1, 2):  # the centre of voxel 0 is the translation: lower corners coincide
        assert r_shift[a] - r_scale[a] / 2 == pytest.approx(l_shift[a] - l_scale[a] / 2)
        # and the same physical point as the xarray coordinate of voxel 0
    assert l_shift[2] == pytest.approx(float(ds["x"].values[0]))
    assert r_shift[2] == pytest.approx(float(ds["x_raw"].values[0]))
