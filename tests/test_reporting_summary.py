"""Readable summary (Secondary Capture) and cross-object consistency: dciodvfy accepts the page,
dcentvfy finds no patient/study inconsistency across the CT and every output of a study."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_reporting_seg import MODEL, VENV_BIN, dciodvfy_errors, phantom_case

from reporting.change import compute_change
from reporting.followup_sr import build_followup_sr
from reporting.seg import build_seg_frames
from reporting.sr import build_measurement_sr
from reporting.summary import (
    _MARGIN,
    _PAD,
    MINUS,
    _signed,
    _table_rows,
    build_summary,
    change_bars,
    header_lines,
    page_figure,
    page_table,
    qa_warnings,
    render_page,
    total_change_lines,
)
from reporting.uids import derived_uid
from seg.dates import display_date
from seg.header import SeriesHeader
from seg.records import (
    ChangeRecord,
    ClinicalTimePoint,
    MetalLocation,
    ModelInfo,
    Reason,
    ReasonCode,
    StructureChange,
    StructureVolume,
    StudyRef,
    TimePoint,
    VolumeQA,
    VolumeRecord,
)

PATIENT = {"patient_id": "SUM0001", "patient_name": "Summary^Test", "sex": "M", "height_m": 1.75}


def dcentvfy_problems(paths: list[Path]) -> list[str]:
    out = subprocess.run([str(VENV_BIN / "dcentvfy"), *map(str, paths)], capture_output=True, text=True,
                         timeout=300)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") or "nconsisten" in line]


def _outputs(root: Path, **opts):
    ct, labels, vols = phantom_case(root, **opts)
    seg = build_seg_frames(ct, labels, vols, MODEL).dataset
    lab = build_seg_frames(ct, labels, vols, MODEL, seg_type="LABELMAP").dataset
    sr = build_measurement_sr(ct, seg, vols, MODEL)
    paths = []
    for ds, name in ((seg, "seg.dcm"), (lab, "labelmap.dcm"), (sr, "sr.dcm")):
        ds.save_as(root / name, enforce_file_format=True)
        paths.append(root / name)
    return ct, vols, seg, sr, paths


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    b = tmp_path_factory.mktemp("sum_base")
    f = tmp_path_factory.mktemp("sum_follow")
    b_ct, b_vols, b_seg, b_sr, b_paths = _outputs(b, seed=8, study_date="20240110", **PATIENT)
    f_ct, f_vols, f_seg, f_sr, f_paths = _outputs(
        f, seed=8, study_date="20240410", postop=True, implant_side="right",
        atrophy={"gluteus_maximus": 0.85}, study_uid=derived_uid("test", "sum-fu-study"),
        series_uid=derived_uid("test", "sum-fu-series"), **PATIENT)

    def ref(c, s, r):
        return StudyRef(study_instance_uid=c.header.study_instance_uid, study_date=c.header.study_date,
                        series_instance_uid=c.header.series_instance_uid,
                        seg_sop_instance_uid=s.SOPInstanceUID, sr_sop_instance_uid=r.SOPInstanceUID)

    change = compute_change(b_vols, f_vols, 1.75, ref(b_ct, b_seg, b_sr), ref(f_ct, f_seg, f_sr),
                            patient_id=f_ct.header.patient_id, fractured_side="right")
    b_sum = build_summary(b_ct, b_vols, MODEL)
    f_sum = build_summary(f_ct, f_vols, MODEL, change=change)
    f_fsr = build_followup_sr(f_ct, change, [b_seg, b_sr], model_info=MODEL)
    for ds, root, name in ((b_sum, b, "summary.dcm"), (f_sum, f, "summary.dcm"), (f_fsr, f, "followup.dcm")):
        ds.save_as(root / name, enforce_file_format=True)
    # the follow-up set includes the baseline CT, SEG and SR the follow-up SR cites (same patient)
    f_all = [*f_paths, f / "summary.dcm", f / "followup.dcm", b / "seg.dcm", b / "sr.dcm", *b_ct.source_files]
    return {"b": (b, b_ct, b_vols, b_sum, [*b_paths, b / "summary.dcm"]),
            "f": (f, f_ct, f_vols, f_sum, f_all), "change": change}


def dciodvfy_warnings(path: Path) -> list[str]:
    out = subprocess.run([str(VENV_BIN / "dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Warning")]


@pytest.mark.parametrize("which", ["b", "f"])
def test_summary_passes_dciodvfy(studies, which):
    root, _, _, ds, _ = studies[which]
    assert dciodvfy_errors(root / "summary.dcm") == []
    assert dciodvfy_warnings(root / "summary.dcm") == []  # an empty Laterality drew one
    px = ds.pixel_array
    assert px.ndim == 3 and px.shape[2] == 3 and px.dtype == np.uint8
    assert px.std() > 5  # something was drawn


@pytest.mark.parametrize("which", ["b", "f"])
def test_dcentvfy_no_patient_study_inconsistency(studies, which):
    root, ct, _, _, outputs = studies[which]
    assert dcentvfy_problems([*ct.source_files, *outputs]) == []


def test_summary_in_source_study_with_stable_uids(studies):
    _, ct, vols, ds, _ = studies["b"]
    again = build_summary(ct, vols, MODEL)
    assert ds.StudyInstanceUID == ct.header.study_instance_uid
    assert ds.PatientID == ct.header.patient_id
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    _, f_ct, f_vols, with_change, _ = studies["f"]
    assert with_change.SOPInstanceUID != ds.SOPInstanceUID  # another series, another page
    # the follow-up page without the comparison is other content: same series, its own instance UID
    alone = build_summary(f_ct, f_vols, MODEL)
    assert alone.SeriesInstanceUID == with_change.SeriesInstanceUID
    assert alone.SOPInstanceUID != with_change.SOPInstanceUID


def test_summary_says_it_shows_both_sides(studies):
    """The page covers both thighs: Image Laterality B; no series Laterality, which could only say R or
    L (or, empty, "unknown") and is not required once Image Laterality is present."""
    for which in ("b", "f"):
        ds = studies[which][3]
        assert ds.ImageLaterality == "B"
        assert "Laterality" not in ds


def test_pre_operative_page_shows_the_registrys_fractured_side(studies):
    """A page without a comparison shows the fractured side it is given (the registry's), and says
    when there is none; a page with a side is other content, under its own UID."""
    _, ct, vols, without, _ = studies["b"]
    left = ClinicalTimePoint(fractured_side="left")
    lines = header_lines(vols, MODEL, ct.header, None, left, 21, 1.0, None)
    assert "Fractured side: left" in lines[1][0]
    unknown = header_lines(vols, MODEL, ct.header, None, ClinicalTimePoint(), 21, 1.0, None)
    assert "Fractured side: not recorded" in unknown[1][0]
    with_side = build_summary(ct, vols, MODEL, facts=left)
    assert with_side.SeriesInstanceUID == without.SeriesInstanceUID
    assert with_side.SOPInstanceUID != without.SOPInstanceUID
    assert not np.array_equal(with_side.pixel_array, without.pixel_array)
    change = studies["change"]  # a comparison's side wins: pairing took it from the same registry
    compared = header_lines(vols, MODEL, ct.header, change, left, 21, 1.0, None)
    assert "Fractured side: right" in compared[1][0]


def test_page_without_comparison_shows_the_registrys_fracture_and_time_point(studies):
    """The pre-operative page's header gives the fracture type and the surgery date as the follow-up
    page's does, and says the study is pre-operative; a post-operative study without a comparison
    gives its post-operative day; a surgery date that cannot place the study (no study date) is shown
    alone; facts the registry lacks are not shown. Each fact shown is in the page's UID."""
    _, ct, vols, without, _ = studies["b"]  # the baseline CT of 2024-01-10

    def when(facts: ClinicalTimePoint) -> str:
        return header_lines(vols, MODEL, ct.header, None, facts, 21, 1.0, None)[1][0]

    pre = ClinicalTimePoint(fractured_side="right", fracture_type="FNF", surgery_date="20240112",
                            study_date="20240110")
    assert when(pre) == ("Study date: 2024-01-10     Fractured side: right (FNF)     "
                         "pre-operative (surgery 2024-01-12)")
    post = pre.model_copy(update={"surgery_date": "20240102"})
    assert when(post).endswith("Fractured side: right (FNF)     post-op day 8 (surgery 2024-01-02)")
    # on the surgery day, where pairing's metal rule placed it (dicomnode.clinical.surgery_day)
    same_day = pre.model_copy(update={"surgery_date": "20240110"})
    assert when(same_day).endswith("Fractured side: right (FNF)     surgery 2024-01-10")  # not placed
    for placed, text in ((TimePoint.PREOPERATIVE, "pre-operative"),
                         (TimePoint.POSTOPERATIVE, "post-op day 0")):
        assert when(same_day.model_copy(update={"surgery_day": placed})).endswith(
            f"{text} (surgery 2024-01-10)")
    undated = pre.model_copy(update={"study_date": None})
    assert when(undated).endswith("Fractured side: right (FNF)     surgery 2024-01-12")
    assert when(ClinicalTimePoint()) == "Study date: 2024-01-10     Fractured side: not recorded"
    pages = [build_summary(ct, vols, MODEL, facts=f)
             for f in (pre, pre.model_copy(update={"fracture_type": None}), post)]
    uids = {p.SOPInstanceUID for p in pages} | {without.SOPInstanceUID}
    assert len(uids) == 4  # the page without facts and three pages with other facts: four UIDs
    assert {p.SeriesInstanceUID for p in pages} == {without.SeriesInstanceUID}
    assert not np.array_equal(pages[0].pixel_array, pages[1].pixel_array)


def test_header_has_patient_id_and_readable_dates(studies):
    _, ct, vols, _, _ = studies["f"]
    change = studies["change"]
    lines = [text for text, _, _ in header_lines(vols, MODEL, ct.header, change, ClinicalTimePoint(), 21,
                                                 1.0, None)]
    assert lines[0] == (f"Patient ID: {PATIENT['patient_id']}     Name: Summary, Test     Sex: M     "
                        f"Age: {vols.age_years} y     Accession: {ct.header.accession_number}")
    assert lines[1] == "Study date: 2024-04-10     Fractured side: right"
    assert lines[2].startswith(f"Compared with the study of 2024-01-10, {change.days_between} days earlier")
    facts = change.with_facts(fracture_type="ITF", surgery_date="20240112")
    lines = [text for text, _, _ in header_lines(vols, MODEL, ct.header, facts, ClinicalTimePoint(), 21,
                                                 1.0, None)]
    assert lines[1] == ("Study date: 2024-04-10     Fractured side: right (ITF)     "
                        "post-op day 89 (surgery 2024-01-12)")
    assert [display_date(v) for v in ("20240110", "", None, "2024")] == ["2024-01-10", "unknown", "unknown",
                                                                           "2024"]


def _texts(fig) -> dict[str, list]:
    fig.canvas.draw()
    out: dict[str, list] = {}
    for t in fig.axes[0].texts:
        out.setdefault(t.get_text(), []).append(t)
    return out


def test_table_reads_left_to_right_without_an_empty_band(studies):
    """Muscle names left-aligned on one edge, numbers right-aligned in their column, and the page ends
    under the table (no empty band: every horizontal gap narrower than a few lines)."""
    _, ct, vols, _, _ = studies["b"]
    fig = page_figure(vols, MODEL, ct.header)
    texts = _texts(fig)
    rows, _, _ = _table_rows(vols)
    names = [texts[r[0]][0] for r in rows]
    assert {t.get_horizontalalignment() for t in names} == {"left"}
    lefts = {round(t.get_window_extent().x0) for t in names}
    assert max(lefts) - min(lefts) <= 1 and abs(min(lefts) - (_MARGIN + _PAD)) <= 2
    numbers = [t for t in fig.axes[0].texts if t.get_horizontalalignment() == "right"]
    assert len(numbers) == 4 * (len(rows) + 1)  # every number and its column's head
    assert len({round(t.get_window_extent().x1) for t in numbers}) == 4  # one right edge per column
    page = render_page(vols, MODEL, ct.header)
    inked = np.flatnonzero(page.max(axis=(1, 2)) > 60)
    assert np.diff(inked).max() < 40  # no empty band anywhere
    assert page.shape[0] - inked[-1] < 2 * _MARGIN  # the page ends under the table


def test_qa_warnings_say_what_is_missing():
    where = MetalLocation(side="left", left_voxels=3, right_voxels=0, z_range_mm=(0, 0),
                          centroid_mm=(9, 0, 0))
    vols = VolumeRecord(qa=VolumeQA(metal=True, metal_where=where))
    w = qa_warnings(vols, SeriesHeader(), ModelInfo(demo=True))
    assert any("DEMO" in x for x in w)
    assert any("height missing" in x.lower() for x in w)
    assert any("Metal present (left side)" in x for x in w)
    unlocated = VolumeRecord(qa=VolumeQA(metal=True))  # a record that does not say where: not guessed
    unlocated_warnings = qa_warnings(unlocated, SeriesHeader(), ModelInfo())
    assert any("Metal present (side not recorded)" in x for x in unlocated_warnings)
    assert any("implausible" in x for x in qa_warnings(vols, SeriesHeader(size_m=3.1), ModelInfo()))


def test_change_chart_plots_signed_change_with_floor(studies):
    """The chart's bars are the signed change (follow-up minus baseline, negative for a loss), as in
    the follow-up SR; a near-empty baseline gets no bar instead of +500 %."""
    change = studies["change"]
    bars = change_bars(change)
    gm = next(e for e in change.structures if e.name == "gluteus_maximus" and e.side == "right")
    # of the volumes as written, as the change SR states it (and to its 0.1 %)
    shown = round((round(gm.post_cm3, 1) - round(gm.pre_cm3, 1)) / round(gm.pre_cm3, 1) * 100, 1)
    assert bars["gluteus_maximus"]["right"] == shown and gm.change_pct < -10
    assert abs(shown - gm.change_pct) < 0.1
    tiny = StructureChange(label=1, name="sartorius", side="left", pre_cm3=0.045, post_cm3=0.27,
                           change_pct=None, loss_pct=-500.0)
    small = tiny.model_copy(update={"side": "right", "pre_cm3": 4.0, "post_cm3": 6.0})
    assert change_bars(ChangeRecord(structures=(tiny, small))) == {}


def test_table_says_not_found_below_minimum_segment_size():
    vols = VolumeRecord(height_m=1.6, structures=(
        StructureVolume(label=1, name="sartorius", volume_cm3=80.045, left_cm3=0.045, right_cm3=80.0,
                        index_cm3_m2=31.268),
        StructureVolume(label=2, name="rectus_femoris", volume_cm3=0.0, left_cm3=0.0, right_cm3=0.0,
                        index_cm3_m2=0.0)))
    rows, _, _ = _table_rows(vols)
    assert rows[0][1:] == ["n/f", "80.0", "80.0", "31.3"]
    assert rows[1][1:] == ["n/f", "n/f", "n/f", "–"]


def test_follow_up_table_gives_each_sides_change_in_numbers(studies):
    """The follow-up page's table carries the chart's numbers (signed % of baseline per side, "–"
    where the chart has no bar), so a radiologist reads them without opening the SR."""
    f_vols, change = studies["f"][2], studies["change"]
    heads, rows = page_table(f_vols, _table_rows(f_vols)[0], change)
    operated = {"left": ["Left Δ % ▼", "Right Δ %"], "right": ["Left Δ %", "Right Δ % ▼"]}
    assert heads[-2:] == operated.get(change.fractured_side, ["Left Δ %", "Right Δ %"])
    assert change.fractured_side in operated  # the operated side's column is marked, as on the images
    bars = change_bars(change)
    row = next(r for r in rows if r[0] == "Gluteus maximus")
    shown = [cell.removesuffix(" †") for cell in row[-2:]]  # † marks a side next to the implant
    assert shown == [f"{bars['gluteus_maximus'][side]:+.1f}".replace("-", MINUS)
                     for side in ("left", "right")]
    assert page_table(f_vols, _table_rows(f_vols)[0], None)[0] == heads[:-2]


def test_table_lists_the_muscles_in_the_papers_order(studies):
    """Anterior, medial, gluteal, posterior, as the paper's tables and the cohort report: the label
    order would put the hamstrings between pectineus and gluteus maximus."""
    from seg.labels import PAPER_ORDER, by_name

    rows, _, _ = _table_rows(studies["b"][2])
    shown = [r[0] for r in rows]
    assert shown == [by_name(n).display_name for n in PAPER_ORDER if by_name(n).display_name in shown]
    assert shown.index("Gluteus maximus") < shown.index("Semitendinosus") < shown.index("Biceps femoris")


def test_change_numbers_never_read_minus_zero():
    """A change that rounds to zero is "+0.0" as on the other rows; "-0.0" reads as a loss."""
    assert [_signed(v) for v in (-0.04, 0.0, 0.04, -0.26, 1.0, None)] == [
        "+0.0", "+0.0", "+0.0", "\u22120.3", "+1.0", "–"]


def test_a_loss_reads_with_the_minus_sign_everywhere_on_the_page(studies):
    """Header, table and chart write a negative number with the minus sign (U+2212), as the header's
    "follow-up − baseline" and the chart's ticks do; the table and the header had the hyphen."""
    import re

    _, ct, f_vols, _, _ = studies["f"]
    fig = page_figure(f_vols, MODEL, ct.header, studies["change"])
    fig.canvas.draw()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    header = next(t for t in texts if t.startswith("Change of the 21 analysed muscles"))
    assert re.match(f"Change of the 21 analysed muscles since then: {MINUS}\\d", header)
    table = [t for t in fig.axes[0].texts if t.get_horizontalalignment() == "right"]
    assert any(t.get_text().startswith(MINUS) for t in table)  # a loss in the table (gluteus maximus)
    assert any(t.startswith(MINUS) for t in ticks)
    hyphened = [t for t in texts + ticks if re.search(r"(?<![\w.])-\d", t)]  # a date's "-" is not one
    assert not hyphened, hyphened


def test_page_states_no_single_patient_orientation(studies):
    """The page mixes text, a chart, axial and coronal images: PatientOrientation is empty (Type 2C),
    not L\\P, which a viewer would draw as edge markers over the whole page."""
    page = studies["b"][3]
    assert "PatientOrientation" in page and not page.PatientOrientation


def test_header_gives_each_sides_total_change_the_operated_one_marked(studies):
    """The both-sides total halves the operated side's loss: the header gives each side's total of
    the 21 muscles too, the operated one marked, each figure from the volumes as written."""
    change = studies["change"]
    lines = total_change_lines(change)
    t = change.total_analysed_muscles
    assert lines[0].startswith(f"Change of the 21 analysed muscles since then: "
                               f"{round(t.post_cm3, 1) - round(t.pre_cm3, 1):+.1f} cm³".replace("-", MINUS))
    by_side = {s.side: s for s in change.total_analysed_muscles_by_side}
    assert set(by_side) == {"left", "right"}
    assert by_side["left"].pre_cm3 + by_side["right"].pre_cm3 == pytest.approx(t.pre_cm3)
    right = by_side["right"]
    assert f"right ▼ operated: {right.pre_cm3:.1f} → {right.post_cm3:.1f} cm³" in lines[1]
    assert f"left: {by_side['left'].pre_cm3:.1f} →" in lines[1]


def test_page_is_rle_lossless(studies):
    """The page is mostly black: RLE Lossless keeps its pixels and a fraction of its size (3.6 MB
    uncompressed for a pre-operative page)."""
    from pydicom.uid import RLELossless

    _, _, _, page, _ = studies["b"]
    assert page.file_meta.TransferSyntaxUID == RLELossless
    raw = page.Rows * page.Columns * page.SamplesPerPixel
    assert len(page.PixelData) < raw / 3


def test_muscles_next_to_the_implant_are_marked_with_a_legend(studies):
    """The follow-up page marks each muscle side flagged next to the implant (right) with †, in its
    volume and its change, and the metal warning says what † means; the baseline page marks none."""
    from reporting.summary import NEAR_METAL_MARK
    from seg.labels import by_name

    f_vols, change = studies["f"][2], studies["change"]
    heads, rows = page_table(f_vols, _table_rows(f_vols)[0], change)
    flagged = {by_name(s.name).display_name for s in f_vols.structures if s.near_metal("right")}
    assert flagged and not any(s.near_metal("left") for s in f_vols.structures)
    col = {h: i for i, h in enumerate(heads)}
    right_change = next(h for h in heads if h.startswith("Right Δ"))
    for row in rows:
        marked = row[0] in flagged
        assert row[col["Right cm³"]].endswith(f" {NEAR_METAL_MARK}") is marked, row
        assert row[col[right_change]].endswith(f" {NEAR_METAL_MARK}") is marked, row
        assert NEAR_METAL_MARK not in row[col["Left cm³"]] + row[col["Total cm³"]]
    warnings = qa_warnings(f_vols, SeriesHeader(), MODEL, change)
    assert f"Metal present (right side): {NEAR_METAL_MARK} muscles next to it, their volumes less reliable" \
        in warnings
    b_vols = studies["b"][2]
    assert not any(NEAR_METAL_MARK in c for r in _table_rows(b_vols)[0] for c in r)
    assert not any(NEAR_METAL_MARK in w for w in qa_warnings(b_vols, SeriesHeader(), MODEL))


def test_page_warns_of_a_baseline_older_than_the_admission_ct(studies):
    """A comparison whose baseline is not the admission CT says so on the page, as a coverage
    difference does; the comparison's other notes (how it was paired) stay off the page."""
    f_vols, change = studies["f"][2], studies["change"]
    old = Reason(ReasonCode.BASELINE_BEFORE_ADMISSION,
                 "baseline 365 days before surgery (2023-01-10), more than 14: not the admission CT; "
                 "the change includes the time before the fracture")
    other = Reason(ReasonCode.SURGERY_DAY_PREOPERATIVE, "same day as surgery (2023-01-10), no implant")
    assert old.text not in qa_warnings(f_vols, SeriesHeader(), MODEL, change)
    flagged = change.model_copy(update={"notes": (*change.notes, old, other)})
    warnings = qa_warnings(f_vols, SeriesHeader(), MODEL, flagged)
    assert old.text in warnings and other.text not in warnings
    # drawn whole: wrapped inside the page's right margin, every word of it on the page
    fig = page_figure(f_vols, MODEL, studies["f"][1].header, flagged)
    fig.canvas.draw()
    drawn = [t for t in fig.axes[0].texts if t.get_color() == "#ffcc00"]
    assert " ".join(t.get_text().removeprefix("⚠ ").strip() for t in drawn).count(old.text) == 1
    assert max(t.get_window_extent().x1 for t in drawn) <= fig.bbox.width - 20


def test_marked_numbers_keep_their_columns_decimal_alignment(studies):
    """A number next to the implant ends where its column's other numbers end, the † drawn beside it
    in the column's room (right-aligned with it, "58.6 †" put the decimal point a mark's width left of
    its neighbours'); the column's head ends there too."""
    from reporting.summary import NEAR_METAL_MARK

    _, ct, f_vols, _, _ = studies["f"]
    fig = page_figure(f_vols, MODEL, ct.header, studies["change"])
    fig.canvas.draw()
    table = fig.axes[0].texts
    marks = [t for t in table if t.get_text() == NEAR_METAL_MARK]
    assert marks and not [t for t in table if NEAR_METAL_MARK in t.get_text()
                          and any(c.isdigit() for c in t.get_text())]  # each mark on its own
    numbers = [t for t in table if t.get_horizontalalignment() == "right"]
    edges = sorted({round(t.get_window_extent().x1) for t in numbers})
    heads, rows = page_table(f_vols, _table_rows(f_vols)[0], studies["change"])
    assert len(edges) == len(heads) - 1  # one right edge per column, marked numbers and heads too
    for mark in marks:
        box = mark.get_window_extent()
        same_row = [t for t in numbers if abs(t.get_position()[1] - mark.get_position()[1]) < 1]
        left_of = max((t.get_window_extent().x1 for t in same_row if t.get_window_extent().x1 <= box.x0),
                      default=None)
        assert left_of is not None and 0 < box.x0 - left_of < 6, (box, left_of)  # just after its number
        assert not any(box.x1 > x > box.x0 for x in edges)  # clear of the next column's numbers


def test_change_chart_names_the_operated_side_and_the_flagged_muscles(studies):
    """The chart's legend says which side was operated on, as the table's column does; a muscle next
    to the implant carries † after its name, explained under the chart; its y label is on the page."""
    from reporting.summary import NEAR_METAL_MARK
    from seg.labels import by_name

    _, ct, f_vols, _, _ = studies["f"]
    change = studies["change"]
    fig = page_figure(f_vols, MODEL, ct.header, change)
    fig.canvas.draw()
    chart = fig.axes[1]
    assert [t.get_text() for t in chart.get_legend().get_texts()] == ["left", "right ▼ operated"]
    flagged = {by_name(e.name).display_name for e in change.structures if e.near_metal}
    ticks = [t.get_text() for t in chart.get_xticklabels()]
    assert flagged and {t.removesuffix(f" {NEAR_METAL_MARK}") for t in ticks if t.endswith(NEAR_METAL_MARK)} \
        == flagged & {t.removesuffix(f" {NEAR_METAL_MARK}") for t in ticks}
    assert any(f"{NEAR_METAL_MARK} next to the implant" in t.get_text() for t in fig.texts)
    assert chart.yaxis.label.get_window_extent().x0 >= 0  # "change since baseline (%)" whole
