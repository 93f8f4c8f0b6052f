"""The torch adapter: patches equal the cached arrays, transforms match the reference, drop-in works."""

import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.torch
import zarr

torch = pytest.importorskip("torch")
torch_em = pytest.importorskip("torch_em")
from torch_em.data.datasets.electron_microscopy import wildenberg as reference  # noqa: E402

import wildenberg_intake  # noqa: E402
from wildenberg_intake import training  # noqa: E402
from wildenberg_intake.training import transforms  # noqa: E402

from conftest import record_windows  # noqa: E402

BOX = {"p105": [1001, 3007, 805, 2503, 301, 699], "p14": [101, 2990, 95, 2777, 99, 501]}
PATCH = (8, 64, 64)


def identity(x):
    return x


def identity2(x, y):
    return x, y


@pytest.mark.parametrize("entry,split", [("p105_psd", None), ("p14_saturated", None), ("p14_vesicle_cloud", "val")])
def test_patches_equal_the_cached_arrays(entry, split, server, tmp_path):
    experiment, label = entry.split("_", 1)
    patch = (2, 64, 64) if split else PATCH  # the small test box's val split is 2 slices deep
    ds = training.get_dataset(entry, patch, bbox_nm=BOX[experiment], base_url=server.base_url,
                              cache_dir=str(tmp_path), progress=False, split=split,
                              raw_transform=identity, transform=identity2)
    _, windows = record_windows(ds)
    src = training.resolve_sources(entry, bbox_nm=BOX[experiment], base_url=server.base_url,
                                   cache_dir=str(tmp_path))[0]
    group = zarr.open_group(src.materialise(), mode="r")
    raw_all, lab_all = group["raw"][:], group[f"labels/{label}/0"][:]
    roi = training.split_roi(src, split) if split else (slice(None),) * 3
    raw_all, lab_all = raw_all[roi], lab_all[roi]
    if split == "val":
        assert 0 < raw_all.shape[0] < group["raw"].shape[0]
    inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
    from wildenberg_intake.store.reader import ShardedArrayReader
    from elf.wrapper import RoiWrapper
    if split:  # a split reads its ROI of the store through elf's RoiWrapper, over the package's reader
        assert isinstance(inner.raw, RoiWrapper)
        reader = inner.raw.volume
    else:
        reader = inner.raw
    assert isinstance(reader, ShardedArrayReader)
    np.random.seed(0)
    for i in range(4):
        raw, labels = ds[i]
        bb = windows[-1]
        assert raw.shape == (1, *patch) and labels.shape == (1, *patch)
        np.testing.assert_array_equal(raw[0].numpy(), raw_all[bb].astype("float32"))
        np.testing.assert_array_equal(labels[0].numpy(), lab_all[bb].astype("float32"))


def test_split_is_declared_and_disjoint(server, tmp_path):
    src = training.resolve_sources("p14_psd", bbox_nm=BOX["p14"], base_url=server.base_url, cache_dir=str(tmp_path))[0]
    train, val = training.split_roi(src, "train")[0], training.split_roi(src, "val")[0]
    depth = src.plan.arrays["raw"].shape[0]
    assert train.start == 0 and train.stop == val.start and val.stop == depth
    with pytest.raises(ValueError, match=r"split='test' is unknown; allowed: \['train', 'val'\]"):
        training.split_roi(src, "test")


@pytest.fixture(scope="module")
def reference_store(server, tmp_path_factory, request):
    """The reference torch-em module, pointed at the mirror, caching the same box."""
    mp = pytest.MonkeyPatch()
    mp.setattr(reference, "WILDENBERG_S3_BASE", f"precomputed://{server.base_url}")
    request.addfinalizer(mp.undo)
    return tmp_path_factory.mktemp("reference")


@pytest.mark.parametrize("targets", [dict(), dict(boundaries=True), dict(offsets=[[-1, 0, 0], [0, -1, 0], [0, 0, -1]])],
                         ids=["instances", "boundaries", "affinities"])
def test_saturated_targets_match_the_reference(targets, server, tmp_path, reference_store):
    common = dict(patch_shape=PATCH, experiments=["p14"], label_choice="saturated", bounding_box=BOX["p14"],
                  download=True, **targets)
    ref = reference.get_wildenberg_dataset(str(reference_store), **common)
    os.environ["WILDENBERG_BOSSDB_URL"] = server.base_url
    try:
        ours = training.get_wildenberg_dataset(str(tmp_path), **common)
    finally:
        del os.environ["WILDENBERG_BOSSDB_URL"]
    np.random.seed(1), torch.manual_seed(1)
    r_raw, r_lab = ref[0]
    np.random.seed(1), torch.manual_seed(1)
    o_raw, o_lab = ours[0]
    assert (o_raw.shape, o_raw.dtype, o_lab.shape, o_lab.dtype) == (r_raw.shape, r_raw.dtype, r_lab.shape, r_lab.dtype)
    # Same box, same bytes: with the same random state the samples are identical.
    assert torch.equal(o_raw, r_raw) and torch.equal(o_lab, r_lab)


