"""A readable summary page as a DICOM Secondary Capture image, for viewers without SR support.

Why an image: every PACS viewer displays a Secondary Capture, while SR rendering is patchy. The page
shows the per-muscle table (left, right, total, index), the total, the height used, the QA warnings,
and, for a follow-up, a bar chart of the signed change per muscle (follow-up minus baseline, in % of
baseline: negative bars are losses, as in the follow-up SR). Numbers come straight from volumes.json
(and the change record), never recomputed differently; a side below the minimum segment size reads
"n/f" (not found), as in the SR, and a muscle whose baseline is below the percentage floor has no bar.

Key images (when the label map is given, as the node does): below the table, three axial levels
(hip, mid-thigh, distal thigh, placed along the femur) and a coronal view, the segmentation blended
over the CT in the SEG's colours (``seg/structures.csv``) with a legend; for a follow-up with the
baseline's CT and labels, the baseline row above the follow-up row and the operated side marked.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from reporting.change import laterality_conflict
from reporting.page_name import page_name
from reporting.rules import RULES, is_found, shown_change
from reporting.seg import algorithm_name, series_description
from reporting.uids import (
    copy_identity,
    date_series,
    output_uid,
    registry_facts,
    source_content,
    source_header,
)
from seg.dates import display_date
from seg.header import SeriesHeader
from seg.height import height_state
from seg.labels import PAPER_ORDER, by_name, reading_order, structures
from seg.metal_proximity import NEAR_METAL_MARK
from seg.records import (
    COMPARABILITY_CODES,
    ChangeRecord,
    ClinicalTimePoint,
    LeftRight,
    ModelInfo,
    ReasonCode,
    TimePoint,
    VolumeRecord,
)
from seg.volume import Volume

SUMMARY_SERIES_NUMBER = 9903
_DPI = 100


def _fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _fmt_side(v: float | None) -> str:
    """A side's volume, or "n/f" when it is below the minimum segment size (no SEG segment)."""
    return "–" if v is None else _fmt(v, RULES.volume_decimals) if is_found(v) else "n/f"


def qa_warnings(volumes: VolumeRecord, header: SeriesHeader, model_info: ModelInfo,
                change: ChangeRecord | None = None, fractured_side: LeftRight | None = None) -> list[str]:
    """Plain-language QA warnings shown on the page (empty when nothing is wrong); with a comparison,
    the notes that make it less comparable (the two CTs' coverage, a baseline older than the
    admission CT, two models), and on any page metal on the side
    the registry does not call operated."""
    out = []
    qa = volumes.qa
    if model_info.demo:
        out.append("DEMO model trained on synthetic phantoms: not for clinical use")
    state = height_state(volumes.height_m, volumes.height_source, header.size_m)
    if state != "present":
        out.append(f"Body height {state}: no height index")
    if qa.metal:
        where = qa.metal_where.side if qa.metal_where else None
        side = {"left": "left side", "right": "right side", "both": "both sides"}.get(str(where),
                                                                                   "side not recorded")
        out.append(f"Metal present ({side}): "
                   + (f"{NEAR_METAL_MARK} muscles next to it, their volumes less reliable"
                      if any_near_metal(volumes, change) else "volumes near it are less reliable"))
    if qa.z_coverage_ok is False:
        out.append("Incomplete craniocaudal coverage")
    if change is not None:
        # the laterality conflict below, for every page
        out += [n.text for n in change.notes
                if n.code in COMPARABILITY_CODES and n.code != ReasonCode.LATERALITY_CONFLICT]
    if (conflict := laterality_conflict(qa, shown_side(change, fractured_side))) is not None:
        out.append(conflict.text)
    ratio = qa.segmented_vs_hu_muscle
    if ratio is not None and not 0.5 <= float(ratio) <= 1.5:
        out.append(f"Segmented muscle is {float(ratio):.2f}x the HU-threshold muscle volume: "
                   "check the segmentation")
    return out


def any_near_metal(volumes: VolumeRecord, change: ChangeRecord | None = None) -> bool:
    """Whether the page marks any analysed muscle side next to the implant (its table or changes)."""
    return (any(e.near_metal("both") for e in volumes.structures if e.name in PAPER_ORDER)
            or (change is not None and any(e.near_metal for e in change.structures if e.name in PAPER_ORDER)))


