"""wildenberg-intake: the Wildenberg 2023 synapse FIB-SEM dataset from BossDB, through an intake catalog.

    import intake, wildenberg_intake
    cat = intake.open_catalog(wildenberg_intake.catalog_path())
    ds = cat.p105_psd(bbox_nm=[576, 12864, 576, 12864, 160, 2720]).read()   # xarray.Dataset

Kept cheap to import: the heavy modules (cloud-volume, zarr, intake) load when first used.
"""

import warnings

__version__ = "0.1.0"

# intake 2.0 warns about shell commands for every string user parameter, though none is run.
warnings.filterwarnings("ignore", message="Shell command not executed due to getshell=False")

from .catalog import catalog_path, default_cache_dir, entry_names  # noqa: E402  (light: yaml only)

_TRAINING = ("get_dataset", "get_loader", "get_wildenberg_data", "get_wildenberg_paths",
             "get_wildenberg_dataset", "get_wildenberg_loader")
__all__ = ["__version__", "catalog_path", "default_cache_dir", "entry_names", "open_catalog", "verify",
           *_TRAINING]


def verify(path) -> dict:
    """Reread a cached store (its folder or data.zarr) and report missing and corrupted shards per array."""
    from .store.cache import StoreCache
    return StoreCache.at(path).verify()


def __getattr__(name):
    # Built on first use so that importing the package stays cheap and intake is not imported
    # while intake itself is loading this package's entry points.
    if name == "cat":  # intake's own catalog type: what intake's entry point (intake.cat.wildenberg2023) expects
        return _intake_catalog()
    # The torch adapter loads torch and torch-em: only when asked for.
    if name in _TRAINING:
        from . import training
        return getattr(training, name)
    raise AttributeError(f"module 'wildenberg_intake' has no attribute {name!r}")


def _intake_catalog():
    from .intake_catalog import WildenbergCatalog  # imports intake: only when asked for
    return WildenbergCatalog()


def open_catalog(**parameters):
    """The packaged catalog, opened with intake; `parameters` (base_url=, cache_dir=, ...) apply to every
    entry. Unlike intake's own catalog object it names a misspelled entry and the closest one
    (`cat.p105_pds` -> "entry 'p105_pds' is unknown; allowed: [...]; did you mean 'p105_psd'?")."""
    import intake
    from .catalog import check_names
    from .drivers import source_keywords
    check_names(parameters, source_keywords(), "open_catalog parameter")  # before anything is opened
    return PackageCatalog(intake.open_catalog(catalog_path()), parameters)


class PackageCatalog:
    """A view of the intake catalog: entries by attribute or key (with `parameters` applied to each),
    anything else of the intake catalog as it is, unknown entries named with the closest match."""

    def __init__(self, cat, parameters=None):
        self._cat, self._parameters = cat, dict(parameters or {})

    def __iter__(self):
        return iter(self._cat)

    def __len__(self):
        return len(list(self._cat))

    def __contains__(self, name):
        return name in self._cat

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._cat))

    def __repr__(self):
        return f"<wildenberg-intake catalog {catalog_path()}: {list(self._cat)}>"

    def _entry(self, name):
        entry = self._cat[name]
        return entry if not self._parameters else _ConfiguredEntry(entry, self._parameters)

    def __getitem__(self, name):
        """The entry (`cat["p105_psd"](bbox_nm=...)`), or with the catalog's parameters its source."""
        if name not in self._cat:
            from .catalog import unknown_name
            raise KeyError(unknown_name("entry", name, list(self._cat)))
        return self._cat[name](**self._parameters) if self._parameters else self._cat[name]

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._cat:
            return self._entry(name)
        if hasattr(self._cat, name):
            return getattr(self._cat, name)
        from .catalog import unknown_name
        raise AttributeError(unknown_name("entry", name, list(self._cat)))


class _ConfiguredEntry:
    """A catalog entry with fixed user parameters: call it to override them, or use it as the source."""

    def __init__(self, entry, parameters):
        self._entry, self._parameters = entry, parameters

    def __call__(self, **kwargs):
        return self._entry(**{**self._parameters, **kwargs})

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self(), name)
