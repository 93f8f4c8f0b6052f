"""The catalog through intake 2's readers, beside intake's v1 drivers (`drivers.py`).

intake imports this module at start-up (the package's `intake.imports` entry point), which
registers its data types and readers with intake 2:

    import intake
    (kind,) = [t for t in intake.readers.datatypes.recommend(path) if t.__name__ == "WildenbergCatalogFile"]
    cat = kind(url=path).to_reader("Catalog").read()       # intake.readers.entry.Catalog
    cat["p105_psd"].read(bbox_nm=[...])                     # xarray.Dataset of dask arrays (lazy)
    cat["p105_psd"].read(load=True)                         # loaded into memory
    cat["p105_psd"].to_reader("dask").read(variable="labels")   # one dask array
    cat["p105_psd"].to_reader(reader="StorePath").read()    # materialised; the zarr store's path
    cat["p105_synapses"].read()                             # pandas.DataFrame

`path` is the packaged `catalog/wildenberg.yaml`, the one file both APIs read. Each reader is a
few lines over the v1 source of the same entry (`drivers.entry_source`): one code path, so every
user parameter and option (bbox_nm, em_mip, seg_mip, cache_dir, base_url, raw_codec, lock,
cache_limit, workers, ...) is taken the same way, as keywords of `read()` (or of the reader
called, `cat["p105_psd"](bbox_nm=[...])`), and checked the same way.
"""

from __future__ import annotations

from intake.readers import BaseReader, datatypes
from intake.readers.entry import Catalog

from .catalog import load_catalog_yaml


class WildenbergEntry(datatypes.BaseData):
    """One entry of the packaged catalog (`p105_psd`, `p14_synapses`, ...)."""

    structure = {"array"}

    def __init__(self, entry: str, metadata: dict | None = None):
        self.entry = entry
        super().__init__(metadata=metadata)


class WildenbergCatalogFile(datatypes.YAMLFile):
    """The packaged catalog file, `catalog/wildenberg.yaml` (recognised by its driver lines)."""

    magic = {(None, rb"driver: wildenberg_intake\.drivers\.")}


class _EntryReader(BaseReader):
    imports = {"wildenberg_intake"}  # `implements` on the readers only: intake offers every class that has one

    @staticmethod
    def source(data: WildenbergEntry, **parameters):
        """The v1 source of the entry (the one code path both APIs run)."""
        from .drivers import entry_source
        return entry_source(data.entry, **parameters)


class WildenbergDatasetReader(_EntryReader):
    """An entry's raw EM and labels as an xarray Dataset: dask arrays whose chunks are the store's
    shards, fetched as they are computed (`load=True`: loaded into memory, fetching what is missing)."""

    implements = {WildenbergEntry}
    output_instance = "xarray:Dataset"

    def _read(self, data, load: bool = False, **parameters):
        source = self.source(data, **parameters)
        return source.read() if load else source.to_dask()


class WildenbergDaskReader(_EntryReader):
    """One array of an entry (`variable`: "raw" or "labels") as a dask array, lazily."""

    implements = {WildenbergEntry}
    output_instance = "dask.array:Array"

    def _read(self, data, variable: str = "labels", **parameters):
        dataset = self.source(data, **parameters).to_dask()
        if variable not in dataset:
            from .catalog import unknown_name
            raise ValueError(unknown_name("variable", variable, list(dataset.data_vars)))
        return dataset[variable].data


class WildenbergStorePathReader(_EntryReader):
    """The entry materialised (fetched whole, with its pyramid); the path of its zarr v3 store."""

    implements = {WildenbergEntry}
    output_instance = "builtins:str"

    def _read(self, data, **parameters):
        return self.source(data, **parameters).materialise()


class WildenbergSynapseTableReader(_EntryReader):
    """A `<experiment>_synapses` entry's per-synapse table as a pandas DataFrame."""

    implements = {WildenbergEntry}
    output_instance = "pandas:DataFrame"

    def _read(self, data, **parameters):
        return self.source(data, **parameters).read()


class WildenbergCatalogReader(BaseReader):
    """The packaged catalog file as an intake 2 Catalog: each entry read by the reader of its
    main output (a Dataset for a voxel entry, a DataFrame for a synapse table)."""

    implements = {WildenbergCatalogFile}
    imports = {"wildenberg_intake"}
    output_instance = "intake.readers.entry:Catalog"

    def _read(self, data, **parameters):
        """parameters: applied to every entry, as `wildenberg_intake.open_catalog(**parameters)`."""
        import fsspec
        import yaml
        from .catalog import check_names
        from .drivers import source_keywords
        check_names(parameters, source_keywords(), "catalog parameter")
        with fsspec.open(data.url, "rt", **(data.storage_options or {})) as f:
            spec = yaml.safe_load(f)
        if spec != load_catalog_yaml():
            raise ValueError(f"url={data.url!r} is not this package's catalog; allowed: its catalog/wildenberg.yaml")
        cat = Catalog(metadata=spec["metadata"])
        for name, entry in spec["sources"].items():
            reader = WildenbergSynapseTableReader if entry["driver"].endswith("SynapseTableSource") else \
                WildenbergDatasetReader
            cat.add_entry(reader(WildenbergEntry(name, metadata={"description": entry.get("description", "")}),
                                 **parameters), name=name)
        return cat
