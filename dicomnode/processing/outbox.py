"""The send outbox: the states an output's row takes, and the one writer of its rows.

Why one owner: the worker hands outputs on, the sender records each attempt, a new attempt of a job
and the operator's ``retry`` give rows their tries again, and a failed or superseded attempt drops what
it had not sent. When each wrote its own SQL, the same state strings and the same resets were spelled
in four modules. Every write of an outbox row is here, as :func:`dicomnode.processing.jobs.move` is the
one writer of a job's state; callers pass their open transaction, so a row changes together with the
job it belongs to. Readers filter with :class:`OutboxState`; the stored strings are the schema's.
"""

from __future__ import annotations

import sqlite3
from enum import StrEnum
from pathlib import Path


class OutboxState(StrEnum):
    """Where one output is. Strings on purpose: they are what the index stores and ``status`` shows."""

    PENDING = "pending"  # owed: sent when due (``next_attempt_at``, None: now)
    SENT = "sent"  # stored in the PACS
    FAILED = "failed"  # ``send.attempts`` used up; its job failed with the row's ``last_error``


def counts(con: sqlite3.Connection, job_id: int) -> dict[OutboxState, int]:
    """How many of the job's rows are in each state (states without rows left out)."""
    return {OutboxState(r[0]): int(r[1]) for r in con.execute(
        "SELECT state, COUNT(*) FROM outbox WHERE job_id=? GROUP BY state", (job_id,))}


def add(con: sqlite3.Connection, job_id: int, path: Path, t: float) -> None:
    """Owe ``path`` to the PACS, due at ``t``. Idempotent: an output handed on before keeps its row
    (sent early, it is never sent twice)."""
    con.execute("INSERT OR IGNORE INTO outbox (job_id, path, state, next_attempt_at) VALUES (?, ?, ?, ?)",
                (job_id, str(path), OutboxState.PENDING.value, t))


def mark_sent(con: sqlite3.Connection, row_id: int, job_id: int, path: str, attempts: int, t: float) -> None:
    """The PACS stored the row's file at attempt ``attempts``. A row dropped while it was being sent
    (its job failed meanwhile) is written again: it was sent all the same."""
    con.execute("INSERT OR IGNORE INTO outbox (id, job_id, path) VALUES (?, ?, ?)", (row_id, job_id, path))
    con.execute("UPDATE outbox SET state=?, attempts=?, sent_at=?, last_error=NULL WHERE id=?",
                (OutboxState.SENT.value, attempts, t, row_id))


def mark_failed(con: sqlite3.Connection, row_id: int, attempts: int, error: str) -> None:
    """Attempt ``attempts`` failed and was the last one allowed: the row gives up."""
    con.execute("UPDATE outbox SET state=?, attempts=?, last_error=? WHERE id=?",
                (OutboxState.FAILED.value, attempts, error, row_id))


def retry_later(con: sqlite3.Connection, row_id: int, attempts: int, error: str, due: float) -> None:
    """Attempt ``attempts`` failed; the row stays pending until ``due`` (the sender's backoff)."""
    con.execute("UPDATE outbox SET attempts=?, last_error=?, next_attempt_at=? WHERE id=?",
                (attempts, error, due, row_id))


def reset_failed(con: sqlite3.Connection, job_id: int) -> None:
    """A new attempt of the job: its rows that gave up get all their tries again, due now."""
    con.execute("UPDATE outbox SET state=?, attempts=0, next_attempt_at=NULL, last_error=NULL"
                " WHERE job_id=? AND state=?", (OutboxState.PENDING.value, job_id, OutboxState.FAILED.value))


def resend(con: sqlite3.Connection, job_id: int, t: float) -> None:
    """The operator's re-send: every row of the job, sent or not, is owed again from ``t``."""
    con.execute("UPDATE outbox SET state=?, attempts=0, next_attempt_at=?, last_error=NULL WHERE job_id=?",
                (OutboxState.PENDING.value, t, job_id))


def drop_unsent(con: sqlite3.Connection, job_id: int) -> None:
    """The job's attempt ended without results (failed, superseded): what it had not sent goes nowhere,
    so no pending row outlives it (retention waits for none). Sent rows stay: they are in the PACS."""
    con.execute("DELETE FROM outbox WHERE job_id=? AND state<>?", (job_id, OutboxState.SENT.value))
