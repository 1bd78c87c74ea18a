"""TID 1500 measurement SR and follow-up SR: dciodvfy, dsrdump and dcmqi tid1500reader accept them,
their numbers equal volumes.json / the change record rounded to the reporting precision, each volume
group names the CT images its segment lies on, every group carries spatial coordinates (each muscle
the outline of its largest cross-section, scan-level groups the scanned extent), specks below the
minimum segment size are reported absent, changes are signed, and their UIDs are stable across
re-runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as Polygon
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from scipy import ndimage
from test_reporting_seg import MODEL, VENV_BIN, dciodvfy_errors, phantom_case, with_speck

from reporting import codes
from reporting.change import compute_change
from reporting.followup_sr import build_followup_sr
from reporting.keyslice import outline
from reporting.rules import RULES
from reporting.seg import algorithm_name, build_seg_frames, plan_segments
from reporting.sr import build_measurement_sr, coverage_mm, key_sections, measurement_sr_uid
from reporting.sr import segments_of as segments_of_seg
from reporting.uids import derived_uid, parse_tracking_label
from seg.header import SeriesHeader
from seg.labels import ANALYSED_MUSCLES, by_name
from seg.measure import measure_volumes
from seg.records import (
    COMPARABILITY_CODES,
    ClinicalTimePoint,
    Reason,
    ReasonCode,
    StructureVolume,
    StudyRef,
    VolumeRecord,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = {"patient_id": "RPT0001", "patient_name": "Report^Test", "sex": "F", "height_m": 1.62}
# the registry's facts: a left femoral neck fracture operated on 2024-01-10, between the two CTs
PRE_OP = ClinicalTimePoint(fractured_side="left", fracture_type="FNF", surgery_date="20240110",
                           study_date="20240105")
POST_OP = PRE_OP.model_copy(update={"study_date": "20240505"})


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


def content_items(ds: Dataset):
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The Measurement Group containers (125007, DCM) of a TID 1500 report."""
    return [i for i in content_items(sr) if i.ValueType == "CONTAINER" and concept(i) == "125007"]


def children(group: Dataset, code: str) -> list[Dataset]:
    return [i for i in group.ContentSequence if concept(i) == code]


def numeric_values(sr: Dataset) -> list[str]:
    """The DS strings of every NUM item, as encoded."""
    return [str(i.MeasuredValueSequence[0].NumericValue) for i in content_items(sr) if i.ValueType == "NUM"]


def _build(root: Path, facts: ClinicalTimePoint = ClinicalTimePoint(), **opts):
    ct, labels, vols = phantom_case(root, **opts)
    seg = build_seg_frames(ct, labels, vols, MODEL).dataset
    sr = build_measurement_sr(ct, seg, vols, MODEL, facts=facts)
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        ds.save_as(root / name, enforce_file_format=True)
    return ct, labels, vols, seg, sr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr_base")
    return root, *_build(root, PRE_OP, seed=5, study_date="20240105", **PATIENT)


@pytest.fixture(scope="module")
def followup(tmp_path_factory, baseline):
    root = tmp_path_factory.mktemp("sr_follow")
    b_root, b_ct, _, b_vols, b_seg, b_sr = baseline
    ct, labels, vols, seg, sr = _build(root, POST_OP, seed=5, study_date="20240505", postop=True,
                                       implant_side="left",
                                       atrophy={"gluteus_medius": 0.8, "vastus_lateralis": 0.85},
                                       study_uid=derived_uid("test", "followup-study"),
                                       series_uid=derived_uid("test", "followup-series"), **PATIENT)

    def ref(c, s, r):
        return StudyRef(study_instance_uid=c.header.study_instance_uid,
                        series_instance_uid=c.header.series_instance_uid, study_date=c.header.study_date,
                        seg_sop_instance_uid=s.SOPInstanceUID, sr_sop_instance_uid=r.SOPInstanceUID)

    change = compute_change(b_vols, vols, 1.62, ref(b_ct, b_seg, b_sr), ref(ct, seg, sr),
                            patient_id=ct.header.patient_id, fractured_side="left",
                            height_source="PatientSize")
    fsr = build_followup_sr(ct, change, [b_seg, b_sr], model_info=MODEL)  # without its SEG (it is gone)
    fsr.save_as(root / "followup.dcm", enforce_file_format=True)
    return root, ct, change, fsr, seg


def test_measurement_sr_passes_dciodvfy_and_dsrdump(baseline):
    root = baseline[0]
    assert dciodvfy_errors(root / "sr.dcm") == []
    text = dsrdump(root / "sr.dcm")
    assert "Imaging Measurement Report" in text and "Referenced Segment" in text


def test_sr_numbers_equal_volumes_json(baseline, tmp_path):
    root, ct, _, vols, seg, _ = baseline
    meta = tid1500(root / "sr.dcm", tmp_path / "sr.json")
    by_label = vols.by_label()
    tids = {int(i.SegmentNumber): str(i.TrackingID) for i in seg.SegmentSequence}
    groups = [m for m in meta["Measurements"] if "ReferencedSegment" in m]
    assert len(groups) == len(tids)
    h2 = vols.height_m ** 2
    for g in groups:
        name, side = parse_tracking_label(tids[int(g["ReferencedSegment"])])
        expected = by_label[by_name(name).label].side_volume(side)
        assert g["SourceSeriesForImageSegmentation"] == ct.header.series_instance_uid
        assert g["Laterality"]["CodeMeaning"].lower() == side
        items = {i["quantity"]["CodeValue"]: i for i in g["measurementItems"]}
        assert items["118565006"]["value"] == f"{expected:.1f}"  # 0.1 cm³
        assert items["118565006"]["units"]["CodeValue"] == "cm3"
        assert float(items["VIDX"]["value"]) == pytest.approx(round(expected / h2, 2), abs=1e-9)  # 0.01
        assert items["VIDX"]["units"]["CodeValue"] == "cm3/m2"
    qa = [m for m in meta["Measurements"] if m.get("TrackingIdentifier") == "Quality assurance"]
    assert len(qa) == 1


def test_volume_groups_name_their_segment_and_source_series(baseline):
    """TID 1411: each group has the referenced segment, then the source series, and no row per CT
    slice (the SEG's frames name those; 1.2 MB of references in a 400-slice study's SR); the CT
    images stay evidence."""
    _, ct, labels, vols, seg, sr = baseline
    segments, _ = plan_segments(labels, vols, ct)
    groups = [g for g in measurement_groups(sr) if children(g, "121191")]
    assert len(groups) == len(segments)
    for g in groups:
        assert children(g, "121232")[0].UID == ct.header.series_instance_uid
        refs = [concept(i) for i in g.ContentSequence if concept(i) in ("121191", "121233", "121232")]
        assert refs == ["121191", "121232"]
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert set(ct.source_sop_uids) | {seg.SOPInstanceUID} <= evidence


