"""Torch adapter: catalog entries to torch-em datasets and loaders, plus drop-in reference functions.

    from wildenberg_intake import get_loader
    loader = get_loader(["p105_psd", "p14_psd"], patch_shape=(32, 256, 256), batch_size=2,
                        cache_dir="...", split="train")

`get_wildenberg_data/paths/dataset/loader` keep the exact signatures, defaults and return types of
`torch_em.data.datasets.electron_microscopy.wildenberg`, backed by the catalog, so a training script
written for the reference runs after changing its import line. The paths they return open with
`raw_key="raw"` and `label_key="labels"`: each is a small zarr group whose `raw` and `labels` link
to the shared store's arrays (raw is never copied per label).
"""

import os
import warnings
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import DataLoader, Dataset
from torch_em.data import SegmentationDataset

from ..catalog import LABELS, load_catalog_yaml
from ..drivers import entry_source
from .sampling import draw
from .transforms import fast_label_transforms, fast_transform

EXPERIMENTS = ("p105", "p14")
# Entry parameters that get_dataset / get_loader pass on to the catalog entries.
ENTRY_PARAMETERS = ("bbox_nm", "em_mip", "seg_mip", "cache_dir", "base_url", "raw_codec", "workers", "progress",
                    "connections", "cache_limit", "retry", "check_hashes", "lock")
# torch-em's default_segmentation_dataset keywords that get_dataset passes on (the others it sets itself).
TORCH_EM_DATASET_KEYWORDS = ("label_transform", "label_transform2", "raw_transform", "transform", "dtype",
                             "label_dtype", "rois", "n_samples", "sampler", "ndim", "is_seg_dataset",
                             "with_channels", "with_label_channels", "verify_paths", "with_padding", "z_ext",
                             "pre_label_transform")
DATASET_KEYWORDS = ("split", "offsets", "boundaries", "binary", "labels", "download", "lazy", "warmup", "seed",
                    "lazy_timeout", "min_foreground", "sampler", "foreground_weight")


def _check_keywords(kwargs: dict, function: str, extra=()):
    """Refuse a keyword get_dataset / get_loader do not know, with the allowed names and the closest
    one, before any request or file is made (torch-em would raise only after the box was fetched)."""
    from ..catalog import check_names
    check_names(kwargs, [*DATASET_KEYWORDS, *ENTRY_PARAMETERS, *TORCH_EM_DATASET_KEYWORDS, *extra],
                f"{function} keyword")
SPLITS = ("train", "val")


def _refuse_tables(sources):
    """A synapse table entry has no voxels to train on: name the label entries instead."""
    from ..drivers import SynapseTableSource
    for s in sources:
        if isinstance(s, SynapseTableSource):
            raise ValueError(f"sources: {s.request.experiment}_synapses is a synapse table, not a label volume; "
                             f"allowed: the label entries, e.g. {[f'{s.request.experiment}_{l}' for l in LABELS]}")


def resolve_sources(sources, **parameters) -> list:
    """Catalog sources, entry names, a catalog, or a list mixing them -> a list of WildenbergSource.

    `parameters` (bbox_nm, em_mip, seg_mip, cache_dir, base_url, workers, progress) apply to entries
    given by name or catalog; sources already configured keep their own.
    """
    from ..drivers import WildenbergSource
    if isinstance(sources, (str, WildenbergSource)) or not isinstance(sources, Sequence):
        if hasattr(sources, "walk") or hasattr(sources, "_cat"):  # an intake catalog (or our view of one)
            sources = [sources[name] for name in list(sources)]
            return [s if not parameters else s.configure_new(**parameters) for s in sources]
        sources = [sources]
    out = []
    for s in sources:
        if isinstance(s, str):
            out.append(entry_source(s, **parameters))
        elif isinstance(s, WildenbergSource):
            out.append(s)
        else:
            raise ValueError(f"sources={s!r} is not valid; allowed: entry names, catalog sources or a catalog")
    if not out:
        raise ValueError("sources=[] is empty; allowed: at least one entry name or catalog source")
    return out


def split_roi(source, split: Optional[str]):
    """The region of `source`'s store that belongs to `split`, as declared in the catalog (z fractions)."""
    if split is None:
        return None
    splits = load_catalog_yaml()["metadata"]["splits"]
    if split not in splits:
        raise ValueError(f"split={split!r} is unknown; allowed: {list(splits)} or None")
    shape = source.plan.arrays[source.plan.label_name].shape
    lo, hi = splits[split]["z_fraction"]
    return (slice(int(round(lo * shape[0])), int(round(hi * shape[0]))), slice(None), slice(None))


