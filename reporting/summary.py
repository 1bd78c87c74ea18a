"""A readable summary page as a DICOM Secondary Capture image, for viewers without SR support.

Why an image: every PACS viewer displays a Secondary Capture, while SR rendering is patchy. The page
shows the per-muscle table (left, right, total, index), the total, the height used, the QA warnings,
and, for a follow-up, a bar chart of the signed change per muscle (follow-up minus baseline, in % of
baseline: negative bars are losses, as in the follow-up SR). Numbers come straight from volumes.json
(and the change record), never recomputed differently; a side below the minimum segment size reads
"n/f" (not found), as in the SR, and a muscle whose baseline is below the percentage floor has no bar.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from reporting.rules import RULES, is_found
from reporting.seg import algorithm_name
from reporting.uids import copy_identity, output_uid, source_content, source_header
from seg.labels import structures
from seg.volume import Volume

SUMMARY_SERIES_NUMBER = 9903
_DPI = 100


def _fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _fmt_side(v: float | None) -> str:
    """A side's volume, or "n/f" when it is below the minimum segment size (no SEG segment)."""
    return "–" if v is None else _fmt(v, RULES.volume_decimals) if is_found(v) else "n/f"


def qa_warnings(volumes: dict, meta: dict, model_info: dict) -> list[str]:
    """Plain-language QA warnings shown on the page (empty when nothing is wrong)."""
    out = []
    qa = volumes.get("qa") or {}
    if model_info.get("demo"):
        out.append("DEMO model trained on synthetic phantoms: not for clinical use")
    if not volumes.get("height_m"):
        size = meta.get("PatientSize")
        out.append("Body height implausible: no height index" if size not in (None, "")
                   else "Body height missing: no height index")
    if qa.get("metal"):
        where = (qa.get("metal_where") or {}).get("side")
        out.append("Metal present" + (f" ({where} side)" if where else "")
                   + ": volumes near it are less reliable")
    if qa.get("z_coverage_ok") is False:
        out.append("Incomplete craniocaudal coverage")
    ratio = qa.get("segmented_vs_hu_muscle")
    if ratio is not None and not 0.5 <= float(ratio) <= 1.5:
        out.append(f"Segmented muscle is {float(ratio):.2f}x the HU-threshold muscle volume: "
                   "check the segmentation")
    return out


def _table_rows(volumes: dict) -> tuple[list[list[str]], float, float | None]:
    rows = []
    total = 0.0
    total_idx = 0.0
    h = volumes.get("height_m")
    muscles = {s.label for s in structures() if s.analysed}
    for e in sorted(volumes.get("structures", []), key=lambda e: int(e["label"])):
        if int(e["label"]) not in muscles:
            continue
        s = structures()[int(e["label"])]
        total += float(e["volume_cm3"])
        if e.get("index_cm3_m2") is not None:
            total_idx += float(e["index_cm3_m2"])
        found = is_found(e.get("volume_cm3"))
        rows.append([s.display_name, _fmt_side(e.get("left_cm3")), _fmt_side(e.get("right_cm3")),
                     _fmt_side(e.get("volume_cm3")), _fmt(e.get("index_cm3_m2")) if found else "–"])
    return rows, total, (total_idx if h else None)


