"""Follow-up report (Comprehensive 3D SR, TID 1500) in the follow-up study, from a change record.

Why a separate SR: the measurement SR of each study stays a pure record of that study; the change
between two studies is a new statement with its own time-point context (TID 1502: follow-up order,
days since baseline, post-operative when the baseline preceded surgery), placed in the later study
and citing the earlier study's SEG/SR as evidence. It is a plain TID 1500 report (root concept
126000 "Imaging Measurement Report") so viewers that read TID 1500 read it. Its measurement groups
reuse the per-muscle tracking UIDs of the measurement SRs, so a longitudinal viewer can chain them.
Changes are signed, follow-up minus baseline (negative for a loss), in cm³ and in % of baseline;
values are rounded per :mod:`reporting.rules` (the change in cm³ is the difference of the two
volumes as written), a volume below the minimum segment size is not stated, and no percentage is
stated for a baseline below the floor.

Every group carries spatial coordinates, which OHIF 3.13 needs to open a TID 1500 report
(docs/upstream.md §6): given the follow-up's own SEG, a structure's group states its maximal
cross-sectional area at follow-up, inferred from the outline on the CT slice where it is largest;
otherwise (and for the comparison context) the follow-up's craniocaudal coverage, inferred from
the scanned extent (as in :mod:`reporting.sr`). Every group names itself for viewers
(:func:`reporting.sr.name_for_viewers`), a flagged side with its near-metal flag in words
(:func:`reporting.sr.viewer_name`).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from reporting import codes
from reporting.change import days_since_surgery
from reporting.keyslice import Section
from reporting.rules import RULES, ReportingRules, rounded, shown_change
from reporting.seg import series_description
from reporting.source_header import read_source_headers
from reporting.sr import (
    CM3,
    CM3_PER_M2,
    METER,
    MM,
    PERCENT,
    coverage,
    fracture_evaluations,
    group_header,
    key_sections,
    max_area,
    metal_evaluation,
    name_for_viewers,
    near_metal_evaluations,
    observation_context,
    segments_of,
    viewer_name,
)
from reporting.uids import (
    OUTPUT_REVISION,
    TOTAL,
    copy_identity,
    date_series,
    derived_uid,
    registry_facts,
    source_content,
    source_header,
    tracking_label,
    tracking_subject,
)
from seg.dates import display_date
from seg.labels import ANALYSED_MUSCLES
from seg.records import (
    COMPARABILITY_CODES,
    ChangeFigures,
    ChangeRecord,
    ClinicalTimePoint,
    ModelInfo,
    ReasonCode,
    SideTotalChange,
    StructureChange,
    TotalChange,
)
from seg.volume import Volume

FOLLOWUP_SERIES_NUMBER = 9904


def _time_point(change: ChangeRecord) -> hd.sr.TimePointContext:
    """TID 1502 for the follow-up: its date and the days after the baseline study (the offset from the
    Baseline event, which says the order too).

    No Time Point Order (optional in TID 1502): it is a NUM among the group's measurements, so OHIF
    drew "Time Point Order: 2.00 1" as the first line of every muscle's label (which shows five lines,
    so the % change fell off) and dcmqi's tid1500reader listed it as a measurement.
    """
    days = change.days_between
    base = display_date(change.baseline.study_date) if change.baseline.study_date else "unknown date"
    text = f"Follow-up vs baseline {base}" + (f" ({days:+d} d)" if days is not None else "")
    offset = None
    if days is not None:
        offset = hd.sr.LongitudinalTemporalOffsetFromEvent(value=float(days), unit=codes.DAY,
                                                            event_type=codes.BASELINE_EVENT)
    return hd.sr.TimePointContext(
        time_point=text[:64],
        time_point_type=codes.POSTOPERATIVE if change.baseline_preoperative is True else None,
        subject_time_point_identifier=change.followup.study_date or None,
        temporal_offset_from_event=offset,
    )


def _measurements(entry: ChangeFigures, height_m: float | None, rules: ReportingRules,
                  ) -> list[hd.sr.Measurement]:
    """Baseline and follow-up volume when found; signed changes only when both are found, each from
    the two volumes as written (:func:`reporting.rules.shown_change`: the page shows the same)."""
    shown = shown_change(entry.pre_cm3, entry.post_cm3, height_m, rules)
    items = [(codes.VOLUME_BASELINE, shown.pre_cm3, CM3), (codes.VOLUME, shown.post_cm3, CM3),
             (codes.VOLUME_CHANGE, shown.delta_cm3, CM3),
             (codes.VOLUME_CHANGE_PCT, shown.change_pct, PERCENT),
             (codes.VOLUME_INDEX_CHANGE, shown.delta_index_cm3_m2, CM3_PER_M2)]
    return [hd.sr.Measurement(name=concept, value=value, unit=unit)
            for concept, value, unit in items if value is not None]


def _group(subject: str, entry: StructureChange, height_m: float | None, time_point: hd.sr.TimePointContext,
           ct: Volume, section: Section | None, model_info: ModelInfo, rules: ReportingRules = RULES,
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """TID 1501 group of one structure side; ``section``: its largest cross-section at follow-up;
    flagged when the side lay next to the implant in either study."""
    measurements = _measurements(entry, height_m, rules)
    if not measurements:
        return None
    measurements.append(max_area(section, rules) if section is not None else coverage(ct, rules=rules))
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        **group_header(subject, entry.name, entry.side, model_info),
        time_point_context=time_point,
        measurements=measurements,
        qualitative_evaluations=near_metal_evaluations(entry.near_metal),
    ), viewer_name(tracking_label(entry.name, entry.side), entry.near_metal))


def _total_group(subject: str, total: TotalChange | SideTotalChange, height_m: float | None,
                 time_point: hd.sr.TimePointContext, ct: Volume, model_info: ModelInfo,
                 rules: ReportingRules = RULES,
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """TID 1501 group of the 21 analysed muscles together on one side or both: the change the paper's
    Table 2 reports by fracture type (the operated side's own, which the both-sides total halves);
    located by the follow-up's scanned extent. Its tracking UID is the measurement SRs' total's."""
    measurements = _measurements(total, height_m, rules)
    if not measurements:
        return None
    measurements.append(coverage(ct, rules=rules))
    side = total.side if isinstance(total, SideTotalChange) else "both"
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        **group_header(subject, TOTAL, side, model_info),
        time_point_context=time_point,
        measurements=measurements,
    ), tracking_label(TOTAL, side))


