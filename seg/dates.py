"""Calendar dates as DICOM writes them (DA, ``YYYYMMDD``): one reader for a header's StudyDate and a
registry's surgery date, because pairing orders studies by comparing these strings."""

from __future__ import annotations

import re
from datetime import date

# YYYYMMDD, or year, month and day joined by one separator used twice: "-" (ISO 8601), "." (the
# ACR-NEMA form older archives still hold) or "/".
_DATE = re.compile(r"(\d{4})([-./]?)(\d{2})\2(\d{2})")


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