def located(sr: Dataset) -> dict[str, set[str]]:
    """Per tracking UID (the groups sharing one are one measurement to OHIF), the value types of the
    coordinates its NUMs are inferred from."""
    out: dict[str, set[str]] = {}
    for g in measurement_groups(sr):
        kinds = out.setdefault(children(g, "112040")[0].UID, set())
        for num in (i for i in g.ContentSequence if i.ValueType == "NUM"):
            kinds |= {c.ValueType for c in num.get("ContentSequence", [])
                      if c.ValueType in ("SCOORD", "SCOORD3D")}
    return out


def segment_of(sr: Dataset) -> dict[str, int]:
    """Tracking UID -> referenced segment number, for the volume groups."""
    return {children(g, "112040")[0].UID: int(children(g, "121191")[0].ReferencedSOPSequence[0]
                                               .ReferencedSegmentNumber)
            for g in measurement_groups(sr) if children(g, "121191")}


def test_every_group_has_coordinates(baseline, followup):
    """OHIF 3.13 opens a TID 1500 report only if every measurement (the groups sharing a tracking UID)
    has coordinates: each muscle the outline of a cross-section, the others the scanned extent."""
    sr = baseline[5]
    where = located(sr)
    muscles = set(segment_of(sr))
    assert muscles and {u for u, kinds in where.items() if kinds == {"SCOORD"}} == muscles
    assert all(kinds == {"SCOORD3D"} for u, kinds in where.items() if u not in muscles)
    assert all(kinds == {"SCOORD3D"} for kinds in located(followup[3]).values())  # built without its SEG


def test_cross_section_is_the_largest_and_its_outline_encloses_it(baseline):
    """Each muscle's companion group states Area (derivation Maximum) on the CT slice where its
    segment has the most pixels; the closed outline encloses exactly that slice's largest connected
    region (holes filled) and the area is that region's, in cm² at 0.1."""
    _, ct, labels, vols, seg, sr = baseline
    _, seg_map = plan_segments(labels, vols, ct)  # (slice, row, column)
    k_of = {uid: k for k, uid in enumerate(ct.source_sop_uids)}
    rows, cols = seg_map.shape[1:]
    centres = np.stack(np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5), axis=-1).reshape(-1, 2)
    number_of = segment_of(sr)
    checked = 0
    for g in measurement_groups(sr):
        if not children(g, "42798000"):
            continue
        [area] = children(g, "42798000")
        assert not children(g, "121191")  # a companion: TID 1411 allows no coordinates next to the segment
        number = number_of[children(g, "112040")[0].UID]
        derivation = children(area, "121401")[0].ConceptCodeSequence[0]
        assert (derivation.CodeValue, derivation.CodingSchemeDesignator) == ("56851009", "SCT")  # Maximum
        [scoord] = [c for c in area.ContentSequence if c.ValueType == "SCOORD"]
        assert (scoord.RelationshipType, scoord.GraphicType) == ("INFERRED FROM", "POLYLINE")
        k = k_of[scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        counts = (seg_map == number).sum(axis=(1, 2))
        assert counts[k] == counts.max() > 0
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1])
        inside = Polygon(points).contains_points(centres).reshape(rows, cols)
        parts, _ = ndimage.label(seg_map[k] == number)
        largest = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
        assert np.array_equal(inside, largest)
        value = area.MeasuredValueSequence[0]
        expected = round(int(largest.sum()) * ct.spacing_mm[0] * ct.spacing_mm[1] / 100, RULES.area_decimals)
        assert float(value.NumericValue) == pytest.approx(expected, abs=1e-9)
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "cm2"
        checked += 1
    assert checked == len(number_of)


def test_sections_equal_for_every_seg_encoding(baseline):
    """BINARY frames that start mid-byte (decoded here, pydicom 3.0 cannot), FRACTIONAL and LABELMAP
    give the same largest cross-sections."""
    _, ct, labels, vols, seg, _ = baseline
    assert seg.SegmentationType == "BINARY" and (seg.Rows * seg.Columns) % 8
    ref = key_sections(seg)
    assert ref
    for seg_type in ("FRACTIONAL", "LABELMAP"):
        other = key_sections(build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type).dataset)
        assert other.keys() == ref.keys()
        for number, section in ref.items():
            assert other[number].sop_instance_uid == section.sop_instance_uid
            assert other[number].area_cm2 == pytest.approx(section.area_cm2)
            assert np.array_equal(other[number].outline, section.outline)


def test_outline_runs_along_pixel_edges_of_the_largest_region():
    """Pixel corners, clockwise on screen from the top-left, straight runs reduced to their ends; the
    hole is filled, a region touching only at a corner and a smaller one are left out."""
    mask = np.zeros((7, 8), dtype=bool)
    mask[1:4, 1:4] = True
    mask[2, 2] = False  # a hole
    mask[4, 1:3] = True  # an L
    mask[4, 4] = True  # touches the square only at a corner
    mask[6, 6:8] = True  # smaller
    points, pixels = outline(mask)
    assert points.tolist() == [[1, 1], [4, 1], [4, 4], [3, 4], [3, 5], [1, 5], [1, 1]]
    assert pixels == 11
    with pytest.raises(ValueError):
        outline(np.zeros((3, 3), dtype=bool))


def test_scan_level_groups_state_the_scanned_extent(baseline):
    """The QA coverage (slices × spacing) is inferred from a SCOORD3D line on the CT's frame of
    reference, through the volume along its slice normal, as long as the coverage."""
    _, ct, _, vols, _, sr = baseline
    qa = next(g for g in measurement_groups(sr) if children(g, "112039")[0].TextValue == "Quality assurance")
    [cov] = children(qa, codes.QA_Z_COVERAGE.value)
    value = float(cov.MeasuredValueSequence[0].NumericValue)
    assert value == round(vols.qa.z_coverage_mm, 1) == round(coverage_mm(ct), 1)
    [line] = cov.ContentSequence
    assert (line.RelationshipType, line.ValueType) == ("INFERRED FROM", "SCOORD3D")
    assert line.GraphicType == "POLYLINE"
    assert line.ReferencedFrameOfReferenceUID == ct.header.frame_of_reference_uid
    a, b = np.asarray(line.GraphicData, dtype=float).reshape(2, 3)
    assert np.linalg.norm(b - a) == pytest.approx(value, abs=0.05)
    normal = ct.affine[:3, 2] / np.linalg.norm(ct.affine[:3, 2])
    assert abs(float(np.dot((b - a) / np.linalg.norm(b - a), normal))) == pytest.approx(1.0)


def test_reading_the_seg_leaves_its_fast_encoding_alone(baseline):
    """Building the SR reads the SEG's frames from a copy: the fast encoder's raw per-frame bytes stay
    raw, so saving the SEG afterwards does not re-encode every frame item."""
    _, ct, labels, vols, _, _ = baseline
    seg = build_seg_frames(ct, labels, vols, MODEL).dataset
    assert isinstance(seg.get_item(0x52009230), RawDataElement)
    build_measurement_sr(ct, seg, vols, MODEL)
    assert isinstance(seg.get_item(0x52009230), RawDataElement)


