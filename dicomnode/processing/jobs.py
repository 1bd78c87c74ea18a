"""The job lifecycle: the states a job takes, the legal moves between them, and the one writer.

Why one owner: the store, the stability watcher, the queue, the sender and the operator's ``retry``
all change a job's state. When each wrote its own SQL, nothing stopped an impossible move (a
rejected job re-sent, a finished one running again), and timestamps and attempt counts depended
on who wrote. Here :func:`move` checks every transition against :data:`TRANSITIONS` and writes the
timestamps, the reason (human text plus a :class:`~seg.records.ReasonCode` a program can filter on) and the
attempt count the same way for everyone. Callers pass their open transaction, so a move commits
together with whatever else that caller changes (an instance row, an outbox row).

Reads for operators (``dicomnode jobs`` / ``status``) are here too, as typed records, so the CLI
holds no SQL.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, fields
from enum import StrEnum

from dicomnode.db import Database
from dicomnode.processing import outbox
from dicomnode.processing.outbox import OutboxState
from seg.records import Reason, ReasonCode  # the project's one reason vocabulary (ground floor)


class JobState(StrEnum):
    """Where a job is. Strings on purpose: they are what the index stores and ``jobs --json`` shows."""

    RECEIVING = "receiving"  # instances arriving; closed once the series is quiet
    COMPLETE = "complete"  # quiet: completeness and selection are being checked
    QUEUED = "queued"  # accepted, waiting for the worker (or for its retry time)
    RUNNING = "running"  # the pipeline runs
    SENDING = "sending"  # outputs waiting in the outbox
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a late instance re-opened the series under a new job


FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.SUPERSEDED})
# jobs that have not ended yet (receiving, complete, queued, running, sending): retention keeps their series
ACTIVE = frozenset(JobState) - FINAL
# jobs that have not produced results: a late instance replaces them outright
UNFINISHED = frozenset({JobState.COMPLETE, JobState.QUEUED, JobState.RUNNING, JobState.REJECTED})

S = JobState
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({S.RECEIVING}),  # the first instance of a series opens a job
    # a new instance re-arms a series held as incomplete; quiet series are closed
    S.RECEIVING: frozenset({S.RECEIVING, S.COMPLETE}),
    # held again (incomplete), or a restart during the check; else the verdict
    S.COMPLETE: frozenset({S.RECEIVING, S.QUEUED, S.REJECTED, S.DONE, S.SUPERSEDED}),
    S.QUEUED: frozenset({S.RUNNING, S.SUPERSEDED}),
    # outcome of an attempt; back to queued for a retry or after a restart
    S.RUNNING: frozenset({S.SENDING, S.DONE, S.REJECTED, S.FAILED, S.QUEUED, S.SUPERSEDED}),
    S.SENDING: frozenset({S.SENDING, S.DONE, S.FAILED}),  # a failed send pass stays sending
    S.DONE: frozenset({S.SENDING}),  # operator re-send
    S.FAILED: frozenset({S.SENDING, S.QUEUED}),  # operator re-send or re-run
    S.REJECTED: frozenset({S.SUPERSEDED}),  # new content may still be measurable
    S.SUPERSEDED: frozenset(),
}


class IllegalTransition(ValueError):
    """A move the lifecycle does not allow (a bug in the caller, never a race: see ``expect``)."""

    def __init__(self, job_id: int, current: JobState | None, to: JobState) -> None:
        super().__init__(f"job {job_id}: {current or 'new'} -> {to} is not a legal transition")
        self.job_id, self.current, self.to = job_id, current, to


@dataclass(frozen=True)
class Job:
    """What a queue hands the worker."""

    id: int
    series_uid: str
    state: JobState
    attempts: int


def check(job_id: int, current: JobState | None, to: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``current → to`` is in :data:`TRANSITIONS`."""
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(job_id, current, to)


def create(con: sqlite3.Connection, series_uid: str, t: float) -> int:
    """Open a job for a series in the one state :data:`TRANSITIONS` allows a new job; returns its id."""
    cur = con.execute(
        "INSERT INTO jobs (series_uid, state, attempts, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
        (series_uid, S.RECEIVING.value, t, t),
    )
    return int(cur.lastrowid or 0)


def state_of(con: sqlite3.Connection, job_id: int) -> JobState | None:
    row = con.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
    return JobState(row[0]) if row is not None else None


