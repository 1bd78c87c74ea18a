"""TID 1500 measurement SR and follow-up SR: dciodvfy, dsrdump and dcmqi tid1500reader accept them,
their numbers equal volumes.json / the change record, and their UIDs are stable across re-runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_reporting_seg import MODEL, VENV_BIN, dciodvfy_errors, phantom_case

from reporting import codes
from reporting.change import compute_change
from reporting.followup_sr import build_followup_sr
from reporting.seg import build_seg
from reporting.sr import build_measurement_sr
from reporting.uids import derived_uid
from seg.labels import by_name

PATIENT = {"patient_id": "RPT0001", "patient_name": "Report^Test", "sex": "F", "height_m": 1.62}


def tid1500(path: Path, out: Path) -> dict:
    cmd = [str(VENV_BIN / "tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


def dsrdump(path: Path) -> str:
    res = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TCP_NODELAY": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _build(root: Path, **opts):
    ct, labels, vols = phantom_case(root, **opts)
    seg = build_seg(ct, labels, vols, MODEL)
    sr = build_measurement_sr(ct, seg, vols, MODEL)
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        ds.save_as(root / name, enforce_file_format=True)
    return ct, labels, vols, seg, sr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr_base")
    return root, *_build(root, seed=5, study_date="20240105", **PATIENT)


@pytest.fixture(scope="module")
def followup(tmp_path_factory, baseline):
    root = tmp_path_factory.mktemp("sr_follow")
    b_root, b_ct, _, b_vols, b_seg, b_sr = baseline
    ct, labels, vols, seg, sr = _build(root, seed=5, study_date="20240505", postop=True, implant_side="left",
                                       atrophy={"gluteus_medius": 0.8, "vastus_lateralis": 0.85},
                                       study_uid=derived_uid("test", "followup-study"),
                                       series_uid=derived_uid("test", "followup-series"), **PATIENT)

    def meta(c, s, r):
        return {"study_instance_uid": c.meta["StudyInstanceUID"],
                "series_instance_uid": c.meta["SeriesInstanceUID"], "study_date": c.meta["StudyDate"],
                "seg_sop_instance_uid": s.SOPInstanceUID,
                "sr_sop_instance_uid": r.SOPInstanceUID, "patient_id": c.meta["PatientID"]}

    post_meta = {**meta(ct, seg, sr), "fractured_side": "left", "height_source": "PatientSize"}
    change = compute_change(b_vols, vols, 1.62, meta(b_ct, b_seg, b_sr), post_meta)
    fsr = build_followup_sr(ct, change, [b_seg, b_sr])
    fsr.save_as(root / "followup.dcm", enforce_file_format=True)
    return root, ct, change, fsr


def test_measurement_sr_passes_dciodvfy_and_dsrdump(baseline):
    root = baseline[0]
    assert dciodvfy_errors(root / "sr.dcm") == []
    text = dsrdump(root / "sr.dcm")
    assert "Imaging Measurement Report" in text and "Referenced Segment" in text


def test_sr_numbers_equal_volumes_json(baseline, tmp_path):
    root, ct, _, vols, seg, _ = baseline
    meta = tid1500(root / "sr.dcm", tmp_path / "sr.json")
    by_label = {e["label"]: e for e in vols["structures"]}
    tids = {int(i.SegmentNumber): str(i.TrackingID) for i in seg.SegmentSequence}
    groups = [m for m in meta["Measurements"] if "ReferencedSegment" in m]
    assert len(groups) == len(tids)
    h2 = vols["height_m"] ** 2
    for g in groups:
        name, side = tids[int(g["ReferencedSegment"])].rsplit(" ", 1)
        expected = by_label[by_name(name).label][f"{side}_cm3"]
        assert g["SourceSeriesForImageSegmentation"] == ct.meta["SeriesInstanceUID"]
        assert g["Laterality"]["CodeMeaning"].lower() == side
        items = {i["quantity"]["CodeValue"]: i for i in g["measurementItems"]}
        assert float(items["118565006"]["value"]) == pytest.approx(expected, rel=1e-12, abs=1e-9)
        assert items["118565006"]["units"]["CodeValue"] == "cm3"
        assert float(items["VIDX"]["value"]) == pytest.approx(expected / h2, rel=1e-9)
        assert items["VIDX"]["units"]["CodeValue"] == "cm3/m2"
    qa = [m for m in meta["Measurements"] if m.get("TrackingIdentifier") == "Quality assurance"]
    assert len(qa) == 1


def test_sr_without_height_has_no_index_and_says_so(tmp_path):
    ct, _, vols, seg, sr = _build(tmp_path, seed=6, write_height=False)
    assert vols["height_m"] is None
    text = dsrdump(tmp_path / "sr.dcm")
    assert codes.VOLUME_INDEX.meaning not in text
    assert codes.HEIGHT_MISSING.meaning in text
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_sr_rerun_identical_uids(baseline):
    _, ct, _, vols, seg, sr = baseline
    again = build_measurement_sr(ct, seg, vols, MODEL)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    assert again.StudyInstanceUID == ct.meta["StudyInstanceUID"]


def test_followup_sr_valid_and_equal_to_change(followup, baseline, tmp_path):
    root, ct, change, fsr = followup
    b_seg, b_sr = baseline[4], baseline[5]
    assert dciodvfy_errors(root / "followup.dcm") == []
    assert "Volume change" in dsrdump(root / "followup.dcm")
    meta = tid1500(root / "followup.dcm", tmp_path / "f.json")
    assert fsr.StudyInstanceUID == ct.meta["StudyInstanceUID"] != b_seg.StudyInstanceUID
    refs = {i.ReferencedSOPInstanceUID for s in fsr.PertinentOtherEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert {b_seg.SOPInstanceUID, b_sr.SOPInstanceUID} <= refs
    by_key = {f"{by_name(e['name']).display_name} {e['side']}": e for e in change["structures"]}
    checked = 0
    for g in meta["Measurements"]:
        e = by_key.get(g.get("TrackingIdentifier"))
        if e is None:
            continue
        items = {i["quantity"]["CodeValue"]: float(i["value"]) for i in g["measurementItems"]}
        assert items["VPRE"] == pytest.approx(e["pre_cm3"])
        assert items["118565006"] == pytest.approx(e["post_cm3"])
        assert items["VDELTA"] == pytest.approx(e["delta_cm3"])
        if e["loss_pct"] is not None:
            assert items["VLOSSPCT"] == pytest.approx(e["loss_pct"])
        assert items["VIDXDELTA"] == pytest.approx(e["delta_index_cm3_m2"])
        checked += 1
    assert checked >= 20
    gm = by_key["Gluteus medius left"]
    assert gm["loss_pct"] > 10  # the phantom's atrophy shows up as a loss


def test_followup_rerun_identical_uids(followup, baseline):
    _, ct, change, fsr = followup
    again = build_followup_sr(ct, change, [baseline[4], baseline[5]])
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (fsr.SOPInstanceUID, fsr.SeriesInstanceUID)


def test_sr_referencing_labelmap_seg(baseline, tmp_path):
    """With a LABELMAP SEG the only dciodvfy complaint is its unawareness of the Label Map
    Segmentation SOP Class (1.2.840.10008.5.1.4.1.1.66.7) when checking Referenced Segment Number."""
    _, ct, labels, vols, _, _ = baseline
    lm = build_seg(ct, labels, vols, MODEL, seg_type="LABELMAP")
    sr = build_measurement_sr(ct, lm, vols, MODEL)
    sr.save_as(tmp_path / "sr-lm.dcm", enforce_file_format=True)
    errors = dciodvfy_errors(tmp_path / "sr-lm.dcm")
    assert all("not segmentation - attribute <ReferencedSegmentNumber>" in e for e in errors), errors
    meta = tid1500(tmp_path / "sr-lm.dcm", tmp_path / "sr-lm.json")
    assert len([m for m in meta["Measurements"] if "ReferencedSegment" in m]) == len(lm.SegmentSequence) - 1


def test_height_status_and_source():
    from reporting.sr import height_status

    assert height_status({"height_m": None}, {"PatientSize": "3.1"}) == (codes.HEIGHT_IMPLAUSIBLE,
                                                                         codes.HEIGHT_SOURCE_NONE)
    assert height_status({"height_m": None}, {}) == (codes.HEIGHT_MISSING, codes.HEIGHT_SOURCE_NONE)
    assert height_status({"height_m": 1.6, "height_source": "registry"}, {}) == (codes.HEIGHT_PRESENT,
                                                                                 codes.HEIGHT_SOURCE_REGISTRY)
    assert height_status({"height_m": 1.6, "height_source": "PatientSize"}, {"PatientSize": 1.6})[1] == \
        codes.HEIGHT_SOURCE_PATIENT_SIZE