def test_encoded_values_have_no_float_noise(baseline, followup):
    """Every NUM is written at its reporting precision (e.g. 41.4, never 41.4459556191840)."""
    for sr in (baseline[5], followup[3]):
        values = numeric_values(sr)
        assert values
        bad = [v for v in values if not re.fullmatch(r"-?\d+(\.\d{1,2})?", v)]
        assert bad == []


def test_one_voxel_structure_is_reported_absent(baseline, tmp_path):
    """A speck below the minimum segment size: no segment, no volume, an "absent" group instead."""
    _, ct, labels, _, _, _ = baseline
    speck = by_name("semimembranosus")
    lab = with_speck(labels, speck.label)
    vols = measure_volumes(lab, ct, height_m=PATIENT["height_m"], model=MODEL)
    seg = build_seg_frames(ct, lab, vols, MODEL).dataset
    sr = build_measurement_sr(ct, seg, vols, MODEL)
    sr.save_as(tmp_path / "speck.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "speck.dcm") == []
    label = f"{speck.display_name} left"
    groups = [g for g in measurement_groups(sr) if children(g, "112039")[0].TextValue == label]
    assert len(groups) == 1
    g = groups[0]
    nums = [i for i in g.ContentSequence if i.ValueType == "NUM"]
    assert not children(g, "121191")
    assert [concept(i) for i in nums] == [codes.QA_Z_COVERAGE.value]  # no volume, the coverage
    assert [c.ValueType for c in nums[0].ContentSequence] == ["SCOORD3D"]  # the scanned extent
    presence = children(g, codes.PRESENCE.value)[0].ConceptCodeSequence[0]
    assert (presence.CodeValue, presence.CodingSchemeDesignator) == (codes.ABSENT.value, "SCT")
    qa = next(g for g in measurement_groups(sr) if children(g, "112039")[0].TextValue == "Quality assurance")
    minimum = children(qa, codes.MIN_SEGMENT_VOLUME.value)[0].MeasuredValueSequence[0]
    assert float(minimum.NumericValue) == RULES.min_segment_cm3
    meta = tid1500(tmp_path / "speck.dcm", tmp_path / "speck.json")
    absent = [m for m in meta["Measurements"] if m.get("TrackingIdentifier") == label]
    assert len(absent) == 1
    assert [m["quantity"]["CodeValue"] for m in absent[0]["measurementItems"]] == [codes.QA_Z_COVERAGE.value]


def test_sr_without_height_has_no_index_and_says_so(tmp_path):
    ct, _, vols, seg, sr = _build(tmp_path, seed=6, write_height=False)
    assert vols.height_m is None
    text = dsrdump(tmp_path / "sr.dcm")
    assert codes.VOLUME_INDEX.meaning not in text
    assert codes.HEIGHT_MISSING.meaning in text
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_sr_rerun_identical_uids(baseline):
    _, ct, _, vols, seg, sr = baseline
    again = build_measurement_sr(ct, seg, vols, MODEL, facts=PRE_OP)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    assert again.StudyInstanceUID == ct.header.study_instance_uid


def test_followup_sr_valid_and_equal_to_change(followup, baseline, tmp_path):
    root, ct, change, fsr, _ = followup
    b_seg, b_sr = baseline[4], baseline[5]
    assert dciodvfy_errors(root / "followup.dcm") == []
    assert "Volume change" in dsrdump(root / "followup.dcm")
    meta = tid1500(root / "followup.dcm", tmp_path / "f.json")
    assert fsr.StudyInstanceUID == ct.header.study_instance_uid != b_seg.StudyInstanceUID
    refs = {i.ReferencedSOPInstanceUID for s in fsr.PertinentOtherEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert {b_seg.SOPInstanceUID, b_sr.SOPInstanceUID} <= refs
    by_key = {f"{by_name(e.name).display_name} {e.side}": e for e in change.structures}
    checked = 0
    for g in meta["Measurements"]:
        e = by_key.get(g.get("TrackingIdentifier"))
        if e is None:
            continue
        items = {i["quantity"]["CodeValue"]: i for i in g["measurementItems"]}
        assert items["VPRE"]["value"] == f"{e.pre_cm3:.1f}"
        assert items["118565006"]["value"] == f"{e.post_cm3:.1f}"
        # the change as a reader computes it from the two values shown (22 of 69 groups were 0.1 off)
        shown = float(items["118565006"]["value"]) - float(items["VPRE"]["value"])
        assert float(items["VDELTA"]["value"]) == pytest.approx(shown, abs=1e-9)
        assert abs(float(items["VDELTA"]["value"]) - e.delta_cm3) <= 0.1 + 1e-9
        assert {items[k]["units"]["CodeValue"] for k in ("VPRE", "118565006", "VDELTA")} == {"cm3"}
        # the % and the index change of the volumes as written: no "0.0 cm³" beside "-0.2 %" or
        # "-0.01 cm³/m²"; the index change to 0.1, as 0.1 cm³ moves it about 0.04
        pre_shown = float(items["VPRE"]["value"])
        if e.change_pct is None:
            assert "VCHGPCT" not in items
        else:
            pct = round(shown / pre_shown * 100, 1)
            assert float(items["VCHGPCT"]["value"]) == pytest.approx(pct, abs=1e-9)
            assert abs(float(items["VCHGPCT"]["value"]) - e.change_pct) <= 0.1 + 0.05 / pre_shown * 200
            assert items["VCHGPCT"]["units"]["CodeValue"] == "%"
        index_change = round(float(items["VDELTA"]["value"]) / change.height_m ** 2, 1)
        assert float(items["VIDXDELTA"]["value"]) == pytest.approx(index_change, abs=1e-9)
        assert "VLOSSPCT" not in items
        checked += 1
    assert checked >= 20
    # the paper's 21 muscles only: "Femur right +11.6 %" measured the nail, an "Else" muscle the coverage
    shown = {by_key[t].name for g in meta["Measurements"] if (t := g.get("TrackingIdentifier")) in by_key}
    assert shown <= set(ANALYSED_MUSCLES) and len(shown) >= 15
    assert {"femur", "iliac_bone"} <= {e.name for e in change.structures}  # in the record, not the SR
    gm = by_key["Gluteus medius left"]
    assert gm.change_pct < -10 and gm.delta_cm3 < 0  # the phantom's atrophy is a negative change
    assert gm.loss_pct == pytest.approx(-gm.change_pct)  # the paper's loss ratio, opposite sign


def test_followup_sr_with_its_seg_outlines_each_structure(followup, baseline, tmp_path):
    """Given the follow-up's SEG, each structure side found at follow-up states its largest cross-section
    there (Area, Maximum, with its outline on the follow-up CT); a side without a segment and the
    comparison context state the scanned extent. Valid, read by dcmqi, and a new SOP Instance UID."""
    root, ct, change, fsr, seg = followup
    with_seg = build_followup_sr(ct, change, [baseline[4], baseline[5]], model_info=MODEL, seg=seg)
    with_seg.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "f.dcm") == []
    tid1500(tmp_path / "f.dcm", tmp_path / "f.json")
    assert with_seg.SOPInstanceUID != fsr.SOPInstanceUID
    sections = key_sections(seg)
    section_of = {f"{by_name(name).display_name} {side}": sections[n]
                  for n, name, side in segments_of_seg(seg)}
    outlined = 0
    for g in measurement_groups(with_seg):
        label = children(g, "112039")[0].TextValue
        areas = children(g, "42798000")
        if label not in section_of:
            assert not areas and children(g, codes.QA_Z_COVERAGE.value)
            continue
        [area] = areas
        [scoord] = [c for c in area.ContentSequence if c.ValueType == "SCOORD"]
        assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            section_of[label].sop_instance_uid
        assert float(area.MeasuredValueSequence[0].NumericValue) == round(section_of[label].area_cm2, 1)
        outlined += 1
    assert outlined >= 20
    assert all(located(with_seg).values())


def test_followup_sr_is_a_tid1500_report_with_time_point(followup):
    """Root concept (126000, DCM), TID 1500 template, every group with the TID 1502 time point: the
    offset from the baseline, but no Time Point Order, which OHIF and dcmqi read as a measurement."""
    _, _, change, fsr, _ = followup
    root = fsr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert fsr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (fsr.SeriesDate, fsr.SeriesTime) == (fsr.ContentDate, fsr.ContentTime)  # a dated series
    groups = measurement_groups(fsr)
    assert groups
    for g in groups:
        assert children(g, "126073") == []  # Time Point Order
        assert children(g, "C2348792")  # Time Point (text)
        offset = children(g, "128740")[0]  # Longitudinal Temporal Offset from Event
        assert float(offset.MeasuredValueSequence[0].NumericValue) == change.days_between
        assert offset.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "d"
        event = children(offset, "128741")[0].ConceptCodeSequence[0]  # Longitudinal Temporal Event Type
        assert (event.CodeValue, event.CodingSchemeDesignator) == ("121079", "DCM")
    used = {(i.CodingSchemeDesignator) for item in content_items(fsr)
            for i in (*item.get("ConceptNameCodeSequence", []), *item.get("ConceptCodeSequence", []))}
    declared = {i.CodingSchemeDesignator for i in fsr.CodingSchemeIdentificationSequence}
    assert used <= declared | {"RFC5646"}  # the language modifier: a standard designator (PS3.16 §8)


def viewer_labels(sr: Dataset) -> dict[str, list[str]]:
    """What OHIF 3.13 writes beside each drawn measurement (its SR viewport): per tracking UID (the
    groups sharing one are merged), the Comment rows' text first, then "meaning: value unit" of each NUM
    directly in a group that has no children or coordinates among them (extensions/cornerstone-dicom-sr,
    _processNonGeometricallyDefinedMeasurement), of which the text box shows the first five."""
    comments: dict[str, list[str]] = {}
    nums: dict[str, list[str]] = {}

    def drawn(num: Dataset) -> bool:
        kids = num.get("ContentSequence", [])
        return not kids or any(c.ValueType in ("SCOORD", "SCOORD3D") for c in kids)

    for g in measurement_groups(sr):
        uid = children(g, "112040")[0].UID
        comments.setdefault(uid, []).extend(str(i.TextValue) for i in children(g, "121106"))
        nums.setdefault(uid, []).extend(
            f"{i.ConceptNameCodeSequence[0].CodeMeaning}: {i.MeasuredValueSequence[0].NumericValue} "
            f"{i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
            for i in g.ContentSequence if i.ValueType == "NUM" and drawn(i))
    return {uid: comments[uid] + nums[uid] for uid in comments}


def test_drawn_measurements_name_their_muscle_and_side(baseline, followup, tmp_path):
    """A reader looking at an outline in OHIF sees which muscle and side it is, that a structure was not
    found, and (follow-up) the change in cm³ and % within the five lines it shows; each group names
    itself once, in a Comment row, which dciodvfy and dcmqi accept (dcmqi lists no extra measurement)."""
    sr, fsr = baseline[5], followup[3]
    for report in (sr, fsr):
        identifiers = {children(g, "112040")[0].UID: str(children(g, "112039")[0].TextValue)
                       for g in measurement_groups(report)}
        flagged = _near_metal_uids(report)
        for uid, lines in viewer_labels(report).items():
            name = identifiers[uid]
            named = f"{name}, next to metal implant" if uid in flagged else name
            assert lines[0] in (named, f"{name} not found"), lines
            assert not any(line.startswith(name) for line in lines[1:]), lines  # named once
            assert not any(line.startswith("Time Point Order") for line in lines), lines
    absent = [lines for lines in viewer_labels(sr).values() if lines[0].endswith(" not found")]
    presence = [g for g in measurement_groups(sr) if children(g, codes.PRESENCE.value)]
    assert len(absent) == len(presence)
    changed = [lines[:5] for lines in viewer_labels(fsr).values()
               if any(line.startswith(codes.VOLUME_CHANGE_PCT.meaning) for line in lines)]
    assert changed and all(any(line.startswith(codes.VOLUME_CHANGE_PCT.meaning) for line in shown)
                           and any(line.startswith(codes.VOLUME_CHANGE.meaning + ":") for line in shown)
                           for shown in changed)
    fsr.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "f.dcm") == []
    read = tid1500(tmp_path / "f.dcm", tmp_path / "f.json")
    quantities = {m["quantity"]["CodeMeaning"] for g in read["Measurements"] for m in g["measurementItems"]}
    assert "Time Point Order" not in quantities
    assert all(g["TrackingIdentifier"] for g in read["Measurements"])