def _marked(text: str, near: bool | None) -> str:
    return f"{text} {NEAR_METAL_MARK}" if near else text


def _table_rows(volumes: VolumeRecord) -> tuple[list[list[str]], float, float | None]:
    rows = []
    total = 0.0
    total_idx = 0.0
    h = volumes.height_m
    analysed = [e for e in volumes.structures if e.name in PAPER_ORDER]
    for e in sorted(analysed, key=lambda e: reading_order(e.name)):  # the cohort report's order too
        s = structures()[e.label]
        total += e.volume_cm3
        if e.index_cm3_m2 is not None:
            total_idx += e.index_cm3_m2
        found = is_found(e.volume_cm3)
        rows.append([s.display_name, _marked(_fmt_side(e.left_cm3), e.near_metal("left")),
                     _marked(_fmt_side(e.right_cm3), e.near_metal("right")),
                     _fmt_side(e.volume_cm3), _fmt(e.index_cm3_m2) if found else "–"])
    return rows, total, (total_idx if h else None)


def page_table(volumes: VolumeRecord, rows: list[list[str]],
               change: ChangeRecord | None) -> tuple[list[str], list[list[str]]]:
    """The table's heads and rows; a follow-up's also give each side's change in % of baseline, the
    chart's numbers, so a reader need not measure a bar (or tell a 0 % bar from none). A side next to
    the implant is marked (:data:`NEAR_METAL_MARK`): its volume, and its change when it lay next to
    it in either study."""
    heads = ["Muscle", "Left cm³", "Right cm³", "Total cm³", "Index cm³/m²"]
    if change is None:
        return heads, rows
    bars = change_bars(change)
    names = {structures()[e.label].display_name: e.name for e in volumes.structures}
    operated = shown_side(change, None)  # the operated side's column marked as on the key images
    near = {(e.name, e.side) for e in change.structures if e.near_metal}
    return heads + [f"{side.title()} Δ %{' ▼' if side == operated else ''}" for side in ("left", "right")], [
        r + [_marked(_signed(bars.get(names.get(r[0], ""), {}).get(side)), (names.get(r[0]), side) in near)
             for side in ("left", "right")]
        for r in rows]


MINUS = "\u2212"  # the minus sign, as the header's "follow-up − baseline" and the chart's ticks


def _signed(value: float | None) -> str:
    """A change (cm³, or % of baseline as the chart and the SR give it): signed, "–" where there is
    none. A loss reads "−3.0" with the minus sign, as the chart's ticks do, not the shorter hyphen."""
    if value is None:
        return "–"
    text = f"{value if round(value, 1) else 0.0:+.1f}"  # -0.04 is "+0.0", never "-0.0"
    return text.replace("-", MINUS)


def shown_side(change: ChangeRecord | None, fractured_side: LeftRight | None) -> LeftRight | None:
    """The fractured side the page shows: the comparison's (pairing's), else the registry's."""
    return (change.fractured_side if change is not None else None) or fractured_side


def shown_facts(change: ChangeRecord | None, facts: ClinicalTimePoint) -> ClinicalTimePoint:
    """The clinical facts the page's header shows: on a follow-up the comparison's (pairing read them
    from the same registry; the side falls back to the job's), else the job's own reading."""
    if change is None:
        return facts
    # with a surgery date, pairing compares only post-operative studies with the baseline, one on the
    # surgery day included (its implant placed it there)
    return ClinicalTimePoint(fractured_side=shown_side(change, facts.fractured_side),
                             fracture_type=change.fracture_type, surgery_date=change.surgery_date,
                             study_date=change.followup.study_date, surgery_day=TimePoint.POSTOPERATIVE)


def time_point_text(facts: ClinicalTimePoint) -> str | None:
    """The study's place relative to surgery as the header says it: "pre-operative (surgery …)",
    "post-op day N (surgery …)", or only the surgery date when the study cannot be placed; None
    without a surgery date."""
    if not facts.surgery_date:
        return None
    surgery = f"surgery {display_date(facts.surgery_date)}"
    if facts.time_point is TimePoint.PREOPERATIVE:
        return f"pre-operative ({surgery})"
    if facts.time_point is TimePoint.POSTOPERATIVE:
        return f"post-op day {facts.days_since_surgery} ({surgery})"
    return surgery


