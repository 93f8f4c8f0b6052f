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
    if name == "cat":
        return open_catalog()
    # The torch adapter loads torch and torch-em: only when asked for.
    if name in _TRAINING:
        from . import training
        return getattr(training, name)
    raise AttributeError(f"module 'wildenberg_intake' has no attribute {name!r}")


def open_catalog(**parameters):
    """The packaged catalog opened with intake; `parameters` (base_url=, cache_dir=, ...) apply to every entry."""
    import intake
    cat = intake.open_catalog(catalog_path())
    if not parameters:
        return cat
    return _OverriddenCatalog(cat, parameters)


class _OverriddenCatalog:
    """A thin view of an intake catalog that passes fixed user parameters to every entry."""

    def __init__(self, cat, parameters):
        self._cat, self._parameters = cat, dict(parameters)

    def __iter__(self):
        return iter(self._cat)

    def __contains__(self, name):
        return name in self._cat

    def __getitem__(self, name):
        if name not in self._cat:
            raise KeyError(f"entry {name!r} is unknown; allowed: {list(self._cat)}")
        return self._cat[name](**self._parameters)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._cat:
            raise AttributeError(f"entry {name!r} is unknown; allowed: {list(self._cat)}")
        entry = self._cat[name]

        def configure(**kwargs):
            return entry(**{**self._parameters, **kwargs})
        return configure
