"""TID 1500 measurement report (Comprehensive 3D SR) with one volumetric group per muscle and side.

Why TID 1500: it is the template viewers and dcmqi understand for "this segment has this volume",
it points at the SEG segment (so a click shows the region) and carries a tracking identifier that
is the same for a patient's muscle in every study, which is what longitudinal viewers match on.
Each group names the CT series its segment was derived from (TID 1411 "Source series for
segmentation"), not each CT image: the SEG's frames already name their images, and one row per
segment and slice made the report a megabyte of references that SR viewers list in full. A
structure side below the minimum segment size (:mod:`reporting.rules`) has no segment and is
reported as absent, without a volume. Values are rounded to the precision in ``reporting.rules``.
QA facts (coverage, metal and its side, height) travel as qualitative evaluations so a reader sees
why a number may not be trusted, without a free-text parser; beside them, the registry's fractured
side and fracture type when it has them. When the registry's surgery date and the study date place the
study before or after surgery, every group carries that as its TID 1502 time point context
(pre-operative, or post-operative with the days since surgery), as the change SR's groups carry theirs.

Every measurement group also carries spatial coordinates, because OHIF 3.13 cannot open a TID 1500
report with a group that has none (docs/upstream.md §6), and highdicom's TID 1411 builder takes a
Referenced Segment or an image region, not both, and no coordinates on its measurements. So each
volume group has a TID 1501 companion with the same tracking identifiers: the segment's maximal
cross-sectional area, inferred from its outline on the CT slice where it is largest
(:mod:`reporting.keyslice`). Groups about the scan rather than a segment (QA,
absent structures) state the craniocaudal coverage, inferred from the scanned extent (SCOORD3D).

Every group a viewer draws (those with coordinates) also names itself in a (121106, DCM, "Comment")
TEXT row (TID 1501 is extensible): OHIF labels a drawn measurement with its NUMs and that comment
only, never with the tracking identifier or finding site, so without it a reader sees
"Volume: 24.5 cm3" beside an outline and must guess the muscle and side (:func:`name_for_viewers`);
a side flagged next to the implant says so in that row too (:func:`viewer_name`).
"""

from __future__ import annotations

import logging
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes as std

from reporting import codes, sr_splice
from reporting.keyslice import Section, largest_sections, pixel_spacing
from reporting.rules import RULES, ReportingRules, rounded
from reporting.seg import algorithm_name, series_description
from reporting.segframes import SegFrames
from reporting.uids import (
    TOTAL,
    copy_identity,
    date_series,
    derived_uid,
    output_uid,
    parse_tracking_label,
    registry_facts,
    source_content,
    source_header,
    tracking_label,
    tracking_subject,
    tracking_uid,
)
from seg.dates import display_date
from seg.header import SeriesHeader
from seg.height import height_state
from seg.labels import by_name
from seg.records import (
    ClinicalTimePoint,
    ModelInfo,
    Side,
    StructureVolume,
    TimePoint,
    VolumeQA,
    VolumeRecord,
)
from seg.volume import Volume

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9902
CM3 = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")
CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
CM3_PER_M2 = hd.sr.CodedConcept("cm3/m2", "UCUM", "cubic centimeter per square meter")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
METER = hd.sr.CodedConcept("m", "UCUM", "meter")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_PER_FRAME = 0x52009230  # PerFrameFunctionalGroupsSequence


def observation_context(model_info: ModelInfo) -> hd.sr.ObservationContext:
    """The algorithm as device observer (name says DEMO when the demo model produced the numbers)."""
    name = algorithm_name(model_info)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", model_info.name, model_info.version),
        name=name,
        manufacturer_name="dicomnode",
        model_name=(model_info.name or "unknown-model")[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=std.DCM.Device,
                                                      observer_identifying_attributes=device))


