"""The patient's age at a study, from the DICOM header: the one rule, so every record reads it alike.

Why: the cohort's baseline table gives each group's age at the baseline CT (the paper reports its
cohort's mean age). PatientAge (``"081Y"``) is what the modality recorded at the study and is used
first; without a valid one, the age is counted from PatientBirthDate to StudyDate. An age that
cannot be read, or is implausible (under 0 or over :data:`MAX_AGE_YEARS`), is missing: never a guess.
Ages are whole years (completed years, as PatientAge's ``Y`` unit states them).
"""

from __future__ import annotations

import re
from typing import Any

from seg.dates import as_date
from seg.header import SeriesHeader

MAX_AGE_YEARS = 130
_PATIENT_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def _plausible(years: int) -> int | None:
    return years if 0 <= years <= MAX_AGE_YEARS else None


def age_from_patient_age(value: Any) -> int | None:
    """DICOM PatientAge (``nnnD|W|M|Y``) → completed years, or None if it is not one."""
    if value in (None, ""):
        return None
    m = _PATIENT_AGE.match(str(value))
    if m is None:
        return None
    number, unit = int(m.group(1)), m.group(2).upper()
    years = number if unit == "Y" else int(number * _DAYS_PER[unit] // _DAYS_PER["Y"])
    return _plausible(years)


def age_from_birth_date(birth_date: Any, study_date: Any) -> int | None:
    """Completed years from PatientBirthDate to StudyDate; None if either is missing or unreadable,
    or the birth date is after the study."""
    born, on = as_date(birth_date), as_date(study_date)
    if born is None or on is None or born > on:
        return None
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return _plausible(years)


def age_at_study(header: SeriesHeader) -> tuple[int | None, str | None]:
    """(age in completed years, where it came from: ``"PatientAge"`` | ``"PatientBirthDate"``) from a
    series' header values; (None, None) when neither gives a plausible age."""
    years = age_from_patient_age(header.patient_age)
    if years is not None:
        return years, "PatientAge"
    years = age_from_birth_date(header.birth_date, header.study_date)
    if years is not None:
        return years, "PatientBirthDate"
    return None, None
