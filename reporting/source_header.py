"""A source CT header as the output builders need it: highdicom reads the CT's patient and study
attributes strictly, where real CTs are loose.

Why: the SEG, the SR and the summary copy the CT's Patient and General Study modules through
highdicom, which reads them as attributes and converts them: a CT without PatientSex, PatientName,
StudyDate, AccessionNumber or StudyID (Type 2, often dropped by anonymisers and older modalities)
raised AttributeError; a birth date "1940" or "00000000", a StudyTime "12:00:00" or a PatientSex
"X" raised ValueError; a CT without SliceThickness could not give the SEG its pixel measures. Every
output of such a study failed, after the whole inference, on each of the node's retries.

Here, before any builder reads the header: the character set is made declarable
(:mod:`reporting.charset`); a missing Type 2 identity attribute is added empty (what the outputs
carry for it anyway, :func:`reporting.uids.copy_identity`); a copied fact that is not a valid DICOM
value (a date, time, sex, age, height, weight or study description: a PatientAge "65" without its
unit made every output fail dciodvfy) is emptied (Type 2) or left out (Type 3), with a warning that
names the attribute (never the value: it may identify the patient); a missing SliceThickness is the
slice spacing the loader measured from the positions. Identifiers (PatientID, IssuerOfPatientID,
PatientName, StudyInstanceUID, AccessionNumber, StudyID) are copied as they are, even when too long:
they are how the PACS files the outputs with the CT.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM, validate_value

from reporting.charset import with_declarable_charset

log = logging.getLogger(__name__)

# Type 2 attributes of the Patient and General Study modules: present in every output, empty when unknown
TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "StudyID", "AccessionNumber", "ReferringPhysicianName")
# copied facts that are emptied or left out when they are not valid DICOM (identifiers never are)
CHECKED_FACTS = ("PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "StudyDate",
                 "StudyTime", "StudyDescription")
_SEXES = frozenset({"M", "F", "O"})
_PARSERS = {"DA": DA, "TM": TM, "DT": DT}


def read_source_header(path: Path, slice_spacing_mm: float | None = None, quiet: bool = False) -> Dataset:
    """The header of one source CT file (no pixels), made buildable (:func:`buildable`)."""
    return buildable(pydicom.dcmread(path, stop_before_pixels=True), slice_spacing_mm, quiet)


def read_source_headers(paths: list[Path], slice_spacing_mm: float | None = None) -> list[Dataset]:
    """Every source file's header, the repairs said once for the series (not once per slice)."""
    return [read_source_header(p, slice_spacing_mm, quiet=i > 0) for i, p in enumerate(paths)]


def buildable(ds: Dataset, slice_spacing_mm: float | None = None, quiet: bool = False) -> Dataset:
    """``ds`` (in place) with the repairs of the module's note (``quiet``: without the warnings)."""
    with_declarable_charset(ds)
    for keyword in CHECKED_FACTS:
        if keyword in ds and not _valid(ds, keyword):
            type2 = keyword in TYPE2_IDENTITY
            if not quiet:
                log.warning("the CT's %s is not a valid DICOM value: the outputs %s", keyword,
                            "carry it empty" if type2 else "leave it out")
            if type2:
                setattr(ds, keyword, None)
            else:
                del ds[keyword]
    for keyword in TYPE2_IDENTITY:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if slice_spacing_mm is not None and not ds.get("SliceThickness"):
        ds.SliceThickness = round(float(slice_spacing_mm), 6)
    return ds


def _valid(ds: Dataset, keyword: str) -> bool:
    try:
        value = ds[keyword].value  # a DS such as "1,75" already fails to convert here
        if value in (None, ""):
            return True
        if keyword == "PatientSex":
            return str(value) in _SEXES
        vr = ds[keyword].VR
        for v in value if isinstance(value, list | tuple) else [value]:
            text = v if isinstance(v, str | bytes) else str(v)  # a DS or IS is checked as its text
            validate_value(vr, text, pydicom.config.RAISE)
            if vr in _PARSERS:  # the form can be right and the date impossible ("00000000")
                _PARSERS[vr](v)
    except (ValueError, OverflowError):
        return False
    return True