class _StackedLabels:
    """Several label arrays of one store read as one (channel, z, y, x) array, window by window."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.shape = (len(arrays), *arrays[0].shape)
        self.ndim = 4
        self.dtype = np.result_type(*[a.dtype for a in arrays])

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return np.stack([np.asarray(a[key[1:]]) for a in self.arrays]).astype(self.dtype)[key[0]]


def _attach_readers(ds):
    """Read a SegmentationDataset's windows with the cache's fast reader (see store/reader.py), or, for a
    lazy dataset, through the cache (store/lazy.py: shards fetched when first read)."""
    from elf.wrapper import RoiWrapper
    from ..store.reader import ShardedArrayReader

    def wrap(array):
        return RoiWrapper(array, ds.roi) if ds.roi is not None else array
    lazy = getattr(ds, "_lazy", None)
    if lazy is not None:
        from ..store.lazy import ReadThroughArray, ShardPool
        raw, *labels = [ReadThroughArray(lazy["plan"], name, lazy["connections"], lazy["cache_limit"])
                        for name in ["raw", *lazy["labels"]]]
        ds.raw = wrap(raw)
        ds.labels = _StackedLabels([wrap(a) for a in labels]) if len(labels) > 1 else wrap(labels[0])
        box = ds.roi or tuple(slice(0, n) for n in raw.shape)
        ds._pool = ShardPool([raw, *labels], [sl.start for sl in box], [sl.stop for sl in box], ds.sample_shape)
        ds._rng = None
        return
    ds.raw = wrap(ShardedArrayReader(Path(ds.raw_path) / ds.raw_key))
    paths = getattr(ds, "multi_label_paths", None)
    if paths:
        ds.labels = _StackedLabels([wrap(ShardedArrayReader(Path(p) / "labels")) for p in paths])
    else:
        ds.labels = wrap(ShardedArrayReader(Path(ds.label_path) / ds.label_key))


class CachedStoreDataset(SegmentationDataset):
    """A torch-em SegmentationDataset that reads its windows with the cache's fast reader.

    With `min_foreground` (see `get_dataset`), a patch's origin is proposed from the store's
    foreground index (`sampling.ForegroundProposals`) and accepted by its exact foreground count:
    the same distribution as torch-em's rejection sampling, without reading the background."""

    _foreground = None  # ForegroundProposals, or None
    _foreground_weight = 1.0
    _proposing = False
    _fg_rng = None

    def __setstate__(self, state):  # loader workers (spawned) reopen their arrays
        super().__setstate__(state)
        _attach_readers(self)

    def _generator(self) -> np.random.Generator:
        # Seeded from numpy's global state, which torch-em seeds and draws its own boxes from; made
        # anew in each process (a forked loader worker would repeat its parent's draws otherwise).
        if self._fg_rng is None or self._fg_rng[0] != os.getpid():
            self._fg_rng = (os.getpid(), np.random.default_rng(np.random.randint(2**31, size=4)))
        return self._fg_rng[1]

    def _sample_bounding_box(self):
        if not self._proposing:
            return super()._sample_bounding_box()
        fg = self._foreground
        origin = fg.propose(self._generator())
        return tuple(slice(o - lo, o - lo + p) for o, lo, p in zip(origin, fg.box[0], self.sample_shape))

    def _more_foreground(self) -> bool:
        """Whether more candidates can come after max_sampling_attempts rejections (lazy: more shards)."""
        return False

    def _get_desired_raw_and_labels(self):
        fg = self._foreground
        if fg is None or (self._foreground_weight < 1 and self._generator().random() >= self._foreground_weight):
            return super()._get_desired_raw_and_labels()  # uniform over the whole box, as torch-em draws
        # Several entries: each proposal picks a store by its candidate origins, so the accepted
        # patches are uniform over the acceptable patches of all of them.
        group = self._foreground_group or [self]
        rng = self._generator()
        while True:
            for _ in range(self.max_sampling_attempts + 1):
                d = group[0] if len(group) == 1 else group[draw(rng, np.cumsum([g._candidates() for g in group]))]
                found = d._foreground_patch()
                if found is not None:
                    return found
            if not any([g._more_foreground() for g in group]):
                break
        raise RuntimeError(f"no patch with more than {fg.min_fraction} foreground in {self.max_sampling_attempts} "
                           f"proposals from the foreground index ({sum(g._candidates() for g in group)} candidate "
                           f"origins, at most {fg.largest_fraction} foreground): lower min_foreground")

    _foreground_group = None  # the datasets of all entries, when there are several

    def _candidates(self) -> int:
        return self._foreground.candidates

    def _foreground_patch(self):
        """One proposal of this dataset: its labels read and counted, its raw read only if accepted
        (torch-em's `_get_desired_raw_and_labels` reads both first; otherwise the same steps)."""
        self._proposing = True
        try:
            box = self._sample_bounding_box()
        finally:
            self._proposing = False
        labels = self.labels[(slice(None),) + box if self._with_label_channels else box]
        pre_label_transform = getattr(self, "pre_label_transform", None)
        if pre_label_transform is not None:
            labels = pre_label_transform(labels)
        if not self._foreground.accepts(labels, self._with_label_channels):
            return None
        return self.raw[(slice(None),) + box if self._with_channels else box], labels