def _who(header: SeriesHeader, age_years: int | None) -> str:
    """Whom the page is about, as a reader checks a printed or misfiled page against the patient: ID,
    name, sex and age, accession number (each only when the CT's header has it)."""
    parts = [f"Patient ID: {header.patient_id or 'unknown'}"]
    if (name := page_name(header.patient_name)) is not None:
        parts.append(f"Name: {name.text}")
    if sex := (header.sex or "").strip():
        parts.append(f"Sex: {sex}")
    if age_years is not None:
        parts.append(f"Age: {age_years} y")
    if accession := (header.accession_number or "").strip():
        parts.append(f"Accession: {accession}")
    return "     ".join(parts)


def total_change_lines(change: ChangeRecord) -> list[str]:
    """The 21 analysed muscles' change since the baseline, both sides and then each side, the
    operated one marked as in the table (its loss is what the both-sides total halves); figures from
    the volumes as written, as the change SR states them."""
    t = change.total_analysed_muscles
    both = shown_change(t.pre_cm3, t.post_cm3, None)
    if both.delta_cm3 is None:
        return []
    lines = [f"Change of the {t.structures} analysed muscles since then: {_signed(both.delta_cm3)} cm³"
             + (f", {_signed(both.change_pct)} %" if both.change_pct is not None else "")
             + f" of {both.pre_cm3:.1f} cm³ (Δ = follow-up − baseline: negative is a loss)"]
    operated = shown_side(change, None)
    sides = []
    for side_total in change.total_analysed_muscles_by_side:
        s = shown_change(side_total.pre_cm3, side_total.post_cm3, None)
        if s.delta_cm3 is None:
            continue
        mark = " ▼ operated" if side_total.side == operated else ""
        sides.append(f"{side_total.side}{mark}: {s.pre_cm3:.1f} → {s.post_cm3:.1f} cm³"
                     + (f", {_signed(s.change_pct)} %" if s.change_pct is not None else ""))
    if sides:
        lines.append("     ".join(sides))
    return lines


def header_lines(volumes: VolumeRecord, model_info: ModelInfo, header: SeriesHeader,
                 change: ChangeRecord | None, facts: ClinicalTimePoint, muscles: int, total: float,
                 total_idx: float | None) -> list[tuple[str, int, str]]:
    """(text, font size, colour) of the lines under the title: who and when first (the patient ID
    and dates identify the page on a screen full of series), then the totals and the algorithm."""
    shown = shown_facts(change, facts)
    when = [f"Study date: {display_date(header.study_date)}",
            f"Fractured side: {shown.fractured_side or 'not recorded'}"
            + (f" ({shown.fracture_type})" if shown.fracture_type else "")]
    if (placed := time_point_text(shown)) is not None:
        when.append(placed)
    lines = [(_who(header, volumes.age_years), 12, "white"), ("     ".join(when), 12, "white")]
    if change is not None:
        days = change.days_between
        lines.append((f"Compared with the study of {display_date(change.baseline.study_date)}"
                      + (f", {days} days earlier" if days is not None else ""), 11, "white"))
        lines += [(text, 11, "white") for text in total_change_lines(change)]
    h = volumes.height_m
    lines.append((f"{muscles} analysed muscles, both sides: {total:.1f} cm³"
                  + (f"     index {total_idx:.1f} cm³/m²" if total_idx is not None else "")
                  + (f"     height {h:.2f} m ({volumes.height_source or '?'})" if h else "     height: none"),
                  11, "white"))
    lines.append((f"Algorithm: {algorithm_name(model_info)} {model_info.version}", 10, "#bbbbbb"))
    return lines


# Page layout in pixels at _DPI (1 pt = 100/72 px): every text at least 9 pt, about 12 px high.
_PAGE_W = 1024
_MARGIN = 30
_TITLE_H = 36
_LINE_H = 22
_ROW_H = 22
_NAME_W = 220  # "Tensor fasciae latae" at 10 pt, with padding
_NUM_W = 120  # "Index cm³/m²" in bold at 10 pt, with padding; seven columns fit 1024 px
_PAD = 8
_MARK_W = 12  # the near-metal mark and its gap, right of a marked column's numbers
_CHART_H = 486  # the change chart: title, bars, the muscle names below it, the footnote's two lines


