"""The node's SQLite index (WAL): patients, studies, series, instances, jobs and the send outbox.

Why SQLite: embedded, transactional, survives kill -9, readable by ``dicomnode jobs`` from another
process while ``serve`` runs. One :class:`Database` object is shared by the threads of one process
(a lock serialises writers; transactions are short, and none spans file I/O). The receive path opens
its own connection with a short busy timeout (``busy_timeout``), so a write lock held elsewhere (a
backup, another process) makes a C-STORE answer "out of resources" at once instead of stalling every
association for 30 s. The file holds PHI in clear, so it is created 0600 (its ``-wal``/``-shm``
files inherit that mode) inside a 0750 state folder. The instance files are the source of truth:
they are fsynced before their row is committed, and :func:`dicomnode.storage.store.Store.recover` re-indexes
any file whose row was lost, so ``synchronous=NORMAL`` is enough here. The schema is versioned in
:data:`MIGRATIONS` (``PRAGMA user_version``), the one place any table of this file is defined.
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

SCHEMA_V1 = """
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

# 3: the clinical registry (dicomnode.clinical.registry)
REGISTRY_V3 = """
CREATE TABLE IF NOT EXISTS registry_patients (
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    height_m REAL,
    height_flag TEXT,
    sex TEXT,
    fracture_type TEXT,
    fractured_side TEXT,
    surgery_date TEXT,
    koval_grade INTEGER,
    source TEXT,
    imported_at TEXT,
    PRIMARY KEY (patient_id, issuer_of_patient_id)
);
"""

# 4: the pairing timeline (dicomnode.clinical.pairing): results, roles with reasons, changes, prior retrievals
PAIRING_V4 = """
CREATE TABLE IF NOT EXISTS pairing_results (
    series_instance_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    patient_sex TEXT,
    patient_size_m REAL,
    study_instance_uid TEXT NOT NULL,
    study_date TEXT,
    study_time TEXT,
    volumes_json TEXT NOT NULL,
    seg_sop_instance_uid TEXT,
    sr_sop_instance_uid TEXT,
    result_dir TEXT,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairing_results_patient ON pairing_results (patient_id, issuer_of_patient_id);
CREATE TABLE IF NOT EXISTS pairing_status (
    series_instance_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL,
    reasons TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pairing_changes (
    baseline_series_uid TEXT NOT NULL,
    followup_series_uid TEXT NOT NULL,
    comparison TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    change_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (baseline_series_uid, followup_series_uid)
);
CREATE TABLE IF NOT EXISTS pairing_retrievals (
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    study_instance_uid TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT
);
"""

# 5: monotonic activity counters for Prometheus (dicomnode/ops/metrics.py). Kept by triggers, so every
# writer (receive processes, worker, sender) counts without knowing, a restart keeps the totals, and
# retention deleting old instance rows does not make "instances received" go down. Seeded from what
# the index holds when an older file is upgraded.
COUNTERS_V5 = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO counters (name, value) SELECT 'instances_received', COUNT(*) FROM instances;
INSERT OR IGNORE INTO counters (name, value) SELECT 'bytes_received', COALESCE(SUM(size), 0) FROM instances;
INSERT OR IGNORE INTO counters (name, value) SELECT 'outputs_sent', COUNT(*) FROM outbox WHERE state = 'sent';
INSERT OR IGNORE INTO counters (name, value)
    SELECT 'send_attempts_failed', COALESCE(SUM(attempts - (state = 'sent')), 0) FROM outbox;
INSERT OR IGNORE INTO counters (name, value) SELECT 'jobs_failed', COUNT(*) FROM jobs WHERE state = 'failed';
CREATE TRIGGER IF NOT EXISTS count_instance_received AFTER INSERT ON instances BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'instances_received';
    UPDATE counters SET value = value + COALESCE(NEW.size, 0) WHERE name = 'bytes_received';
END;
CREATE TRIGGER IF NOT EXISTS count_output_sent AFTER UPDATE OF state ON outbox
    WHEN NEW.state = 'sent' AND OLD.state <> 'sent' BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'outputs_sent';
END;
CREATE TRIGGER IF NOT EXISTS count_send_attempt_failed AFTER UPDATE OF last_error ON outbox
    WHEN NEW.last_error IS NOT NULL BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'send_attempts_failed';
END;
CREATE TRIGGER IF NOT EXISTS count_job_failed AFTER UPDATE OF state ON jobs
    WHEN NEW.state = 'failed' AND OLD.state <> 'failed' BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'jobs_failed';
