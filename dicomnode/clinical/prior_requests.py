"""A follow-up's missing baseline asked of the PACS in the background, until the PACS answers.

Why retried: the request was made once per follow-up study, so a PACS that was down, restarting or
refusing when the follow-up was measured left it without its baseline for good, while the same
job's results were sent again and again until the PACS took them. A request is now retried as a
send is (``send.attempts`` in all, the wait doubling from ``send.initial_backoff_seconds`` up to
``send.max_backoff_seconds``) for as long as the PACS cannot be asked; an answer ends it, "no
earlier study" included. Every attempt's outcome is a row of ``pairing_retrievals``, from which
the node's retry loop (:mod:`dicomnode.clinical.prior_retries`) finds what is due, so the retries
survive a restart; a request the node stopped in the middle of (its last row ``requested``) is
asked again when the node starts, or an hour later (the pipeline process asking it was replaced).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from dicomnode.config import Settings
from dicomnode.db import opened
from dicomnode.logs import error_text

log = logging.getLogger(__name__)


class RetrievalStatus(StrEnum):
    """A prior retrieval's rows in the index: asked for, then what the PACS gave (stored as its value)."""

    REQUESTED = "requested"
    RETRIEVED = "retrieved"  # an earlier study was moved to the node
    NONE = "none"  # the PACS holds no usable earlier study
    FAILED = "failed"  # the PACS could not be asked (unreachable, refused); asked again while attempts last


@dataclass(frozen=True)
class PriorRequest:
    """What one follow-up study asks the PACS for (:func:`dicomnode.network.retrieve.retrieve_prior`)."""

    patient_id: str
    issuer: str
    study_instance_uid: str  # the asking follow-up's study: the request's key in the index
    before_date: str
    before_time: str
    surgery_date: str | None
    not_before: str  # an older pre-operative CT is held: only an admission CT would replace it
    known_study_uids: frozenset[str]
    linked_ids: tuple[str, ...]


@dataclass(frozen=True)
class RequestState:
    """Where one follow-up's request stands: its newest row, and how many attempts failed."""

    patient_id: str
    issuer: str
    study_instance_uid: str
    status: RetrievalStatus  # the newest row's
    at: datetime  # the newest row's time
    failed: int
    detail: str | None = None  # the newest row's: what the PACS answered, or why it could not be asked

    def standing(self, attempts: int) -> str:
        """One of :data:`STANDINGS` (``attempts``: send.attempts)."""
        if self.status == RetrievalStatus.REQUESTED:
            return "asking"
        if self.status == RetrievalStatus.FAILED:
            return "waiting to ask again" if self.failed < attempts else "given up"
        return "answered"

    def text(self, attempts: int) -> str:
        """Where it stands and what came of it, as a line under its study (`patients timeline`,
        `report patient`)."""
        failed = f", {self.failed} of {attempts} attempts failed" if self.failed else ""
        said = f": {self.detail}" if self.detail else ""
        return f"baseline asked of the PACS ({self.standing(attempts)}{failed}){said}"

    def as_json(self, attempts: int) -> dict[str, Any]:
        """Its standing and newest row, as the commands' ``--json`` write it (``attempts``: send.attempts)."""
        return {"standing": self.standing(attempts), "status": str(self.status), "failed": self.failed,
                "at": self.at.isoformat(), "detail": self.detail}


# Where a request can stand, as `dicomnode status` and the metrics name it
STANDINGS = ("asking", "waiting to ask again", "given up", "answered")


def request_states(con: sqlite3.Connection) -> list[RequestState]:
    """Every follow-up's request as its newest row in ``pairing_retrievals`` leaves it, its failed
    attempts counted since it was last asked for anew (its newest ``requested`` row: the follow-up's
    first, :func:`ask_anew`'s)."""
    rows = con.execute(
        "SELECT patient_id, issuer_of_patient_id, study_instance_uid, status, requested_at, failed, detail"
        " FROM ("
        " SELECT *, SUM(status = ? AND n > asked) OVER w AS failed,"
        " ROW_NUMBER() OVER (w ORDER BY n DESC) AS newest FROM ("
        "  SELECT rowid AS n, *, COALESCE(MAX(CASE WHEN status = ? THEN rowid END) OVER w, 0) AS asked"
        "  FROM pairing_retrievals"
        "  WINDOW w AS (PARTITION BY patient_id, issuer_of_patient_id, study_instance_uid))"
        " WINDOW w AS (PARTITION BY patient_id, issuer_of_patient_id, study_instance_uid))"
        " WHERE newest = 1 ORDER BY requested_at",
        (RetrievalStatus.FAILED, RetrievalStatus.REQUESTED),
    ).fetchall()
    return [RequestState(r[0], r[1], r[2], RetrievalStatus(r[3]), datetime.fromisoformat(r[4]), int(r[5]),
                         r[6]) for r in rows]


