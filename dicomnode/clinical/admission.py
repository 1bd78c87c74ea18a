"""The admission period before a hip operation: the days whose CT is the fracture's admission CT.

Why: the paper's pre-operative CT (Kim et al., PeerJ 2024) is the CT of the fracture's admission,
taken days at most before the operation; a CT dated a year before it, pre-operative by its date
alone, measures a thigh before the fracture, and a change against it includes that year. Pairing
(the latest pre-operative CT is the baseline, flagged when it is older than this period) and prior
retrieval (which earlier CT to fetch first) both ask here, with the same length, so that they agree.

The registry gives the surgery day, not the day of admission, so the period is a number of days
before the surgery day: ``pairing.admission_window_days`` (:mod:`dicomnode.config`, the one owner of
its value), which each caller passes as ``days``. Its default, 14, is twice the delay of a hip
fracture operated late (anticoagulation, a medical condition to treat first: about a week; most
are operated within two days), so an admission CT is never flagged and a CT flagged is almost
surely from before the fracture; a site whose delays are longer sets more.
"""

from __future__ import annotations

from datetime import timedelta

from seg.dates import as_date


def window_start(surgery_date: str, days: int) -> str:
    """The first day (YYYYMMDD) of the admission period of ``days`` days before ``surgery_date``;
    "" when the surgery date cannot be read (then no study is placed outside the period)."""
    day = as_date(surgery_date)
    return "" if day is None else (day - timedelta(days=days)).strftime("%Y%m%d")


def days_before(study_date: str, surgery_date: str) -> int | None:
    """Days from ``study_date`` to ``surgery_date`` (0 on the surgery day); None when either cannot
    be read."""
    study, surgery = as_date(study_date), as_date(surgery_date)
    return None if study is None or surgery is None else (surgery - study).days


def before_admission(study_date: str, surgery_date: str, days: int) -> bool:
    """Whether a study lies before the admission period (more than ``days`` days before the
    surgery day): not the admission CT."""
    before = days_before(study_date, surgery_date)
    return before is not None and before > days