class LazyStoreDataset(CachedStoreDataset):
    """A dataset over a store that is filled while it is used (`get_dataset(..., lazy=True)`).

    Windows are drawn only where every shard they touch is cached (`lazy.ShardPool`: uniform over
    those windows), while a background `lazy.Prefetcher` in the process that made the dataset
    fetches the box's shards in a seeded random order; loader workers read what it caches.
    `prefetcher` (in that process) tells how far it is and stops it.
    """

    prefetcher = None

    def __getstate__(self):
        state = super().__getstate__()
        for key in ("_pool", "_rng", "prefetcher"):
            state.pop(key, None)
        return state

    def _draw_rng(self) -> np.random.Generator:
        if self._rng is None:
            import torch
            info = torch.utils.data.get_worker_info()
            # In a loader worker torch's per-epoch worker seed (from torch's seed) keeps epochs
            # apart and runs reproducible; in the main process the dataset's seed alone.
            extra = [] if info is None else [info.seed % 2**63]
            self._rng = np.random.default_rng([self._lazy["seed"], self._lazy["index"], *extra])
        return self._rng

    def wait(self, min_shards=None, stall=None) -> bool:
        """Block until `min_shards` shards of this dataset's box (default: its warm-up) are cached;
        False if the prefetcher finished, or nothing new was cached for `stall` seconds, first."""
        pool = self._pool
        want = self._lazy["warmup"] if min_shards is None else min_shards
        if isinstance(want, float):
            want = int(np.ceil(want * len(pool.shards)))
        prefetcher = self.prefetcher
        return pool.wait(want, self._lazy["timeout"] if stall is None else stall,
                         error=(lambda: prefetcher.error) if prefetcher is not None else (lambda: None),
                         finished=(lambda: not prefetcher.running) if prefetcher is not None else (lambda: False))

    def _generator(self) -> np.random.Generator:
        return self._draw_rng()  # proposals too: the same seed, torch seed and cache state, the same patches

    def _warm_up(self):
        if not getattr(self, "_warm", False):
            self.wait()
            self._warm = True

    def _sample_bounding_box(self):
        self._warm_up()
        if self.prefetcher is not None and self.prefetcher.error is not None:
            self.wait()  # raises it
        if self._proposing:
            self._refresh_foreground()
            return super()._sample_bounding_box()
        rng = self._draw_rng()
        window = self._pool.sample(rng)
        if window is None and self.prefetcher is not None and self.prefetcher.running:
            self.wait(1)  # every cached shard was evicted meanwhile: the prefetcher brings more
            window = self._pool.sample(rng)
        if window is None:  # nothing cached holds a window and nothing more is coming: read one through
            window = self._pool.sample(rng, anywhere=True)
        return tuple(slice(w.start - sl.start, w.stop - sl.start)
                     for w, sl in zip(window, self.roi or [slice(0, None)] * len(window)))


    def _candidates(self) -> int:
        self._warm_up()
        return self._foreground.refresh(self._pool.cached()).candidates

    def _more_foreground(self) -> bool:
        # The few shards cached so far may hold only rare acceptable patches: wait for the next one,
        # as long as one can come (the prefetcher runs, here or, for a loader worker, in the process
        # that made the dataset; nothing new for lazy_timeout seconds ends the wait).
        fg = self._foreground
        cached = self._pool.cached(refresh=True)
        if cached != fg.seen:  # more cached since the proposals were made (they are remade once a second)
            fg.refresh(cached, force=True)
            return True
        if len(cached) >= len(self._pool.shards):
            return False
        prefetcher = self.prefetcher
        if prefetcher is not None and prefetcher.owner_pid == os.getpid() and not prefetcher.running:
            return False
        if not self._pool.wait(len(cached) + 1, self._lazy["timeout"],
                               error=(lambda: prefetcher.error) if prefetcher is not None else (lambda: None)):
            return False
        fg.refresh(self._pool.cached(refresh=True), force=True)
        return True

    def _refresh_foreground(self):
        """Proposals over the shards cached now; with none yet, wait for more shards while any can come."""
        fg = self._foreground
        while not fg.refresh(self._pool.cached()).candidates:
            if not self._more_foreground():
                raise ValueError(f"min_foreground={fg.min_fraction}: no patch of the {len(fg.seen)} cached shards "
                                 f"of {self._lazy['plan'].request.experiment} can hold that much foreground (the "
                                 f"most any holds: at most {[round(f, 6) for f in fg.largest_fraction]}), and no "
                                 "more shards are coming; lower min_foreground")


