"""Follow-up report (Comprehensive 3D SR, TID 1500) in the follow-up study, from a change record.

Why a separate SR: the measurement SR of each study stays a pure record of that study; the change
between two studies is a new statement with its own time-point context (TID 1502: follow-up order,
days since baseline, post-operative when the baseline preceded surgery), placed in the later study
and citing the earlier study's SEG/SR as evidence. It is a plain TID 1500 report (root concept
126000 "Imaging Measurement Report") so viewers that read TID 1500 read it. Its measurement groups
reuse the per-muscle tracking UIDs of the measurement SRs, so a longitudinal viewer can chain them.
Changes are signed, follow-up minus baseline (negative for a loss), in cm³ and in % of baseline;
values are rounded per :mod:`reporting.rules`, a volume below the minimum segment size is not
stated, and no percentage is stated for a baseline below the floor.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from reporting import codes
from reporting.rules import RULES, ReportingRules, is_found, rounded
from reporting.sr import CM3, CM3_PER_M2, METER, PERCENT
from reporting.uids import (
    copy_identity,
    derived_uid,
    read_header,
    source_content,
    source_header,
    tracking_uid,
)
from seg.labels import by_name
from seg.volume import Volume

FOLLOWUP_SERIES_NUMBER = 9904


def _time_point(change: dict) -> hd.sr.TimePointContext:
    """TID 1502 for the follow-up: order 2 of the pair, its date, days after the baseline study."""
    days = change.get("days_between")
    base = (change.get("baseline") or {}).get("study_date") or "unknown date"
    text = f"Follow-up vs baseline {base}" + (f" ({days:+d} d)" if days is not None else "")
    offset = None
    if days is not None:
        offset = hd.sr.LongitudinalTemporalOffsetFromEvent(value=float(days), unit=codes.DAY,
                                                            event_type=codes.BASELINE_EVENT)
    return hd.sr.TimePointContext(
        time_point=text[:64],
        time_point_type=codes.POSTOPERATIVE if change.get("baseline_preoperative") is True else None,
        time_point_order=2,
        subject_time_point_identifier=str((change.get("followup") or {}).get("study_date") or "") or None,
        temporal_offset_from_event=offset,
    )


def _measurements(entry: dict, rules: ReportingRules) -> list[hd.sr.Measurement]:
    """Baseline and follow-up volume when found; signed changes only when both are found."""
    pre, post = entry.get("pre_cm3"), entry.get("post_cm3")
    items: list[tuple[hd.sr.CodedConcept, float | None, hd.sr.CodedConcept, int]] = [
        (codes.VOLUME_BASELINE, pre if is_found(pre, rules) else None, CM3, rules.volume_decimals),
        (codes.VOLUME, post if is_found(post, rules) else None, CM3, rules.volume_decimals),
    ]
    if is_found(pre, rules) and is_found(post, rules):
        items += [(codes.VOLUME_CHANGE, entry.get("delta_cm3"), CM3, rules.volume_decimals),
                  (codes.VOLUME_CHANGE_PCT, entry.get("change_pct"), PERCENT, rules.percent_decimals),
                  (codes.VOLUME_INDEX_CHANGE, entry.get("delta_index_cm3_m2"), CM3_PER_M2,
                   rules.index_decimals)]
    return [hd.sr.Measurement(name=concept, value=rounded(value, decimals), unit=unit)
            for concept, value, unit, decimals in items if value is not None]


def _group(patient_id: str, entry: dict, time_point: hd.sr.TimePointContext,
           rules: ReportingRules = RULES) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    name, side = str(entry["name"]), str(entry.get("side") or "both")
    s = by_name(name)
    code = codes.structure_code(s)
    measurements = _measurements(entry, rules)
    if not measurements:
        return None
    label = s.display_name if side == "both" else f"{s.display_name} {side}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(patient_id, name, side),
                                                     identifier=label),
        time_point_context=time_point,
        finding_type=code,
        finding_sites=[hd.sr.FindingSite(anatomic_location=code, laterality=codes.laterality_code(side))],
        measurements=measurements,
    )


def _context_group(change: dict, uid: str, time_point: hd.sr.TimePointContext
                   ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = []
    if change.get("height_m"):
        src = str(change.get("height_source") or "")
        source = (codes.HEIGHT_SOURCE_PATIENT_SIZE if src == "PatientSize" else
                  codes.HEIGHT_SOURCE_REGISTRY if "registry" in src.lower() else codes.HEIGHT_SOURCE_OTHER)
        evaluations += [hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, codes.HEIGHT_PRESENT),
                        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, source)]
    else:
        evaluations += [hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, codes.HEIGHT_MISSING),
                        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, codes.HEIGHT_SOURCE_NONE)]
    side = codes.laterality_code(str(change.get("fractured_side") or ""))
    if side is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QA_FRACTURED_SIDE, side))
    measurements = None
    if change.get("height_m"):
        measurements = [hd.sr.Measurement(name=codes.BODY_HEIGHT, unit=METER,
                                          value=rounded(change["height_m"], RULES.height_decimals))]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier="Comparison context"),
        time_point_context=time_point,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def build_followup_sr(ct: Volume, change: dict, evidence: list[Dataset],
                      rules: ReportingRules = RULES) -> Dataset:
    """The change report for the follow-up series ``ct`` (evidence: the baseline's SEG/SR headers)."""
    src0 = source_header(ct.source_files)
    patient_id = str(src0.get("PatientID", "")) if src0 is not None else str(ct.meta.get("PatientID", ""))
    follow_series = str(ct.meta.get("SeriesInstanceUID") or src0.SeriesInstanceUID)
    base_series = str((change.get("baseline") or {}).get("series_instance_uid") or "")
    # new content on either side (a completed series, a re-measured baseline) gives a new report
    content = (source_content(follow_series, ct.source_sop_uids),
               *sorted(str(e.SOPInstanceUID) for e in evidence if "SOPInstanceUID" in e))
    time_point = _time_point(change)
    groups: list = []
    for entry in change.get("structures", []):
        g = _group(patient_id, entry, time_point, rules)
        if g is not None:
            groups.append(g)
    context_uid = derived_uid("followup-context", follow_series, base_series)
    groups.append(_context_group(change, context_uid, time_point))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.CodedConcept("121007", "DCM", "Device"),
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=derived_uid("device", "dicomnode-change"), name="dicomnode change report",
                    manufacturer_name="dicomnode"))),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,  # title: highdicom's default, (126000, DCM) as TID 1500 requires
    )
    # The follow-up CT first: the SR belongs to its study, the CT is the current evidence and the
    # baseline SEG/SR (another study) become Pertinent Other Evidence.
    current = [read_header(f) for f in ct.source_files] or ([src0] if src0 is not None else [])
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
    sr.SeriesDescription = "Thigh muscle change since baseline"
    copy_identity(sr, src0, ct.meta)
    codes.declare_schemes(sr)
    return sr
