"""The multiscale pyramid: levels equal an independent downsampling of level 0, are recorded and
resumable like level 0, are made lazily from level 0's shards, and validate as OME-Zarr."""

import numpy as np
import pytest
import zarr

from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.mirror import MirrorServer

from conftest import all_layers, expected_window

ALL = [-1e9, 1e9] * 3


from tests_helpers import mean_2x2 as _mean, mode_2x2 as _mode  # noqa: E402  (independent of the package)
from tests_helpers import mean_2x2_loops, mode_2x2_loops  # noqa: E402


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_downsampling_equals_the_loops_on_every_shape_dtype_and_tie(dtype, compiled, monkeypatch):
    """Odd and even edges, one-voxel sides, few values (ties of 2 + 2, 1 + 1 + 1 + 1, and 2 + 1 + 1
    in every order), full-range EM values, contiguous or not; numpy's passes and the compiled loops."""
    import time
    from wildenberg_intake.store import downsample as module
    from wildenberg_intake.store.downsample import downsample
    if compiled:  # as a large run does: loaded in the background, used once loaded
        monkeypatch.setattr(module, "_warm_up_started", False)
        module.warm_up(module.COMPILED_FROM)
        deadline = time.monotonic() + 300
        while module._compiled is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert module._compiled is not None
    else:
        monkeypatch.setattr(module, "_compiled", None)
    rng = np.random.default_rng(7)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 10, size=3))
        labels = rng.integers(0, rng.integers(1, 5), size=shape).astype(dtype)
        if rng.random() < 0.2:
            labels[labels == labels.max()] = np.iinfo(dtype).max  # the dtype's largest value too
        for block in (labels, labels[:, ::-1]):
            want = mode_2x2_loops(block)
            np.testing.assert_array_equal(downsample(block, is_label=True), want)
            np.testing.assert_array_equal(_mode(block), want)  # the tests' whole-array reference
        if np.dtype(dtype).itemsize <= 2:
            em = rng.integers(0, np.iinfo(dtype).max + 1, size=shape).astype(dtype)
            want = mean_2x2_loops(em)
            np.testing.assert_array_equal(downsample(em, is_label=False), want)
            np.testing.assert_array_equal(_mean(em), want)


def _placement(meta) -> np.ndarray:
    """Where napari puts a layer beside its scale: its affine matrix, or its translation."""
    return np.asarray(meta["affine"].affine_matrix if "affine" in meta else meta.get("translate", ()), dtype=float)


@pytest.fixture(scope="module")
def wide_server(wide):
    with MirrorServer(wide.root) as server:
        yield server


@pytest.fixture(scope="module")
def pyramid_store(wide_server, catalog, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("pyr")
    src = catalog.p14_saturated(base_url=wide_server.base_url, cache_dir=str(cache_dir), progress=False)
    path = src.materialise()
    return src, zarr.open_group(path, mode="r"), StoreCache(cache_dir, src.plan.name)


def test_levels_equal_an_independent_downsampling(wide, pyramid_store):
    src, store, cache = pyramid_store
    raw = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0][:3]
    labels = expected_window(wide, "p14", "saturated_autoseg", 0, ALL, all_layers("p14"))[0][:3]
    # 1100 x 520: two levels until a level fits one 512 x 512 shard; level 1 spans two shards in x.
    assert [n for n in cache.arrays() if n.startswith("raw")] == ["raw", "raw@1", "raw@2"]
    z, y, x = store["raw"].shape
    assert y > 512 and x > 1024
    assert store["raw_s1"].shape == (z, -(-y // 2), -(-x // 2)) and store["raw_s2"].shape == (z, -(-y // 4), -(-x // 4))
    assert store["labels/saturated/2"].shape == store["raw_s2"].shape
    r1, l1 = _mean(raw), _mode(labels)
    np.testing.assert_array_equal(store["raw_s1"][:3], r1)
    np.testing.assert_array_equal(store["labels/saturated/1"][:3], l1)
    np.testing.assert_array_equal(store["raw_s2"][:3], _mean(r1))
    np.testing.assert_array_equal(store["labels/saturated/2"][:3], _mode(l1))
    for name in ("raw@1", "raw@2", "labels/saturated@1", "labels/saturated@2"):
        assert cache.is_complete(name)
        for index in cache.done_shards(name):
            assert cache.check_shard(name, index, hashes=True) is None


def test_ome_metadata_lists_the_levels_and_validates(pyramid_store):
    yaozarrs = pytest.importorskip("yaozarrs")
    src, store, cache = pyramid_store
    (ms,) = store.attrs["ome"]["multiscales"]
    assert [d["path"] for d in ms["datasets"]] == ["raw", "raw_s1", "raw_s2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    shifts = [d["coordinateTransformations"][1]["translation"] for d in ms["datasets"]]
    assert scales == [[40.0, 12.0, 12.0], [40.0, 24.0, 24.0], [40.0, 48.0, 48.0]]
    for scale, shift in zip(scales, shifts):  # every level's voxel 0 starts at one physical corner
        assert [t - s / 2 for t, s in zip(shift, scale)] == pytest.approx(
            [t - s / 2 for t, s in zip(shifts[0], scales[0])])
    (lab,) = store["labels/saturated"].attrs["ome"]["multiscales"]
    assert [d["path"] for d in lab["datasets"]] == ["0", "1", "2"]
    yaozarrs.validate_zarr_store(str(cache.zarr_path))


def test_a_level_read_lazily_makes_only_the_shards_it_needs(wide, catalog, tmp_path):
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        from wildenberg_intake.store.lazy import ReadThroughArray
        level2 = ReadThroughArray(src.plan, "raw@2")
        before = sum(server.requests.values())
        z, y, x = src.plan.arrays["raw"].shape
        assert level2.shape == (z, -(-y // 4), -(-x // 4))
        assert sum(server.requests.values()) == before, "opening a level fetches nothing"
        window = level2[0:4, 0:64, 0:64]
        cache = level2.cache
        assert cache.done_shards("raw@2") == {(0, 0, 0)}
        # Level 2's one shard covers level 1's two, which cover all six of level 0; nothing else is made.
        assert cache.done_shards("raw@1") == {(0, 0, 0), (0, 0, 1)}
        assert len(cache.done_shards("raw")) == 6 and cache.done_shards("labels/psd") == set()
        # Level 1 read lazily in one corner makes one level-1 shard from four level-0 ones.
        other = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path / "b"), progress=False)
        corner = ReadThroughArray(other.plan, "labels/psd@1")[0:2, 0:10, 0:10]
        assert corner.shape == (2, 10, 10)
        b = ReadThroughArray(other.plan, "labels/psd@1").cache
        assert b.done_shards("labels/psd@1") == {(0, 0, 0)}
        assert b.done_shards("labels/psd") == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)}
        raw = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0]
        np.testing.assert_array_equal(window, _mean(_mean(raw[0:4]))[:, 0:64, 0:64])
        # A later materialise() makes the rest and ends with the same bytes as one run.
        src.materialise()
        assert all(cache.is_complete(n) for n in ("raw@1", "raw@2", "labels/psd@2"))