def move(
    con: sqlite3.Connection,
    job_id: int,
    to: JobState,
    t: float,
    *,
    reason: Reason | None = None,
    expect: Collection[JobState] | None = None,
    next_attempt_at: float | None = None,
    message: str | None = None,
    content_hash: str | None = None,
    n_instances: int | None = None,
    superseded_by: int | None = None,
    reset_attempts: bool = False,
) -> JobState | None:
    """Move one job to ``to`` inside the caller's transaction; returns the state it left.

    ``expect``: the states the caller believes the job is in. When it is elsewhere (superseded while
    running, re-opened while being closed) that is a race, not an error: nothing is written and None
    is returned. A move outside :data:`TRANSITIONS` raises :class:`IllegalTransition`.

    Written for every move: ``updated_at``; the reason and its code (cleared when none is given);
    ``next_attempt_at`` (cleared unless given); ``complete_at`` on complete; ``started_at`` and one
    more attempt on running; ``run_ended_at`` when leaving running (cleared on entering it: a send
    or re-send later never moves it); ``finished_at`` on a final state (cleared otherwise). The other
    facts are written only when given.
    """
    current = state_of(con, job_id)
    if current is None:
        raise LookupError(f"no job {job_id}")
    if expect is not None and current not in expect:
        return None
    check(job_id, current, to)
    sets = ["state=?", "updated_at=?", "reason=?", "reason_code=?", "next_attempt_at=?", "finished_at=?"]
    values: list[object] = [
        to.value, t, reason.text if reason else None, reason.code.value if reason else None,
        next_attempt_at, t if to in FINAL else None,
    ]
    if to is S.COMPLETE:
        sets.append("complete_at=?")
        values.append(t)
    if to is S.RUNNING:
        sets += ["started_at=?", "attempts=attempts+1", "run_ended_at=NULL"]
        values.append(t)
    if current is S.RUNNING:
        sets.append("run_ended_at=?")
        values.append(t)
    if reset_attempts:
        sets.append("attempts=0")
    for column, value in (("message", message), ("content_hash", content_hash),
                          ("n_instances", n_instances), ("superseded_by", superseded_by)):
        if value is not None:
            sets.append(f"{column}=?")
            values.append(value)
    con.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*values, job_id))
    if current is S.RUNNING and to in (S.FAILED, S.SUPERSEDED):
        # outputs this attempt handed on early and not yet sent: a retry (or the superseding job)
        # builds them again
        outbox.drop_unsent(con, job_id)
    return current


def touch(con: sqlite3.Connection, job_id: int, t: float) -> None:
    """Note activity on a job (an identical re-send) without changing its state or reason."""
    con.execute("UPDATE jobs SET updated_at=? WHERE id=?", (t, job_id))


def supersede(con: sqlite3.Connection, old_id: int, new_id: int, t: float) -> None:
    """A late instance opened ``new_id`` for the same series: an unfinished ``old_id`` is superseded;
    one with results keeps its state and only points at its successor."""
    current = state_of(con, old_id)
    if current in UNFINISHED:
        move(con, old_id, S.SUPERSEDED, t, superseded_by=new_id, reason=Reason(
            ReasonCode.LATE_INSTANCE, f"superseded by job {new_id}: a late instance re-opened the series"))
    else:
        con.execute("UPDATE jobs SET superseded_by=? WHERE id=?", (new_id, old_id))


