"""Programs other than the package's readers open what it writes: a partly fetched store is a valid
OME-Zarr at every moment (every declared array exists) and says which arrays are complete."""

import json

import numpy as np
import zarr

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store.engine import cache_for

from conftest import all_layers, expected_window


def _declared(zarr_path):
    """Every array path the OME-Zarr metadata declares: the root image's levels, each label's."""
    root = json.loads((zarr_path / "zarr.json").read_text())["attributes"]
    paths = [d["path"] for d in root["ome"]["multiscales"][0]["datasets"]]
    labels = json.loads((zarr_path / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"]
    for label in labels:
        meta = json.loads((zarr_path / "labels" / label / "zarr.json").read_text())["attributes"]["ome"]
        paths += [f"labels/{label}/{d['path']}" for d in meta["multiscales"][0]["datasets"]]
    return paths, labels


def test_a_lazily_filled_store_opens_in_zarr_python_and_napari_and_says_what_is_complete(wide, catalog, tmp_path):
    reader = __import__("napari_ome_zarr._reader", fromlist=["napari_get_reader"])
    with MirrorServer(wide.root) as server:
        src = catalog.p14_psd(base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
        ds = src.to_dask()
        window = ds.isel(z=slice(2, 12), y=slice(30, 300), x=slice(600, 1050))["labels"].values  # one window read
        cache = cache_for(src.plan)
        assert cache.done_shards("labels/psd") == {(0, 0, 1), (0, 0, 2)}
        paths, labels = _declared(cache.zarr_path)
        assert paths == ["raw", "raw_s1", "raw_s2", "labels/psd/0", "labels/psd/1", "labels/psd/2"] and labels == ["psd"]
        group = zarr.open_group(str(cache.zarr_path), mode="r")
        for path in paths:  # each declared array opens (an unfetched shard reads as the fill value)
            array = group[path]
            assert array.attrs["wildenberg_intake_complete"] is False, path
        psd = expected_window(wide, "p14", "psd_autoseg", 0, [-1e9, 1e9] * 3, all_layers("p14"))[0]
        np.testing.assert_array_equal(group["labels/psd/0"][2:12, 30:300, 600:1050], psd[2:12, 30:300, 600:1050])
        np.testing.assert_array_equal(window, psd[2:12, 30:300, 600:1050])
        note = group.attrs["wildenberg_intake"]
        assert note["complete_arrays"] == [] and "fill value 0" in note["meaning"]
        layers = reader.napari_get_reader(str(cache.zarr_path))(str(cache.zarr_path))
        assert [kind for _, _, kind in layers] == ["image", "labels"]
        assert [len(data) for data, _, _ in layers] == [3, 3]

        src.materialise()
        group = zarr.open_group(str(cache.zarr_path), mode="r")
        assert group.attrs["wildenberg_intake"]["complete_arrays"] == sorted(paths)
        assert all(group[p].attrs["wildenberg_intake_complete"] is True for p in paths)
        assert cache.evict("labels/psd@1", (0, 0, 0))  # a budget evicts a shard: no longer complete
        group = zarr.open_group(str(cache.zarr_path), mode="r")
        assert group.attrs["wildenberg_intake"]["complete_arrays"] == sorted(set(paths) - {"labels/psd/1"})
        assert group["labels/psd/1"].attrs["wildenberg_intake_complete"] is False
        assert group["labels/psd/1"].attrs["missing_source_chunks"]["count"] == 0  # kept from completion