def test_napari_reader_gives_an_image_and_a_labels_layer_per_label_with_their_levels(wide, wide_server, pyramid_store,
                                                                                    catalog):
    """napari-ome-zarr's reader (no window): one image layer, one labels layer per label, in nm, with
    the pyramid's levels, all placed alike. napari-ome-zarr 0.10 reads only the first transform of
    the first dataset (the scale; its issue #73), so napari starts the box at 0 nm, not at its place
    in the dataset: EM and labels still overlay exactly."""
    reader = pytest.importorskip("napari_ome_zarr._reader")
    src, store, cache = pyramid_store
    # A second label in the same store.
    catalog.p14_psd(base_url=wide_server.base_url, cache_dir=str(cache.root.parent.parent), progress=False).materialise()
    path = str(cache.zarr_path)
    layers = reader.napari_get_reader(path)(path)
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels", "labels"]
    names = sorted(meta["name"].rsplit("/", 1)[-1] for _, meta, kind in layers if kind == "labels")
    assert names == ["psd", "saturated"]
    raw = expected_window(wide, "p14", "em_aligned", 1, ALL, all_layers("p14"))[0]
    for data, meta, kind in layers:
        assert len(data) == 3 and [d.shape for d in data] == [store[p].shape for p in
                                                               (("raw", "raw_s1", "raw_s2") if kind == "image" else
                                                                ("labels/psd/0", "labels/psd/1", "labels/psd/2"))]
        assert meta["units"] == ("nanometer",) * 3 and list(meta["scale"]) == [40.0, 12.0, 12.0]
        # Every layer placed as the image is (napari-ome-zarr 0.10 gives an affine, 0.11 a translation).
        np.testing.assert_array_equal(_placement(meta), _placement(layers[0][1]))
    image = layers[0][0]
    np.testing.assert_array_equal(np.asarray(image[0][:2]), raw[:2])
    np.testing.assert_array_equal(np.asarray(image[1][:2]), _mean(raw[:2]))
    saturated = next(d for d, m, k in layers if m.get("name", "").endswith("saturated"))
    labels = expected_window(wide, "p14", "saturated_autoseg", 0, ALL, all_layers("p14"))[0]
    np.testing.assert_array_equal(np.asarray(saturated[0][:2]), labels[:2])