def _fast(ds, label_paths=None, lazy=None, foreground=None):
    """Swap torch-em's zarr-python reads for the fast reader, in this process and in loader workers;
    with `label_paths` (per label, one path per volume), the target has one channel per label.
    lazy: (options, per-source (plan, label array names)) to read through the cache instead.
    foreground: (options, per-source (source, label array names)) to propose patches from the index."""
    inner = list(ds.datasets) if hasattr(ds, "datasets") else [ds]
    for i, d in enumerate(inner):
        if type(d) is not SegmentationDataset:
            # Its own reads are zarr-python's: a lazy store's unfetched shards would be zeros, a
            # damaged shard unnoticed, several labels one. Refused, never left alone.
            raise TypeError(f"torch-em built a {type(d).__name__}, whose reads the package cannot replace; the "
                            "package reads through torch-em's SegmentationDataset (the default of "
                            "default_segmentation_dataset for the package's zarr stores); allowed: torch-em "
                            "versions that build it (pip install 'torch-em>=0.10')")
        # torch-em builds its SegmentationDataset itself (default_segmentation_dataset has no
        # dataset-class hook): the subclass is put on the built object rather than copying torch-em's
        # construction (splits, ROIs, samplers, kwargs) here.
        d.__class__ = CachedStoreDataset
        d.transform = fast_transform(d.transform)
        if label_paths is not None:
            d.multi_label_paths = [group[i] for group in label_paths]
            d._with_label_channels = True
        if lazy is not None:
            options, sources = lazy
            plan, labels = sources[i]
            d.__class__ = LazyStoreDataset
            d._lazy = {**options, "plan": plan, "labels": labels, "index": i}
        _attach_readers(d)
        if foreground is not None:
            fg_options, fg_sources = foreground
            d._foreground = _proposals(d, *fg_sources[i], **fg_options, lazy=lazy is not None)
            d._foreground_weight = fg_options["weight"]
        if lazy is not None:
            from ..store.lazy import Prefetcher
            d.prefetcher = Prefetcher(d._pool.arrays, d._pool.shards, seed=options["seed"] + 1000003 * i,
                                      workers=options["prefetch_workers"], first=d._pool.owners).start()
    if foreground is not None:
        _group_foreground(inner, foreground[1], foreground[0]["split"])
    return ds


def _group_foreground(inner, sources, split):
    """Let the datasets of several entries draw foreground patches as one (see `_get_desired_raw_and_labels`);
    refuse a threshold none of them can meet, naming each entry's largest fraction."""
    if all(getattr(d, "_lazy", None) is None for d in inner) and not any(d._candidates() for d in inner):
        fg = inner[0]._foreground
        shown = fg.min_fraction[0] if len(set(fg.min_fraction)) == 1 else fg.min_fraction
        largest = {f"{s.request.experiment}_{s.request.label}": [round(f, 6) for f in d._foreground.largest_fraction]
                   for d, (s, _) in zip(inner, sources)}
        raise ValueError(f"min_foreground={shown!r}: no {tuple(inner[0].sample_shape)} patch of "
                         f"{', '.join(largest)}{f' ({split} split)' if split else ''} can hold that much foreground; "
                         f"the most any holds is at most {largest} (per label, from the store's foreground index). "
                         "Lower min_foreground, or choose a smaller patch_shape")
    if len(inner) > 1:
        for d in inner:
            d._foreground_group = inner