_WARNING_CHARS = 110  # a warning line at 11 pt that ends inside the page's right margin


def warning_lines(warnings: list[str]) -> list[str]:
    """The page's warning lines: each warning after "⚠ ", wrapped to the page's width (a long
    comparability note ran off the right edge), its continuation lines indented under its text;
    "QA: no warnings" when there is none."""
    if not warnings:
        return ["QA: no warnings"]
    return [line for w in warnings
            for line in textwrap.wrap(f"⚠ {w}", _WARNING_CHARS, subsequent_indent="    ")]


def page_height(n_lines: int, n_warnings: int, n_rows: int, chart: bool) -> int:
    """Pixels the page needs: no empty band under the table whatever the number of rows."""
    return (_MARGIN + _TITLE_H + _LINE_H * (n_lines + n_warnings) + 12 + _ROW_H * (n_rows + 1)
            + (_CHART_H if chart else 0) + _MARGIN)


def _split_mark(text: str) -> tuple[str, bool]:
    """A cell's number and whether it carries the near-metal mark (:func:`_marked`)."""
    number = text.removesuffix(f" {NEAR_METAL_MARK}")
    return number, number != text


def _draw_table(ax: Any, top: float, heads: list[str], rows: list[list[str]]) -> float:
    """The table in page pixels from ``top``: names left-aligned, numbers right-aligned on their
    decimal places, rows shaded alternately so a row reads across; returns the table's bottom.

    A column with a marked cell keeps the mark's room right of all its numbers and its head, and the
    mark is drawn in it: right-aligned with the number, "294.5 †" put the decimal point a mark's
    width left of its neighbours'."""
    widths = [_NAME_W] + [_NUM_W] * (len(heads) - 1)
    lefts = np.cumsum([_MARGIN] + widths[:-1])
    right = _MARGIN + sum(widths)
    room = [_MARK_W if any(_split_mark(r[c])[1] for r in rows if c < len(r)) else 0
            for c in range(len(heads))]
    for r, cells in enumerate([heads, *rows]):
        y = top + r * _ROW_H
        if r % 2 == 0 and r:
            ax.add_patch(_rect(_MARGIN, y, right - _MARGIN, _ROW_H, "#1c1c1c"))
        for c, cell in enumerate(cells):
            text, mark = _split_mark(cell) if r and c else (cell, False)
            x, ha = ((lefts[c] + _PAD, "left") if c == 0
                     else (lefts[c] + widths[c] - _PAD - room[c], "right"))
            ax.text(x, y + _ROW_H / 2, text, ha=ha, va="center", color="white", fontsize=10,
                    weight="bold" if r == 0 else "normal")
            if mark:
                ax.text(x + 3, y + _ROW_H / 2, NEAR_METAL_MARK, ha="left", va="center", color="white",
                        fontsize=10)
    bottom = top + _ROW_H * (len(rows) + 1)
    ax.hlines([top, top + _ROW_H, bottom], _MARGIN, right, color="#888888", lw=1)
    return bottom


def _rect(x: float, y: float, w: float, h: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=colour, edgecolor="none")


def render_page(volumes: VolumeRecord, model_info: ModelInfo, header: SeriesHeader,
                change: ChangeRecord | None = None,
                facts: ClinicalTimePoint = ClinicalTimePoint()) -> np.ndarray:
    """RGB uint8 page (rows, columns, 3) of :func:`page_figure`, rendered with matplotlib's Agg."""
    return rasterise(page_figure(volumes, model_info, header, change, facts))