def get(con: sqlite3.Connection, job_id: int) -> Job | None:
    row = con.execute("SELECT id, series_uid, state, attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None:
        return None
    return Job(int(row[0]), str(row[1]), JobState(row[2]), int(row[3]))


# ---------------------------------------------------------------- operator views


@dataclass(frozen=True)
class JobView:
    """One row of ``dicomnode jobs``: the pseudonymised patient (never the PatientID) and timings."""

    id: int
    patient: str
    series_instance_uid: str
    modality: str | None
    instances: int | None
    state: JobState
    attempts: int
    reason: str | None
    reason_code: ReasonCode | None
    message: str | None
    outputs: int
    sent: int
    superseded_by: int | None
    created_at: float | None
    complete_at: float | None
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    study_instance_uid: str | None = None  # for a link to the study in a viewer (operations page)
    run_ended_at: float | None = None  # the last attempt left running (None: running, or not recorded)

    @property
    def run_end(self) -> float | None:
        """Where the "ran" column ends: now while the last attempt runs, else when it left running.
        Never the send that followed, nor an operator's re-send hours later (they move ``finished_at``)."""
        return time.time() if self.state == S.RUNNING else self.run_ended_at


def listing(db: Database, state: JobState | None = None, limit: int = 50) -> list[JobView]:
    """Jobs, newest first (only those in ``state`` when given)."""
    sql = (
        "SELECT j.*, s.modality, s.n_instances AS series_instances, s.study_uid, p.pseudonym,"
        " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state=?) AS sent,"
        " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id) AS outputs"
        " FROM jobs j LEFT JOIN series s ON s.series_uid=j.series_uid"
        " LEFT JOIN studies st ON st.study_uid=s.study_uid LEFT JOIN patients p ON p.id=st.patient_ref"
    )
    params: list[object] = [OutboxState.SENT.value]
    if state is not None:
        sql += " WHERE j.state=?"
        params.append(JobState(state).value)
    sql += " ORDER BY j.id DESC LIMIT ?"
    params.append(limit)
    return [
        JobView(
            id=int(r["id"]), patient=r["pseudonym"] or "-", series_instance_uid=r["series_uid"],
            modality=r["modality"], instances=r["n_instances"] or r["series_instances"],
            state=JobState(r["state"]), attempts=int(r["attempts"]), reason=r["reason"],
            reason_code=ReasonCode(r["reason_code"]) if r["reason_code"] else None, message=r["message"],
            outputs=int(r["outputs"]), sent=int(r["sent"]), superseded_by=r["superseded_by"],
            created_at=r["created_at"], complete_at=r["complete_at"], started_at=r["started_at"],
            finished_at=r["finished_at"], updated_at=r["updated_at"], study_instance_uid=r["study_uid"],
            run_ended_at=r["run_ended_at"],
        )
        for r in db.query(sql, params)
    ]


@dataclass(frozen=True)
class Overview:
    """``dicomnode status``: what the index holds and how far its jobs and sends are."""

    series: int
    instances: int
    jobs: dict[str, int]  # state → count
    outbox: dict[OutboxState, int]  # outbox row state → count


def overview(db: Database) -> Overview:
    def counts(table: str) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in db.query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")}

    return Overview(series=int(db.one("SELECT COUNT(*) FROM series")[0]),
                    instances=int(db.one("SELECT COUNT(*) FROM instances")[0]),
                    jobs=counts("jobs"), outbox={OutboxState(k): n for k, n in counts("outbox").items()})


@dataclass(frozen=True)
class Counters:
    """Totals since the index was created, kept by triggers (``dicomnode.db`` version 5): they never go
    down, whichever process wrote and whatever retention deleted, so Prometheus can take rates of them."""

    instances_received: int
    bytes_received: int
    outputs_sent: int
    send_attempts_failed: int
    jobs_failed: int


def counters(db: Database) -> Counters:
    values = {str(r[0]): int(r[1]) for r in db.query("SELECT name, value FROM counters")}
    return Counters(**{f.name: values.get(f.name, 0) for f in fields(Counters)})


@dataclass(frozen=True)
class Throughput:
    """What the node did between ``since`` and ``until`` (the operations page shows the last hour)."""

    since: float
    until: float
    instances: int
    bytes: int
    jobs_done: int
    jobs_failed: int
    outputs_sent: int


def throughput(db: Database, since: float, until: float) -> Throughput:
    received = db.one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE received_at >= ?"
                      " AND received_at < ?", (since, until))
    ended = {str(r[0]): int(r[1]) for r in db.query(
        "SELECT state, COUNT(*) FROM jobs WHERE finished_at >= ? AND finished_at < ? GROUP BY state",
        (since, until))}
    sent = db.one("SELECT COUNT(*) FROM outbox WHERE state=? AND sent_at >= ? AND sent_at < ?",
                  (OutboxState.SENT.value, since, until))
    return Throughput(since=since, until=until, instances=int(received[0]), bytes=int(received[1]),
                      jobs_done=ended.get(S.DONE.value, 0), jobs_failed=ended.get(S.FAILED.value, 0),
                      outputs_sent=int(sent[0]))


# reasons an operator should look at even while the job is still retrying
TROUBLE = frozenset({ReasonCode.PIPELINE_ERROR, ReasonCode.PIPELINE_CRASHED, ReasonCode.PIPELINE_TIMEOUT,
                     ReasonCode.RESTART_REQUEUED, ReasonCode.RESTART_GAVE_UP, ReasonCode.SEND_RETRYING,
                     ReasonCode.SEND_FAILED})


@dataclass(frozen=True)
class Problem:
    """A job that failed, was rejected, or is retrying after an error, with its latest reason."""

    job_id: int
    at: float
    state: JobState
    code: ReasonCode | None
    text: str


def problems(db: Database, limit: int = 10) -> list[Problem]:
    """The latest problems, newest first."""
    codes = sorted(c.value for c in TROUBLE)
    rows = db.query(
        "SELECT id, updated_at, state, reason_code, COALESCE(reason, message, '') AS text FROM jobs"
        f" WHERE state IN (?, ?) OR reason_code IN ({', '.join('?' * len(codes))})"
        " ORDER BY updated_at DESC, id DESC LIMIT ?",
        (S.FAILED.value, S.REJECTED.value, *codes, limit))
    return [Problem(job_id=int(r["id"]), at=float(r["updated_at"] or 0.0), state=JobState(r["state"]),
                    code=ReasonCode(r["reason_code"]) if r["reason_code"] else None, text=str(r["text"]))
            for r in rows]
