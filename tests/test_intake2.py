"""The catalog through intake 2's own API: readers and a Catalog found through intake's entry
points (nothing imported from the package here beyond what they load, and the test helpers),
equal voxel for voxel to the mirror, lazily and loaded, sharing one code path with the v1 drivers."""

from pathlib import Path

import numpy as np
import pytest

import intake

from test_read import BOX, _check

CATALOG_FILE = str(Path(__file__).parents[1] / "catalog" / "wildenberg.yaml")  # the packaged catalog's source


def _catalog(**parameters):
    kinds = [t for t in intake.readers.datatypes.recommend(CATALOG_FILE) if t.__name__ == "WildenbergCatalogFile"]
    assert len(kinds) == 1, "intake's entry points did not register the package's data type"
    return kinds[0](url=CATALOG_FILE).to_reader("Catalog").read(**parameters)


@pytest.mark.parametrize("entry", ["p105_psd", "p14_saturated"])
def test_intake2_readers_equal_the_mirror_lazily_loaded_and_as_one_array(entry, mirror, server, tmp_path):
    experiment, label = entry.split("_", 1)
    cat = _catalog(base_url=server.base_url, cache_dir=str(tmp_path))
    assert sorted(cat.entries) == sorted(f"{e}_{l}" for e in ("p105", "p14")
                                         for l in ("psd", "vesicle_cloud", "saturated", "synapses"))
    reader = cat[entry]
    assert reader.output_instance == "xarray:Dataset"
    lazy = reader.read(bbox_nm=BOX[experiment])
    assert lazy["labels"].chunks is not None  # dask-backed: nothing read yet
    _check(lazy, mirror, experiment, label, BOX[experiment])
    _check(reader(bbox_nm=BOX[experiment]).read(load=True), mirror, experiment, label, BOX[experiment])
    dask_reader = reader.to_reader("dask")
    assert dask_reader.output_instance == "dask.array:Array"
    array = dask_reader.read(variable="labels", bbox_nm=BOX[experiment], base_url=server.base_url,
                             cache_dir=str(tmp_path))
    np.testing.assert_array_equal(array.compute(), lazy["labels"].values)
    with pytest.raises(ValueError, match=r"variable 'label' is unknown; allowed: \['labels', 'raw'\]; "
                                         r"did you mean 'labels'\?"):
        dask_reader.read(variable="label", base_url=server.base_url, cache_dir=str(tmp_path))
    store = reader.to_reader(reader="StorePath").read(bbox_nm=BOX[experiment], base_url=server.base_url,
                                               cache_dir=str(tmp_path))
    assert Path(store, "zarr.json").is_file() and lazy.attrs["store"] in store


def test_intake2_synapse_table_equals_the_v1_entry_and_chains_into_intakes_converter(server, tmp_path, catalog):
    cat = _catalog(base_url=server.base_url, cache_dir=str(tmp_path))
    reader = cat["p14_synapses"]
    assert reader.output_instance == "pandas:DataFrame"
    table = reader.read()
    v1 = catalog.p14_synapses(base_url=server.base_url, cache_dir=str(tmp_path)).read()
    assert len(table) > 0
    assert table.equals(v1)
    # One of intake's own converters, chained: the DataFrame to an xarray Dataset.
    converted = reader.PandasToXarray.read()
    assert type(converted).__name__ == "Dataset" and converted.sizes["index"] == len(table)
    np.testing.assert_array_equal(converted["psd_volume_um3"].values, table["psd_volume_um3"].values)


def test_intake2_and_v1_run_one_code_path_and_check_parameters_alike(server, tmp_path, catalog, monkeypatch):
    import sys
    drivers = sys.modules["wildenberg_intake.drivers"]  # loaded by intake's entry points, not imported here
    seen = []
    real = drivers.WildenbergSource.to_dask

    def spy(self):
        seen.append(self.request.bbox_nm)
        return real(self)
    monkeypatch.setattr(drivers.WildenbergSource, "to_dask", spy)
    box = [float(v) for v in BOX["p14"]]
    catalog.p14_psd(bbox_nm=box, base_url=server.base_url, cache_dir=str(tmp_path)).to_dask()
    _catalog(base_url=server.base_url, cache_dir=str(tmp_path))["p14_psd"].read(bbox_nm=box)
    assert len(seen) == 2 and seen[0] == seen[1]
    with pytest.raises(ValueError, match=r"parameter 'bbox_nmm' is unknown; .*did you mean 'bbox_nm'\?"):
        _catalog(base_url=server.base_url)["p14_psd"].read(bbox_nmm=box)
    with pytest.raises(ValueError, match=r"catalog parameter 'cachedir' is unknown; .*did you mean 'cache_dir'\?"):
        _catalog(cachedir=str(tmp_path))