def page_figure(volumes: VolumeRecord, model_info: ModelInfo, header: SeriesHeader,
                change: ChangeRecord | None = None,
                facts: ClinicalTimePoint = ClinicalTimePoint()) -> Any:
    """The page: header (patient ID, dates, fractured side and type, time point, totals), QA
    warnings, the table, and for a follow-up the change chart, as tall as they need (laid out in
    pixels, y down).

    ``facts``: the registry's, shown when there is no comparison to take them from."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found, total, total_idx = _table_rows(volumes)
    heads, rows = page_table(volumes, found, change)
    rows = rows or [["(no muscle found)"] + [""] * (len(heads) - 1)]
    lines = header_lines(volumes, model_info, header, change, facts, len(found), total, total_idx)
    warnings = qa_warnings(volumes, header, model_info, change, facts.fractured_side)
    shown = warning_lines(warnings)
    height = page_height(len(lines), len(shown), len(rows), change is not None)
    fig = Figure(figsize=(_PAGE_W / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    ax = fig.add_axes((0, 0, 1, 1))  # the whole page in pixels, y down
    ax.set_xlim(0, _PAGE_W)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.text(_MARGIN, _MARGIN, "Thigh muscle volumes (CT)", color="white", fontsize=16, weight="bold",
            va="top")
    y = _MARGIN + _TITLE_H
    name = page_name(header.patient_name)  # a name in a script the page's font lacks: a font that has it
    family = name.families() if name is not None else None
    for text, size, colour in lines:
        # header values are text: a "$" pair in a name or accession is no matplotlib formula
        ax.text(_MARGIN, y, text, color=colour, fontsize=size, va="top", fontfamily=family, parse_math=False)
        y += _LINE_H
    for w in shown:
        ax.text(_MARGIN, y, w, color="#ffcc00" if warnings else "#88dd88",
                fontsize=11, va="top", parse_math=False)
        y += _LINE_H
    bottom = _draw_table(ax, y + 12, heads, rows)
    if change:
        _change_chart(fig, change, top_px=bottom, height_px=height)
    return fig


def change_bars(change: ChangeRecord) -> dict[str, dict[str, float]]:
    """Per analysed muscle and side, the signed change in % of baseline that the chart plots.

    Follow-up minus baseline of the volumes as written (:func:`reporting.rules.shown_change`, as in the
    change SR), null (no bar) below the baseline floor, so a near-empty baseline cannot dominate.
    """
    names = {s.name for s in structures() if s.analysed}
    data: dict[str, dict[str, float]] = {}
    for e in change.structures:
        pct = shown_change(e.pre_cm3, e.post_cm3, None).change_pct  # as the change SR states it
        if e.name in names and e.side in ("left", "right") and pct is not None:
            data.setdefault(e.name, {})[e.side] = pct
    return data


_CHART_LEFT = 100  # the plot's left edge in page pixels: room for the tick values and the y label


def _change_chart(fig: Any, change: ChangeRecord, top_px: float, height_px: int) -> None:
    """Bar chart under the table (``top_px`` down a page ``height_px`` high): signed change % per
    analysed muscle, left and right side by side; the operated side named in the legend, as its
    table column is marked, and a muscle next to the implant marked after its name, as its change is
    in the table (a bar says nothing of how far to trust it)."""
    names = list(PAPER_ORDER)
    disp = {s.name: s.display_name for s in structures()}
    data = change_bars(change)
    near = {e.name for e in change.structures if e.near_metal and e.side in ("left", "right")}
    operated = shown_side(change, None)
    plot_top, plot_h = top_px + 50, 250  # the title above, the muscle names below
    ax = fig.add_axes((_CHART_LEFT / _PAGE_W, 1 - (plot_top + plot_h) / height_px,
                       (_PAGE_W - _CHART_LEFT - 30) / _PAGE_W, plot_h / height_px))
    ax.set_facecolor("black")
    shown = [n for n in names if n in data]
    x = np.arange(len(shown))
    for off, side, color in ((-0.2, "left", "#4aa3ff"), (0.2, "right", "#ff8c42")):
        ax.bar(x + off, [data[n].get(side, np.nan) for n in shown], width=0.4, color=color,
               label=f"{side} ▼ operated" if side == operated else side)
    ax.axhline(0, color="white", lw=0.8)
    ax.set_xticks(x, [_marked(disp[n], n in near) for n in shown], rotation=60, ha="right", fontsize=9,
                  color="white")
    ax.tick_params(colors="white", labelsize=9)
    ax.set_ylabel("change since baseline (%)", color="white", fontsize=10)
    days = change.days_between
    side = shown_side(change, None)
    ax.set_title(f"Change since {display_date(change.baseline.study_date)}"
                 + (f" ({days} days)" if days is not None else "")
                 + (f", fractured side: {side}" if side else ""), color="white", fontsize=11)
    ax.legend(facecolor="black", labelcolor="white", fontsize=9)
    fig.text(_CHART_LEFT / _PAGE_W, 1 - (top_px + _CHART_H - 12) / height_px,
             "Follow-up minus baseline; negative = loss. Each bar's figure is in the table, where "
             "\"–\" means no bar:\n"
             f"baseline below {RULES.pct_baseline_floor_cm3:g} cm³ or follow-up not found."
             + (f"  {NEAR_METAL_MARK} next to the implant: the least reliable change." if near else ""),
             color="#bbbbbb", fontsize=9, va="bottom", linespacing=1.5)
    for sp in ax.spines.values():
        sp.set_color("#888888")


# Key images: where the three axial levels sit between the top (0) and the bottom (1) of the
# segmented femur (of all labels when the femur is absent): hip, mid-thigh, distal thigh.
KEY_LEVELS: tuple[tuple[str, float], ...] = (("hip", 0.1), ("mid-thigh", 0.5), ("distal thigh", 0.85))
OVERLAY_ALPHA = 0.5
CT_WINDOW = (40.0, 400.0)  # soft-tissue level and width, HU
_ROW_IN = 2.9  # inches per study row of key images
_HEAD_IN = 0.45  # title strip
_LEGEND_IN = 1.3
_WIDTH_IN = 10.24  # as the table page, so the two stack into one image


@dataclass
class KeyStudy:
    """One study's CT and label map for the key images, with its row caption."""

    ct: Volume
    labels: Volume
    caption: str


