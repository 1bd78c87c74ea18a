"""A series' identifying header: the patient, study and series values every output and record copies.

Why one record: these values cross from the loader (:mod:`seg.io`) or a phantom into the pipeline,
the registry, the measurements and every output (SEG, SR, page); each consumer used to read them from
a dict by DICOM keyword and repeat its own default. Values are kept as the header gave them (strings
as written, PersonName as its string form, dates as DA ``YYYYMMDD``), so outputs built from them
stay what they were; a value the header lacks, or that cannot be read, is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

HeaderValue = str | float | int


def _dicom(keyword: str) -> Any:
    """A field read from the DICOM attribute ``keyword``; None when the header lacks it."""
    return field(default=None, metadata={"keyword": keyword})


@dataclass(frozen=True, kw_only=True)
class SeriesHeader:
    """The header of a series' first instance; empty (all None) for a volume read without DICOM."""

    study_instance_uid: str | None = _dicom("StudyInstanceUID")
    series_instance_uid: str | None = _dicom("SeriesInstanceUID")
    frame_of_reference_uid: str | None = _dicom("FrameOfReferenceUID")
    patient_id: str | None = _dicom("PatientID")
    patient_name: str | None = _dicom("PatientName")
    sex: str | None = _dicom("PatientSex")
    size_m: float | None = _dicom("PatientSize")  # > 0, metres as DICOM says (plausibility: seg.height)
    birth_date: str | None = _dicom("PatientBirthDate")  # DA
    study_date: str | None = _dicom("StudyDate")  # DA
    study_time: str | None = _dicom("StudyTime")
    modality: str | None = _dicom("Modality")
    patient_position: str | None = _dicom("PatientPosition")
    accession_number: str | None = _dicom("AccessionNumber")
    study_id: str | None = _dicom("StudyID")
    issuer_of_patient_id: str | None = _dicom("IssuerOfPatientID")
    weight_kg: float | None = _dicom("PatientWeight")  # > 0
    patient_age: str | None = _dicom("PatientAge")  # as written, e.g. "081Y" (read by seg.age)
    series_number: int | None = _dicom("SeriesNumber")
    series_description: str | None = _dicom("SeriesDescription")

    def value(self, keyword: str) -> HeaderValue | None:
        """The value under a DICOM keyword, for code that walks a list of keywords (the identity copied
        into each output); None when absent or not a keyword this header keeps."""
        name = FIELD_OF_KEYWORD.get(keyword)
        return None if name is None else getattr(self, name)

    def filled_from(self, other: SeriesHeader) -> SeriesHeader:
        """This header's values, with ``other``'s where this one has none (a CT's header over its label
        map's)."""
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        return SeriesHeader(**{name: getattr(other, name) if v is None else v for name, v in mine.items()})


# DICOM keyword -> field name: the attributes the loader reads into a header.
FIELD_OF_KEYWORD: dict[str, str] = {f.metadata["keyword"]: f.name for f in fields(SeriesHeader)}