def time_point_context(facts: ClinicalTimePoint) -> hd.sr.TimePointContext | None:
    """TID 1502 of a measured study the registry places before or after surgery: Time Point in words
    ("Pre-operative (surgery 2024-01-10)", "Post-operative day 116 (surgery ...)"), Time Point Type
    from CID 6146 and the study date as Subject Time Point Identifier (as the change SR gives its
    follow-up's). None when it cannot be placed: no time point is guessed.

    No Time Point Order (the order among the patient's studies is pairing's, decided later) and no
    offset NUM: CID 280 has no surgery event, and OHIF prints a bare NUM as a measurement.
    """
    kind = facts.time_point
    if kind is None:
        return None
    surgery = f"(surgery {display_date(facts.surgery_date)})"
    text = (f"Pre-operative {surgery}" if kind is TimePoint.PREOPERATIVE
            else f"Post-operative day {facts.days_since_surgery} {surgery}")
    return hd.sr.TimePointContext(
        time_point=text,
        time_point_type=codes.PREOPERATIVE if kind is TimePoint.PREOPERATIVE else codes.POSTOPERATIVE,
        subject_time_point_identifier=facts.study_date,
    )


def fracture_evaluations(facts: ClinicalTimePoint) -> list[hd.sr.QualitativeEvaluation]:
    """The registry's fractured side (QAFXSIDE) and fracture type (FXTYPE), those it has, coded as the
    change SR codes them."""
    out = []
    side = codes.laterality_code(facts.fractured_side or "")
    if side is not None:
        out.append(hd.sr.QualitativeEvaluation(codes.QA_FRACTURED_SIDE, side))
    fracture = codes.FRACTURE_TYPES.get(facts.fracture_type or "")
    if fracture is not None:
        out.append(hd.sr.QualitativeEvaluation(codes.FRACTURE_TYPE, fracture))
    return out


def algorithm_id(model_info: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algorithm_name(model_info),
                                         version=(model_info.version or "0")[:64])


def segments_of(seg: Dataset) -> list[tuple[int, str, str]]:
    """(segment number, structure name, side) for each segment of a SEG built by reporting.seg."""
    out = []
    for item in seg.SegmentSequence:
        found = parse_tracking_label(str(item.get("TrackingID", "")))
        if found is not None:  # not a LABELMAP's background
            out.append((int(item.SegmentNumber), *found))
    return out


def per_frame_groups(seg: Dataset) -> Sequence:
    """The SEG's per-frame functional groups, parsed without touching the SEG itself.

    Why: the fast BINARY encoder stores them as raw bytes; parsing them in place would make saving
    the SEG re-encode every frame item, which is what that encoder avoids (minutes on a large CT).
    """
    elem = seg.get_item(_PER_FRAME)
    if not isinstance(elem, RawDataElement):
        return seg.PerFrameFunctionalGroupsSequence
    holder = Dataset()
    holder[_PER_FRAME] = elem
    return holder.PerFrameFunctionalGroupsSequence


def key_sections(seg: Dataset) -> dict[int, Section]:
    """Per segment number, its largest cross-section (CT image, outline, area), read from the SEG."""
    return largest_sections(seg, per_frame_groups(seg))


def max_area(section: Section, rules: ReportingRules = RULES) -> hd.sr.Measurement:
    """TID 300: Area, derivation Maximum, in cm², INFERRED FROM its outline (SCOORD POLYLINE, closed)
    SELECTED FROM the CT image of the segment's largest cross-section."""
    where = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=section.outline,
        source_image=hd.sr.SourceImageForRegion(section.sop_class_uid, section.sop_instance_uid))
    return hd.sr.Measurement(name=std.SCT.Area, value=rounded(section.area_cm2, rules.area_decimals),
                             unit=CM2, derivation=std.SCT.Maximum, referenced_coordinates=[where])


def coverage_mm(ct: Volume) -> float:
    """Craniocaudal coverage as :mod:`seg.measure` states it: slices × slice spacing."""
    return ct.shape[2] * ct.spacing_mm[2]


