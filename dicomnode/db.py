"""The node's SQLite index (WAL): patients, studies, series, instances, jobs and the send outbox.

Why SQLite: embedded, transactional, survives kill -9, readable by ``dicomnode jobs`` from another
process while ``serve`` runs. One :class:`Database` object is shared by the threads of one process
(a lock serialises writers; transactions are short, and none spans file I/O). The receive path opens
its own connection with a short busy timeout (``busy_timeout``), so a write lock held elsewhere (a
backup, another process) makes a C-STORE answer "out of resources" at once instead of stalling every
association for 30 s. The file holds PHI in clear, so it is created 0600 (its ``-wal``/``-shm``
files inherit that mode) inside a 0750 state folder. The instance files are the source of truth:
they are fsynced before their row is committed, and :func:`dicomnode.store.Store.recover` re-indexes
any file whose row was lost, so ``synchronous=NORMAL`` is enough here.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    pseudonym TEXT NOT NULL,
    patient_name TEXT,
    sex TEXT,
    UNIQUE (patient_id, issuer)
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_ref INTEGER REFERENCES patients(id),
    study_date TEXT,
    study_time TEXT,
    accession TEXT,
    created_at REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    description TEXT,
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    last_received_at REAL,
    current_job INTEGER
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    sop_class TEXT,
    transfer_syntax TEXT,
    path TEXT NOT NULL,
    size INTEGER,
    calling_aet TEXT,
    received_at REAL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    message TEXT,
    content_hash TEXT,
    n_instances INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL,
    updated_at REAL,
    complete_at REAL,
    started_at REAL,
    finished_at REAL,
    next_attempt_at REAL,
    superseded_by INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    sop_uid TEXT,
    sop_class TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, path)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state);
"""


def now() -> float:
    return time.time()


DB_FILE_MODE = 0o600
STATE_DIR_MODE = 0o750


class DatabaseBusy(sqlite3.OperationalError):
    """The write lock was not obtained within the connection's busy timeout (transient)."""


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing; tighten an older, wider file (and its WAL/SHM) to 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DB_FILE_MODE))
    except OSError:  # exists already (the usual case), or not ours to create: SQLite reports that
        pass
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if p.stat().st_mode & 0o077 and p.stat().st_uid == os.getuid():
                os.chmod(p, DB_FILE_MODE)
        except OSError:  # not ours to change: leave it as it is
            pass


class Database:
    """One connection shared by a process's threads; ``tx()`` gives a short write transaction.

    ``busy_timeout`` (seconds) bounds how long ``tx()`` waits for the write lock, both this object's
    thread lock and SQLite's; past it :class:`DatabaseBusy` is raised.
    """

    def __init__(self, path: Path | str, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        _private_file(self.path)
        self.lock = threading.RLock()
        self.con = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=busy_timeout
        )
        self.con.row_factory = sqlite3.Row
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        with self.lock:
            self.con.executescript(SCHEMA)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE) under the process lock; commits or rolls back."""
        if not self.lock.acquire(timeout=self.busy_timeout):
            raise DatabaseBusy("database busy in this process")
        try:
            try:
                self.con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise DatabaseBusy(str(exc)) from exc
                raise
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
        finally:
            self.lock.release()

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.con.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Row | None:
        with self.lock:
            return self.con.execute(sql, params).fetchone()

    def close(self) -> None:
        with self.lock:
            self.con.close()