def test_followup_sr_names_its_model_and_both_sides_groups(followup):
    """As the measurement SR: the model is the observer and each group's algorithm (DEMO for the
    shipped one, in the series description too); a group of both sides together says so, in its
    identifier and as laterality "Right and left", so a total is not read as one side's value."""
    fsr = followup[3]
    assert fsr.SeriesDescription.startswith("DEMO ") == MODEL.demo  # first: series lists cut the end
    observer = [i for i in content_items(fsr) if concept(i) == "121013"]  # Device Observer Name
    assert observer and observer[0].TextValue == algorithm_name(MODEL)
    groups = {str(children(g, "112039")[0].TextValue): g for g in measurement_groups(fsr)}
    for ident, g in groups.items():
        if ident == "Comparison context":
            continue
        assert [i.TextValue for i in children(g, "111001")] == [algorithm_name(MODEL)]  # Algorithm Name
        assert [i.TextValue for i in children(g, "111003")] == [MODEL.version]  # Algorithm Version
        site = children(g, "363698007")[0]  # Finding Site, its laterality modifier below
        side = children(site, "272741003")[0].ConceptCodeSequence[0]
        want = {"left": "Left", "right": "Right"}.get(ident.rsplit(" ", 1)[-1], "Right and left")
        assert side.CodeMeaning == want, ident
    assert "Sartorius both sides" in groups and "Sartorius left" in groups and "Sartorius" not in groups


