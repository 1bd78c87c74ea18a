"""The on-disk store and its index: durable instance files, then their SQLite rows.

Layout (a plain folder, mercure-like, readable without the node):
``storage_dir/incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` and a private work folder per job
``storage_dir/jobs/<job_id>/``. An instance is written as preamble + file meta + the dataset bytes
exactly as received to ``.<sop>.<pid>.<n>.tmp``, fsynced, renamed, and only then indexed; the SCP
answers success after that. A new study/series folder is fsynced into its parent once; the rename
itself is not followed by a directory fsync (it doubled the cost per instance; ext4 commits it with
its journal within seconds), so only a power cut in that window could lose an acknowledged file's
name, never leave a partial file. A crash leaves at most a ``.tmp`` file, which :meth:`Store.recover`
deletes; a file whose row was lost is re-indexed from its header.

Indexing is also where series assembly starts: the first instance of a series opens a job in state
``receiving``; a *new* instance (new SOP UID or changed size) arriving after the series was closed
re-opens it with a fresh job that supersedes the unfinished old one; a byte-identical re-send of an
instance the node already has does not re-open anything, so the same series sent twice gives one job.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.db import Database, now
from dicomnode.logs import event, load_pseudonym_key, pseudonym

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PREAMBLE = b"\x00" * 128 + b"DICM"

# jobs in these states have not produced results yet: a late instance replaces them outright
UNFINISHED = ("complete", "queued", "running", "rejected")


class StoreError(Exception):
    """The instance cannot be stored; the message goes into the failure status comment."""


@dataclass
class InstanceInfo:
    """What the index needs from one instance's header (identifiers only; no pixels)."""

    sop_uid: str
    sop_class: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    modality: str = ""
    series_description: str = ""
    calling_aet: str = ""


@dataclass
class Indexed:
    job_id: int
    new_instance: bool
    reopened: bool
    superseded: int | None = None


LAST_HEADER_TAG = 0x0020000E  # SeriesInstanceUID: every tag the index needs comes before it


def read_header(fp: Any, transfer_syntax: str) -> Dataset | None:
    """Parse a received dataset only up to SeriesInstanceUID (None for deflated/big-endian syntaxes).

    The pixel data and everything after the identifiers are never parsed on the hot path.
    """
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    if ts.is_deflated or not ts.is_little_endian:
        return None
    fp.seek(0)
    try:
        return read_dataset(fp, ts.is_implicit_VR, True,
                            stop_when=lambda tag, vr, length: tag > LAST_HEADER_TAG)
    finally:
        fp.seek(0)


def _text(ds: Dataset, tag: int) -> str:
    """An element's text straight from its raw bytes (pydicom's value conversion is the slow part)."""
    try:
        elem = ds.get_item(tag)
    except KeyError:
        return ""
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return text.strip("\x00 ").strip()
    return str(value).strip()


def info_from_dataset(
    ds: Dataset, sop_class: str, transfer_syntax: str, calling_aet: str = ""
) -> InstanceInfo:
    """Identifiers of one instance; raises :class:`StoreError` when a UID needed for filing is unusable."""
    info = InstanceInfo(
        sop_uid=_text(ds, 0x00080018),
        sop_class=sop_class or _text(ds, 0x00080016),
        transfer_syntax=transfer_syntax,
        study_uid=_text(ds, 0x0020000D),
        series_uid=_text(ds, 0x0020000E),
        patient_id=_text(ds, 0x00100020),
        issuer=_text(ds, 0x00100021),
        patient_name=_text(ds, 0x00100010),
        sex=_text(ds, 0x00100040),
        study_date=_text(ds, 0x00080020),
        study_time=_text(ds, 0x00080030),
        accession=_text(ds, 0x00080050),
        modality=_text(ds, 0x00080060),
        series_description=_text(ds, 0x0008103E),
        calling_aet=calling_aet,
    )
    for name in ("sop_uid", "study_uid", "series_uid"):
        value = getattr(info, name)
        if not value or len(value) > 64 or not UID_RE.match(value):
            raise StoreError(f"missing or invalid {name.replace('_', ' ').replace('sop', 'SOP')} {value!r}")
    return info


IMPLEMENTATION_CLASS_UID = "2.25.7505657138699353879577041376030314113"  # uuid5-derived
IMPLEMENTATION_VERSION = "DICOMNODE_01"