def slice_z_mm(vol: Volume) -> np.ndarray:
    """Patient z (mm, LPS: larger is cranial) of each slice k, for axial series."""
    k = np.arange(vol.shape[2])
    return vol.affine[2, 2] * k + vol.affine[2, 3]


def key_slices(labels: Volume) -> list[tuple[str, int]]:
    """(level name, slice k) of the hip, mid-thigh and distal thigh levels of this label map.

    Why relative to the femur: the levels then mean the same anatomy in a baseline and a follow-up
    scanned with different coverage.
    """
    arr = labels.array
    femur = arr == by_name("femur").label
    mask = femur if femur.any() else arr > 0
    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    if ks.size == 0:
        ks = np.arange(arr.shape[2])
    z = slice_z_mm(labels)[ks]
    top, bottom = float(z.max()), float(z.min())
    out = []
    for name, frac in KEY_LEVELS:
        target = top - frac * (top - bottom)
        out.append((name, int(ks[np.argmin(np.abs(z - target))])))
    return out


def coronal_row(labels: Volume) -> int:
    """The row j of the coronal view: through the centre of the femora (of all labels without)."""
    femur = labels.array == by_name("femur").label
    mask = femur if femur.any() else labels.array > 0
    js = np.nonzero(mask)[1]
    return int(round(js.mean())) if js.size else labels.shape[1] // 2