def test_postoperative_time_point_and_percent_floor(followup, tmp_path):
    """A post-operative follow-up is typed as such; a small baseline gets cm³ but no percentage, a
    speck (below the minimum segment size) no volume at all; dciodvfy accepts the result."""
    _, ct, change, _, _ = followup
    e = next(x for x in change.structures if x.name == "gluteus_medius" and x.side == "left")
    small = e.model_copy(update={"pre_cm3": 3.0, "post_cm3": 4.5, "delta_cm3": 1.5, "loss_pct": -50.0,
                                 "change_pct": None, "delta_index_cm3_m2": 1.5 / 1.62**2})
    speck = e.model_copy(update={"side": "right", "pre_cm3": 0.16, "post_cm3": 0.96, "delta_cm3": 0.8,
                                 "loss_pct": -500.0, "change_pct": None, "delta_index_cm3_m2": 0.8 / 1.62**2})
    edited = change.with_facts(baseline_preoperative=True, structures=[small, speck])
    fsr = build_followup_sr(ct, edited, [], model_info=MODEL)
    fsr.save_as(tmp_path / "postop.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "postop.dcm") == []
    groups = {children(g, "112039")[0].TextValue: g for g in measurement_groups(fsr)}
    got = {concept(i): str(i.MeasuredValueSequence[0].NumericValue)
           for i in groups["Gluteus medius left"].ContentSequence if i.ValueType == "NUM"}
    assert got["VPRE"] == "3.0" and got["118565006"] == "4.5" and got["VDELTA"] == "1.5"
    assert "VCHGPCT" not in got
    assert "Gluteus medius right" not in groups  # neither time point has a structure of the minimum size
    tp_type = children(groups["Gluteus medius left"], "126072")[0].ConceptCodeSequence[0]
    assert (tp_type.CodeValue, tp_type.CodingSchemeDesignator) == ("262061000", "SCT")


def test_followup_change_is_the_difference_of_the_volumes_as_written():
    """100.04 → 90.06 cm³ is written 100.0 and 90.1, so the change is written −9.9, not the −10.0
    that rounding −9.98 on its own gives: the reader's subtraction and the SR agree."""
    from reporting.followup_sr import _measurements

    def record(side_cm3: float) -> VolumeRecord:
        return VolumeRecord(structures=(StructureVolume(
            label=1, name="sartorius", group="anterior", volume_cm3=2 * side_cm3, left_cm3=side_cm3,
            right_cm3=side_cm3),))

    c = compute_change(record(100.04), record(90.06), 1.6, StudyRef(), StudyRef())
    entry = next(e for e in c.structures if e.side == "left")
    assert round(entry.delta_cm3, 1) == -10.0
    values = {m.name.value: m.value for m in _measurements(entry, 1.6, RULES)}
    assert (values["VPRE"], values[codes.VOLUME.value], values["VDELTA"]) == (100.0, 90.1, -9.9)
    assert values["VIDXDELTA"] == -3.9  # -9.9 / 1.6² = -3.87, to 0.1



def test_change_record_is_signed_with_a_percent_floor():
    """change_pct = (post − pre) / pre × 100, negative for a loss; none for a baseline under the floor
    (1 → 6 voxels is +500 %), while the cm³ change is still stated."""
    def record(left: float, right: float) -> VolumeRecord:
        return VolumeRecord(structures=(StructureVolume(
            label=1, name="sartorius", group="anterior", volume_cm3=left + right, left_cm3=left,
            right_cm3=right),))

    c = compute_change(record(0.045, 20.0), record(0.27, 17.0), 1.6, StudyRef(), StudyRef())
    side = {e.side: e for e in c.structures}
    assert side["right"].change_pct == pytest.approx(-15.0)
    assert side["right"].loss_pct == pytest.approx(15.0)  # the paper's loss ratio keeps its sign
    assert side["left"].change_pct is None and side["left"].delta_cm3 == pytest.approx(0.225)
    assert RULES.pct_baseline_floor_cm3 > 0.045


def test_followup_rerun_identical_uids(followup, baseline):
    _, ct, change, fsr, _ = followup
    again = build_followup_sr(ct, change, [baseline[4], baseline[5]], model_info=MODEL)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (fsr.SOPInstanceUID, fsr.SeriesInstanceUID)


def test_sr_referencing_labelmap_seg(baseline, tmp_path):
    """With a LABELMAP SEG the only dciodvfy complaint is its unawareness of the Label Map
    Segmentation SOP Class (1.2.840.10008.5.1.4.1.1.66.7) when checking Referenced Segment Number.
    Its groups outline the same largest cross-sections as with the BINARY SEG (read from its pixels)."""
    _, ct, labels, vols, _, binary_sr = baseline
    lm = build_seg_frames(ct, labels, vols, MODEL, seg_type="LABELMAP").dataset
    sr = build_measurement_sr(ct, lm, vols, MODEL)
    sr.save_as(tmp_path / "sr-lm.dcm", enforce_file_format=True)
    errors = dciodvfy_errors(tmp_path / "sr-lm.dcm")
    assert all("not segmentation - attribute <ReferencedSegmentNumber>" in e for e in errors), errors
    meta = tid1500(tmp_path / "sr-lm.dcm", tmp_path / "sr-lm.json")
    assert len([m for m in meta["Measurements"] if "ReferencedSegment" in m]) == len(lm.SegmentSequence) - 1

    def outlined(report: Dataset) -> dict[str, set[str]]:
        """Tracking UID -> the CT images its outlines are drawn on."""
        out: dict[str, set[str]] = {}
        for g in measurement_groups(report):
            images = out.setdefault(children(g, "112040")[0].UID, set())
            for num in (i for i in g.ContentSequence if i.ValueType == "NUM"):
                for scoord in (c for c in num.get("ContentSequence", []) if c.ValueType == "SCOORD"):
                    images |= {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                               for i in scoord.ContentSequence}
        return out

    assert outlined(sr) == outlined(binary_sr) and any(outlined(sr).values())


def _metal(sr: Dataset) -> Dataset:
    qa = next(g for g in measurement_groups(sr) if children(g, "112039")[0].TextValue == "Quality assurance")
    [metal] = children(qa, codes.QA_METAL.value)
    return metal


def test_metal_flag_says_which_side(baseline, followup, tmp_path):
    """The QA metal flag carries the side the metal lies on (the record's ``metal_where``) as a HAS
    CONCEPT MOD Laterality, the codes the volume groups' finding sites use; no metal, no side."""
    f_root = followup[0]  # implant on the left
    metal = _metal(dcmread(f_root / "sr.dcm"))
    assert metal.ConceptCodeSequence[0].CodeValue == codes.YES.value
    [side] = metal.ContentSequence
    assert (side.RelationshipType, side.ValueType, concept(side)) == ("HAS CONCEPT MOD", "CODE", "272741003")
    assert (side.ConceptCodeSequence[0].CodeValue, side.ConceptCodeSequence[0].CodingSchemeDesignator) == (
        codes.LEFT.value, "SCT")
    assert dciodvfy_errors(f_root / "sr.dcm") == []
    assert "Laterality" in dsrdump(f_root / "sr.dcm")
    tid1500(f_root / "sr.dcm", tmp_path / "f.json")  # dcmqi reads it still
    no_metal = _metal(baseline[5])
    assert no_metal.ConceptCodeSequence[0].CodeValue == codes.NO.value and "ContentSequence" not in no_metal


def test_metal_side_is_never_guessed():
    """Metal on both sides: "Right and left"; a record that does not locate it: no side at all."""
    from reporting.sr import metal_evaluation
    from seg.records import MetalLocation, VolumeQA

    where = MetalLocation(side="both", left_voxels=3, right_voxels=4, z_range_mm=(0, 1),
                          centroid_mm=(0, 0, 0))
    [item] = metal_evaluation(VolumeQA(metal=True, metal_where=where))
    assert item.ContentSequence[0].ConceptCodeSequence[0].CodeValue == codes.BOTH_SIDES.value
    [unlocated] = metal_evaluation(VolumeQA(metal=True))
    assert unlocated.ConceptCodeSequence[0].CodeValue == codes.YES.value
    assert "ContentSequence" not in unlocated


def test_height_status_and_source():
    from reporting.sr import height_status

    none = VolumeRecord()
    implausible = (codes.HEIGHT_IMPLAUSIBLE, codes.HEIGHT_SOURCE_NONE)
    assert height_status(none, SeriesHeader(size_m=3.1)) == implausible
    assert height_status(none, SeriesHeader()) == (codes.HEIGHT_MISSING, codes.HEIGHT_SOURCE_NONE)
    registry = VolumeRecord(height_m=1.6, height_source="registry")
    assert height_status(registry, SeriesHeader()) == (codes.HEIGHT_PRESENT, codes.HEIGHT_SOURCE_REGISTRY)
    header = VolumeRecord(height_m=1.6, height_source="PatientSize")
    assert height_status(header, SeriesHeader(size_m=1.6))[1] == codes.HEIGHT_SOURCE_PATIENT_SIZE


@pytest.mark.parametrize("seg_type", ["FRACTIONAL", "BINARY", "LABELMAP"])
def test_fast_sr_equals_highdicom(seg_type, baseline, tmp_path):
    """The SR splice (image rows added after highdicom's constructor, content encoded once per item,
    frames known from the SEG's build) writes exactly plain highdicom's file."""
    from test_reporting_seg import _fixed_time

    from reporting.seg import build_seg_frames

    _, ct, labels, vols, _, _ = baseline
    built = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type)
    assert built.frames is not None  # the SR need not read the SEG's frames back
    variants = {"plain": build_measurement_sr(ct, built.dataset, vols, MODEL, fast=False, facts=PRE_OP),
                "fast": build_measurement_sr(ct, built.dataset, vols, MODEL, facts=PRE_OP),
                "fast-frames": build_measurement_sr(ct, built.dataset, vols, MODEL, frames=built.frames,
                                                    facts=PRE_OP)}
    assert isinstance(variants["fast"].get_item(0x0040A730), RawDataElement)  # the splice ran
    for name, ds in variants.items():
        _fixed_time(ds)
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    plain = (tmp_path / "plain.dcm").read_bytes()
    assert (tmp_path / "fast.dcm").read_bytes() == plain
    assert (tmp_path / "fast-frames.dcm").read_bytes() == plain