@dataclass(frozen=True)
class RequestView:
    """One request as `dicomnode priors list` and the operations page show it: the patient by the
    pseudonym `dicomnode jobs` shows ("-" for one the node never received), never by PatientID."""

    patient: str
    standing: str  # one of STANDINGS
    state: RequestState


def requests_by_study(con: sqlite3.Connection) -> dict[tuple[str, str, str], RequestState]:
    """Each request by its follow-up: (patient_id, issuer, study_instance_uid)."""
    return {(s.patient_id, s.issuer, s.study_instance_uid): s for s in request_states(con)}


def request_views(con: sqlite3.Connection, attempts: int, answered: bool = False) -> list[RequestView]:
    """The requests not answered (``answered``: every one), oldest first (``attempts``: send.attempts)."""
    names = {(r[0], r[1]): r[2] for r in con.execute("SELECT patient_id, issuer, pseudonym FROM patients")}
    views = [RequestView(names.get((s.patient_id, s.issuer), "-"), s.standing(attempts), s)
             for s in request_states(con)]
    return [v for v in views if answered or v.standing != "answered"]


def standing_counts(con: sqlite3.Connection, attempts: int) -> dict[str, int]:
    """How many follow-ups' requests stand where, for each of :data:`STANDINGS` in its order (zeros kept)."""
    standings = [state.standing(attempts) for state in request_states(con)]
    return {name: standings.count(name) for name in STANDINGS}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def record(settings: Settings, request: PriorRequest, status: RetrievalStatus, detail: str | None) -> None:
    """One row of the request's history in ``pairing_retrievals``."""
    with opened(settings.db_path) as db, db.tx() as con:
        con.execute("INSERT INTO pairing_retrievals VALUES (?,?,?,?,?,?)",
                    (request.patient_id, request.issuer, request.study_instance_uid, _now(), status, detail))


def backoff_seconds(settings: Settings, failed: int) -> float:
    """The wait after the ``failed``-th failed attempt (1 on), as the sender waits between sends."""
    return min(settings.send.initial_backoff_seconds * 2 ** (failed - 1), settings.send.max_backoff_seconds)


def ask(settings: Settings, request: PriorRequest, failed_before: int = 0) -> RetrievalStatus:
    """One attempt: ask the PACS and record what came of it (``failed_before``: the request's failed
    attempts so far). The status recorded."""
    from dicomnode.network.retrieve import retrieve_prior

    try:
        outcome = retrieve_prior(
            settings, request.patient_id, before_date=request.before_date,
            known_study_uids=set(request.known_study_uids), surgery_date=request.surgery_date,
            issuer=request.issuer, before_time=request.before_time, not_before=request.not_before,
            linked_ids=request.linked_ids,
        )
    except Exception as exc:  # the node keeps running when the PACS is unreachable
        failed, attempts = failed_before + 1, settings.send.attempts
        again = f", again in {backoff_seconds(settings, failed):g} s" if failed < attempts else (
            ", the last: `dicomnode priors retry` asks again once the cause is mended")
        log.warning("prior retrieval failed (attempt %d of %d%s): %s", failed, attempts, again,
                    error_text(exc))
        log.debug("prior retrieval failed", exc_info=True)
        _record_quietly(settings, request, RetrievalStatus.FAILED,
                        f"attempt {failed} of {attempts}: {type(exc).__name__}: {exc}")
        return RetrievalStatus.FAILED
    status = RetrievalStatus.RETRIEVED if outcome.moved else RetrievalStatus.NONE
    log.info("prior retrieval: %s (%s)", status, outcome.reason)
    _record_quietly(settings, request, status, outcome.reason)
    return status


def ask_anew(settings: Settings, request: PriorRequest, why: str) -> RetrievalStatus:
    """Ask again a request the PACS answered or gave up on, its attempts counted from one again
    (``why``: the new ``requested`` row's detail, e.g. "asked again: PatientIDs linked")."""
    record(settings, request, RetrievalStatus.REQUESTED, why)
    return ask(settings, request)


def _record_quietly(settings: Settings, request: PriorRequest, status: RetrievalStatus, detail: str) -> None:
    try:
        record(settings, request, status, detail)
    except sqlite3.Error:
        log.debug("could not record the retrieval outcome", exc_info=True)


def ask_in_background(settings: Settings, request: PriorRequest) -> threading.Thread:
    """The first attempt, in a daemon thread of the pipeline's process (the job does not wait for
    the PACS); the node's own loop makes the later ones (:mod:`dicomnode.clinical.prior_retries`)."""
    thread = threading.Thread(target=ask, args=(settings, request), name="prior-retrieval", daemon=True)
    thread.start()
    return thread
