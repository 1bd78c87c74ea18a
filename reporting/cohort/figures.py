"""Cohort figures: the paper's Figures 6–8 as PNG bytes (matplotlib, Agg).

Why bytes: the report embeds them in its HTML and also writes them as files; nothing here writes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from reporting.cohort.collect import FRACTURES, SEX_NAME, display
from seg.labels import ANALYSED_MUSCLES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reporting.cohort.report import CohortReport

GROUP_COLOURS = {
    "Female FNF": "tab:blue",
    "Male FNF": "tab:orange",
    "Female ITF": "tab:green",
    "Male ITF": "tab:red",
}
FRACTURE_COLOURS = {"FNF": "tab:red", "ITF": "tab:green"}
# The names figures() returns: the report removes those a previous run left and this one did not write.
FIGURE_NAMES = ("figure6_boxplots.png", "figure7_bars.png", "figure8_loss_ratio.png")
SEX_STYLE = (("M", -0.2, 0.6, ""), ("F", 0.2, 0.3, "//"))  # Figure 6: sex, offset, alpha, hatch; male left


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure6(report: CohortReport) -> Figure:
    """Figure 6: box plots of per-muscle loss, one panel per fracture type, male left / female right.

    Each panel has a legend naming the sex of each box style (and its n), so neither panel depends
    on the caption to say which boxes are the men's.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    long = report.long
    x = np.arange(len(ANALYSED_MUSCLES))
    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharey=True)
    for ax, fracture, letter in zip(axes, FRACTURES, "AB", strict=True):
        handles = []
        for sex, offset, alpha, hatch in SEX_STYLE:
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
            style = {"facecolor": FRACTURE_COLOURS[fracture], "alpha": alpha, "hatch": hatch}
            for box in bp["boxes"]:
                box.set(**style)
            n = report.group_sizes.get(f"{SEX_NAME[sex]} {fracture}", 0)
            handles.append(Patch(**style, label=f"{SEX_NAME[sex]} {fracture} (n={n})"))
        ax.set_title(f"({letter}) {fracture}: loss per muscle (male left, female right)")
        ax.set_ylabel("loss, pre − post (cm³)")
        ax.set_xticks(x, [display(m) for m in ANALYSED_MUSCLES], rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        if handles:
            # above the plot, right of the title: no box is hidden behind it
            ax.legend(handles=handles, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=2)
    return fig


def figures(report: CohortReport) -> dict[str, bytes]:
    """Figure 6 (box plots), 7 (mean loss by subgroup) and 8 (loss ratio by fracture type)."""
    plt = _pyplot()

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

    out["figure6_boxplots.png"] = png(figure6(report))

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