@pytest.mark.parametrize("seg_type", ["FRACTIONAL", "LABELMAP"])
def test_frames_known_from_the_build_equal_frames_read_from_the_seg(seg_type, baseline, tmp_path):
    """What the SR takes from a SEG's build equals what it reads from the SEG on disk."""
    import pydicom

    from reporting.keyslice import pixel_spacing
    from reporting.seg import build_seg_frames
    _, ct, labels, vols, _, _ = baseline
    built = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type)
    built.dataset.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    known, sections = built.frames.largest_sections(pixel_spacing(seg)), key_sections(seg)
    assert known.keys() == sections.keys()
    for n, section in sections.items():
        assert (known[n].sop_instance_uid, known[n].area_cm2) == (section.sop_instance_uid, section.area_cm2)
        assert np.array_equal(known[n].outline, section.outline)


def test_sr_splice_is_checked_against_the_installed_highdicom():
    """Fails loudly on a highdicom the SR splice was not checked against (the node would silently build
    the SR the slow way): run test_fast_sr_equals_highdicom with it, then widen the pin."""
    import highdicom as hd

    from reporting.sr_splice import SPLICE_HIGHDICOM, splice_supported

    assert splice_supported(), f"highdicom {hd.__version__} not in {SPLICE_HIGHDICOM}"
    assert not splice_supported("0.29.0")


def test_sr_splice_refuses_content_citing_no_evidence():
    """highdicom refuses an SR whose content cites an instance missing from the evidence; so does the
    splice, which keeps the content away from highdicom's own check."""
    from reporting import sr_splice

    cited = Dataset()
    cited.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.3.4"
    cited.ReferencedSOPSequence = [ref]
    container = Dataset()
    container.ValueType = "CONTAINER"
    container.ContentSequence = [cited]
    root = Dataset()
    root.ContentSequence = [container]
    evidence = Dataset()
    evidence.SOPInstanceUID = "1.2.3.5"

    def never(_: Dataset) -> Dataset:
        raise AssertionError("highdicom called with uncited evidence")

    with pytest.raises(ValueError, match="1.2.3.4"):
        sr_splice.construct(never, root, [evidence])
    evidence.SOPInstanceUID = "1.2.3.4"
    built = sr_splice.construct(lambda r: Dataset(), root, [evidence])
    assert built.ContentSequence[0].ContentSequence[0] is cited and len(root.ContentSequence) == 1


def test_unchecked_highdicom_builds_the_sr_with_plain_highdicom(baseline, monkeypatch, caplog):
    import highdicom as hd

    from reporting import sr_splice

    _, ct, _, vols, seg, _ = baseline
    monkeypatch.setattr(hd, "__version__", "0.99.0")

    def splice(*args, **kwargs):
        raise AssertionError("SR splice used on an unchecked highdicom")

    monkeypatch.setattr(sr_splice, "construct", splice)
    with caplog.at_level("INFO", logger="reporting.sr"):
        sr = build_measurement_sr(ct, seg, vols, MODEL)
    assert "not checked against highdicom 0.99.0" in caplog.text
    assert isinstance(sr, hd.sr.Comprehensive3DSR)


def test_outline_found_in_the_mask_box_is_the_outline_in_the_whole_image():
    """:func:`reporting.keyslice.outline` works inside the mask's bounding box; the outline, the pixel
    count and the chosen region equal those found in the whole image (several regions, holes, regions
    on the image's edges)."""
    from reporting.keyslice import _outline

    rng = np.random.default_rng(7)
    for case in range(40):
        mask = ndimage.binary_opening(rng.random((40, 52)) < 0.55, iterations=1)
        if case % 3 == 0:
            mask[:, :3] = mask[:3, :] = False  # away from the top and left edges
        if not mask.any():
            continue
        got, whole = outline(mask), _outline(mask)
        assert np.array_equal(got[0], whole[0]) and got[1] == whole[1], case


