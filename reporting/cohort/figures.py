"""Cohort figures: the paper's Figures 6–8 as PNG bytes (matplotlib, Agg).

Why bytes: the report embeds them in its HTML and also writes them as files; nothing here writes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from reporting.cohort.collect import FRACTURES, display
from seg.labels import ANALYSED_MUSCLES

if TYPE_CHECKING:
    from reporting.cohort.report import CohortReport

GROUP_COLOURS = {
    "Female FNF": "tab:blue",
    "Male FNF": "tab:orange",
    "Female ITF": "tab:green",
    "Male ITF": "tab:red",
}
FRACTURE_COLOURS = {"FNF": "tab:red", "ITF": "tab:green"}


def figures(report: CohortReport) -> dict[str, bytes]:
    """Figure 6 (box plots), 7 (mean loss by subgroup) and 8 (loss ratio by fracture type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = report.long
    names = [display(m) for m in ANALYSED_MUSCLES]
    x = np.arange(len(ANALYSED_MUSCLES))
    out: dict[str, bytes] = {}

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    # Figure 6: box plots of per-muscle loss, one panel per fracture type, male left / female right.
    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharey=True)
    for ax, fracture, letter in zip(axes, FRACTURES, "AB", strict=True):
        for offset, sex, hatch in ((-0.2, "M", ""), (0.2, "F", "//")):
            data = [
                long.loc[
                    (long["muscle"] == m) & (long["fracture_type"] == fracture) & (long["sex"] == sex),
                    "loss_cm3",
                ].to_numpy()
                for m in ANALYSED_MUSCLES
            ]
            if not any(len(d) for d in data):
                continue
            bp = ax.boxplot(
                [d if len(d) else [np.nan] for d in data],
                positions=x + offset,
                widths=0.35,
                patch_artist=True,
                showfliers=True,
            )
            for box in bp["boxes"]:
                box.set(facecolor=FRACTURE_COLOURS[fracture], alpha=0.6 if sex == "M" else 0.3, hatch=hatch)
        ax.set_title(f"({letter}) {fracture}: loss per muscle (male left, female right)")
        ax.set_ylabel("loss, pre − post (cm³)")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
    out["figure6_boxplots.png"] = png(fig)

    # Figure 7: mean loss per muscle, four subgroups.
    fig, ax = plt.subplots(figsize=(14, 5))
    means = long.groupby(["group", "muscle"])["loss_cm3"].mean()
    order = ["Female FNF", "Male FNF", "Female ITF", "Male ITF"]
    for i, g in enumerate(order):
        if g not in means.index.get_level_values(0):
            continue
        vals = [means.get((g, m), np.nan) for m in ANALYSED_MUSCLES]
        ax.bar(
            x + (i - 1.5) * 0.2,
            vals,
            width=0.2,
            color=GROUP_COLOURS[g],
            label=f"({'ABCD'[i]}) {g} (n={report.group_sizes.get(g, 0)})",
        )
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean loss (cm³)")
    ax.legend(fontsize=8)
    ax.set_title("Mean muscle volume loss by subgroup")
    out["figure7_bars.png"] = png(fig)

    # Figure 8: loss ratio, sexes merged, FNF vs ITF (with the total).
    t = report.loss_ratio_by_fracture
    fig, ax = plt.subplots(figsize=(14, 5))
    xx = np.arange(len(t.index))
    for i, fracture in enumerate(t.columns):
        n = int((report.patients["fracture_type"] == fracture).sum())
        ax.bar(
            xx + (i - 0.5) * 0.4,
            t[fracture].to_numpy(),
            width=0.4,
            color=FRACTURE_COLOURS[fracture],
            label=f"({'AB'[i]}) {fracture} (n={n})",
        )
    ax.set_xticks(xx, list(t.index), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean loss ratio (pre − post) / pre (%)")
    ax.legend(fontsize=8)
    ax.set_title("Loss ratio by fracture type, sexes merged")
    out["figure8_loss_ratio.png"] = png(fig)
    return out
