"""The torch-em adapter: datasets and loaders over catalog entries (loads torch and torch-em)."""

from .datasets import (ENTRY_PARAMETERS, EXPERIMENTS, SPLITS, CachedStoreDataset, LazyStoreDataset, get_dataset,
                       get_loader, get_wildenberg_data, get_wildenberg_dataset, get_wildenberg_loader,
                       get_wildenberg_paths, label_view, resolve_sources, split_roi)

__all__ = ["ENTRY_PARAMETERS", "EXPERIMENTS", "SPLITS", "CachedStoreDataset", "LazyStoreDataset", "get_dataset",
           "get_loader", "get_wildenberg_data", "get_wildenberg_dataset", "get_wildenberg_loader",
           "get_wildenberg_paths", "label_view", "resolve_sources", "split_roi"]