def render_page(volumes: dict, model_info: dict, meta: dict, change: dict | None = None) -> np.ndarray:
    """RGB uint8 page (rows, columns, 3) rendered with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, total, total_idx = _table_rows(volumes)
    fig = Figure(figsize=(10.24, 13.0 if change else 10.24), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    top = fig.add_axes((0.03, 0.45 if change else 0.12, 0.94, 0.47 if change else 0.8))
    top.axis("off")
    h = volumes.get("height_m")
    title = "Thigh muscle volumes (CT)"
    sub = (f"Total of {len(rows)} analysed muscles: {total:.1f} cm³"
           + (f"   index {total_idx:.1f} cm³/m²" if total_idx is not None else "")
           + (f"   height {h:.2f} m ({volumes.get('height_source') or '?'})" if h else "   height: none"))
    fig.text(0.03, 0.975, title, color="white", fontsize=16, weight="bold", va="top")
    fig.text(0.03, 0.955, sub, color="white", fontsize=10, va="top")
    fig.text(0.03, 0.94, f"Algorithm: {algorithm_name(model_info)} {model_info.get('version', '')}",
             color="#bbbbbb", fontsize=9, va="top")
    table = top.table(cellText=rows or [["(no muscle found)", "", "", "", ""]],
                      colLabels=["Muscle", "Left cm³", "Right cm³", "Total cm³", "cm³/m²"],
                      loc="upper center", cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.15)
    for cell in table.get_celld().values():
        cell.set_facecolor("black")
        cell.set_edgecolor("#555555")
        cell.get_text().set_color("white")
    warnings = qa_warnings(volumes, meta, model_info)
    y = 0.43 if change else 0.1
    for w in warnings or ["QA: no warnings"]:
        fig.text(0.03, y, ("⚠ " if warnings else "") + w, color="#ffcc00" if warnings else "#88dd88",
                 fontsize=10, va="top")
        y -= 0.018
    if change:
        _change_chart(fig, change)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3])


def change_bars(change: dict) -> dict[str, dict[str, float]]:
    """Per analysed muscle and side, the signed change in % of baseline that the chart plots.

    ``change_pct`` of the change record: follow-up minus baseline, null (no bar) below the baseline
    floor, so a near-empty baseline cannot dominate the chart.
    """
    names = {s.name for s in structures() if s.analysed}
    data: dict[str, dict[str, float]] = {}
    for e in change.get("structures", []):
        if e.get("name") in names and e.get("side") in ("left", "right") and e.get("change_pct") is not None:
            data.setdefault(e["name"], {})[e["side"]] = float(e["change_pct"])
    return data


def _change_chart(fig, change: dict) -> None:
    """Bar chart: signed change % per analysed muscle, left and right side by side."""
    names = [s.name for s in structures() if s.analysed]
    disp = {s.name: s.display_name for s in structures()}
    data = change_bars(change)
    ax = fig.add_axes((0.08, 0.1, 0.88, 0.22))
    ax.set_facecolor("black")
    shown = [n for n in names if n in data]
    x = np.arange(len(shown))
    for off, side, color in ((-0.2, "left", "#4aa3ff"), (0.2, "right", "#ff8c42")):
        ax.bar(x + off, [data[n].get(side, np.nan) for n in shown], width=0.4, color=color, label=side)
    ax.axhline(0, color="white", lw=0.8)
    ax.set_xticks(x, [disp[n] for n in shown], rotation=60, ha="right", fontsize=7, color="white")
    ax.tick_params(colors="white")
    ax.set_ylabel("change since baseline (%)", color="white")
    days = change.get("days_between")
    base = (change.get("baseline") or {}).get("study_date") or "?"
    ax.set_title(f"Change since {base}" + (f" ({days} days)" if days is not None else "")
                 + (f", fractured side: {change['fractured_side']}" if change.get("fractured_side") else ""),
                 color="white", fontsize=10)
    ax.legend(facecolor="black", labelcolor="white", fontsize=8)
    fig.text(0.08, 0.015, f"Follow-up minus baseline; negative = loss. No bar: baseline below "
             f"{RULES.pct_baseline_floor_cm3:g} cm³ or follow-up not found.", color="#bbbbbb", fontsize=8)
    for sp in ax.spines.values():
        sp.set_color("#888888")


def build_summary(ct: Volume, volumes: dict, model_info: dict, change: dict | None = None) -> Dataset:
    """Secondary Capture of the summary page in the source study (new series)."""
    src0 = source_header(ct.source_files)
    if src0 is None:
        raise ValueError("the CT has no source DICOM files: the summary needs the study's identity")
    pixels = render_page(volumes, model_info, ct.meta, change)
    series_uid = str(ct.meta.get("SeriesInstanceUID") or src0.SeriesInstanceUID)
    content = source_content(series_uid, ct.source_sop_uids)
    kind = "SC-summary"  # with or without a comparison: a re-run replaces the page, never adds one
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src0,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=output_uid(content, model_info, kind + "/series"),
        series_number=SUMMARY_SERIES_NUMBER,
        sop_instance_uid=output_uid(content, model_info, kind + "/instance"),
        instance_number=1,
        manufacturer="dicomnode",
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = ("Thigh muscle summary" + (" DEMO" if model_info.get("demo") else ""))[:64]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        sc.Laterality = None  # Type 2C in General Series for a PATIENT-frame image: present, empty
    copy_identity(sc, src0, ct.meta)
    return sc
