"""The admission period before a hip operation: the days whose CT is the fracture's admission CT.

Why: the paper's pre-operative CT (Kim et al., PeerJ 2024) is the CT of the fracture's admission,
taken days at most before the operation; a CT dated a year before it, pre-operative by its date
alone, measures a thigh before the fracture, and a change against it includes that year. Pairing
(the latest pre-operative CT is the baseline, flagged when it is older than this period) and prior
retrieval (which earlier CT to fetch first) read the period here, so that they agree.

The registry gives the surgery day, not the day of admission. Most hip fractures are operated
within two days of admission, a delayed one (anticoagulation, a medical condition to treat first)
within about a week; :data:`ADMISSION_WINDOW_DAYS` leaves twice that, so an admission CT is never
flagged and a CT flagged is almost surely from before the fracture.
"""

from __future__ import annotations

from datetime import timedelta

from seg.dates import as_date

# a pre-operative CT at most this many days before the surgery day is an admission CT
ADMISSION_WINDOW_DAYS = 14


def window_start(surgery_date: str) -> str:
    """The first day (YYYYMMDD) of the admission period before ``surgery_date``; "" when the
    surgery date cannot be read (then no study is placed outside the period)."""
    day = as_date(surgery_date)
    return "" if day is None else (day - timedelta(days=ADMISSION_WINDOW_DAYS)).strftime("%Y%m%d")


def days_before(study_date: str, surgery_date: str) -> int | None:
    """Days from ``study_date`` to ``surgery_date`` (0 on the surgery day); None when either cannot
    be read."""
    study, surgery = as_date(study_date), as_date(surgery_date)
    return None if study is None or surgery is None else (surgery - study).days


def before_admission(study_date: str, surgery_date: str) -> bool:
    """Whether a study lies before the admission period (older than :data:`ADMISSION_WINDOW_DAYS`
    before the surgery day): not the admission CT."""
    days = days_before(study_date, surgery_date)
    return days is not None and days > ADMISSION_WINDOW_DAYS
