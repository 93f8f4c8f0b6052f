"""Independent reference computations shared by tests (plain numpy loops, nothing of the package)."""

import numpy as np


def mean_2x2(a):
    """x and y halved: each output voxel the rounded-half-up mean of its 2 x 2 block, clipped at the edge."""
    z, y, x = a.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), dtype=a.dtype)
    for j in range(out.shape[1]):
        for i in range(out.shape[2]):
            block = a[:, 2 * j:2 * j + 2, 2 * i:2 * i + 2].reshape(z, -1).astype(np.float64)
            out[:, j, i] = np.floor(block.mean(axis=1) + 0.5)
    return out


def mode_2x2(a):
    """x and y halved: each output voxel the most frequent value of its 2 x 2 block, ties to the lowest."""
    z, y, x = a.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), dtype=a.dtype)
    for k in range(z):
        for j in range(out.shape[1]):
            for i in range(out.shape[2]):
                values, counts = np.unique(a[k, 2 * j:2 * j + 2, 2 * i:2 * i + 2], return_counts=True)
                out[k, j, i] = values[np.argmax(counts)]  # unique sorts: the first maximum is the lowest
    return out


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
