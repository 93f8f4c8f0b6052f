"""Comparing synapse tables across experiments: counts, densities, size distributions, and a figure."""

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


def plot(tables: dict, path) -> None:
    """Box plots of PSD and paired vesicle-cloud volumes (µm³, log scale) per experiment, side by
    side, with n under each box; synapses touching the box's faces left out, as in `summarise`."""
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
        ax.set_title(title)
    fig.suptitle("Synapses not touching the box's faces")
    fig.savefig(path, dpi=120)
    plt.close(fig)
