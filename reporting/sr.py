"""TID 1500 measurement report (Comprehensive 3D SR) with one volumetric group per muscle and side.

Why TID 1500: it is the template viewers and dcmqi understand for "this segment has this volume",
it points at the SEG segment (so a click shows the region) and carries a tracking identifier that
is the same for a patient's muscle in every study, which is what longitudinal viewers match on.
QA facts (coverage, metal, height) travel as qualitative evaluations so a reader sees why a number
may not be trusted, without a free-text parser.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std

from reporting import codes
from reporting.seg import algorithm_name
from reporting.uids import copy_identity, derived_uid, output_uid, source_content, source_header, tracking_uid
from seg.labels import by_name
from seg.volume import Volume

SR_SERIES_NUMBER = 9902
CM3 = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")
CM3_PER_M2 = hd.sr.CodedConcept("cm3/m2", "UCUM", "cubic centimeter per square meter")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
METER = hd.sr.CodedConcept("m", "UCUM", "meter")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_SIDE_KEY = {"left": "left_cm3", "right": "right_cm3", "both": "volume_cm3"}


def observation_context(model_info: dict) -> hd.sr.ObservationContext:
    """The algorithm as device observer (name says DEMO when the demo model produced the numbers)."""
    name = algorithm_name(model_info)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", str(model_info.get("name", "")), str(model_info.get("version", ""))),
        name=name,
        manufacturer_name="dicomnode",
        model_name=str(model_info.get("name") or "unknown-model")[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=std.DCM.Device,
                                                      observer_identifying_attributes=device))


def algorithm_id(model_info: dict) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algorithm_name(model_info),
                                         version=str(model_info.get("version") or "0")[:64])


def segments_of(seg: Dataset) -> list[tuple[int, str, str]]:
    """(segment number, structure name, side) for each segment of a SEG built by reporting.seg."""
    out = []
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        tid = str(item.get("TrackingID", ""))
        if number == 0 or " " not in tid:
            continue  # LABELMAP background
        name, side = tid.rsplit(" ", 1)
        out.append((number, name, side))
    return out


def height_status(volumes: dict, meta: dict) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """(status, source) of the body height used for the index: present/missing/implausible."""
    if volumes.get("height_m"):
        src = str(volumes.get("height_source") or "")
        if src == "PatientSize":
            source = codes.HEIGHT_SOURCE_PATIENT_SIZE
        elif "registry" in src.lower():
            source = codes.HEIGHT_SOURCE_REGISTRY
        else:
            source = codes.HEIGHT_SOURCE_OTHER
        return codes.HEIGHT_PRESENT, source
    size = meta.get("PatientSize")
    try:
        given = size not in (None, "") and float(size) > 0
    except (TypeError, ValueError):
        given = False
    return (codes.HEIGHT_IMPLAUSIBLE if given else codes.HEIGHT_MISSING), codes.HEIGHT_SOURCE_NONE


def qa_group(ct: Volume, volumes: dict, model_info: dict) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Series-level QA: z-coverage (mm), metal yes/no, height status and source, height (m)."""
    qa = volumes.get("qa") or {}
    content = source_content(str(ct.meta.get("SeriesInstanceUID", "")), ct.source_sop_uids)
    measurements = []
    if qa.get("z_coverage_mm") is not None:
        measurements.append(hd.sr.Measurement(name=codes.QA_Z_COVERAGE, value=float(qa["z_coverage_mm"]),
                                              unit=MM))
    if volumes.get("height_m"):
        measurements.append(hd.sr.Measurement(name=codes.BODY_HEIGHT, value=float(volumes["height_m"]),
                                              unit=METER))
    status, source = height_status(volumes, ct.meta)
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_STATUS, status),
        hd.sr.QualitativeEvaluation(codes.QA_HEIGHT_SOURCE, source),
    ]
    if qa.get("metal") is not None:
        metal = codes.YES if qa["metal"] else codes.NO
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QA_METAL, metal))
    if qa.get("z_coverage_ok") is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QA_Z_COVERAGE_OK,
                                                       codes.YES if qa["z_coverage_ok"] else codes.NO))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=output_uid(content, model_info, "SR/qa-group"),
                                                     identifier="Quality assurance"),
        algorithm_id=algorithm_id(model_info),
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )


def side_volume(entry: dict, side: str) -> float | None:
    v = entry.get(_SIDE_KEY[side])
    return None if v is None else float(v)


def volume_group(patient_id: str, seg: Dataset, series_uid: str, number: int, name: str, side: str,
                 entry: dict, height_m: float | None,
                 model_info: dict) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    volume = side_volume(entry, side)
    if volume is None:
        return None
    s = by_name(name)
    code = codes.structure_code(s)
    measurements = [hd.sr.Measurement(name=codes.VOLUME, value=volume, unit=CM3)]
    if height_m:
        measurements.append(hd.sr.Measurement(name=codes.VOLUME_INDEX, value=volume / height_m**2,
                                              unit=CM3_PER_M2))
    label = s.display_name if side == "both" else f"{s.display_name} {side}"
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(patient_id, name, side),
                                                     identifier=label),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
        finding_type=code,
        finding_sites=[hd.sr.FindingSite(anatomic_location=code, laterality=codes.laterality_code(side))],
        algorithm_id=algorithm_id(model_info),
        measurements=measurements,
    )


def build_measurement_sr(ct: Volume, seg: Dataset, volumes: dict, model_info: dict) -> Dataset:
    """The TID 1500 SR for one measured series (numbers exactly as in ``volumes``)."""
    src0 = source_header(ct.source_files)
    patient_id = str(src0.get("PatientID", "")) if src0 is not None else str(ct.meta.get("PatientID", ""))
    series_uid = str(ct.meta.get("SeriesInstanceUID") or src0.SeriesInstanceUID)
    content = source_content(series_uid, ct.source_sop_uids)
    by_label = {int(e["label"]): e for e in volumes.get("structures", [])}
    height_m = float(volumes["height_m"]) if volumes.get("height_m") else None
    groups: list = []
    for number, name, side in segments_of(seg):
        entry = by_label.get(by_name(name).label)
        if entry is None:
            continue
        g = volume_group(patient_id, seg, series_uid, number, name, side, entry, height_m, model_info)
        if g is not None:
            groups.append(g)
    groups.append(qa_group(ct, volumes, model_info))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(model_info),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=output_uid(content, model_info, "SR/series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=output_uid(content, model_info, "SR/instance"),
        instance_number=1,
        manufacturer="dicomnode",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = ("Thigh muscle volumes SR" + (" DEMO" if model_info.get("demo") else ""))[:64]
    copy_identity(sr, src0, ct.meta)
    codes.declare_schemes(sr)
    return sr

