"""Independent reference computations shared by tests (plain numpy loops, nothing of the package)."""

import numpy as np


def mean_2x2_loops(a):
    """x and y halved: each output voxel the rounded-half-up mean of its 2 x 2 block, clipped at the edge."""
    z, y, x = a.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), dtype=a.dtype)
    for j in range(out.shape[1]):
        for i in range(out.shape[2]):
            block = a[:, 2 * j:2 * j + 2, 2 * i:2 * i + 2].reshape(z, -1).astype(np.float64)
            out[:, j, i] = np.floor(block.mean(axis=1) + 0.5)
    return out


def mode_2x2_loops(a):
    """x and y halved: each output voxel the most frequent value of its 2 x 2 block, ties to the lowest."""
    z, y, x = a.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), dtype=a.dtype)
    for k in range(z):
        for j in range(out.shape[1]):
            for i in range(out.shape[2]):
                values, counts = np.unique(a[k, 2 * j:2 * j + 2, 2 * i:2 * i + 2], return_counts=True)
                out[k, j, i] = values[np.argmax(counts)]  # unique sorts: the first maximum is the lowest
    return out


def _candidates(a):
    """The four voxels of each 2 x 2 block of `a` (z, y, x) as (4, z, y/2, x/2), edges padded, and
    which of them exist."""
    z, y, x = a.shape
    oy, ox = -(-y // 2), -(-x // 2)
    padded = np.zeros((z, 2 * oy, 2 * ox), a.dtype)
    padded[:, :y, :x] = a
    exists = np.zeros((2 * oy, 2 * ox), bool)
    exists[:y, :x] = True
    values = np.stack([padded[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)])
    valid = np.stack([np.broadcast_to(exists[dy::2, dx::2], (z, oy, ox)) for dy in (0, 1) for dx in (0, 1)])
    return values, valid


def mean_2x2(a):
    """As `mean_2x2_loops`, whole arrays at once (float64 sums; the property test checks one against the other)."""
    values, valid = _candidates(a)
    total = np.where(valid, values, 0).astype(np.float64).sum(axis=0)
    return np.floor(total / valid.sum(axis=0) + 0.5).astype(a.dtype)


def mode_2x2(a):
    """As `mode_2x2_loops`, whole arrays at once: each candidate's count among the block's voxels, the
    largest count, the lowest value holding it."""
    values, valid = _candidates(a)
    counts = np.stack([((values == v) & valid).sum(axis=0) for v in values])
    counts[~valid] = -1
    top = counts.max(axis=0)
    return np.where(counts == top, values, np.iinfo(a.dtype).max).min(axis=0).astype(a.dtype)


def independent_pyramid(base, is_label, levels):
    """Levels 1..`levels` of `base`, each from the one below."""
    out, level = [], base
    for _ in range(levels):
        level = mode_2x2(level) if is_label else mean_2x2(level)
        out.append(level)
    return out


def locate(patch, volume):
    """Every window start of `volume` whose voxels equal `patch`."""
    from numpy.lib.stride_tricks import sliding_window_view
    rows = sliding_window_view(volume[:, :, :], patch.shape[2], axis=2)  # (z, y, x, w)
    first = np.argwhere((rows[: volume.shape[0] - patch.shape[0] + 1] == patch[0, 0]).all(-1))
    return [tuple(p) for p in first if np.array_equal(
        volume[p[0]:p[0] + patch.shape[0], p[1]:p[1] + patch.shape[1], p[2]:p[2] + patch.shape[2]], patch)]