def comparability_evaluations(change: ChangeRecord) -> list[hd.sr.QualitativeEvaluation]:
    """QACMP, once for each note that makes the two studies less comparable (the page's warnings:
    coverage, a baseline older than the admission period, two models, metal on the side the registry
    does not call fractured), in the order the change states them.

    Why: a program reading the change SR (a registry, a viewer) took a loss measured across two models
    or over two lengths of thigh for a plain loss; the page said so, the SR did not."""
    return [hd.sr.QualitativeEvaluation(codes.QA_COMPARABILITY, codes.COMPARABILITY[code])
            for code in comparable_codes(change)]


def comparable_codes(change: ChangeRecord) -> list[ReasonCode]:
    """The codes of ``change``'s comparability notes, each once, in the order it states them."""
    return list(dict.fromkeys(n.code for n in change.notes if n.code in COMPARABILITY_CODES))


def _context_group(change: ChangeRecord, uid: str, time_point: hd.sr.TimePointContext, ct: Volume,
                   rules: ReportingRules = RULES) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = []
    if change.height_m:
        src = change.height_source or ""
        source = (codes.HEIGHT_SOURCE_PATIENT_SIZE if src == "PatientSize" else
                  codes.HEIGHT_SOURCE_REGISTRY if "registry" in src.lower() else codes.HEIGHT_SOURCE_OTHER)
        evaluations += [hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, codes.HEIGHT_PRESENT),
                        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, source)]
    else:
        evaluations += [hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, codes.HEIGHT_MISSING),
                        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, codes.HEIGHT_SOURCE_NONE)]
    evaluations += fracture_evaluations(ClinicalTimePoint(fractured_side=change.fractured_side,
                                                          fracture_type=change.fracture_type))
    if change.followup_qa is not None and change.followup_qa.metal is not None:
        evaluations.append(metal_evaluation(change.followup_qa))  # which side's changes it may spoil
    evaluations += comparability_evaluations(change)
    measurements = []
    if change.height_m:
        measurements.append(hd.sr.Measurement(name=codes.BODY_HEIGHT, unit=METER,
                                              value=rounded(change.height_m, rules.height_decimals)))
    if (days := days_since_surgery(change)) is not None:
        measurements.append(hd.sr.Measurement(name=codes.DAYS_SINCE_SURGERY, unit=codes.DAY,
                                              value=float(days)))
    measurements.append(coverage(ct, rules=rules))  # the follow-up's scanned extent
    if change.baseline_qa is not None and change.baseline_qa.z_coverage_mm is not None:
        # beside the follow-up's: a shorter follow-up reads as loss at the end it misses
        measurements.append(hd.sr.Measurement(name=codes.QA_Z_COVERAGE_BASELINE, unit=MM,
                                              value=rounded(change.baseline_qa.z_coverage_mm,
                                                            rules.length_decimals)))
    return name_for_viewers(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier="Comparison context"),
        time_point_context=time_point,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    ), "Comparison context")