def test_a_wide_preview_is_an_overview_from_the_sources_mip_and_the_slices_chunks(wide, wide_server, tmp_path,
                                                                                   capsys):
    """1100 x 520 label voxels with --max-size 300: an overview at level 2 (48 nm pixels, 275 wide).
    Each pixel shows the EM voxel under its centre at the source's coarsest mip not coarser than a
    pixel (24 nm), the labels the 2 x 2 mode applied twice to the slice (rendered independently
    here from the mirror); nothing of level 0 is fetched, only the EM mip's and the labels' source
    chunks of the slice's z-row."""
    from PIL import Image
    from wildenberg_intake import cli
    png = tmp_path / "overview.png"
    z = 2
    before = dict(wide_server.requests)
    code = cli.main(["preview", "p14_psd", "--base-url", wide_server.base_url, "--cache-dir", str(tmp_path),
                     "--z", str(z), "-o", str(png), "--max-size", "300"])
    assert code == 0 and "(overview at level 2" in capsys.readouterr().out
    psd, box = expected_window(wide, "p14", "psd_autoseg", 0, ALL, all_layers("p14"))
    want_psd = _mode(_mode(psd[z:z + 1]))[0]
    # The EM voxel (24 nm, mip 2) under each 48 nm pixel's centre, placed in nm from the labels' origin.
    x0, _, y0, _, z0, _ = box
    origin = np.floor(np.array([z0, y0, x0]) / [40, 12, 12]) * [40, 12, 12]
    em = wide.layer("p14", "em_aligned")
    assert em.resolution_xyz[2][:2] == (24, 24)
    rows = np.floor((origin[1] + (np.arange(want_psd.shape[0]) + 0.5) * 48) / 24).astype(int)
    cols = np.floor((origin[2] + (np.arange(want_psd.shape[1]) + 0.5) * 48) / 24).astype(int)
    zi = int(np.floor((origin[0] + (z + 0.5) * 40) / 40))
    plane = em.expected(2, (zi, rows.min(), cols.min()), (zi + 1, rows.max() + 1, cols.max() + 1))[0]
    want_raw = plane[np.ix_(rows - rows.min(), cols - cols.min())]
    image = np.asarray(Image.open(png))
    assert image.shape[:2] == want_psd.shape and want_psd.shape[1] <= 300 < 2 * want_psd.shape[1]
    assert (want_psd > 0).any()
    plain = want_psd == 0
    plain[-30:, :] = plain[:20, :] = False  # the scale bar and the title
    np.testing.assert_array_equal(image[plain][:, 0], want_raw[plain])
    labelled = want_psd > 0
    labelled[-30:, :] = labelled[:20, :] = False
    over = 0.45 * want_raw[labelled].astype(np.float32) + 0.55 * np.float32(255)  # the overlay, in float32
    np.testing.assert_array_equal(image[labelled][:, 0], over.clip(0, 255).astype(np.uint8))
    # Nothing of level 0 fetched or made: only the source chunks of the slice's z-row, EM at 24 nm.
    for folder in tmp_path.glob("wildenberg2023/*"):  # (no store is made at all)
        store = StoreCache(tmp_path, folder.name)
        assert not any(store.done_shards(name) for name in store.arrays())
    fetched = {p: n - before.get(p, 0) for p, n in wide_server.requests.items() if n != before.get(p, 0)}
    for layer, most in (("psd_autoseg", 6), ("em_aligned/24_24_40", 6)):
        requests = [p for p in fetched if f"/{layer}/" in p and not p.endswith("/info")]
        assert 0 < len(requests) <= most  # the chunks of one chunk row in z: a single z range
        assert len({p.removesuffix(".gz").rsplit("_", 1)[1] for p in requests}) == 1, requests
    assert not [p for p in fetched if "/em_aligned/12_12_40/" in p], "level 0's EM was fetched"


def test_an_overview_that_would_cost_too_much_is_refused_with_the_estimate(wide_server, tmp_path, capsys):
    from wildenberg_intake import cli
    code = cli.main(["preview", "p14_saturated", "--base-url", wide_server.base_url, "--cache-dir", str(tmp_path),
                     "--z", "0", "-o", str(tmp_path / "x.png"), "--max-size", "300", "--max-fetch", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "would fetch about" in err and "more than max_fetch=1000 bytes" in err
    assert not (tmp_path / "x.png").exists()


def test_a_compiled_downsampler_that_cannot_load_warns_and_numpy_goes_on(monkeypatch):
    import sys
    import time
    import warnings
    from wildenberg_intake.store import downsample as module
    monkeypatch.setattr(module, "_warm_up_started", False)
    monkeypatch.setattr(module, "_compiled", None)
    monkeypatch.setitem(sys.modules, "wildenberg_intake.store.kernels", None)  # its import now fails
    monkeypatch.delattr(sys.modules["wildenberg_intake.store"], "kernels", raising=False)  # loaded by another test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.warm_up(module.COMPILED_FROM)
        deadline = time.monotonic() + 60
        while not caught and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [str(w.message).split(" (")[0] for w in caught] == ["the compiled downsampling could not be loaded"]
    assert module._compiled is None
    block = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(module.downsample(block, is_label=False), mean_2x2_loops(block))