def test_the_sr_and_the_page_say_what_volumes_json_says_of_the_height():
    """An implausible registry height and no PatientSize: volumes.json said "implausible registry
    height", the SR coded "missing" and the page printed "Body height missing" (each judged
    PatientSize again). A record stored before it had a source is judged by PatientSize."""
    from reporting.sr import height_status
    from reporting.summary import qa_warnings
    from seg.records import ModelInfo

    flagged = VolumeRecord(height_source="implausible registry height")
    assert height_status(flagged, SeriesHeader())[0] == codes.HEIGHT_IMPLAUSIBLE
    assert "Body height implausible: no height index" in qa_warnings(flagged, SeriesHeader(), ModelInfo())
    bad_text = VolumeRecord(height_source="missing")  # a PatientSize "abc": no height, not implausible
    assert height_status(bad_text, SeriesHeader())[0] == codes.HEIGHT_MISSING  # the loader keeps no "abc"
    page = qa_warnings(bad_text, SeriesHeader(), ModelInfo())
    assert "Body height missing: no height index" in page


def _group_named(sr: Dataset, identifier: str) -> Dataset:
    [group] = [g for g in measurement_groups(sr) if str(children(g, "112039")[0].TextValue) == identifier]
    return group


def _num(group: Dataset, code: str) -> float:
    return float(children(group, code)[0].MeasuredValueSequence[0].NumericValue)


def test_measurement_sr_states_the_analysed_muscles_total_per_side(baseline):
    """The paper's Table 2 total (21 muscles) is in the SR, per side and both, with its height index,
    equal to the sum of the 21 muscles as the SR writes them (within their rounding)."""
    _, _, _, vols, _, sr = baseline
    by_name_ = vols.by_name()
    for side in ("left", "right", "both"):
        label = f"21 analysed thigh muscles {'both sides' if side == 'both' else side}"
        g = _group_named(sr, label)
        expected = sum(by_name_[n].side_volume(side) or 0.0 for n in ANALYSED_MUSCLES if n in by_name_)
        assert expected > 100
        assert _num(g, "118565006") == pytest.approx(round(expected, 1), abs=1e-9)
        assert _num(g, "VIDX") == pytest.approx(round(expected / vols.height_m ** 2, 2), abs=1e-9)
        assert children(g, "QAZCOV")  # located by the scanned extent, so OHIF can open the report
    both = _num(_group_named(sr, "21 analysed thigh muscles both sides"), "118565006")
    sides = sum(_num(_group_named(sr, f"21 analysed thigh muscles {s}"), "118565006")
                for s in ("left", "right"))
    assert both == pytest.approx(sides, abs=0.11)