def coverage(ct: Volume, value_mm: float | None = None,
             rules: ReportingRules = RULES) -> hd.sr.Measurement:
    """TID 300: the coverage (mm), INFERRED FROM the scanned extent: a SCOORD3D line through the
    image centre from the first slice's outer face to the last one's (its length is the coverage).
    Without a Frame of Reference (not a DICOM series) the value stands alone."""
    value = coverage_mm(ct) if value_mm is None else value_mm
    for_uid = ct.header.frame_of_reference_uid
    where = None
    if for_uid:
        i, j, n = (ct.shape[0] - 1) / 2, (ct.shape[1] - 1) / 2, ct.shape[2]
        ends = ct.world_coords(np.array([[i, j, -0.5], [i, j, n - 0.5]]))
        where = [hd.sr.CoordinatesForMeasurement3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                                                   graphic_data=ends, frame_of_reference_uid=str(for_uid))]
    return hd.sr.Measurement(name=codes.QA_Z_COVERAGE, value=rounded(value, rules.length_decimals), unit=MM,
                             referenced_coordinates=where)


def source_evidence(seg: Dataset) -> list[Dataset]:
    """Minimal headers of the SEG's source CT images, as SR evidence for the image references.

    Built from the SEG's ReferencedSeriesSequence (same study), so no CT file is read again.
    """
    out = []
    for series in seg.get("ReferencedSeriesSequence", []):
        for ref in series.ReferencedInstanceSequence:
            ds = Dataset()
            ds.StudyInstanceUID = seg.StudyInstanceUID
            ds.SeriesInstanceUID = series.SeriesInstanceUID
            ds.SOPClassUID = ref.ReferencedSOPClassUID
            ds.SOPInstanceUID = ref.ReferencedSOPInstanceUID
            out.append(ds)
    return out


def height_status(volumes: VolumeRecord,
                  header: SeriesHeader) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """(status, source) of the body height used for the index: present/missing/implausible."""
    if volumes.height_m:
        src = volumes.height_source or ""
        if src == "PatientSize":
            source = codes.HEIGHT_SOURCE_PATIENT_SIZE
        elif "registry" in src.lower():
            source = codes.HEIGHT_SOURCE_REGISTRY
        else:
            source = codes.HEIGHT_SOURCE_OTHER
        return codes.HEIGHT_PRESENT, source
    state = height_state(volumes.height_m, volumes.height_source, header.size_m)
    status = codes.HEIGHT_IMPLAUSIBLE if state == "implausible" else codes.HEIGHT_MISSING
    return status, codes.HEIGHT_SOURCE_NONE