def build_followup_sr(ct: Volume, change: ChangeRecord, evidence: list[Dataset],
                      rules: ReportingRules = RULES, *, model_info: ModelInfo,
                      seg: Dataset | None = None) -> Dataset:
    """The change report for the follow-up series ``ct`` (evidence: the baseline's SEG/SR headers).

    ``model_info``: the model that measured the follow-up, named (DEMO for the shipped one) as the
    observer, in every group and in the series description, as on the measurement SR.
    ``seg``: the follow-up's own SEG (with its pixels), for each structure's largest cross-section;
    without it each structure group states the scanned extent instead.
    """
    src0 = source_header(ct.source_files)
    subject = tracking_subject(src0, ct.header)
    follow_series = str(ct.header.series_instance_uid or src0.SeriesInstanceUID)
    base_series = change.baseline.series_instance_uid or ""
    # new content on either side (a completed series, a re-measured baseline) gives a new report
    content = (source_content(follow_series, ct.source_sop_uids),
               *sorted(str(e.SOPInstanceUID) for e in evidence if "SOPInstanceUID" in e),
               *([f"seg:{seg.SOPInstanceUID}"] if seg is not None else []),  # outlines from it: other content
               model_info.name, model_info.version, f"revision-{OUTPUT_REVISION}",
               registry_facts(change.height_m, change.height_source, change.fractured_side),  # shown
               f"fracture-{change.fracture_type}/surgery-{change.surgery_date}",
               # stated too; most follow from the content above, the admission period from the config
               "comparability-" + ",".join(comparable_codes(change)))
    time_point = _time_point(change)
    sections: dict[tuple[str, str], Section] = {}
    if seg is not None:
        by_number = key_sections(seg)
        sections = {(name, side): by_number[n] for n, name, side in segments_of(seg) if n in by_number}
    groups: list = []
    # the paper's 21 analysed muscles: the others (iliopsoas ... multifidus) reach the scan's edge, so
    # their change measures the coverage, and a bone's the implant (a nail is labelled femur)
    for entry in (e for e in change.structures if e.name in ANALYSED_MUSCLES):
        g = _group(subject, entry, change.height_m, time_point, ct, sections.get((entry.name, entry.side)),
                   model_info, rules)
        if g is not None:
            groups.append(g)
    for total in (*change.total_analysed_muscles_by_side, change.total_analysed_muscles):
        g = _total_group(subject, total, change.height_m, time_point, ct, model_info, rules)
        if g is not None:
            groups.append(g)
    context_uid = derived_uid("followup-context", follow_series, base_series)
    groups.append(_context_group(change, context_uid, time_point, ct, rules))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(model_info),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,  # title: highdicom's default, (126000, DCM) as TID 1500 requires
    )
    # The follow-up CT first: the SR belongs to its study, the CT is the current evidence and the
    # baseline SEG/SR (another study) become Pertinent Other Evidence.
    current = read_source_headers(ct.source_files) or ([src0] if src0 is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=current + list(evidence),
        content=report,
        series_instance_uid=derived_uid("followup-SR/series", *content, base_series),
        series_number=FOLLOWUP_SERIES_NUMBER,
        sop_instance_uid=derived_uid("followup-SR/instance", *content, base_series),
        instance_number=1,
        manufacturer="dicomnode",
        is_complete=True,
    )
    sr.SeriesDescription = series_description("Thigh muscle change since baseline", model_info)
    copy_identity(sr, src0, ct.header)
    date_series(sr)
    codes.declare_schemes(sr)
    return sr
