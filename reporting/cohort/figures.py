"""Cohort figures: the paper's Figure 1 (participant flow) and Figures 6–8 as PNG bytes (matplotlib, Agg).

Why bytes: the report embeds them in its HTML and also writes them as files; nothing here writes.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from reporting.cohort.collect import FRACTURES, MUSCLE_ORDER, SEX_NAME, display
from reporting.cohort.flow import group_count
from reporting.cohort.statistics import TOTAL, figure8_short_bars

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
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
# Figure 1 is drawn whenever the report is, even with no pair left (it then shows why): not in
# FIGURE_NAMES, whose files an empty report removes.
FLOW_FIGURE = "figure1_flow.png"
FRACTURE_NAME = {"FNF": "Femoral neck fracture (FNF)", "ITF": "Intertrochanteric fracture (ITF)"}


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
    x = np.arange(len(MUSCLE_ORDER))
    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharey=True)
    for ax, fracture, letter in zip(axes, FRACTURES, "AB", strict=True):
        handles = []
        for sex, offset, alpha, hatch in SEX_STYLE:
            data = [
                long.loc[
                    (long["muscle"] == m) & (long["fracture_type"] == fracture) & (long["sex"] == sex),
                    "loss_cm3",
                ].to_numpy()
                for m in MUSCLE_ORDER
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
        ax.set_xticks(x, [display(m) for m in MUSCLE_ORDER], rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        if handles:
            # above the plot, right of the title: no box is hidden behind it
            ax.legend(handles=handles, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=2)
    return fig


def figure8(report: CohortReport) -> Figure:
    """Figure 8: mean loss ratio per muscle, sexes merged, FNF vs ITF (with the total).

    The legend gives each fracture type's n (its total's ``n_FNF``/``n_ITF`` in the CSV); a muscle
    whose bar rests on fewer patients (a 0 cm³ baseline has no ratio) is starred, and the legend
    says on how many, so no bar shrinks silently.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    t = report.loss_ratio_by_fracture
    short = figure8_short_bars(report.long, report.patients)
    starred = {display(c.muscle) for c in short}
    fig, ax = plt.subplots(figsize=(14, 5))
    xx = np.arange(len(t.index))
    for i, fracture in enumerate(f for f in FRACTURES if f in t.columns):
        n = int(t.loc[TOTAL, f"n_{fracture}"])
        ax.bar(
            xx + (i - 0.5) * 0.4,
            t[fracture].to_numpy(),
            width=0.4,
            color=FRACTURE_COLOURS[fracture],
            label=f"({'AB'[i]}) {fracture} (n={n})",
        )
    labels = [f"{m} *" if m in starred else m for m in t.index]
    ax.set_xticks(xx, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean loss ratio (pre − post) / pre (%)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="none", label=f"* {display(c.muscle)}, {c.group}: n={c.n} of {c.of}")
                for c in short]
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("Loss ratio by fracture type, sexes merged")
    return fig


def figures(report: CohortReport) -> dict[str, bytes]:
    """Figure 6 (box plots), 7 (mean loss by subgroup) and 8 (loss ratio by fracture type)."""
    plt = _pyplot()

    long = report.long
    names = [display(m) for m in MUSCLE_ORDER]
    x = np.arange(len(MUSCLE_ORDER))
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
        vals = [means.get((g, m), np.nan) for m in MUSCLE_ORDER]
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

    out["figure8_loss_ratio.png"] = png(figure8(report))
    return out


# ---------------------------------------------------------------- Figure 1: participant flow
# Drawn in inches (the axes span the figure, 1 data unit = 1 inch), so box sizes follow the text.
_LINE_IN = 0.2  # one 10-point line with its spacing
_PAD_IN = 0.22  # a box's padding above and below its text, together
_GAP_IN = 0.3  # vertical space between boxes
_MAIN = (0.3, 4.5)  # left and right edge of the main column's boxes
_SIDE = (5.2, 9.7)  # ... of the exclusion boxes
_WRAP = 46  # characters a box line holds at 10 points


@dataclass(frozen=True)
class _Box:
    """A box of Figure 1: its text lines (the first ``bold`` in bold), edges (x), colour, alignment."""

    lines: tuple[str, ...]
    x: tuple[float, float]
    colour: str
    centred: bool = True
    bold: int = 1

    @property
    def height(self) -> float:
        return len(self.lines) * _LINE_IN + _PAD_IN


def _wrapped(*texts: str) -> tuple[str, ...]:
    return tuple(line for t in texts for line in (textwrap.wrap(t, _WRAP, subsequent_indent="  ") or [""]))