def test_change_sr_states_the_total_change_fracture_type_and_days_since_surgery(followup, baseline, tmp_path):
    """The change of the 21 muscles together, the fracture type and the days since surgery (the
    paper's strata) are in the change SR; another fracture type or surgery date is other content."""
    root, ct, change, fsr, _ = followup
    for side in change.total_analysed_muscles_by_side:  # the operated side's own total too
        group = _group_named(fsr, f"21 analysed thigh muscles {side.side}")
        assert _num(group, "VPRE") == round(side.pre_cm3, 1)
    total = _group_named(fsr, "21 analysed thigh muscles both sides")
    t = change.total_analysed_muscles
    assert _num(total, "VPRE") == pytest.approx(round(t.pre_cm3, 1), abs=1e-9)
    assert _num(total, "118565006") == pytest.approx(round(t.post_cm3, 1), abs=1e-9)
    assert _num(total, "VCHGPCT") == pytest.approx(round(t.change_pct, 1), abs=1e-9)
    context = _group_named(fsr, "Comparison context")
    assert not children(context, "DAYSPOSTOP") and not children(context, "FXTYPE")  # not in the registry
    # the follow-up's metal with its side, and the baseline's coverage beside the follow-up's
    metal = children(context, "QAMETAL")[0]
    assert metal.ConceptCodeSequence[0].CodeValue == "373066001"  # Yes
    assert children(metal, "272741003")[0].ConceptCodeSequence[0].CodeMeaning == "Left"
    assert _num(context, "QAZCOVPRE") == round(change.baseline_qa.z_coverage_mm, 1)
    assert _num(context, "QAZCOV") == round(change.followup_qa.z_coverage_mm, 1)
    known = change.with_facts(fracture_type="ITF", surgery_date="20240110")
    evidence = [baseline[4], baseline[5]]
    again = build_followup_sr(ct, known, evidence, model_info=MODEL)
    context = _group_named(again, "Comparison context")
    assert _num(context, "DAYSPOSTOP") == 116  # 2024-01-10 to 2024-05-05 (a leap year)
    assert children(context, "FXTYPE")[0].ConceptCodeSequence[0].CodeValue == "ITF"
    assert again.SOPInstanceUID != fsr.SOPInstanceUID
    other = build_followup_sr(ct, known.with_facts(fracture_type="FNF"), evidence, model_info=MODEL)
    assert other.SOPInstanceUID != again.SOPInstanceUID
    again.save_as(tmp_path / "again.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "again.dcm") == []


def test_change_sr_codes_each_note_that_makes_the_comparison_less_comparable(followup, baseline, tmp_path):
    """The page's comparability warnings (two models, two lengths of thigh, ...) are coded in the change
    SR's context group, once per kind in the order the change states them; other notes (height) are
    not; the report with them is other content (a new UID) and still valid."""
    root, ct, change, fsr, _ = followup
    assert not children(_group_named(fsr, "Comparison context"), "QACMP")  # one model, one coverage
    notes = (Reason(ReasonCode.MODELS_DIFFER, "Baseline measured by model m 1.0, follow-up by 1.1"),
             Reason(ReasonCode.NO_HEIGHT, "no plausible height"),
             Reason(ReasonCode.COVERAGE_DIFFERS, "The follow-up covers 40 mm less thigh at the knee end"),
             Reason(ReasonCode.COVERAGE_DIFFERS, "The follow-up covers 30 mm less at the femoral head end"))
    with_notes = change.with_facts(notes=[*change.notes, *notes])
    noted = build_followup_sr(ct, with_notes, [baseline[4], baseline[5]], model_info=MODEL)
    stated = children(_group_named(noted, "Comparison context"), "QACMP")
    assert [i.ConceptCodeSequence[0].CodeValue for i in stated] == ["CMPMODEL", "CMPCOV"]
    assert noted.SOPInstanceUID != fsr.SOPInstanceUID
    noted.save_as(tmp_path / "noted.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "noted.dcm") == []


def test_every_comparability_note_has_its_code():
    assert set(codes.COMPARABILITY) == COMPARABILITY_CODES
    assert len({c.value for c in codes.COMPARABILITY.values()}) == len(COMPARABILITY_CODES)
    assert all(len(c.meaning) <= 64 for c in codes.COMPARABILITY.values())  # LO


def _time_points(sr: Dataset) -> set[tuple[str, str, str]]:
    """(Time Point, Time Point Type code, Subject Time Point Identifier) of every group's TID 1502."""
    out = set()
    for g in measurement_groups(sr):
        [text], [kind], [ident] = children(g, "C2348792"), children(g, "126072"), children(g, "126070")
        out.add((str(text.TextValue), str(kind.ConceptCodeSequence[0].CodeValue), str(ident.TextValue)))
    return out


def test_measurement_sr_states_the_registrys_time_point_and_fracture(baseline, followup, tmp_path):
    """A study the registry's surgery date places: every group's TID 1502 says pre-operative, or
    post-operative with the days since surgery (CID 6146 codes), with the study date as the subject's
    time point identifier and no Time Point Order; the QA group gives the fractured side and the
    fracture type. dciodvfy and dcmqi read both SRs; dcmqi lists no extra measurement."""
    pre, post_root = baseline[5], followup[0]
    post = dcmread(post_root / "sr.dcm")
    assert _time_points(pre) == {("Pre-operative (surgery 2024-01-10)", "262068006", "20240105")}
    assert _time_points(post) == {("Post-operative day 116 (surgery 2024-01-10)", "262061000", "20240505")}
    for sr, name in ((pre, "pre"), (post, "post")):
        assert not [i for i in content_items(sr) if concept(i) == "126073"]  # no Time Point Order
        qa = _group_named(sr, "Quality assurance")
        side = children(qa, codes.QA_FRACTURED_SIDE.value)[0].ConceptCodeSequence[0]
        assert (side.CodeValue, side.CodeMeaning) == (codes.LEFT.value, "Left")
        assert children(qa, codes.FRACTURE_TYPE.value)[0].ConceptCodeSequence[0].CodeValue == "FNF"
        sr.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == []
        read = tid1500(tmp_path / f"{name}.dcm", tmp_path / f"{name}.json")
        quantities = {m["quantity"]["CodeValue"] for g in read["Measurements"] for m in g["measurementItems"]}
        assert not quantities & {"126073", "C2348792", "126070"}
        assert len(read["Measurements"]) == len(measurement_groups(sr))


def test_measurement_sr_without_registry_facts_states_none(baseline):
    """No registry row: no time point, no fractured side or type (nothing guessed); a surgery date
    without a study date places nothing either. Each fact shown is part of the SR's UID, so a registry
    row that arrives, or changes, after an SR was sent gives the re-run's SR another UID."""
    _, ct, _, vols, seg, with_facts = baseline
    bare = build_measurement_sr(ct, seg, vols, MODEL)
    assert not [i for i in content_items(bare)
                if concept(i) in ("C2348792", "126072", "126070", "QAFXSIDE", "FXTYPE")]
    undated = PRE_OP.model_copy(update={"study_date": None})
    assert undated.time_point is None
    sr = build_measurement_sr(ct, seg, vols, MODEL, facts=undated)
    assert not [i for i in content_items(sr) if concept(i) == "C2348792"]
    assert children(_group_named(sr, "Quality assurance"), "FXTYPE")
    variants = [ClinicalTimePoint(), PRE_OP.model_copy(update={"fracture_type": None}), PRE_OP,
                PRE_OP.model_copy(update={"fracture_type": "ITF"}),
                PRE_OP.model_copy(update={"surgery_date": "20240101"})]  # now a post-operative CT
    uids = [measurement_sr_uid(ct, vols, MODEL, f) for f in variants]
    assert len(set(uids)) == len(variants)
    assert uids[0] == bare.SOPInstanceUID and uids[2] == with_facts.SOPInstanceUID
    assert bare.SeriesInstanceUID == with_facts.SeriesInstanceUID  # the same series, another instance



def _near_metal_uids(sr: Dataset) -> set[str]:
    """Tracking UIDs of the groups flagged next to the implant (QANEARMTL = yes)."""
    return {children(g, "112040")[0].UID for g in measurement_groups(sr)
            if children(g, codes.QA_NEAR_METAL.value)}


def _near_metal_groups(sr: Dataset) -> set[tuple[str, str]]:
    """(structure, side) of the groups flagged next to the implant (QANEARMTL = yes)."""
    out = set()
    for g in measurement_groups(sr):
        flags = children(g, codes.QA_NEAR_METAL.value)
        if flags:
            assert [f.ConceptCodeSequence[0].CodeValue for f in flags] == [codes.YES.value]
            out.add(parse_tracking_label(children(g, "112039")[0].TextValue))
    return out


def test_muscles_next_to_the_implant_are_flagged_in_both_srs(baseline, followup, tmp_path):
    """Each muscle side the measurement flags next to the implant carries QANEARMTL = yes in its
    volume group, and its change in the change SR; none without metal; dciodvfy accepts both."""
    from seg.io import load_nifti

    f_root, f_ct, change, fsr, _ = followup
    labels = f_ct.with_array(np.asarray(load_nifti(f_root / "truth" / "labels.nii.gz").array, np.uint8))
    f_vols = measure_volumes(labels, f_ct, model=MODEL)
    flagged = {(s.name, side) for s in f_vols.structures for side in ("left", "right") if s.near_metal(side)}
    assert flagged and {side for _, side in flagged} == {"left"}  # the implant is on the left
    assert _near_metal_groups(dcmread(f_root / "sr.dcm")) == flagged
    assert _near_metal_groups(baseline[5]) == set()  # no metal: no flag
    # the change SR: the analysed muscles' sides flagged at follow-up (none at baseline), and their
    # both-sides groups
    analysed = {(n, side) for n, side in flagged if n in ANALYSED_MUSCLES}
    assert _near_metal_groups(fsr) == analysed | {(n, "both") for n, _ in analysed}
    assert dciodvfy_errors(f_root / "sr.dcm") == [] and dciodvfy_errors(f_root / "followup.dcm") == []
    # OHIF shows no qualitative evaluation beside an outline: the first line it writes (the drawn
    # group's Comment) says it, for exactly the flagged sides, in both SRs
    for report in (dcmread(f_root / "sr.dcm"), fsr):
        names = {children(g, "112040")[0].UID: str(children(g, "112039")[0].TextValue)
                 for g in measurement_groups(report)}
        said = {uid for uid, lines in viewer_labels(report).items()
                if lines[0] == f"{names[uid]}, next to metal implant"}
        assert said == _near_metal_uids(report) != set()
        assert not any("next to metal" in line for lines in viewer_labels(report).values()
                       for line in lines[1:])  # said once, the numbers' lines left as they were
    # dcmqi reads the flag as before: among each flagged side's qualitative evaluations
    meta = tid1500(f_root / "sr.dcm", tmp_path / "f.json")
    read = {parse_tracking_label(g["TrackingIdentifier"]) for g in meta["Measurements"]
            if any(q["conceptCode"]["CodeValue"] == codes.QA_NEAR_METAL.value
                   for q in g.get("qualitativeEvaluations", []))}
    assert read == flagged