def _proposals(d, source, label_names, min_foreground, split, weight, lazy=False):
    """The foreground proposals of dataset `d` over `source`'s labels `label_names`; a store
    written before the foreground index is indexed first (once). lazy: over the shards cached
    as patches are drawn (checked then: nothing is cached yet)."""
    from ..store.engine import cache_for
    from ..store.foreground import array_counts, index_array
    from .sampling import CachedForeground, ForegroundProposals
    cache, plan = cache_for(source.plan), source.plan
    shape = plan.arrays[label_names[0]].shape
    roi = d.roi if d.roi is not None else tuple(slice(0, n) for n in shape)
    box = (tuple(sl.indices(n)[0] for sl, n in zip(roi, shape)), tuple(sl.indices(n)[1] for sl, n in zip(roi, shape)))
    if lazy:
        return CachedForeground(cache, label_names, shape, box, tuple(d.sample_shape), min_foreground)
    counts = []
    for name in label_names:
        found, known = array_counts(cache, name, shape)
        if not known.all():
            index_array(cache, name, shape, progress=source.progress)
            found, known = array_counts(cache, name, shape)
        counts.append(found)
    return ForegroundProposals(counts, shape, box, tuple(d.sample_shape), list(min_foreground))


def _check_foreground(min_foreground, sampler, weight, n_labels: int):
    """Check get_dataset's foreground keywords; returns the fractions (None: no foreground sampling)."""
    if min_foreground is None:
        if isinstance(sampler, str):
            raise ValueError(f"sampler={sampler!r} needs min_foreground; allowed: a callable (torch-em's "
                             "sampler=), or min_foreground=<fraction> with sampler 'foreground' or 'rejection'")
        return None
    values = list(min_foreground) if isinstance(min_foreground, (list, tuple)) else [min_foreground]
    if len(values) not in (1, n_labels) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise ValueError(f"min_foreground={min_foreground!r} is not valid; allowed: a fraction in [0, 1), or one "
                         f"per label ({n_labels})")
    if not (sampler is None or isinstance(sampler, str) and sampler in ("foreground", "rejection") or callable(sampler)):
        raise ValueError(f"sampler={sampler!r} is not valid; allowed: 'foreground' (the index proposes, the "
                         "exact count accepts), 'rejection' (torch-em's MinForegroundSampler), or a callable")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"foreground_weight={weight!r} is not valid; allowed: a fraction in [0, 1]")
    return values * (n_labels // len(values))


def _check_warmup(value):
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1
                                       or isinstance(value, float) and 0 < value <= 1):
        raise ValueError(f"warmup={value!r} is not valid; allowed: a number of shards (an integer >= 1) or a "
                         "fraction of the box's shards (a float in (0, 1])")
    return value