def _draw_box(ax: Axes, box: _Box, top: float) -> None:
    from matplotlib.patches import FancyBboxPatch

    (x0, x1), h = box.x, box.height
    ax.add_patch(FancyBboxPatch((x0, top - h), x1 - x0, h, boxstyle="round,pad=0,rounding_size=0.06",
                                fc=box.colour, ec="0.3", lw=1))
    for i, line in enumerate(box.lines):
        y = top - _PAD_IN / 2 - (i + 0.5) * _LINE_IN
        ax.text((x0 + x1) / 2 if box.centred else x0 + 0.12, y, line, fontsize=10, va="center",
                ha="center" if box.centred else "left", fontweight="bold" if i < box.bold else "normal")


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>", "color": "0.25", "lw": 1.2})


def _exclusion_boxes(flow: pd.DataFrame) -> list[_Box]:
    """One box per exclusion step: its total, then each reason with its count."""
    boxes = []
    for _, step in flow[flow["box"] == "excluded"].iterrows():
        reasons = flow[(flow["box"] == "reason") & (flow["step"] == step["step"])]
        title = _wrapped(f"Excluded: {step['label']}")
        counts = (f"• {r['label']}: {r['n']}" for _, r in reasons.iterrows())
        lines = title + _wrapped(f"n = {step['n']}", *counts)
        boxes.append(_Box(lines, _SIDE, "#f2f2f2", centred=False, bold=len(title)))
    return boxes


def _fracture_box(flow: pd.DataFrame, fracture: str, x: tuple[float, float], colour: str) -> _Box:
    women, men = group_count(flow, f"Female {fracture}"), group_count(flow, f"Male {fracture}")
    return _Box((FRACTURE_NAME[fracture], f"n = {women + men}", f"women {women}, men {men}"), x, colour)


def flow_figure(flow: pd.DataFrame) -> Figure:
    """Figure 1 (participant flow, CONSORT style): every patient at the top, each exclusion step to the
    right with its reasons, the included patients and the FNF and ITF groups (by sex) at the bottom."""
    plt = _pyplot()
    start = flow[flow["box"] == "start"].iloc[0]
    included = flow[flow["box"] == "included"].iloc[0]
    side = _exclusion_boxes(flow)
    first = _Box(_wrapped("Patients measured by the node", f"n = {start['n']}"), _MAIN, "#dbe9f6")
    last = _Box(_wrapped("Included in the tables", f"n = {included['n']}"), _MAIN, "#dbe9f6")
    groups = [_fracture_box(flow, f, x, colour) for f, x, colour in (("FNF", _MAIN, "#f8d7d7"),
                                                                        ("ITF", _SIDE, "#d8efd8"))]
    steps_h = sum(max(b.height, 0.5) + _GAP_IN for b in side)
    total_h = first.height + _GAP_IN + steps_h + last.height + 2 * _GAP_IN + groups[0].height + 0.4
    fig = plt.figure(figsize=(10, total_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, total_h)
    ax.axis("off")
    trunk = (_MAIN[0] + _MAIN[1]) / 2
    top = total_h - 0.2
    _draw_box(ax, first, top)
    y = top - first.height - _GAP_IN
    trunk_top = top - first.height
    for box in side:
        h = max(box.height, 0.5)
        box_top = y - (h - box.height) / 2
        _draw_box(ax, box, box_top)
        mid = box_top - box.height / 2
        ax.plot([trunk, trunk], [trunk_top, mid], color="0.25", lw=1.2)
        _arrow(ax, (trunk, mid), (_SIDE[0], mid))
        trunk_top = mid
        y -= h + _GAP_IN
    _arrow(ax, (trunk, trunk_top), (trunk, y))
    _draw_box(ax, last, y)
    y -= last.height
    fork = y - _GAP_IN
    ax.plot([trunk, trunk], [y, fork], color="0.25", lw=1.2)
    centres = [(b.x[0] + b.x[1]) / 2 for b in groups]
    ax.plot([centres[0], centres[1]], [fork, fork], color="0.25", lw=1.2)
    for box, centre in zip(groups, centres, strict=True):
        _arrow(ax, (centre, fork), (centre, fork - _GAP_IN))
        _draw_box(ax, box, fork - _GAP_IN)
    return fig


def flow_png(flow: pd.DataFrame) -> bytes:
    """Figure 1 as PNG bytes."""
    plt = _pyplot()
    fig = flow_figure(flow)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