def _el(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian group-2 element (short VR form)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(info: InstanceInfo) -> bytes:
    """Part 10 file meta group for an instance received over the network.

    Hand-encoded (it is always the same eight elements) because pydicom's writer costs ~0.7 ms per
    instance on the receive hot path; ``tests/test_node_store.py`` checks pydicom reads it back.
    """
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _el(0x0002, b"UI", _ui(info.sop_class)),
        _el(0x0003, b"UI", _ui(info.sop_uid)),
        _el(0x0010, b"UI", _ui(info.transfer_syntax)),
        _el(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _el(0x0013, b"SH", _text_value(IMPLEMENTATION_VERSION)),
    ))
    if info.calling_aet:
        body += _el(0x0016, b"AE", _text_value(info.calling_aet[:16]))
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Durable files under ``storage_dir`` plus their rows in :class:`Database`."""

    def __init__(self, storage_dir: Path, db: Database) -> None:
        self.root = Path(storage_dir).resolve()  # absolute paths in the index, whatever the cwd
        self.incoming = self.root / "incoming"
        self.jobs_dir = self.root / "jobs"
        self.db = db
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        load_pseudonym_key(self.root)
        self._known_dirs: set[Path] = set()

    # -- files ---------------------------------------------------------------------------------
    def instance_path(self, info: InstanceInfo) -> Path:
        return self.incoming / info.study_uid / info.series_uid / f"{info.sop_uid}.dcm"

    def job_dir(self, job_id: int) -> Path:
        path = self.jobs_dir / str(job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        self._known_dirs.add(folder)

    def write(self, info: InstanceInfo, file_meta: bytes, dataset: bytes | memoryview) -> tuple[Path, int]:
        """Write preamble + file meta + the dataset bytes as received to a temp file; fsync; rename."""
        final = self.instance_path(info)
        folder = final.parent
        self._ensure_dir(folder)
        tmp = folder / f".{info.sop_uid}.{os.getpid()}.{id(dataset)}.tmp"
        size = len(PREAMBLE) + len(file_meta) + len(dataset)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the folder was removed behind our back: recreate it once
            self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            fd = os.open(tmp, flags, 0o644)
        try:
            try:
                os.writev(fd, [PREAMBLE, file_meta, dataset])
                os.fsync(fd)
            finally:
                os.close(fd)
            if os.stat(tmp).st_size != size:
                raise StoreError(f"short write ({os.stat(tmp).st_size} of {size} bytes)")
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final, size

    # -- index ---------------------------------------------------------------------------------
    def index(self, info: InstanceInfo, path: Path, size: int, received_at: float | None = None) -> Indexed:
        """Record one stored instance; open, keep open or re-open its series' job."""
        t = received_at if received_at is not None else now()
        with self.db.tx() as con:
            old = con.execute("SELECT size FROM instances WHERE sop_uid=?", (info.sop_uid,)).fetchone()
            new_instance = old is None or old["size"] != size
            con.execute(
                "INSERT OR REPLACE INTO instances (sop_uid, series_uid, sop_class, transfer_syntax, path,"
                " size,"
                " calling_aet, received_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    info.sop_uid,
                    info.series_uid,
                    info.sop_class,
                    info.transfer_syntax,
                    str(path),
                    size,
                    info.calling_aet,
                    t,
                ),
            )
            series = con.execute(
                "SELECT current_job FROM series WHERE series_uid=?", (info.series_uid,)
            ).fetchone()
            if series is None:
                self._add_study(con, info, t)
                con.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, description, n_instances,"
                    " first_received_at, last_received_at) VALUES (?,?,?,?,0,?,?)",
                    (info.series_uid, info.study_uid, info.modality, info.series_description, t, t),
                )
                job = None
            else:
                job = con.execute(
                    "SELECT id, state FROM jobs WHERE id=?", (series["current_job"],)
                ).fetchone()
            reopened = False
            superseded = None
            if job is not None and job["state"] == "receiving":
                job_id = int(job["id"])
                con.execute("UPDATE jobs SET updated_at=? WHERE id=?", (t, job_id))
            elif job is None or new_instance:
                job_id = int(
                    con.execute(
                        "INSERT INTO jobs (series_uid, state, created_at, updated_at)"
                        " VALUES (?, 'receiving', ?, ?)",
                        (info.series_uid, t, t),
                    ).lastrowid
                )
                con.execute("UPDATE series SET current_job=? WHERE series_uid=?", (job_id, info.series_uid))
                if job is not None:
                    reopened = True
                    superseded = int(job["id"])
                    if job["state"] in UNFINISHED:
                        con.execute(
                            "UPDATE jobs SET state='superseded', superseded_by=?, updated_at=?,"
                            " finished_at=?,"
                            " reason=? WHERE id=?",
                            (
                                job_id,
                                t,
                                t,
                                f"superseded by job {job_id}: a late instance re-opened the series",
                                superseded,
                            ),
                        )
                    else:
                        con.execute("UPDATE jobs SET superseded_by=? WHERE id=?", (job_id, superseded))
            else:  # identical re-send of a known instance into a closed series: nothing to redo
                job_id = int(job["id"])
            if new_instance:
                con.execute(
                    "UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?),"
                    " last_received_at=? WHERE series_uid=?",
                    (info.series_uid, t, info.series_uid),
                )
            elif job_id and job is not None and job["state"] == "receiving":
                con.execute("UPDATE series SET last_received_at=? WHERE series_uid=?", (t, info.series_uid))
        if reopened:
            event(log, "series re-opened", series=info.series_uid, job=job_id, superseded=superseded)
        elif job is None:
            event(
                log,
                "series opened",
                series=info.series_uid,
                job=job_id,
                modality=info.modality,
                patient=pseudonym(info.patient_id, info.issuer),
            )
            log.debug("series %s patient %s %s", info.series_uid, info.patient_id, info.patient_name)
        return Indexed(job_id=job_id, new_instance=new_instance, reopened=reopened, superseded=superseded)

    @staticmethod
    def _add_study(con: Any, info: InstanceInfo, t: float) -> None:
        con.execute(
            "INSERT OR IGNORE INTO patients (patient_id, issuer, pseudonym, patient_name, sex)"
            " VALUES (?,?,?,?,?)",
            (
                info.patient_id,
                info.issuer,
                pseudonym(info.patient_id, info.issuer),
                info.patient_name,
                info.sex,
            ),
        )
        con.execute(
            "INSERT OR IGNORE INTO studies (study_uid, patient_ref, study_date, study_time, accession,"
            " created_at)"
            " VALUES (?, (SELECT id FROM patients WHERE patient_id=? AND issuer=?), ?, ?, ?, ?)",
            (
                info.study_uid,
                info.patient_id,
                info.issuer,
                info.study_date,
                info.study_time,
                info.accession,
                t,
            ),
        )

    def add(self, info: InstanceInfo, file_meta: bytes, dataset: bytes | memoryview) -> Indexed:
        """Store durably, then index: the SCP's whole job for one C-STORE."""
        path, size = self.write(info, file_meta, dataset)
        return self.index(info, path, size)

    def series_files(self, series_uid: str) -> list[Path]:
        rows = self.db.query("SELECT path FROM instances WHERE series_uid=? ORDER BY path", (series_uid,))
        return [Path(r["path"]) for r in rows]

    # -- crash recovery ------------------------------------------------------------------------
    def recover(self, max_attempts: int | None = None) -> dict[str, int]:
        """After a crash: drop partial files, re-index files whose rows were lost, resume interrupted work.

        A job that was running is queued again, unless it has already had ``max_attempts`` attempts (a
        pipeline that kills the node every time must not crash-loop it forever): then it is ``failed``.
        """
        import pydicom

        removed = 0
        for tmp in self.incoming.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        known = {r["path"] for r in self.db.query("SELECT path FROM instances")}
        reindexed = 0
        for path in sorted(self.incoming.glob("*/*/*.dcm")):
            if str(path) in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                info = info_from_dataset(
                    ds, str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)
                )
                self.index(info, path, path.stat().st_size, received_at=path.stat().st_mtime)
                reindexed += 1
            except Exception as exc:  # an unreadable file is reported, not fatal
                event(log, "unindexable file", logging.WARNING, path=path, error=exc)
        t = now()
        with self.db.tx() as con:
            # a series that was still arriving gets a fresh stability window (the sender may resend)
            con.execute(
                "UPDATE series SET last_received_at=? WHERE current_job IN"
                " (SELECT id FROM jobs WHERE state IN ('receiving', 'complete'))",
                (t,),
            )
            con.execute("UPDATE jobs SET state='receiving', updated_at=? WHERE state='complete'", (t,))
            given_up = 0
            if max_attempts is not None:
                given_up = con.execute(
                    "UPDATE jobs SET state='failed', updated_at=?, finished_at=?, reason='the node stopped"
                    " during each of ' || attempts || ' attempts' WHERE state='running' AND attempts >= ?",
                    (t, t, max_attempts),
                ).rowcount
            requeued = con.execute(
                "UPDATE jobs SET state='queued', updated_at=?, next_attempt_at=NULL,"
                " reason='re-queued after restart (was running)' WHERE state='running'",
                (t,),
            ).rowcount
        stats = {"tmp_removed": removed, "reindexed": reindexed, "requeued": requeued}
        if given_up:
            stats["failed"] = given_up
        event(log, "store recovered", **stats)
        return stats