def get_dataset(sources, patch_shape: Tuple[int, ...], *, split: Optional[str] = None,
                offsets: Optional[List[List[int]]] = None, boundaries: bool = False, binary: bool = False,
                labels: Optional[Sequence[str]] = None, download: bool = True, lazy: bool = False,
                warmup: Union[int, float] = 1, seed: int = 0, lazy_timeout: float = 60.0,
                min_foreground: Union[float, Sequence[float], None] = None, sampler=None,
                foreground_weight: float = 1.0, **kwargs) -> Dataset:
    """A torch-em segmentation dataset over one or more catalog entries.

    sources: entry names ("p105_psd"), catalog sources, a catalog, or a list of them. Entry
        parameters (bbox_nm, em_mip, seg_mip, cache_dir, base_url, workers, progress) may be passed
        here and apply to entries given by name.
    split: "train" or "val": the catalog's reproducible split of each store along z; None for all.
    offsets / boundaries / binary: label targets for instance (saturated) labels, as in torch-em:
        affinities, boundaries, or a binary foreground mask.
    labels: several label choices at once (e.g. ["psd", "vesicle_cloud"]) as a multi-channel
        target, one channel each, in this order; every source's experiment and box are used.
    download: fetch what is missing (default); if False, a missing store is an error.
    lazy: do not fetch first: patches start as soon as `warmup` shards are cached, drawn only from
        windows whose shards are cached (uniformly among them), while a background prefetcher in
        this process fetches the box's shards in an order seeded by `seed` (loader workers share
        it). Early patches thus come from few shards; the pool grows to the whole box (or moves
        through it under a `cache_limit`). The same seed, torch seed and cache state give the
        same patches. `lazy_timeout`: seconds without a new shard cached before a waiting patch
        stops waiting and reads its window through the cache itself (as it does when the pool
        holds no window and the prefetcher is done, e.g. under a small `cache_limit`).
        `cache_limit` (e.g. "50GB") bounds the store's disk use, evicting least recently used shards.
    warmup: shards to wait for before the first patch: a count, or a fraction of the box's shards.
    min_foreground: keep only patches with more than this fraction of non-zero label voxels (as
        torch-em's `MinForegroundSampler(min_fraction)`); with `labels`, one fraction per label (or
        one for all), every channel must exceed its own. The default `sampler="foreground"` draws
        patch origins uniformly among those whose foreground *upper bound* (from the store's
        foreground index, made while the shards were written) exceeds the threshold, reads the
        patch and accepts it by its exact count: the **same distribution as rejection sampling**
        over the whole box (uniform over the acceptable patches), without reading the background.
        A threshold no patch can meet is an error here, naming the largest fraction the index
        allows, not after 500 reads. `sampler="rejection"`: torch-em's MinForegroundSampler
        itself (for comparison). A callable `sampler` is torch-em's: it is applied on top.
        With lazy=True, origins are proposed among the shards cached so far (as lazy windows are).
    foreground_weight: the fraction of patches drawn with `min_foreground`; the others are drawn
        uniformly from the whole box, untested (for training that also needs background).
    kwargs: everything else goes to `torch_em.default_segmentation_dataset`.
    """
    import torch_em
    from torch_em.data.datasets import util

    _check_keywords(kwargs, "get_dataset")
    entry_params = {k: kwargs.pop(k) for k in ENTRY_PARAMETERS if k in kwargs}
    srcs = resolve_sources(sources, **entry_params)
    _refuse_tables(srcs)
    if lazy:
        _check_warmup(warmup)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is not valid; allowed: a non-negative integer")
    kinds = {s.request.channel().kind for s in srcs}
    if len(kinds) > 1:
        raise ValueError(f"sources mix label kinds {sorted(kinds)}; allowed: entries of one kind "
                         "(binary: psd, vesicle_cloud; instance: saturated)")
    if len(patch_shape) != 3:
        raise ValueError(f"patch_shape={tuple(patch_shape)!r} is not valid; allowed: three sizes (z, y, x)")
    if (offsets is not None or boundaries or binary) and kinds != {"instance"}:
        raise ValueError("offsets, boundaries and binary apply to instance labels (saturated) only; "
                         f"these sources have {sorted(kinds)} labels")
    fractions = _check_foreground(min_foreground, sampler, foreground_weight, len(labels) if labels else 1)
    if callable(sampler):
        kwargs["sampler"] = sampler
    elif sampler == "rejection":
        if len(set(fractions)) > 1:
            raise ValueError(f"sampler='rejection' takes one min_foreground for every channel; got {min_foreground!r}")
        from torch_em.data import MinForegroundSampler
        kwargs["sampler"] = MinForegroundSampler(min_fraction=fractions[0])
    if labels is not None:
        labels = list(labels)
        unknown = [l for l in labels if l not in LABELS]
        if unknown or not labels:
            raise ValueError(f"labels={labels!r} is not valid; allowed: a non-empty list of {list(LABELS)}")
        if offsets is not None or boundaries or binary:
            raise ValueError("labels (several channels) cannot be combined with offsets, boundaries or binary")
        per_label = [[s if l == s.request.label else s.for_label(l) for s in srcs] for l in labels]
        label_paths = [[label_view(s, download, lazy) for s in group] for group in per_label]
        srcs, paths = per_label[0], label_paths[0]
    else:
        paths = [label_view(s, download, lazy) for s in srcs]
    for s in srcs:
        if lazy and s.plan.arrays["raw"].shape != s.plan.arrays[s.plan.label_name].shape:
            raise ValueError(f"lazy=True needs raw and labels on one grid; em_mip={s.request.em_mip} and "
                             f"seg_mip={s.request.seg_mip} give {s.plan.arrays['raw'].shape} and "
                             f"{s.plan.arrays[s.plan.label_name].shape}")
    for s in srcs:  # a patch deeper or wider than the data is padded by torch-em: say so, with the shapes
        shape = s.plan.arrays[s.plan.label_name].shape
        if split is not None:
            roi = split_roi(s, split)
            shape = (len(range(*roi[0].indices(shape[0]))),) + tuple(shape[1:])
        if any(p > n for p, n in zip(patch_shape, shape)):
            warnings.warn(f"patch_shape={tuple(patch_shape)} is larger than the data of "
                          f"{s.request.experiment}_{s.request.label}"
                          f"{f' ({split} split)' if split else ''}, {tuple(shape)} (z, y, x): patches "
                          "will be padded; choose a smaller patch_shape or a larger bbox_nm", UserWarning, stacklevel=2)
    if split is not None:
        kwargs = util.update_kwargs(kwargs, "rois", [split_roi(s, split) for s in srcs])
    if kinds == {"instance"}:
        kwargs = util.update_kwargs(kwargs, "is_seg_dataset", True)
        kwargs, _ = util.add_instance_label_transform(kwargs, add_binary_target=False, binary=binary,
                                                      boundaries=boundaries, offsets=offsets)
        kwargs = fast_label_transforms(kwargs)
    if labels is not None:
        kwargs = util.update_kwargs(kwargs, "is_seg_dataset", True)
    ds = torch_em.default_segmentation_dataset(raw_paths=paths, raw_key="raw", label_paths=paths,
                                               label_key="labels", patch_shape=patch_shape, **kwargs)
    lazy_sources = None
    if lazy:
        options = {"seed": seed, "warmup": warmup, "timeout": float(lazy_timeout),
                   "connections": srcs[0].connections, "cache_limit": srcs[0].cache_limit,
                   "prefetch_workers": srcs[0].workers}
        label_names = [f"labels/{l}" for l in labels] if labels is not None else None
        lazy_sources = (options, [(s.plan, label_names or [s.plan.label_name]) for s in srcs])
    foreground = None
    if fractions is not None and sampler != "rejection":  # "foreground" (the default) or a callable on top
        names = [f"labels/{l}" for l in labels] if labels is not None else None
        foreground = ({"min_foreground": fractions, "split": split, "weight": float(foreground_weight)},
                      [(s, names or [s.plan.label_name]) for s in srcs])
    return _fast(ds, label_paths if labels is not None else None, lazy_sources, foreground)


