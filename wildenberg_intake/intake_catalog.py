"""The packaged catalog as intake's own YAML catalog type (what `intake.cat.wildenberg2023` is),
naming a misspelled entry and its closest match where intake raises a bare AttributeError/KeyError."""

from intake.catalog.local import YAMLFileCatalog

from .catalog import catalog_path, unknown_name


class WildenbergCatalog(YAMLFileCatalog):
    """intake's YAML catalog of `catalog/wildenberg.yaml`; unknown entries named with the closest."""

    def __init__(self, path=None, **kwargs):
        super().__init__(path or catalog_path(), **kwargs)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item.startswith("_"):
                raise
            raise AttributeError(unknown_name("entry", item, list(self))) from None

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(unknown_name("entry", key, list(self))) from None
