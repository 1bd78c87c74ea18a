"""Coded concepts for the DICOM outputs, all read from one place.

Why: every object (SEG, SR, follow-up SR) must name a structure with the same code, and a code is
either vouched for by a public source (``code_source`` in ``seg/structures.csv``, see
``docs/codes.md``) or belongs to our private scheme ``99THIGH``, which each object then declares in
its CodingSchemeIdentificationSequence. Nothing here is invented from memory.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from seg.labels import Structure, by_name
from seg.records import ReasonCode

PRIVATE_SCHEME = "99THIGH"
PRIVATE_SCHEME_NAME = "Thigh muscle volumetry node private codes"
PRIVATE_SCHEME_VERSION = "1"

# Given by the DICOM standard (pydicom's dictionary is generated from PS3.16).
ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")  # CID 7150
LATERALITY = CodedConcept("272741003", "SCT", "Laterality")  # concept modifier, values from CID 244
LEFT = CodedConcept("7771000", "SCT", "Left")  # CID 244 Laterality
RIGHT = CodedConcept("24028007", "SCT", "Right")  # CID 244 Laterality
BOTH_SIDES = CodedConcept("51440002", "SCT", "Right and left")  # CID 244 Laterality
VOLUME = CodedConcept("118565006", "SCT", "Volume")  # CID 7469 etc.
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
PRESENCE = CodedConcept("121052", "DCM", "Presence of property")
ABSENT = CodedConcept("272519000", "SCT", "Absent")  # CID 240 Present-Absent
POSTOPERATIVE = CodedConcept("262061000", "SCT", "Post-operative")  # CID 6146 Time Point Types
PREOPERATIVE = CodedConcept("262068006", "SCT", "Pre-operative")  # CID 6146 Time Point Types
BASELINE_EVENT = CodedConcept("121079", "DCM", "Baseline")  # CID 280 Longitudinal Temporal Event Type
DAY = CodedConcept("d", "UCUM", "day")


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# Concepts with no standard code (checked against PS3.16 via pydicom.sr codes): private.
VOLUME_INDEX = _private("VIDX", "Volume normalized to body height squared")
VOLUME_BASELINE = _private("VPRE", "Volume at baseline")
# Meanings are what viewers print beside an outline (OHIF: "meaning: value unit", cut at the viewport's
# edge), so they stay short; the sign (follow-up minus baseline, negative for a loss) is in docs/codes.md.
VOLUME_CHANGE = _private("VDELTA", "Volume change from baseline")
VOLUME_CHANGE_PCT = _private("VCHGPCT", "Percent volume change from baseline")
VOLUME_INDEX_CHANGE = _private("VIDXDELTA", "Change of volume normalized to body height squared")
QA_Z_COVERAGE = _private("QAZCOV", "Craniocaudal coverage of the series")
QA_Z_COVERAGE_BASELINE = _private("QAZCOVPRE", "Craniocaudal coverage of the baseline series")
MIN_SEGMENT_VOLUME = _private("QAMINSEG", "Minimum segment volume reported as found")
QA_Z_COVERAGE_OK = _private("QAZOK", "Craniocaudal coverage sufficient")
QA_METAL = _private("QAMETAL", "Metal artifact present")
# a muscle side next to the implant (seg.metal_proximity), its volume (or change) the least reliable
QA_NEAR_METAL = _private("QANEARMTL", "Next to metal implant")
QA_HEIGHT_STATUS = _private("QAHGT", "Body height status")
QA_HEIGHT_SOURCE = _private("QAHGTSRC", "Body height source")
HEIGHT_PRESENT = _private("HGTOK", "Body height available and plausible")
HEIGHT_MISSING = _private("HGTMISS", "Body height missing")
HEIGHT_IMPLAUSIBLE = _private("HGTIMPL", "Body height implausible")
HEIGHT_SOURCE_PATIENT_SIZE = _private("SRCPSIZE", "DICOM Patient Size")
HEIGHT_SOURCE_REGISTRY = _private("SRCREG", "Clinical registry")
HEIGHT_SOURCE_OTHER = _private("SRCOTHER", "Other height source")
HEIGHT_SOURCE_NONE = _private("SRCNONE", "No height source")
BODY_HEIGHT = CodedConcept("8302-2", "LN", "Body height")  # LOINC, as HL7 FHIR vital signs code it
QA_FRACTURED_SIDE = _private("QAFXSIDE", "Fractured side")
ANALYSED_MUSCLES = _private("THIGH21", "Analysed thigh muscles (21)")  # the paper's total, a finding
FRACTURE_TYPE = _private("FXTYPE", "Hip fracture type")
FRACTURE_TYPES = {"FNF": _private("FNF", "Femoral neck fracture"),
                  "ITF": _private("ITF", "Intertrochanteric fracture"),
                  "other": _private("FXOTHER", "Other hip fracture")}
DAYS_SINCE_SURGERY = _private("DAYSPOSTOP", "Days since surgery")
# why a comparison is less comparable (reporting.change.COMPARABILITY_CODES): the change SR states each
# note the page warns of, so a program reading the SR learns what a reader of the page does
QA_COMPARABILITY = _private("QACMP", "Comparability of baseline and follow-up")
COMPARABILITY = {
    ReasonCode.COVERAGE_DIFFERS: _private("CMPCOV", "Coverage of the two CTs differs"),
    ReasonCode.LATERALITY_CONFLICT: _private("CMPLAT", "Metal side is not the registry's fractured side"),
    ReasonCode.BASELINE_BEFORE_ADMISSION: _private("CMPADM", "Baseline older than the admission period"),
    ReasonCode.MODELS_DIFFER: _private("CMPMODEL", "Baseline and follow-up measured by different models"),
}
PROCEDURE = _private("THIGHVOL", "CT thigh muscle volumetry")


def structure_code(structure: Structure | str) -> CodedConcept:
    """The Segmented Property Type / finding code of one structure (from structures.csv)."""
    s = by_name(structure) if isinstance(structure, str) else structure
    if not (s.scheme and s.value and s.meaning):
        raise ValueError(f"structures.csv has no code for {s.name!r}")
    return CodedConcept(s.value, s.scheme, s.meaning)


def laterality_code(side: str) -> CodedConcept | None:
    """Laterality modifier for a side key of volumes.json: left, right, or both sides together (a
    total, which a reader must not take for a value of unknown side); ``None`` for anything else."""
    return {"left": LEFT, "right": RIGHT, "both": BOTH_SIDES}.get(side)


def coding_scheme_identification() -> list[Dataset]:
    """Items for CodingSchemeIdentificationSequence: the private scheme and the standard ones used."""
    items = []
    for designator, uid, name, org, version in (
        ("DCM", "1.2.840.10008.2.16.4", "DICOM Controlled Terminology", "NEMA", None),
        ("SCT", "2.16.840.1.113883.6.96", "SNOMED CT", "IHTSDO", None),
        ("UCUM", "2.16.840.1.113883.6.8", "Unified Code for Units of Measure", "Regenstrief Institute",
         "1.4"),
        ("UMLS", "2.16.840.1.113883.6.86", "Unified Medical Language System", "NLM", None),  # TID 1502
        ("LN", "2.16.840.1.113883.6.1", "Logical Observation Identifiers Names and Codes",
         "Regenstrief Institute", None),  # body height
    ):
        ds = Dataset()
        ds.CodingSchemeDesignator = designator
        ds.CodingSchemeUID = uid
        ds.CodingSchemeName = name
        ds.CodingSchemeResponsibleOrganization = org
        if version:
            ds.CodingSchemeVersion = version
        items.append(ds)
    ds = Dataset()
    ds.CodingSchemeDesignator = PRIVATE_SCHEME
    ds.CodingSchemeName = PRIVATE_SCHEME_NAME
    ds.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    ds.CodingSchemeResponsibleOrganization = "dicomnode project (see docs/codes.md)"
    items.append(ds)
    return items


def declare_schemes(ds: Dataset) -> Dataset:
    """Set CodingSchemeIdentificationSequence on an output so the private codes are resolvable."""
    ds.CodingSchemeIdentificationSequence = coding_scheme_identification()
    return ds