def get_loader(sources, patch_shape: Tuple[int, ...], batch_size: int, **kwargs) -> DataLoader:
    """A torch DataLoader over `get_dataset(sources, patch_shape, ...)`; DataLoader keywords
    (num_workers, shuffle, ...) and dataset keywords may be mixed, as in torch-em."""
    import inspect
    import torch_em
    from torch_em.data.datasets import util
    loader_keywords = [n for n in inspect.signature(DataLoader).parameters if n not in ("dataset", "batch_size")]
    _check_keywords(kwargs, "get_loader", loader_keywords)
    ds_kwargs, loader_kwargs = util.split_kwargs(torch_em.default_segmentation_dataset, **kwargs)
    for key in (*DATASET_KEYWORDS, *ENTRY_PARAMETERS):
        if key in loader_kwargs:
            ds_kwargs[key] = loader_kwargs.pop(key)
    ds = get_dataset(sources, patch_shape, **ds_kwargs)
    return torch_em.get_data_loader(ds, batch_size=batch_size, **_pin_where_useful(loader_kwargs))


def _pin_where_useful(loader_kwargs: dict) -> dict:
    """torch-em pins batches by default; without an accelerator torch warns on every loader that
    pinning does nothing: pin only where an accelerator is (unless the caller says)."""
    import torch
    if "pin_memory" not in loader_kwargs:
        loader_kwargs = {**loader_kwargs, "pin_memory": torch.cuda.is_available()}
    return loader_kwargs


def label_view(source, download: bool = True, lazy: bool = False) -> str:
    """Path of a zarr group whose `raw` and `labels` are the store's raw and `source`'s label (links).
    lazy: only the arrays' metadata is written (their shards are fetched when read)."""
    from ..store.cache import StoreCache
    from ..store.engine import cache_for, prepare
    cache: StoreCache = cache_for(source.plan)
    names = ["raw", source.plan.label_name]
    if lazy:
        prepare(source.plan, names)
    elif not all(cache.is_complete(n) for n in names):
        if not download:
            raise RuntimeError(f"No cached data at {cache.root} for {source.request.experiment}/"
                               f"{source.request.label}. Set download=True to fetch it.")
        source.materialise()
    return str(cache.label_view(source.request.label))


# -- drop-in replacements for torch_em.data.datasets.electron_microscopy.wildenberg ---------------

