"""Comparing synapse tables across experiments: counts, densities, size distributions, their
uncertainty (a seeded bootstrap over blocks of the box), a test of the P14 vs P105 difference in
sizes (Mann-Whitney U), and a figure.

What the intervals mean, and what they do not: a bootstrap over blocks of the box (equal blocks of
about a shard, 5.12 x 6.14 x 6.14 µm) resamples the tissue the box holds, so an interval says how much a density
or a median would move with another sample of *this* tissue of the same size; it says nothing of
other animals, other cortical regions or other boxes, and nothing of the automatic annotations'
own errors (a missed or merged PSD counts as the annotation has it). Synapses cut by the box's
faces are counted in densities and left out of sizes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def summarise(tables: dict) -> pd.DataFrame:
    """One row per experiment: synapses, box volume, density per 1000 µm³, and the quartiles of PSD
    and paired vesicle-cloud volumes (µm³) over the synapses that do not touch the box's faces (a cut
    synapse's size is not its size; they are counted, and excluded from sizes only).

    tables: {experiment: (table, box volume in µm³)}."""
    rows = []
    for experiment, (table, box_um3) in tables.items():
        whole = table[~table["touches_box_edge"]]
        clouds = whole.loc[whole["vesicle_cloud_voxels"] > 0, "vesicle_cloud_volume_um3"]
        row = {"experiment": experiment, "synapses": len(table), "box_volume_um3": box_um3,
               "density_per_1000_um3": 1000.0 * len(table) / box_um3 if box_um3 else np.nan,
               "touching_box_edge": int(table["touches_box_edge"].sum()), "sized": len(whole),
               "with_vesicle_cloud": len(clouds)}
        for name, values in (("psd_volume_um3", whole["psd_volume_um3"]), ("vesicle_cloud_volume_um3", clouds)):
            q1, median, q3 = (np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else (np.nan,) * 3)
            row.update({f"{name}_q1": q1, f"{name}_median": median, f"{name}_q3": q3})
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as the text `wildenberg-intake synapses` prints."""
    lines = [f"{'experiment':10s} {'synapses':>8s} {'box µm³':>10s} {'per 1000 µm³':>12s}  "
             f"{'PSD volume µm³ median [q1, q3]':32s} {'vesicle cloud µm³ median [q1, q3]':34s}"]
    for r in summary.itertuples():
        psd = f"{r.psd_volume_um3_median:.5f} [{r.psd_volume_um3_q1:.5f}, {r.psd_volume_um3_q3:.5f}]"
        cloud = (f"{r.vesicle_cloud_volume_um3_median:.5f} [{r.vesicle_cloud_volume_um3_q1:.5f}, "
                 f"{r.vesicle_cloud_volume_um3_q3:.5f}]")
        lines.append(f"{r.experiment:10s} {r.synapses:8d} {r.box_volume_um3:10.1f} {r.density_per_1000_um3:12.1f}  "
                     f"{psd:32s} {cloud:34s}")
    lines.append("Sizes exclude synapses touching the box's faces (cut by it): "
                 + ", ".join(f"{r.experiment} {r.touching_box_edge} of {r.synapses}" for r in summary.itertuples())
                 + "; vesicle-cloud sizes are over synapses with a paired cloud.")
    return "\n".join(lines)