def metal_evaluation(qa: VolumeQA) -> hd.sr.QualitativeEvaluation:
    """QAMETAL yes/no; when yes and the record locates the metal, the side it lies on as a HAS CONCEPT
    MOD Laterality (CID 244: left, right, or "Right and left" when on both), as the volume groups'
    finding sites state theirs.

    Why: a reader must know which thigh's volumes the artefact may spoil. A record that does not locate
    the metal (``metal_where`` unset) gets no modifier, which says the side is not stated: never a guess.
    """
    item = hd.sr.QualitativeEvaluation(codes.QA_METAL, codes.YES if qa.metal else codes.NO)
    side = codes.laterality_code(qa.metal_where.side) if qa.metal and qa.metal_where else None
    if side is not None:
        modifier = hd.sr.CodeContentItem(name=codes.LATERALITY, value=side,
                                         relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
        item[0].ContentSequence = hd.sr.ContentSequence([modifier])  # the template's one CODE item
    return item


def name_for_viewers(group: hd.sr.Template, text: str) -> hd.sr.Template:
    """``group`` with a CONTAINS TEXT (121106, DCM, "Comment") row saying what it is about.

    Why: OHIF (3.13) draws a group's outline or line labelled with its Comment rows and NUMs alone; the
    tracking identifier, finding site and qualitative evaluations (such as "Absent") are not shown, so
    the muscle, its side and an absence would be invisible to a reader. dcmqi and highdicom ignore it.
    """
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=std.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def viewer_name(name: str, near_metal: bool | None) -> str:
    """The Comment text of a structure side's drawn group: its tracking identifier, followed by
    ", next to metal implant" when the side is flagged (QANEARMTL = yes, :func:`near_metal_evaluations`).

    Why: OHIF (3.13) shows neither that qualitative evaluation nor any other beside an outline, only the
    Comment rows and NUMs, five lines at most; in the name's own line the flag takes no line from the
    numbers (a change group already fills five). The coded evaluation stays what the SR states; the
    text repeats its meaning for viewers, as the name repeats the tracking identifier.
    """
    return f"{name}, {codes.QA_NEAR_METAL.meaning.lower()}" if near_metal else name


def qa_group(ct: Volume, volumes: VolumeRecord, model_info: ModelInfo, rules: ReportingRules = RULES,
             facts: ClinicalTimePoint = ClinicalTimePoint(),
             time_point: hd.sr.TimePointContext | None = None,
             ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Series-level QA: z-coverage (mm), metal yes/no, height status and source, height (m), and the
    minimum segment size below which a structure was reported absent; the registry's fractured side
    and fracture type when known. The coverage is stated from the CT when the record lacks it (it is
    slices × spacing either way)."""
    qa = volumes.qa
    content = source_content(ct.header.series_instance_uid or "", ct.source_sop_uids)
    measurements = [coverage(ct, qa.z_coverage_mm, rules)]  # the group's place: the scanned extent
    if volumes.height_m:
        measurements.append(hd.sr.Measurement(
            name=codes.BODY_HEIGHT, value=rounded(volumes.height_m, rules.height_decimals), unit=METER))
    measurements.append(hd.sr.Measurement(name=codes.MIN_SEGMENT_VOLUME, unit=CM3,
                                          value=rounded(rules.min_segment_cm3, rules.volume_decimals)))
    status, source = height_status(volumes, ct.header)
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, status),
        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, source),
    ]
    if qa.metal is not None:
        evaluations.append(metal_evaluation(qa))
    if qa.z_coverage_ok is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QA_Z_COVERAGE_OK,
                                                       codes.YES if qa.z_coverage_ok else codes.NO))
    evaluations += fracture_evaluations(facts)
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=output_uid(content, model_info, "SR/qa-group"),
                                                     identifier="Quality assurance"),
        time_point_context=time_point,
        algorithm_id=algorithm_id(model_info),
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    ), "Quality assurance")


def _referenced_segment(seg: Dataset, number: int, series_uid: str) -> hd.sr.ReferencedSegment:
    """TID 1411 rows: the segment and its source series."""
    return hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                   segment_number=number,
                                   source_series=hd.sr.SourceSeriesForSegmentation(series_uid))


class _GroupHeader(TypedDict):
    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: hd.sr.CodedConcept
    finding_sites: list[hd.sr.FindingSite]
    algorithm_id: hd.sr.AlgorithmIdentification


def group_header(subject: str, name: str, side: str, model_info: ModelInfo) -> _GroupHeader:
    """What every group about one structure side, or the 21 analysed muscles' total (``name`` =
    :data:`reporting.uids.TOTAL`), starts with, in both SRs: its tracking identifier and UID (the same
    for the patient's muscle in every study), finding type and site (with laterality), algorithm."""
    code = codes.ANALYSED_MUSCLES if name == TOTAL else codes.structure_code(name)
    return _GroupHeader(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(subject, name, side),
                                                     identifier=tracking_label(name, side)),
        finding_type=code,
        finding_sites=[hd.sr.FindingSite(anatomic_location=code, laterality=codes.laterality_code(side))],
        algorithm_id=algorithm_id(model_info),
    )


def volume_group(subject: str, seg: Dataset, series_uid: str, number: int, name: str, side: Side,
                 entry: StructureVolume, height_m: float | None, model_info: ModelInfo,
                 rules: ReportingRules = RULES, time_point: hd.sr.TimePointContext | None = None,
                 ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1411 group of one segment: volume (and height index), rounded per ``rules``; flagged when
    the side lies next to the implant."""
    volume = entry.side_volume(side)
    if volume is None:
        return None
    measurements = [hd.sr.Measurement(name=codes.VOLUME, value=rounded(volume, rules.volume_decimals),
                                      unit=CM3)]
    if height_m:
        measurements.append(hd.sr.Measurement(name=codes.VOLUME_INDEX, unit=CM3_PER_M2,
                                              value=rounded(volume / height_m**2, rules.index_decimals)))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        **group_header(subject, name, side, model_info),
        time_point_context=time_point,
        referenced_segment=_referenced_segment(seg, number, series_uid),
        measurements=measurements,
        qualitative_evaluations=near_metal_evaluations(entry.near_metal(side)),
    )


def near_metal_evaluations(near: bool | None) -> list[hd.sr.QualitativeEvaluation] | None:
    """QANEARMTL = yes for a muscle side flagged next to the implant (:mod:`seg.metal_proximity`), in
    both SRs' groups of that side; nothing otherwise, so a study without metal reads as before."""
    return [hd.sr.QualitativeEvaluation(codes.QA_NEAR_METAL, codes.YES)] if near else None


def section_group(subject: str, name: str, side: str, section: Section, model_info: ModelInfo,
                  rules: ReportingRules = RULES, time_point: hd.sr.TimePointContext | None = None,
                  near_metal: bool | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 companion of a volume group (same tracking identifier and UID, so readers that merge
    groups by UID, as OHIF does, show one muscle): its maximal cross-sectional area and outline,
    named for viewers (the volume group has no coordinates, so viewers draw this one), with the volume
    group's near-metal flag in words (:func:`viewer_name`)."""
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        **group_header(subject, name, side, model_info),
        time_point_context=time_point,
        measurements=[max_area(section, rules)],
    ), viewer_name(tracking_label(name, side), near_metal))


def absent_group(subject: str, name: str, side: str, model_info: ModelInfo, ct: Volume,
                 rules: ReportingRules = RULES, time_point: hd.sr.TimePointContext | None = None,
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying a structure side was not found (no segment of the minimum size) within
    the scanned extent, whose coverage it states (the group's spatial coordinates).

    Same tracking UID as its volume group in other studies, so a longitudinal reader sees "absent"
    rather than a silent gap; named for viewers with "not found", since they do not show the
    qualitative evaluation.
    """
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        **group_header(subject, name, side, model_info),
        time_point_context=time_point,
        measurements=[coverage(ct, rules=rules)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.ABSENT)],
    ), f"{tracking_label(name, side)} not found")


def total_group(subject: str, side: Side, volume_cm3: float, height_m: float | None, ct: Volume,
                model_info: ModelInfo, rules: ReportingRules = RULES,
                time_point: hd.sr.TimePointContext | None = None,
                ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the paper's 21 analysed muscles together on one side (or both): the total
    its Table 2 compares by fracture type, with its height index; located by the scanned extent,
    which the total depends on."""
    measurements = [hd.sr.Measurement(name=codes.VOLUME, value=rounded(volume_cm3, rules.volume_decimals),
                                      unit=CM3)]
    if height_m:
        measurements.append(hd.sr.Measurement(name=codes.VOLUME_INDEX, unit=CM3_PER_M2,
                                              value=rounded(volume_cm3 / height_m**2, rules.index_decimals)))
    measurements.append(coverage(ct, rules=rules))
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        **group_header(subject, TOTAL, side, model_info),
        time_point_context=time_point,
        measurements=measurements,
    ), tracking_label(TOTAL, side))


def _series_uid(ct: Volume, src0: Dataset | None) -> str:
    """The source series' UID (from the volume's metadata, else its first source header)."""
    return str(ct.header.series_instance_uid or src0.SeriesInstanceUID)  # type: ignore[union-attr]


def measurement_sr_uid(ct: Volume, volumes: VolumeRecord, model_info: ModelInfo,
                       facts: ClinicalTimePoint = ClinicalTimePoint()) -> str:
    """The SOP Instance UID :func:`build_measurement_sr` gives the SR of ``ct``, known before it is
    built (the node names the SR's file before a child builds it). The height and the registry's
    facts it reports are part of the key: a re-run after a registry import that gave or changed them
    is other content, so another instance."""
    src0 = None if ct.header.series_instance_uid else source_header(ct.source_files)
    content = source_content(_series_uid(ct, src0), ct.source_sop_uids)
    shown = registry_facts(volumes.height_m, volumes.height_source) + facts.key()
    return output_uid(content, model_info, "SR/instance" + shown)


def build_measurement_sr(ct: Volume, seg: Dataset, volumes: VolumeRecord, model_info: ModelInfo,
                         rules: ReportingRules = RULES, frames: SegFrames | None = None,
                         fast: bool = True, facts: ClinicalTimePoint = ClinicalTimePoint()) -> Dataset:
    """The TID 1500 SR for one measured series: ``volumes``' numbers rounded per ``rules``, one volume
    group per SEG segment (followed by its cross-section companion), one "absent" group per
    structure side without a segment, then the QA group.

    ``frames`` (from :func:`reporting.seg.build_seg_frames`) says what the SEG's frames hold without
    reading them back. ``fast`` keeps the content out of highdicom's constructor and encodes it once
    per distinct item (:mod:`reporting.sr_splice`, only on a highdicom it was checked against; the
    same bytes); False = plain highdicom. ``facts``: the registry's, read once by the job
    (:meth:`dicomnode.clinical.registry.Resolved.time_point`); none known = none stated.
    """
    src0 = source_header(ct.source_files)
    subject = tracking_subject(src0, ct.header)
    series_uid = _series_uid(ct, src0)
    content = source_content(series_uid, ct.source_sop_uids)
    by_label = volumes.by_label()
    height_m = volumes.height_m or None
    sections = frames.largest_sections(pixel_spacing(seg)) if frames is not None else key_sections(seg)
    if fast and not sr_splice.splice_supported():
        log.info("SR splice not checked against highdicom %s; plain highdicom", hd.__version__)
        fast = False
    when = time_point_context(facts)
    groups: list = []
    present: set[tuple[str, str]] = set()
    for number, name, side in segments_of(seg):
        entry = by_label.get(by_name(name).label)
        if entry is None:
            continue
        g = volume_group(subject, seg, series_uid, number, name, side, entry, height_m, model_info, rules,
                         when)
        if g is not None:
            groups.append(g)
            groups.append(section_group(subject, name, side, sections[number], model_info, rules, when,
                                        entry.near_metal(side)))
            present.add((name, side))
    for entry in sorted(volumes.structures, key=lambda e: e.label):
        groups.extend(absent_group(subject, entry.name, side, model_info, ct, rules, when)
                      for side in entry.sides() if (entry.name, side) not in present)
    groups.extend(total_group(subject, side, volumes.analysed_total(side), height_m, ct, model_info, rules,
                              when)
                  for side in ("left", "right", "both"))
    groups.append(qa_group(ct, volumes, model_info, rules, facts, when))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(model_info),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
    )
    evidence = [seg, *source_evidence(seg)]

    def construct(root: Dataset) -> hd.sr.Comprehensive3DSR:
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=root,
            series_instance_uid=output_uid(content, model_info, "SR/series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=measurement_sr_uid(ct, volumes, model_info, facts),
            instance_number=1,
            manufacturer="dicomnode",
            is_complete=True,
            is_final=False,
            is_verified=False,
        )

    sr = sr_splice.construct(construct, report[0], evidence) if fast else construct(report[0])
    sr.SeriesDescription = series_description("Thigh muscle volumes SR", model_info)
    copy_identity(sr, src0, ct.header)
    date_series(sr)
    codes.declare_schemes(sr)
    return sr_splice.encode_content(sr) if fast else sr
