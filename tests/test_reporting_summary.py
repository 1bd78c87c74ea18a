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
from reporting.seg import build_seg
from reporting.sr import build_measurement_sr
from reporting.summary import _table_rows, build_summary, change_bars, page_table, qa_warnings
from reporting.uids import derived_uid
from seg.records import (
    ChangeRecord,
    MetalLocation,
    ModelInfo,
    StructureChange,
    StructureVolume,
    StudyRef,
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
    seg = build_seg(ct, labels, vols, MODEL)
    lab = build_seg(ct, labels, vols, MODEL, seg_type="LABELMAP")
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
        return StudyRef(study_instance_uid=c.meta["StudyInstanceUID"], study_date=c.meta["StudyDate"],
                        series_instance_uid=c.meta["SeriesInstanceUID"],
                        seg_sop_instance_uid=s.SOPInstanceUID, sr_sop_instance_uid=r.SOPInstanceUID)

    change = compute_change(b_vols, f_vols, 1.75, ref(b_ct, b_seg, b_sr), ref(f_ct, f_seg, f_sr),
                            patient_id=f_ct.meta["PatientID"], fractured_side="right")
    b_sum = build_summary(b_ct, b_vols, MODEL)
    f_sum = build_summary(f_ct, f_vols, MODEL, change=change)
    f_fsr = build_followup_sr(f_ct, change, [b_seg, b_sr], model_info=MODEL)
    for ds, root, name in ((b_sum, b, "summary.dcm"), (f_sum, f, "summary.dcm"), (f_fsr, f, "followup.dcm")):
        ds.save_as(root / name, enforce_file_format=True)
    # the follow-up set includes the baseline CT, SEG and SR the follow-up SR cites (same patient)
    f_all = [*f_paths, f / "summary.dcm", f / "followup.dcm", b / "seg.dcm", b / "sr.dcm", *b_ct.source_files]
    return {"b": (b, b_ct, b_vols, b_sum, [*b_paths, b / "summary.dcm"]),
            "f": (f, f_ct, f_vols, f_sum, f_all), "change": change}


@pytest.mark.parametrize("which", ["b", "f"])
def test_summary_passes_dciodvfy(studies, which):
    root, _, _, ds, _ = studies[which]
    assert dciodvfy_errors(root / "summary.dcm") == []
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
    assert ds.StudyInstanceUID == ct.meta["StudyInstanceUID"]
    assert ds.PatientID == ct.meta["PatientID"]
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    _, f_ct, f_vols, with_change, _ = studies["f"]
    assert with_change.SOPInstanceUID != ds.SOPInstanceUID  # another series, another page
    # the follow-up page without the comparison is other content: same series, its own instance UID
    alone = build_summary(f_ct, f_vols, MODEL)
    assert alone.SeriesInstanceUID == with_change.SeriesInstanceUID
    assert alone.SOPInstanceUID != with_change.SOPInstanceUID


def test_qa_warnings_say_what_is_missing():
    where = MetalLocation(side="left", left_voxels=3, right_voxels=0, z_range_mm=(0, 0),
                          centroid_mm=(9, 0, 0))
    vols = VolumeRecord(qa=VolumeQA(metal=True, metal_where=where))
    w = qa_warnings(vols, {}, ModelInfo(demo=True))
    assert any("DEMO" in x for x in w)
    assert any("height missing" in x.lower() for x in w)
    assert any("Metal present (left side)" in x for x in w)
    assert any("implausible" in x for x in qa_warnings(vols, {"PatientSize": 3.1}, ModelInfo()))


def test_change_chart_plots_signed_change_with_floor(studies):
    """The chart's bars are the signed change (follow-up minus baseline, negative for a loss), as in
    the follow-up SR; a near-empty baseline gets no bar instead of +500 %."""
    change = studies["change"]
    bars = change_bars(change)
    gm = next(e for e in change.structures if e.name == "gluteus_maximus" and e.side == "right")
    assert bars["gluteus_maximus"]["right"] == pytest.approx(gm.change_pct) and gm.change_pct < -10
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
    assert heads[-2:] == ["Left Δ %", "Right Δ %"]
    bars = change_bars(change)
    row = next(r for r in rows if r[0] == "Gluteus maximus")
    assert row[-2:] == [f"{bars['gluteus_maximus'][side]:+.1f}" for side in ("left", "right")]
    assert page_table(f_vols, _table_rows(f_vols)[0], None)[0] == heads[:-2]
