"""Calendar dates and times of day as DICOM writes them (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``): one
reader for a header's StudyDate and a registry's surgery date, and one for a StudyTime, because
pairing and prior retrieval order studies by comparing these strings."""

from __future__ import annotations

import re
from datetime import date

# YYYYMMDD, or year, month and day joined by one separator used twice: "-" (ISO 8601), "." (the
# ACR-NEMA form older archives still hold) or "/".
_DATE = re.compile(r"(\d{4})([-./]?)(\d{2})\2(\d{2})")
# HH, HHMM, HHMMSS or HHMMSS.F (1 to 6 digits) (PS3.5 TM), or with ":" between the parts (the
# ACR-NEMA form older archives still hold).
_TIME = re.compile(r"(\d{2})(?:(:?)(\d{2})(?:\2(\d{2})(?:\.(\d{1,6}))?)?)?")


def da_date(value: object) -> str | None:
    """``YYYYMMDD`` for a real calendar date in one of the forms above; None for anything else (empty,
    "2024-1-5", "00000000", "20240230"), so that no caller orders or subtracts a garbled date."""
    m = _DATE.fullmatch(str(value or "").strip())
    if m is None:
        return None
    y, _, mo, d = m.groups()
    try:
        date(int(y), int(mo), int(d))
    except ValueError:
        return None
    return f"{y}{mo}{d}"


def tm_time(value: object) -> str | None:
    """``HHMMSS.ffffff`` for a time of day in one of the forms above, the parts a reduced value omits
    as zeros (TM "10" is 10:00, PS3.5), so that two times compare as strings; None for anything else
    (empty, "25", "1261", "10:0000"): a time not read is stated by its caller, never guessed."""
    m = _TIME.fullmatch(str(value or "").strip())
    if m is None:
        return None
    hh, _, mm, ss, frac = m.groups()
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 60:  # 60: a leap second (PS3.5)
        return None
    return f"{hh}{mm or '00'}{ss or '00'}.{(frac or '').ljust(6, '0')}"


def as_date(value: object) -> date | None:
    """:func:`da_date` as a :class:`datetime.date` (an age, the days between two studies), else None."""
    text = da_date(value)
    return None if text is None else date(int(text[:4]), int(text[4:6]), int(text[6:]))


def display_date(value: object) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD, the way a reader parses a date at a glance; anything else
    as it is ("unknown" when empty), never a guessed date."""
    text = str(value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "unknown"
