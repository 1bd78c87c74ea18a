"""The job queue: what the worker needs (:class:`JobQueue`), and the engine behind it.

:class:`SQLiteJobQueue` delivers from the index itself: its due ``queued`` rows are the queue, so it
survives restarts and a ``dicomnode retry`` from another process reaches the serving node at once.
The job's record (state, reason, attempts, timestamps) is written through
:mod:`dicomnode.processing.jobs`, so every state change is checked by the one transition table, and
outputs go to the sender through :mod:`dicomnode.processing.outbox`.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Protocol

from dicomnode.db import Database, now
from dicomnode.logs import event
from dicomnode.processing import jobs, outbox
from dicomnode.processing.jobs import Job, JobState, Reason, ReasonCode
from dicomnode.processing.outbox import OutboxState

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    """What the worker needs from the queue: the next due job, and a record of how its attempt ended."""

    def claim(self) -> Job | None:
        """Take the oldest due queued job and mark it running (attempts + 1); None when idle."""

    def finish(self, job_id: int, outputs: list[Path], message: str) -> JobState:
        """Pipeline succeeded: hand outputs to the sender; returns the job's state afterwards."""

    def early_output(self, job_id: int, path: Path) -> bool:
        """One output of a running job is complete: to the sender now; False when the job is not running."""

    def outputs_in_outbox(self, job_id: int) -> frozenset[Path]:
        """The outputs of a job already in the outbox (an earlier attempt's early outputs among them)."""

    def reject(self, job_id: int, reason: str) -> JobState:
        """The pipeline refused the series (terminal, with reason); returns the state afterwards."""

    def fail(self, job_id: int, reason: str, retry_after: float | None,
             code: ReasonCode = ReasonCode.PIPELINE_ERROR) -> JobState:
        """An attempt failed (``code``: how): re-queue after ``retry_after`` seconds, or fail for good
        when None."""


class SQLiteJobQueue:
    """:class:`JobQueue` whose queue is the index itself: the due ``queued`` rows, oldest first."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self) -> Job | None:
        with self.db.tx() as con:
            row = con.execute(
                "SELECT id FROM jobs WHERE state=? AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
                " ORDER BY id LIMIT 1",
                (JobState.QUEUED.value, now()),
            ).fetchone()
            return self._start(con, int(row[0])) if row is not None else None

    def _state(self, job_id: int) -> JobState:
        with self.db.lock:
            state = jobs.state_of(self.db.con, job_id)
        if state is None:
            raise LookupError(f"no job {job_id}")
        return state

    def finish(self, job_id: int, outputs: list[Path], message: str) -> JobState:
        """Outputs sent early (:meth:`early_output`) keep their row (``INSERT OR IGNORE``: never sent
        twice); with nothing left to send, the job ends here as the sender would end it."""
        t = now()
        with self.db.tx() as con:
            left = None
            if jobs.state_of(con, job_id) is JobState.RUNNING:
                for path in outputs:
                    outbox.add(con, job_id, path, t)
                failed = con.execute("SELECT last_error FROM outbox WHERE job_id=? AND state=?"
                                     " ORDER BY id LIMIT 1", (job_id, OutboxState.FAILED.value)).fetchone()
                state = (JobState.SENDING if outbox.counts(con, job_id).get(OutboxState.PENDING) else
                         JobState.FAILED if failed is not None else JobState.DONE)
                reason = None if state is not JobState.FAILED else Reason(
                    ReasonCode.SEND_FAILED, f"an output sent early was not stored: {failed[0]}")
                left = jobs.move(con, job_id, state, t, message=message, reason=reason,
                                 expect={JobState.RUNNING})
        if left is None:
            state = self._state(job_id)
            event(log, "outputs discarded", logging.WARNING, job=job_id, state=state)
        return state

    def early_output(self, job_id: int, path: Path) -> bool:
        """Only while the job runs: a superseded or failed attempt hands nothing on. The row is the
        one :meth:`finish` would write, so the sender treats it alike (:mod:`dicomnode.network.sender`)."""
        with self.db.tx() as con:
            if jobs.state_of(con, job_id) is not JobState.RUNNING:
                return False
            outbox.add(con, job_id, path, now())
        return True

    def outputs_in_outbox(self, job_id: int) -> frozenset[Path]:
        rows = self.db.query("SELECT path FROM outbox WHERE job_id=?", (job_id,))
        return frozenset(Path(r[0]) for r in rows)

    def reject(self, job_id: int, reason: str) -> JobState:
        with self.db.tx() as con:
            left = jobs.move(con, job_id, JobState.REJECTED, now(), expect={JobState.RUNNING},
                             reason=Reason(ReasonCode.PIPELINE_REJECTED, reason))
        return JobState.REJECTED if left is not None else self._state(job_id)

    def fail(self, job_id: int, reason: str, retry_after: float | None,
             code: ReasonCode = ReasonCode.PIPELINE_ERROR) -> JobState:
        t = now()
        # to failed, jobs.move drops the attempt's unsent early outputs: a retry builds them again
        to = JobState.FAILED if retry_after is None else JobState.QUEUED
        with self.db.tx() as con:
            left = jobs.move(con, job_id, to, t, reason=Reason(code, reason), expect={JobState.RUNNING},
                             next_attempt_at=None if retry_after is None else t + retry_after)
        return to if left is not None else self._state(job_id)

    @staticmethod
    def _start(con: sqlite3.Connection, job_id: int) -> Job | None:
        """queued → running for the claimed job; None when it is no longer queued (superseded).

        An earlier attempt's early outputs whose sending gave up get their tries again with this one."""
        if jobs.move(con, job_id, JobState.RUNNING, now(), expect={JobState.QUEUED}) is None:
            return None
        outbox.reset_failed(con, job_id)
        return jobs.get(con, job_id)