def plot(tables: dict, path, tests: dict | None = None) -> None:
    """Box plots of PSD and paired vesicle-cloud volumes (µm³, log scale) per experiment, side by
    side, with n under each box and, given `size_tests`' result, the Mann-Whitney p in each title;
    synapses touching the box's faces left out, as in `summarise`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
    for ax, (column, title) in zip(axes, (("psd_volume_um3", "PSD volume"),
                                          ("vesicle_cloud_volume_um3", "vesicle cloud volume"))):
        data, names = [], []
        for experiment, (table, _) in tables.items():
            whole = table[~table["touches_box_edge"]]
            values = whole[column] if column == "psd_volume_um3" else \
                whole.loc[whole["vesicle_cloud_voxels"] > 0, column]
            data.append(values.to_numpy())
            names.append(f"{experiment}\nn = {len(values)}")
        ax.boxplot([d if len(d) else [np.nan] for d in data], tick_labels=names, showfliers=True)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title} (µm³)")
        if tests and np.isfinite(tests[column][1]):
            ax.set_title(f"{title}\n(Mann-Whitney p = {tests[column][1]:.3g})")  # one line overflowed the figure
        else:
            ax.set_title(title)
    fig.suptitle("Synapses not touching the box's faces")
    fig.savefig(path, dpi=120)
    plt.close(fig)


BLOCK_NM = (5120.0, 6144.0, 6144.0)  # (z, y, x) nm: one output shard at 40 x 12 x 12 nm
CONFIDENCE = 0.95
MIN_BLOCKS = 20  # below this many blocks the bootstrap's intervals are said to be coarse


def blocks_of(table: pd.DataFrame, bbox_nm) -> tuple[np.ndarray, np.ndarray]:
    """(block of each synapse by its centroid, volume of each block in µm³): the box (x0, x1, y0, y1,
    z0, z1 nm) cut along each axis into the whole number of equal blocks nearest to BLOCK_NM (at
    least one), in C order. Equal blocks, not BLOCK_NM blocks with a sliver at the far edge: a
    sliver drawn alone would give a density of 0 or of thousands."""
    x0, x1, y0, y1, z0, z1 = (float(v) for v in bbox_nm)
    lo, hi = np.array([z0, y0, x0]), np.array([z1, y1, x1])
    counts = np.maximum(1, np.round((hi - lo) / np.array(BLOCK_NM)).astype(int))
    size = (hi - lo) / counts
    where = table[["centroid_z_nm", "centroid_y_nm", "centroid_x_nm"]].to_numpy(dtype=float)
    index = np.clip(np.floor((where - lo) / size).astype(int), 0, counts - 1)
    block = np.ravel_multi_index(tuple(index.T), counts) if len(table) else np.zeros(0, int)
    volume = np.full(int(np.prod(counts)), float(np.prod(size)) / 1e9)
    return block, volume


def bootstrap(table: pd.DataFrame, bbox_nm, n: int = 1000, seed: int = 0) -> dict:
    """Seeded bootstrap over blocks: each round draws as many blocks as the box has, with
    replacement; the density is the synapses of the drawn blocks per 1000 µm³ of them, the medians
    those of the drawn blocks' synapses (counted as often as their block is drawn; cut synapses and
    PSDs without a cloud left out of sizes as in `summarise`). Returns, per statistic, the
    (low, high) percentiles of the rounds for CONFIDENCE, and "blocks": how many blocks the box has
    (with few, the intervals are coarse)."""
    block, volume = blocks_of(table, bbox_nm)
    nb = len(volume)
    per_block = np.bincount(block, minlength=nb)
    whole = ~table["touches_box_edge"].to_numpy(bool)
    psd = table["psd_volume_um3"].to_numpy(float)
    cloud_ok = whole & (table["vesicle_cloud_voxels"].to_numpy() > 0)
    cloud = table["vesicle_cloud_volume_um3"].to_numpy(float)
    rng = np.random.default_rng(seed)
    rounds = {"density_per_1000_um3": [], "psd_volume_um3_median": [], "vesicle_cloud_volume_um3_median": []}
    for _ in range(n):
        drawn = rng.integers(0, nb, nb)
        times = np.bincount(drawn, minlength=nb)[block]  # how often each synapse is drawn
        rounds["density_per_1000_um3"].append(1000.0 * per_block[drawn].sum() / volume[drawn].sum())
        for name, values, keep in (("psd_volume_um3_median", psd, whole),
                                   ("vesicle_cloud_volume_um3_median", cloud, cloud_ok)):
            sample = np.repeat(values[keep], times[keep])
            rounds[name].append(np.median(sample) if len(sample) else np.nan)
    tail = 100 * (1 - CONFIDENCE) / 2
    out = {name: tuple(np.nanpercentile(v, [tail, 100 - tail])) if np.isfinite(v).any() else (np.nan, np.nan)
           for name, v in ((k, np.asarray(v, float)) for k, v in rounds.items())}
    return {**out, "blocks": nb}


def size_tests(tables: dict) -> dict:
    """Mann-Whitney U (two-sided) of PSD and of paired vesicle-cloud volumes between the first two
    experiments of `tables`, over synapses not cut by the box: {column: (U, p, n_a, n_b)}."""
    from scipy.stats import mannwhitneyu
    (a, (ta, *_)), (b, (tb, *_)) = list(tables.items())[:2]
    out = {}
    for column in ("psd_volume_um3", "vesicle_cloud_volume_um3"):
        values = []
        for t in (ta, tb):
            whole = t[~t["touches_box_edge"]]
            if column == "vesicle_cloud_volume_um3":
                whole = whole[whole["vesicle_cloud_voxels"] > 0]
            values.append(whole[column].to_numpy(float))
        if min(len(v) for v in values) == 0:
            out[column] = (np.nan, np.nan, len(values[0]), len(values[1]))
            continue
        result = mannwhitneyu(values[0], values[1], alternative="two-sided")
        out[column] = (float(result.statistic), float(result.pvalue), len(values[0]), len(values[1]))
    return out


def format_comparison(summary: pd.DataFrame, intervals: dict, tests: dict | None) -> str:
    """Intervals and the size tests in plain words, as `wildenberg-intake synapses` prints them."""
    pct = int(round(100 * CONFIDENCE))
    lines = [f"{pct}% intervals (seeded bootstrap over ~5 x 6 x 6 µm blocks of each box: this tissue, not other animals):"]
    for r in summary.itertuples():
        iv = intervals[r.experiment]
        lines.append(f"  {r.experiment}: density {r.density_per_1000_um3:.1f} [{iv['density_per_1000_um3'][0]:.1f}, "
                     f"{iv['density_per_1000_um3'][1]:.1f}] per 1000 µm³; median PSD {r.psd_volume_um3_median:.5f} "
                     f"[{iv['psd_volume_um3_median'][0]:.5f}, {iv['psd_volume_um3_median'][1]:.5f}] µm³; median "
                     f"vesicle cloud {r.vesicle_cloud_volume_um3_median:.5f} [{iv['vesicle_cloud_volume_um3_median'][0]:.5f}, "
                     f"{iv['vesicle_cloud_volume_um3_median'][1]:.5f}] µm³ ({iv['blocks']} block{'s' if iv['blocks'] != 1 else ''}"
                     + ("; too few for a reliable interval: a larger box gives more)" if iv["blocks"] < MIN_BLOCKS
                        else ")"))
    if tests:
        a, b = list(summary["experiment"])[:2]
        for column, words in (("psd_volume_um3", "PSD volumes"), ("vesicle_cloud_volume_um3", "vesicle-cloud volumes")):
            u, p, na, nb = tests[column]
            if not np.isfinite(p):
                lines.append(f"{words}: too few synapses to compare {a} and {b}.")
                continue
            verdict = "differ" if p < 0.05 else "do not differ detectably"
            lines.append(f"{words} of {a} (n = {na}) and {b} (n = {nb}) {verdict} at the 5% level "
                         f"(Mann-Whitney U = {u:.0f}, two-sided p = {p:.3g}).")
    return "\n".join(lines)