@pytest.mark.parametrize("shape,dtype", [((32, 64, 64), "uint32"), ((1, 40, 50), "uint32"), ((50, 60), "uint8"),
                                         ((9, 10, 11), "bool")])
def test_fast_boundaries_equal_skimage(shape, dtype):
    from skimage.segmentation import find_boundaries
    from torch_em.transform.label import BoundaryTransform
    rng = np.random.default_rng(3)
    # Blocky instances with background, touching objects and ids that reach the array's edges.
    coarse = rng.integers(0, 2 if dtype == "bool" else 7, size=tuple(-(-n // 4) for n in shape))
    labels = np.kron(coarse, np.ones((4,) * len(shape), dtype=int))[tuple(slice(0, n) for n in shape)]
    labels = labels.astype(dtype)
    labels[tuple(rng.integers(0, n, size=20) for n in shape)] = 1  # single-voxel specks
    np.testing.assert_array_equal(transforms.thick_boundaries(labels), find_boundaries(labels, mode="thick"))
    for binary in (False, True):
        expected = BoundaryTransform(add_binary_target=binary)(labels)
        got = transforms.FastBoundaryTransform(add_binary_target=binary)(labels)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_fast_flips_equal_torch_ems_augmentations_under_the_same_seeds():
    from torch_em.transform.augmentation import get_augmentations
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((8, 12, 16)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 8, 12, 16)).astype("float32")  # with a channel axis
    reference_pipeline, fast = get_augmentations(ndim=3), transforms.fast_transform(get_augmentations(ndim=3))
    assert type(fast) is transforms.FastFlips
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        expected = reference_pipeline(raw, labels)
        torch.manual_seed(seed)
        got = fast(raw, labels)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype
            assert torch.equal(g, e), seed
        assert torch.rand(1) == (torch.manual_seed(seed), reference_pipeline(raw, labels), torch.rand(1))[2]
        seen.add(got[0].numpy().tobytes())
    assert len(seen) == 8  # the coin tosses picked every combination of the three axes
    # Anything but kornia's plain 3D flips keeps torch-em's own pipeline.
    other = get_augmentations(ndim=3, transforms=["RandomHorizontalFlip3D", "RandomRotation3D"])
    assert type(transforms.fast_transform(other)) is not transforms.FastFlips


def test_binary_targets_from_instances(server, tmp_path):
    ds = training.get_dataset("p14_saturated", PATCH, binary=True, bbox_nm=BOX["p14"], base_url=server.base_url,
                              cache_dir=str(tmp_path), progress=False, raw_transform=identity, transform=identity2)
    _, windows = record_windows(ds)
    group = zarr.open_group(training.resolve_sources("p14_saturated", bbox_nm=BOX["p14"], base_url=server.base_url,
                                                     cache_dir=str(tmp_path))[0].materialise(), mode="r")
    _, labels = ds[0]
    assert labels.dtype == torch.float32
    np.testing.assert_array_equal(labels[0].numpy(), (group["labels/saturated/0"][windows[-1]] > 0).astype("float32"))
    with pytest.raises(ValueError, match="instance labels"):
        training.get_dataset("p14_psd", PATCH, boundaries=True, base_url=server.base_url, cache_dir=str(tmp_path))


def test_several_experiments_and_a_loader_with_two_workers(server, tmp_path):
    cat = wildenberg_intake.open_catalog(base_url=server.base_url, cache_dir=str(tmp_path))
    sources = [cat.p105_psd(bbox_nm=BOX["p105"], progress=False), cat.p14_psd(bbox_nm=BOX["p14"], progress=False)]
    loader = training.get_loader(sources, PATCH, batch_size=2, num_workers=2, shuffle=True, n_samples=8)
    batches = list(loader)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (2, 1, *PATCH) and y.shape == (2, 1, *PATCH)
        assert x.dtype == torch.float32


def test_mixed_label_kinds_and_bad_sources_are_refused(server, tmp_path):
    with pytest.raises(ValueError, match=r"sources mix label kinds \['binary', 'instance'\]"):
        training.get_dataset(["p14_psd", "p14_saturated"], PATCH, base_url=server.base_url, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"entry 'p15_psd' is unknown"):
        training.get_dataset("p15_psd", PATCH, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"patch_shape=\(64, 64\) is not valid"):
        training.get_dataset("p14_psd", (64, 64), base_url=server.base_url, cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["get_wildenberg_data", "get_wildenberg_paths",
                                  "get_wildenberg_dataset", "get_wildenberg_loader"])
def test_drop_in_signatures_equal_the_reference(name):
    assert inspect.signature(getattr(wildenberg_intake, name)) == inspect.signature(getattr(reference, name))


REFERENCE_SCRIPT = """
import sys
import torch_em
from torch_em.data.datasets.electron_microscopy.wildenberg import get_wildenberg_loader, get_wildenberg_paths

cache, box = sys.argv[1], [101, 2990, 95, 2777, 99, 501]
paths = get_wildenberg_paths(cache, experiments=["p14"], label_choice="psd", bounding_box=box, download=True)
loader = get_wildenberg_loader(cache, batch_size=2, patch_shape=(8, 64, 64), experiments=["p14"],
                               label_choice="psd", bounding_box=box, download=True, num_workers=0)
x, y = next(iter(loader))
ds = torch_em.default_segmentation_dataset(paths, "raw", paths, "labels", (8, 64, 64))
print(len(paths), tuple(x.shape), tuple(y.shape), len(ds), sep="|")
"""


def test_a_reference_training_script_runs_after_changing_its_import(server, tmp_path):
    script = REFERENCE_SCRIPT.replace("from torch_em.data.datasets.electron_microscopy.wildenberg import",
                                      "from wildenberg_intake import")
    assert script != REFERENCE_SCRIPT
    env = dict(os.environ, WILDENBERG_BOSSDB_URL=server.base_url)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    n, x, y, length = done.stdout.strip().splitlines()[-1].split("|")
    assert n == "1" and x == "(2, 1, 8, 64, 64)" == y and int(length) > 0
    # The returned path opens as raw + labels, and raw is a link into the shared store, not a copy.
    path = next(tmp_path.glob("wildenberg2023/*/views/psd.zarr"))
    assert (path / "raw").is_symlink() and (path / "labels").is_symlink()
    assert zarr.open_group(str(path), mode="r")["labels"].dtype == np.uint8


def test_several_label_channels_as_one_target(server, tmp_path):
    ds = training.get_dataset("p105_psd", PATCH, labels=["psd", "vesicle_cloud", "saturated"], bbox_nm=BOX["p105"],
                              base_url=server.base_url, cache_dir=str(tmp_path), progress=False,
                              raw_transform=identity, transform=identity2)
    _, windows = record_windows(ds)
    src = training.resolve_sources("p105_psd", bbox_nm=BOX["p105"], base_url=server.base_url,
                                   cache_dir=str(tmp_path))[0]
    group = zarr.open_group(src.materialise(), mode="r")
    raw, labels = ds[0]
    bb = windows[-1]
    assert labels.shape == (3, *PATCH)
    for c, name in enumerate(["psd", "vesicle_cloud", "saturated"]):
        np.testing.assert_array_equal(labels[c].numpy(), group[f"labels/{name}/0"][bb].astype("float32"))
    np.testing.assert_array_equal(raw[0].numpy(), group["raw"][bb].astype("float32"))
    # Raw is stored once for all three.
    assert sorted(group["labels"].group_keys()) == ["psd", "saturated", "vesicle_cloud"]
    loader = training.get_loader("p105_psd", PATCH, batch_size=2, num_workers=2, labels=["psd", "vesicle_cloud"],
                                 bbox_nm=BOX["p105"], base_url=server.base_url, cache_dir=str(tmp_path),
                                 progress=False, n_samples=4)
    shapes = [tuple(y.shape) for _, y in loader]
    assert shapes == [(2, 2, *PATCH)] * 2
    with pytest.raises(ValueError, match=r"labels=\['psd', 'synapse'\] is not valid"):
        training.get_dataset("p105_psd", PATCH, labels=["psd", "synapse"], base_url=server.base_url,
                             cache_dir=str(tmp_path))


def test_a_patch_larger_than_the_data_warns_naming_the_shapes(server, tmp_path):
    with pytest.warns(UserWarning, match=r"patch_shape=\(64, 64, 64\) is larger than the data of p14_psd, "
                                         r"\(\d+, \d+, \d+\) \(z, y, x\): patches will be padded"):
        training.get_dataset("p14_psd", (64, 64, 64), bbox_nm=BOX["p14"], base_url=server.base_url,
                             cache_dir=str(tmp_path), progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="patch_shape")  # a patch that fits says nothing of it
        training.get_dataset("p14_psd", PATCH, bbox_nm=BOX["p14"], base_url=server.base_url,
                             cache_dir=str(tmp_path), progress=False)
