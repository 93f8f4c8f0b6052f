"""Shared fixtures: BossDB-layout mirrors written once per session and served on 127.0.0.1."""

import numpy as np
import pytest

import intake
import wildenberg_intake
from wildenberg_intake.mirror import EXPERIMENTS, LABEL_CHANNELS, MirrorServer, build_mirror

SMALL = (300, 260, 20)  # label voxels (x, y, z): ~1.5 MB a label layer, one output shard


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    return build_mirror(tmp_path_factory.mktemp("mirror-raw"), shape_xyz=SMALL)


@pytest.fixture(scope="session")
def server(mirror):
    with MirrorServer(mirror.root) as s:
        yield s


@pytest.fixture(scope="session")
def catalog():
    return intake.open_catalog(wildenberg_intake.catalog_path())


def expected_window(mirror, experiment, channel, mip, bbox_nm, other_layers):
    """What SPEC.md says a store holds, computed independently of the package.

    Clip `bbox_nm` to the intersection of the layers' physical extents, round the start down and
    the end up at this layer's resolution, and cut the mirror's source array there.
    """
    x0, x1, y0, y1, z0, z1 = bbox_nm
    lo, hi = np.array([z0, y0, x0], float), np.array([z1, y1, x1], float)
    for ch, m in other_layers:
        layer = mirror.layer(experiment, ch)
        res = np.array(layer.resolution_xyz[m][::-1], float)
        off = np.array(layer.offset_zyx[m])
        lo = np.maximum(lo, off * res)
        hi = np.minimum(hi, (off + layer.data[m].shape) * res)
    layer = mirror.layer(experiment, channel)
    res = np.array(layer.resolution_xyz[mip][::-1], float)
    start = np.floor(lo / res).astype(int)
    stop = np.ceil(hi / res).astype(int)
    return layer.expected(mip, start, stop), (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])


def all_layers(experiment, em_mip=1, seg_mip=0):
    exp = EXPERIMENTS[experiment]
    return [(exp["em_channel"], em_mip)] + [(ch, seg_mip) for ch, _ in LABEL_CHANNELS.values()]


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """p14 with 3 x 2 output shards per array (1100 x 520 x 16 label voxels)."""
    return build_mirror(tmp_path_factory.mktemp("mirror-wide"), shape_xyz=(1100, 520, 16), experiments=("p14",))


def record_windows(ds):
    """Make a (torch-em) dataset remember the windows it samples: (the inner dataset, the list)."""
    inner = ds.datasets[0] if hasattr(ds, "datasets") else ds  # torch-em wraps lists of paths
    windows, sample = [], inner._sample_bounding_box

    def recording():
        bb = sample()
        windows.append(bb)
        return bb
    inner._sample_bounding_box = recording
    return inner, windows
