"""The job queue: a small interface and its embedded SQLite implementation.

Why an interface: the worker only claims a job, runs it and reports the outcome. Those four calls
are all a different engine (Celery/Redis, one worker per GPU) would have to provide; the SQLite
one keeps jobs, their states, attempts, timestamps and reasons in the node's index, where
``dicomnode jobs`` reads them. States: receiving → complete → queued → running → sending →
done | failed | rejected, plus ``superseded`` when a late instance replaced an unfinished job.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomnode.db import Database, now
from dicomnode.logs import event

log = logging.getLogger(__name__)

STATES = ("receiving", "complete", "queued", "running", "sending", "done", "failed", "rejected", "superseded")
FINAL = ("done", "failed", "rejected", "superseded")


@dataclass
class Job:
    id: int
    series_uid: str
    state: str
    attempts: int
    reason: str | None = None


class JobQueue(Protocol):
    """What the worker needs from a queue engine."""

    def claim(self) -> Job | None:
        """Take the oldest due queued job and mark it running (attempts + 1); None when idle."""

    def finish(self, job_id: int, outputs: list[Path], message: str) -> str:
        """Pipeline succeeded: hand outputs to the sender; returns the new state."""

    def reject(self, job_id: int, reason: str) -> None:
        """The pipeline refused the series (terminal, with reason)."""

    def fail(self, job_id: int, reason: str, retry_after: float | None) -> str:
        """An attempt failed: re-queue after ``retry_after`` seconds, or fail for good when None."""


class SQLiteJobQueue:
    """:class:`JobQueue` on the node's SQLite index."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self) -> Job | None:
        t = now()
        with self.db.tx() as con:
            row = con.execute(
                "SELECT id, series_uid, attempts FROM jobs WHERE state='queued'"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT 1",
                (t,),
            ).fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started_at=?, updated_at=? WHERE id=?",
                (t, t, row["id"]),
            )
        return Job(
            id=int(row["id"]),
            series_uid=str(row["series_uid"]),
            state="running",
            attempts=int(row["attempts"]) + 1,
        )

    def _still_running(self, con: sqlite3.Connection, job_id: int) -> bool:
        row = con.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row is not None and row["state"] == "running"

    def finish(self, job_id: int, outputs: list[Path], message: str) -> str:
        t = now()
        with self.db.tx() as con:
            if not self._still_running(con, job_id):
                state = con.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()["state"]
                event(log, "outputs discarded", logging.WARNING, job=job_id, state=state)
                return str(state)
            for path in outputs:
                con.execute(
                    "INSERT OR IGNORE INTO outbox (job_id, path, state, next_attempt_at)"
                    " VALUES (?, ?, 'pending', ?)",
                    (job_id, str(path), t),
                )
            state = "sending" if outputs else "done"
            con.execute(
                "UPDATE jobs SET state=?, message=?, reason=NULL, next_attempt_at=NULL, updated_at=?,"
                " finished_at=CASE WHEN ?='done' THEN ? ELSE NULL END WHERE id=?",
                (state, message, t, state, t, job_id),
            )
        return state

    def reject(self, job_id: int, reason: str) -> None:
        t = now()
        with self.db.tx() as con:
            if self._still_running(con, job_id):
                con.execute(
                    "UPDATE jobs SET state='rejected', reason=?, updated_at=?, finished_at=? WHERE id=?",
                    (reason, t, t, job_id),
                )

    def fail(self, job_id: int, reason: str, retry_after: float | None) -> str:
        t = now()
        with self.db.tx() as con:
            if not self._still_running(con, job_id):
                return "superseded"
            if retry_after is None:
                con.execute(
                    "UPDATE jobs SET state='failed', reason=?, updated_at=?, finished_at=? WHERE id=?",
                    (reason, t, t, job_id),
                )
                return "failed"
            con.execute(
                "UPDATE jobs SET state='queued', reason=?, updated_at=?, next_attempt_at=? WHERE id=?",
                (reason, t, t + retry_after, job_id),
            )
            return "queued"