def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"Invalid {name}: '{value}'. Choose from {list(allowed)}.")


def get_wildenberg_data(
    path: Union[os.PathLike, str],
    experiment: Literal["p105", "p14"],
    label_choice: Literal["psd", "vesicle_cloud", "saturated"],
    bounding_box: Optional[Tuple[float, ...]] = None,
    em_mip: int = 1,
    seg_mip: int = 0,
    download: bool = False,
) -> str:
    """Cache one Wildenberg experiment and return a zarr path with arrays `raw` and `labels`.

    Same signature and defaults as torch-em's reference; backed by the catalog entry
    `<experiment>_<label_choice>` with `cache_dir=path`. The BossDB base URL comes from
    $WILDENBERG_BOSSDB_URL when set (a mirror or an offline copy).
    """
    _check_choice("experiment", experiment, EXPERIMENTS)
    _check_choice("label_choice", label_choice, LABELS)
    params = dict(cache_dir=str(path), em_mip=em_mip, seg_mip=seg_mip)
    if bounding_box is not None:
        params["bbox_nm"] = list(bounding_box)
    return label_view(entry_source(f"{experiment}_{label_choice}", **params), download)


def get_wildenberg_paths(
    path: Union[os.PathLike, str],
    experiments: Optional[Sequence[str]] = None,
    label_choice: Literal["psd", "vesicle_cloud", "saturated"] = "psd",
    bounding_box: Optional[Tuple[float, ...]] = None,
    em_mip: int = 1,
    seg_mip: int = 0,
    download: bool = False,
) -> List[str]:
    """Paths of the cached stores for `experiments` (default both), as in torch-em's reference."""
    exps = list(experiments) if experiments is not None else list(EXPERIMENTS)
    return [get_wildenberg_data(path, e, label_choice, bounding_box, em_mip, seg_mip, download) for e in exps]


def get_wildenberg_dataset(
    path: Union[os.PathLike, str],
    patch_shape: Tuple[int, int, int],
    experiments: Optional[Sequence[str]] = None,
    label_choice: Literal["psd", "vesicle_cloud", "saturated"] = "psd",
    bounding_box: Optional[Tuple[float, ...]] = None,
    em_mip: int = 1,
    seg_mip: int = 0,
    download: bool = False,
    offsets: Optional[List[List[int]]] = None,
    boundaries: bool = False,
    **kwargs,
) -> Dataset:
    """The Wildenberg 2023 segmentation dataset, as torch-em's reference builds it."""
    import torch_em
    from torch_em.data.datasets import util
    assert len(patch_shape) == 3
    paths = get_wildenberg_paths(path, experiments, label_choice, bounding_box, em_mip, seg_mip, download)
    if label_choice == "saturated":
        kwargs = util.update_kwargs(kwargs, "is_seg_dataset", True)
        kwargs, _ = util.add_instance_label_transform(kwargs, add_binary_target=False, boundaries=boundaries,
                                                      offsets=offsets)
        kwargs = fast_label_transforms(kwargs)
    return _fast(torch_em.default_segmentation_dataset(raw_paths=paths, raw_key="raw", label_paths=paths,
                                                       label_key="labels", patch_shape=patch_shape, **kwargs))


def get_wildenberg_loader(
    path: Union[os.PathLike, str],
    batch_size: int,
    patch_shape: Tuple[int, int, int],
    experiments: Optional[Sequence[str]] = None,
    label_choice: Literal["psd", "vesicle_cloud", "saturated"] = "psd",
    bounding_box: Optional[Tuple[float, ...]] = None,
    em_mip: int = 1,
    seg_mip: int = 0,
    download: bool = False,
    offsets: Optional[List[List[int]]] = None,
    boundaries: bool = False,
    **kwargs,
) -> DataLoader:
    """The DataLoader for the Wildenberg 2023 dataset, as torch-em's reference builds it."""
    import torch_em
    from torch_em.data.datasets import util
    ds_kwargs, loader_kwargs = util.split_kwargs(torch_em.default_segmentation_dataset, **kwargs)
    ds = get_wildenberg_dataset(path=path, patch_shape=patch_shape, experiments=experiments,
                                label_choice=label_choice, bounding_box=bounding_box, em_mip=em_mip,
                                seg_mip=seg_mip, download=download, offsets=offsets, boundaries=boundaries,
                                **ds_kwargs)
    return torch_em.get_data_loader(ds, batch_size=batch_size, **_pin_where_useful(loader_kwargs))