def overlay_rgb(ct2d: np.ndarray, lab2d: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """A CT plane in a soft-tissue window with each label blended in its SEG colour (uint8 RGB)."""
    level, width = CT_WINDOW
    grey = np.clip((ct2d.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lut = np.array([s.rgb for s in structures()], dtype=np.float32)
    lab = np.asarray(lab2d, dtype=np.intp)
    on = lab > 0
    rgb[on] = (1.0 - alpha) * rgb[on] + alpha * lut[lab[on]]
    return np.round(rgb).astype(np.uint8)


def _planes(study: KeyStudy) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(title, CT plane, label plane, pixel aspect) for the three axial levels and the coronal view
    of a study in LPS order (:func:`_key_studies`): axial as seen from the feet, coronal from the
    front with the head up, the patient's right on the image's left in both."""
    ct, lab = study.ct.array, study.labels.array
    sx, sy, sz = study.ct.spacing_mm
    out = [(name, ct[:, :, k].T, lab[:, :, k].T, sy / sx) for name, k in key_slices(study.labels)]
    j = coronal_row(study.labels)
    out.append(("coronal", ct[:, j, :].T[::-1], lab[:, j, :].T[::-1], sz / sx))
    return out


def _mark_side(ax: Any, side: LeftRight, word: str = "operated") -> None:
    """Mark the operated (or fractured) side at the top of a panel (the patient's right is on the
    image's left)."""
    image_left = side == "right"
    ax.text(0.02 if image_left else 0.98, 0.97, f"▼ {word} ({side})", transform=ax.transAxes,
            ha="left" if image_left else "right", va="top", color="#ff4040", fontsize=9,
            weight="bold")


def key_images_figure(studies: list[KeyStudy], operated_side: LeftRight | None = None,
                      mark: str = "operated") -> Any:
    """Figure of the key images, one row per study (baseline first), with a colour legend; the
    ``operated_side`` marked on every axial panel, in words ``mark`` ("fractured" on a page without
    a comparison, where the study may precede surgery)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height = _HEAD_IN + _ROW_IN * len(studies) + _LEGEND_IN
    fig = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    fig.text(0.03, 1 - 0.1 / height, "Key images: segmentation over the CT (W400 L40)", color="white",
             fontsize=12, weight="bold", va="top")
    present: set[int] = set()
    for r, study in enumerate(studies):
        bottom = (_LEGEND_IN + _ROW_IN * (len(studies) - 1 - r)) / height
        fig.text(0.01, bottom + _ROW_IN / height / 2, study.caption, color="white", fontsize=10,
                 rotation=90, va="center", parse_math=False)
        for c, (title, ct2d, lab2d, aspect) in enumerate(_planes(study)):
            ax = fig.add_axes((0.04 + c * 0.24, bottom + 0.02 / height, 0.23,
                               (_ROW_IN - 0.3) / height))
            ax.imshow(overlay_rgb(ct2d, lab2d), aspect=aspect, interpolation="nearest")
            ax.set_title(title, color="white", fontsize=10)
            ax.axis("off")
            present.update(int(v) for v in np.unique(lab2d) if v > 0)
            for x, letter in ((0.01, "R"), (0.99, "L")):  # the patient's sides, as viewers mark them
                ax.text(x, 0.5, letter, transform=ax.transAxes, ha="left" if x < 0.5 else "right",
                        va="center", color="white", fontsize=9, weight="bold")
            if operated_side and c < len(KEY_LEVELS):
                _mark_side(ax, operated_side, mark)
    handles = [Patch(facecolor=np.array(s.rgb) / 255.0, label=s.display_name)
               for s in structures() if s.label in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=9, frameon=False,
                   labelcolor="white", bbox_to_anchor=(0.5, 0.0))
    return fig


def rasterise(fig: Any) -> np.ndarray:
    """RGB uint8 pixels of a figure drawn with Agg."""
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3])


def key_images_size(n_studies: int) -> tuple[int, int]:
    """(rows, columns) in pixels of the key-image panel for ``n_studies`` rows of images."""
    height = _HEAD_IN + _ROW_IN * n_studies + _LEGEND_IN
    return int(round(height * _DPI)), int(round(_WIDTH_IN * _DPI))


def _key_studies(ct: Volume, labels: Volume, change: ChangeRecord | None,
                 baseline: tuple[Volume, Volume] | None) -> list[KeyStudy]:
    """The follow-up shows the baseline row above its own; otherwise one row. Each study in LPS order
    (:meth:`seg.volume.Volume.in_lps_order`), so head- and feet-first scans show alike."""
    date = ct.header.study_date or ""
    ct, labels = ct.in_lps_order(), labels.in_lps_order()
    if baseline is None:
        return [KeyStudy(ct, labels, display_date(date) if date else "this study")]
    b_ct, b_labels = baseline
    b_date = b_ct.header.study_date or ((change.baseline.study_date or "") if change else "")
    return [KeyStudy(b_ct.in_lps_order(), b_labels.in_lps_order(),
                     f"pre {display_date(b_date) if b_date else ''}".strip()),
            KeyStudy(ct, labels, f"post {display_date(date) if date else ''}".strip())]


def summary_pixels(ct: Volume, volumes: VolumeRecord, model_info: ModelInfo,
                   change: ChangeRecord | None = None, labels: Volume | None = None,
                   baseline: tuple[Volume, Volume] | None = None,
                   facts: ClinicalTimePoint = ClinicalTimePoint()) -> np.ndarray:
    """The table page with, when the label map is given, the key images below it: pre and post with
    the operated side marked, or this study alone with the fractured side marked when it is known."""
    page = render_page(volumes, model_info, ct.header, change, facts)
    if labels is None:
        return page
    side = shown_side(change, facts.fractured_side)
    mark = "operated" if change is not None and baseline is not None else "fractured"
    keys = rasterise(key_images_figure(_key_studies(ct, labels, change, baseline), side, mark))
    return np.concatenate([page, keys], axis=0)


def build_summary(ct: Volume, volumes: VolumeRecord, model_info: ModelInfo,
                  change: ChangeRecord | None = None, labels: Volume | None = None,
                  baseline: tuple[Volume, Volume] | None = None, replaces_first: bool = False,
                  facts: ClinicalTimePoint = ClinicalTimePoint()) -> Dataset:
    """Secondary Capture of the summary page in the source study (new series).

    With ``labels`` the page also shows the key images; with ``baseline`` (its CT and label map)
    those of both studies, pre above post, the operated side marked. ``facts`` (the registry's,
    :meth:`dicomnode.clinical.registry.Resolved.time_point`): shown on a page without a comparison,
    whose change record would carry them; a page that shows other facts (a side, a fracture type, a
    surgery date) is other content than one that does not, so it has its own UID.
    ``replaces_first``: the page built when a baseline arrived after this study, whose first page
    (instance 1, no comparison) is already in the PACS: it is instance 2 and says which page it
    replaces, so a reader of the series knows which one is current.
    """
    src0 = source_header(ct.source_files)
    if src0 is None:
        raise ValueError("the CT has no source DICOM files: the summary needs the study's identity")
    pixels = summary_pixels(ct, volumes, model_info, change, labels, baseline, facts)
    series_uid = str(ct.header.series_instance_uid or src0.SeriesInstanceUID)
    content = source_content(series_uid, ct.source_sop_uids)
    kind = "SC-summary"
    # One summary series per study; each page content its own instance UID: a page with a comparison
    # (and the baseline's key images) is new content, never a replacement under the earlier page's UID.
    compared = "" if change is None else f"/vs-{change.baseline.series_instance_uid}"
    compared += "/pre-images" if change is not None and baseline is not None else ""
    compared += registry_facts(volumes.height_m, volumes.height_source) + shown_facts(change, facts).key()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src0,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=output_uid(content, model_info, kind + "/series"),
        series_number=SUMMARY_SERIES_NUMBER,
        sop_instance_uid=output_uid(content, model_info, kind + "/instance" + compared),
        instance_number=2 if replaces_first else 1,
        manufacturer="dicomnode",
        patient_orientation=("L", "P"),
        # RLE Lossless: the page is mostly black, 3.6 MB uncompressed and 0.65 MB so (a PACS that
        # takes the FRACTIONAL SEG takes RLE); the same pixels, encoded in about 0.1 s
        transfer_syntax_uid=RLELossless,
    )
    # a page of text, table, chart and images in two planes: no one orientation holds for all of it
    # (L\P fits the axial panels only, and a viewer draws edge markers from it): empty, Type 2C
    sc.PatientOrientation = None
    sc.SeriesDescription = series_description("Thigh muscle summary", model_info)
    if replaces_first and change is not None:
        date = change.baseline.study_date
        sc.ImageComments = (f"Replaces instance 1 of this series: now compared with the study of "
                            f"{display_date(date) if date else 'an earlier date'}, which arrived later")
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    set_both_sides(sc)
    copy_identity(sc, src0, ct.header)
    date_series(sc)
    return sc


def set_both_sides(sc: Dataset) -> Dataset:
    """Say that the page shows both thighs: Image Laterality (0020,0062) "B" (General Image, Type 3,
    R/L/U/B), and no series Laterality (0020,0060).

    Why: series Laterality is Type 2C, required for a paired body part only when Image Laterality is
    absent, and its values are R or L alone; sent empty it means "unknown", which is wrong for a page
    that covers both sides (dciodvfy warns), and either letter would claim one side.
    """
    if "Laterality" in sc:
        del sc.Laterality
    sc.ImageLaterality = "B"
    return sc
