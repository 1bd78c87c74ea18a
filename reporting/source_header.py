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
carry for it anyway, :func:`reporting.uids.copy_identity`); a date, time or sex that is not a valid
DICOM value is emptied, with a warning that names the attribute (never the value: it may identify
the patient); a missing SliceThickness is the slice spacing the loader measured from the positions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from reporting.charset import with_declarable_charset

log = logging.getLogger(__name__)

# Type 2 attributes of the Patient and General Study modules: present in every output, empty when unknown
TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "StudyID", "AccessionNumber", "ReferringPhysicianName")
_PARSERS = {"DA": DA, "TM": TM, "DT": DT}
_SEXES = frozenset({"M", "F", "O"})


def read_source_header(path: Path, slice_spacing_mm: float | None = None, quiet: bool = False) -> Dataset:
    """The header of one source CT file (no pixels), made buildable (:func:`buildable`)."""
    return buildable(pydicom.dcmread(path, stop_before_pixels=True), slice_spacing_mm, quiet)


def read_source_headers(paths: list[Path], slice_spacing_mm: float | None = None) -> list[Dataset]:
    """Every source file's header, the repairs said once for the series (not once per slice)."""
    return [read_source_header(p, slice_spacing_mm, quiet=i > 0) for i, p in enumerate(paths)]


def buildable(ds: Dataset, slice_spacing_mm: float | None = None, quiet: bool = False) -> Dataset:
    """``ds`` (in place) with the repairs of the module's note (``quiet``: without the warnings)."""
    with_declarable_charset(ds)
    for keyword in TYPE2_IDENTITY:
        if keyword not in ds:
            setattr(ds, keyword, None)
        elif not _valid(ds, keyword):
            if not quiet:
                log.warning("the CT's %s is not a valid DICOM value: the outputs carry it empty", keyword)
            setattr(ds, keyword, None)
    if slice_spacing_mm is not None and not ds.get("SliceThickness"):
        ds.SliceThickness = round(float(slice_spacing_mm), 6)
    return ds


def _valid(ds: Dataset, keyword: str) -> bool:
    value = ds[keyword].value
    if value in (None, ""):
        return True
    if keyword == "PatientSex":
        return str(value) in _SEXES
    parse = _PARSERS.get(ds[keyword].VR)
    if parse is None:
        return True
    try:
        parse(value)
    except (ValueError, OverflowError):
        return False
    return True