END;
"""

# 6: when a job's last attempt left "running", so `dicomnode jobs` shows the pipeline's run time and not
# the time to a later (re-)send, which finished_at and updated_at move. Known for older rows only where
# the run ended the job (a pipeline rejection or failure); other older rows show no run time.
RUN_END_V6 = """
ALTER TABLE jobs ADD COLUMN run_ended_at REAL;
UPDATE jobs SET run_ended_at = finished_at WHERE started_at IS NOT NULL AND state IN ('rejected', 'failed')
    AND reason_code IN ('pipeline-rejected', 'pipeline-error', 'pipeline-crashed', 'pipeline-timeout');
"""

# 7: one patient under two PatientIDs (dicomnode.clinical.aliases): the birth date each result was
# measured with and its ID's comparison key (spaces around and leading zeros removed, ASCII letters in
# lower case: aliases.id_key, which SQLite's trim/ltrim/lower reproduce for the rows kept before), so
# look-alike IDs are found by an index; and the links an operator made (``patients link A B``): the
# linked ID's results are paired under ``linked_to``, an ID of the same issuer.
ALIASES_V7 = """
ALTER TABLE pairing_results ADD COLUMN patient_birth_date TEXT;
ALTER TABLE pairing_results ADD COLUMN id_key TEXT;
UPDATE pairing_results SET id_key = lower(ltrim(trim(patient_id), '0'));
CREATE INDEX IF NOT EXISTS pairing_results_id_key ON pairing_results (issuer_of_patient_id, id_key);
CREATE TABLE IF NOT EXISTS patient_links (
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    linked_to TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    linked_at TEXT NOT NULL,
    PRIMARY KEY (patient_id, issuer_of_patient_id)
);
"""

# The schema's history, one entry per version (PRAGMA user_version); append, never edit. A file from
# before versioning (user_version 0) replays version 1 harmlessly: it only creates what is missing.
MIGRATIONS: tuple[str, ...] = (
    SCHEMA_V1,
    # 2: a machine-readable code next to each job's human reason (dicomnode.processing.jobs.ReasonCode)
    "ALTER TABLE jobs ADD COLUMN reason_code TEXT;",
    REGISTRY_V3,  # files that registry/pairing created before versioning keep their tables (IF NOT EXISTS)
    PAIRING_V4,
    COUNTERS_V5,
    RUN_END_V6,
    ALIASES_V7,
)


def now() -> float:
    return time.time()


DB_FILE_MODE = 0o600
STATE_DIR_MODE = 0o750


class DatabaseBusy(sqlite3.OperationalError):
    """The write lock was not obtained within the connection's busy timeout (transient)."""


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused for a lock another connection holds (transient: try again), by its
    result code; a full disk, an I/O error or a damaged file are not (their texts say "database")."""
    if isinstance(exc, DatabaseBusy):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


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


def _statements(script: str) -> list[str]:
    """The script's statements, one each; a trigger body's own ``;`` does not end its CREATE TRIGGER."""
    statements, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):  # an unfinished statement: let SQLite say what is wrong with it
        statements.append(pending.strip())
    return statements


def migrate(con: sqlite3.Connection) -> int:
    """Bring the file to the newest schema version in one write transaction; returns that version.

    The common case (already current) takes no write lock, so opening the index from ``dicomnode
    jobs`` never waits behind a running node. Two processes migrating at once serialise on BEGIN
    IMMEDIATE, and the second finds the work done.
    """
    newest = len(MIGRATIONS)
    version = int(con.execute("PRAGMA user_version").fetchone()[0])
    if version == newest:
        return version
    con.execute("BEGIN IMMEDIATE")
    try:
        version = int(con.execute("PRAGMA user_version").fetchone()[0])
        if version > newest:
            raise RuntimeError(f"the index has schema version {version}, newer than this node's {newest}")
        for number in range(version + 1, newest + 1):
            for statement in _statements(MIGRATIONS[number - 1]):
                con.execute(statement)
            con.execute(f"PRAGMA user_version={number}")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return newest


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
            migrate(self.con)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE) under the process lock; commits or rolls back."""
        if not self.lock.acquire(timeout=self.busy_timeout):
            raise DatabaseBusy("database busy in this process")
        try:
            try:
                self.con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if is_busy(exc):
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


@contextmanager
def opened(path: Path | str) -> Iterator[Database]:
    """A :class:`Database` for one short piece of work (a CLI command, one pairing step), then closed."""
    db = Database(path)
    try:
        yield db
    finally:
        db.close()
