"""The on-disk store and its index: checked, durable instance files, then their SQLite rows.

Layout (a plain folder, mercure-like, readable without the node):
``storage_dir/incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` and a private work folder per job
``storage_dir/jobs/<job_id>/``. An instance is first checked (:mod:`dicomnode.network.validate`: header,
pixel-data length or fragments, SOP class against Modality), then written as preamble + file meta +
the dataset bytes exactly as received to ``.<sop>.<pid>.<n>.tmp``, renamed and made durable, bytes
and name, by one ``syncfs`` (Linux ≥ 5.8; elsewhere fsynced, renamed, the folder fsynced), and only
then indexed; the SCP answers success after that. A crash leaves at most a ``.tmp`` file, or after a
power cut an unacknowledged partial file, which :meth:`Store.recover` deletes; a file whose row was
lost is re-indexed from its header.

Patient data at rest: folders are created 0750 and files 0640 (the index 0600, see
:mod:`dicomnode.db`), whatever the umask; ``dicomnode serve`` also narrows its umask to 0027 so that
results and job folders written elsewhere follow.

A SOP Instance UID names one content. An identical re-send (the same dataset bytes) is acknowledged
without writing anything; a *different* dataset under a UID the node already holds is refused
(``uid-collision``), so the first copy stays where it is and its row never moves between series.

Each refusal is a :class:`StoreError` carrying the DIMSE ``status`` to answer:
0xC000 for corrupt data or a UID collision, 0xA900 for a SOP class/dataset mismatch, 0xA700
(transient) when the index stays locked longer than the receive path's short busy timeout or the
disk fails; the SCP passes the status through.

Indexing is also where series assembly starts: the first instance of a series opens a job in state
``receiving``; a *new* instance arriving after the series was closed re-opens it with a fresh job
that supersedes the unfinished old one; an identical re-send does not re-open anything, so the same
series sent twice gives one job.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import sqlite3
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.db import Database, is_busy, now
from dicomnode.logs import error_text, event, load_pseudonym_key, pseudonym
from dicomnode.network.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from dicomnode.network.validate import UID_SHAPE, shown, validate_instance
from dicomnode.processing import jobs
from dicomnode.processing.jobs import JobState, Reason, ReasonCode

log = logging.getLogger(__name__)

# A UID the store files an instance under (its folder and file names are built from it): digits in
# dot-separated components (PS3.5 9.1), at most 64 characters (checked beside it). validate.UID_SHAPE
# is the loose one: which values a refusal may quote.
FILING_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PREAMBLE = b"\x00" * 128 + b"DICM"

FILE_MODE = 0o640  # instance files (PHI): owner and the service group only
DIR_MODE = 0o750  # state folders
UMASK = 0o027
RECEIVE_BUSY_TIMEOUT_S = 2.0  # a C-STORE waits at most this long for the index, then answers 0xA700
SOP_LOCK_FILE = ".sop-locks"  # byte-range locks shared by the receive processes (see Store._sop_lock)


class StoreError(Exception):
    """The instance is refused; the message goes into the failure status comment.

    ``status`` is the DIMSE status the SCP answers (0xC000 "cannot understand" unless said otherwise).
    """

    def __init__(self, message: str, status: int = CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


def restrict_umask() -> int:
    """Narrow the process umask to at least 0027 (no access for others); returns the previous one."""
    previous = os.umask(UMASK)
    os.umask(previous | UMASK)
    return previous


def _private_dir(path: Path) -> None:
    """Create ``path`` 0750, or narrow an existing one of ours that is wider."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
        if mode & ~DIR_MODE:
            os.chmod(path, mode & DIR_MODE)
    except OSError:  # not ours: leave it
        pass


def stored_dataset(path: Path) -> bytes | None:
    """The dataset bytes of a stored Part 10 file (after preamble and file meta), None if unreadable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if raw[:132] != PREAMBLE or raw[132:136] != b"\x02\x00\x00\x00":
        return None
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:]


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


def _raw_text(raw: bytes | bytearray | memoryview) -> str:
    text = bytes(raw)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        decoded = text.decode("latin-1")
    return decoded.strip("\x00 ").strip()


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
        return _raw_text(value)
    return str(value).strip()


# the elements InstanceInfo is made of (all before LAST_HEADER_TAG)
INFO_TAGS = frozenset({0x00080016, 0x00080018, 0x00080020, 0x00080030, 0x00080050, 0x00080060, 0x0008103E,
                       0x00100010, 0x00100020, 0x00100021, 0x00100040, 0x0020000D, 0x0020000E})


def info_from_dataset(
    ds: Dataset, sop_class: str, transfer_syntax: str, calling_aet: str = ""
) -> InstanceInfo:
    """Identifiers of one instance; raises :class:`StoreError` when a UID needed for filing is unusable."""
    return _info(lambda tag: _text(ds, tag), sop_class, transfer_syntax, calling_aet)


def info_from_values(values: dict[int, bytes], sop_class: str, transfer_syntax: str,
                     calling_aet: str = "") -> InstanceInfo:
    """:func:`info_from_dataset` from the raw values of :data:`INFO_TAGS` (as
    :func:`dicomnode.network.validate.quick_header` returns them)."""
    return _info(lambda tag: _raw_text(values[tag]) if tag in values else "", sop_class, transfer_syntax,
                 calling_aet)


def _info(text: Callable[[int], str], sop_class: str, transfer_syntax: str, calling_aet: str) -> InstanceInfo:
    info = InstanceInfo(
        sop_uid=text(0x00080018),
        sop_class=sop_class or text(0x00080016),
        transfer_syntax=transfer_syntax,
        study_uid=text(0x0020000D),
        series_uid=text(0x0020000E),
        patient_id=text(0x00100020),
        issuer=text(0x00100021),
        patient_name=text(0x00100010),
        sex=text(0x00100040),
        study_date=text(0x00080020),
        study_time=text(0x00080030),
        accession=text(0x00080050),
        modality=text(0x00080060),
        series_description=text(0x0008103E),
        calling_aet=calling_aet,
    )
    for name in ("sop_uid", "study_uid", "series_uid"):
        value = getattr(info, name)
        if not value or len(value) > 64 or not FILING_UID.fullmatch(value):
            label = name.replace("_", " ").replace("sop", "SOP")
            raise StoreError(f"missing or invalid {label} {shown(value, UID_SHAPE)}")  # no patient data
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


def _one_flush_supported() -> bool:
    """Can a write be made durable, file and name, by one ``syncfs`` of its own descriptor?

    Linux documents sync/syncfs as giving the same guarantee as fsync of every file (and folder) of the
    filesystem, and since 5.8 syncfs reports to the caller any writeback error on the filesystem since
    the descriptor was opened (before, it always returned 0, so an I/O error would go unnoticed).
    """
    if not sys.platform.startswith("linux"):
        return False
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (5, 8)


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.syncfs.argtypes, _libc.syncfs.restype = [ctypes.c_int], ctypes.c_int


def one_flush_setting(receive_flush: str) -> bool | None:
    """``Store(one_flush=...)`` for the ``receive_flush`` setting (syncfs without kernel support: error)."""
    if receive_flush == "auto":
        return None
    if receive_flush == "syncfs" and not _one_flush_supported():
        raise ValueError("receive_flush = \"syncfs\" needs Linux >= 5.8 (syncfs reporting writeback errors); "
                         "use \"fsync\" or \"auto\"")
    return receive_flush == "syncfs"


def _syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem of ``fd``; OSError with its errno on failure."""
    if _libc is None or _libc.syncfs(fd) != 0:
        errno = ctypes.get_errno() if _libc is not None else 38  # ENOSYS
        raise OSError(errno, f"syncfs: {os.strerror(errno)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FolderSync:
    """fsync of one folder, shared by every rename into it made before that fsync began (group commit).

    Why: with several associations each C-STORE renames into the same series folder and must not be
    acknowledged before the folder is fsynced. An fsync that starts after a rename makes that rename
    durable, so a caller whose rename an fsync in flight does not cover waits for it to end and then
    runs one fsync for itself and every caller that queued meanwhile, instead of one each. A caller
    alone (one association) runs its own fsync at once, as before. A failed fsync covers nobody: each
    waiting caller then runs its own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out: one per rename waiting to be durable
        self._synced = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False

    def sync(self, folder: Path) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._synced < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                cover = self._requested  # their renames are done: this fsync starts after them
                self._cond.release()
                try:
                    _fsync_dir(folder)
                    covered = cover
                except BaseException:
                    covered = 0
                    raise
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._synced = max(self._synced, covered)
                    self._cond.notify_all()


def _collision(info: InstanceInfo, stored_series: str) -> StoreError:
    """Refuse a second, different dataset under a SOP Instance UID the node already holds."""
    where = "the same series" if stored_series == info.series_uid else "another series"
    event(log, "instance refused", logging.WARNING, code="uid-collision", sop=info.sop_uid,
          series=info.series_uid, stored_series=stored_series, calling_aet=info.calling_aet)
    return StoreError(f"uid-collision: UID stored in {where} with other content")


def _range_lock(fd: int, offset: int, kind: int) -> None:
    """Take (F_WRLCK, waiting) or release (F_UNLCK) an open-file-description lock on one byte.

    Why OFD locks and not ``fcntl.lockf``: classic POSIX locks belong to the process, so the kernel's
    deadlock check sees two processes whose threads wait on each other's slots as a cycle and fails one
    request with EDEADLK, although different threads hold them (seen with 4 associations over 2 workers).
    An OFD lock belongs to this Store's open file, and threads of one process never share a slot (the
    thread lock is taken first).
    """
    flock = struct.pack("@hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)  # struct flock; l_pid 0 for OFD
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, flock)


class Store:
    """Durable files under ``storage_dir`` plus their rows in :class:`Database`."""

    def __init__(self, storage_dir: Path, db: Database,
                 receive_busy_timeout: float = RECEIVE_BUSY_TIMEOUT_S, *,
                 cross_process: bool = False, one_flush: bool | None = None) -> None:
        self.root = Path(storage_dir).resolve()  # absolute paths in the index, whatever the cwd
        self.incoming = self.root / "incoming"
        self.jobs_dir = self.root / "jobs"
        self.db = db
        for folder in (self.root, self.incoming, self.jobs_dir):
            _private_dir(folder)
        load_pseudonym_key(self.root)
        self._known_dirs: set[Path] = set()
        # one syncfs per instance where it is as safe as fsync + folder fsync (see write)
        self.one_flush = _one_flush_supported() if one_flush is None else one_flush
        self._folder_syncs: dict[Path, _FolderSync] = {}
        self._folder_syncs_lock = threading.Lock()
        # The receive path's own connection: a short busy timeout, and no wait behind the watcher,
        # worker or sender threads, which share ``db`` and its lock.
        self.rx = Database(db.path, busy_timeout=receive_busy_timeout)
        self._sop_locks = [threading.Lock() for _ in range(64)]  # one C-STORE per SOP UID at a time
        # several receive processes (dicomnode.network.receive_pool): the same 64 slots as byte-range locks on
        # one file, which the kernel releases when a process dies (kill -9 included); see _range_lock
        self._lock_fd = (os.open(self.root / SOP_LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
                         if cross_process else None)

    def close(self) -> None:
        self.rx.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- files ---------------------------------------------------------------------------------
    def instance_path(self, info: InstanceInfo) -> Path:
        return self.incoming / info.study_uid / info.series_uid / f"{info.sop_uid}.dcm"

    def job_dir(self, job_id: int) -> Path:
        path = self.jobs_dir / str(job_id)
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return path

    def _ensure_dir(self, folder: Path) -> None:
        """``incoming/<study>/<series>`` created 0750 level by level; new names fsynced into parents."""
        if folder in self._known_dirs:
            return
        if not folder.is_dir():
            for level in (self.incoming, folder.parent, folder):
                level.mkdir(mode=DIR_MODE, exist_ok=True)
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        self._known_dirs.add(folder)

    def write(self, info: InstanceInfo, file_meta: bytes, dataset: bytes | memoryview) -> tuple[Path, int]:
        """Write preamble + file meta + the dataset bytes as received to a temp file (0640) and make
        bytes and name durable before returning: rename, then one ``syncfs`` of the file's descriptor
        (``one_flush``, Linux ≥ 5.8); else fsync, rename, fsync the folder.

        Why one syncfs: each fsync ends in a disk cache flush, and the flush, not the CPU, is what one
        association waits for most (Orthanc flushes once per instance, fdatasync of its file; the two
        fsyncs flushed twice). The cost of renaming first: a power cut before the syncfs may leave a
        partial file under its final name, never acknowledged and never indexed; :meth:`recover`
        checks every unindexed file and deletes the partial ones.
        """
        final = self.instance_path(info)
        folder = final.parent
        self._ensure_dir(folder)
        tmp = folder / f".{info.sop_uid}.{os.getpid()}.{id(dataset)}.tmp"
        size = len(PREAMBLE) + len(file_meta) + len(dataset)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(tmp, flags, FILE_MODE)
        except FileNotFoundError:  # the folder was removed behind our back: recreate it once
            self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            fd = os.open(tmp, flags, FILE_MODE)
        renamed = False
        try:
            try:
                written = os.writev(fd, [PREAMBLE, file_meta, dataset])
                if written != size:
                    raise StoreError(f"short write ({written} of {size} bytes)", status=OUT_OF_RESOURCES)
                if self.one_flush:
                    os.replace(tmp, final)
                    renamed = True
                    _syncfs(fd)  # errors since this descriptor was opened, i.e. ours included
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not renamed:
                os.replace(tmp, final)
                renamed = True
                self._folder_sync(folder).sync(folder)
        except BaseException:  # bytes or name may not be durable: answer failure and keep nothing
            (final if renamed else tmp).unlink(missing_ok=True)
            raise
        return final, size

    def _folder_sync(self, folder: Path) -> _FolderSync:
        with self._folder_syncs_lock:
            sync = self._folder_syncs.get(folder)
            if sync is None:
                if len(self._folder_syncs) > 256:  # old series folders: their syncs are idle
                    self._folder_syncs.clear()
                sync = self._folder_syncs[folder] = _FolderSync()
            return sync

    # -- index ---------------------------------------------------------------------------------
    def index(self, info: InstanceInfo, path: Path, size: int, received_at: float | None = None,
              db: Database | None = None) -> Indexed:
        """Record one stored instance; open, keep open or re-open its series' job.

        A SOP UID already indexed in another series is a collision (:class:`StoreError`), never a move.
        """
        t = received_at if received_at is not None else now()
        with (db or self.db).tx() as con:
            old = con.execute("SELECT series_uid FROM instances WHERE sop_uid=?", (info.sop_uid,)).fetchone()
            if old is not None and old["series_uid"] != info.series_uid:
                raise _collision(info, str(old["series_uid"]))
            new_instance = old is None
            con.execute(
                "INSERT INTO instances (sop_uid, series_uid, sop_class, transfer_syntax, path, size,"
                " calling_aet, received_at) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT (sop_uid) DO UPDATE SET path=excluded.path, size=excluded.size",
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
            if job is not None and job["state"] == JobState.RECEIVING:
                job_id = int(job["id"])
                if new_instance:  # new content: a series held as incomplete is checked afresh
                    jobs.move(con, job_id, JobState.RECEIVING, t)
                else:
                    jobs.touch(con, job_id, t)
            elif job is None or new_instance:
                job_id = jobs.create(con, info.series_uid, t)
                con.execute("UPDATE series SET current_job=? WHERE series_uid=?", (job_id, info.series_uid))
                if job is not None:
                    reopened = True
                    superseded = int(job["id"])
                    jobs.supersede(con, superseded, job_id, t)
            else:  # identical re-send of a known instance into a closed series: nothing to redo
                job_id = int(job["id"])
            if new_instance:
                con.execute(
                    "UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?),"
                    " last_received_at=? WHERE series_uid=?",
                    (info.series_uid, t, info.series_uid),
                )
            elif job_id and job is not None and job["state"] == JobState.RECEIVING:
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

    def add(self, info: InstanceInfo, file_meta: bytes, dataset: bytes | memoryview, *,
            checked: bool = False) -> Indexed:
        """Check, store durably, then index: the SCP's whole job for one C-STORE.

        ``checked``: the caller has the verdict of these checks already (the SCP's
        :func:`dicomnode.network.validate.quick_header` returned values for this dataset).
        Raises :class:`StoreError` (with the status to answer) for anything it refuses.
        """
        verdict = None if checked else validate_instance(dataset, info.transfer_syntax, info.sop_class)
        if verdict is not None and not verdict.ok:
            raise StoreError(verdict.comment, status=verdict.status)
        with self._sop_lock(info.sop_uid):
            try:
                same = self._same_copy(info, dataset)
                if same is not None:  # identical re-send: acknowledged, nothing written
                    return self.index(info, *same, db=self.rx)
                path, size = self.write(info, file_meta, dataset)
                try:
                    return self.index(info, path, size, db=self.rx)
                except BaseException:
                    path.unlink(missing_ok=True)  # refused or busy: keep nothing unacknowledged
                    raise
            except sqlite3.OperationalError as exc:  # DatabaseBusy among them
                if is_busy(exc):
                    raise StoreError(f"index-busy: the index is locked, try again ({exc})",
                                     status=OUT_OF_RESOURCES) from exc
                # a full disk, an I/O error, a damaged index: SQLite's text names no data
                raise StoreError(f"index-error: the node's index cannot be written ({exc})",
                                 status=OUT_OF_RESOURCES) from exc

    @contextmanager
    def _sop_lock(self, sop_uid: str) -> Iterator[None]:
        """One C-STORE per SOP UID at a time: in this process (threads) and, with ``cross_process``, in
        every receive process (so a different copy under one UID is still seen as a collision)."""
        slot = zlib.crc32(sop_uid.encode()) % len(self._sop_locks)  # hash() differs between processes
        with self._sop_locks[slot]:
            if self._lock_fd is None:
                yield
                return
            _range_lock(self._lock_fd, slot, fcntl.F_WRLCK)
            try:
                yield
            finally:
                _range_lock(self._lock_fd, slot, fcntl.F_UNLCK)

    def _same_copy(self, info: InstanceInfo, dataset: bytes | memoryview) -> tuple[Path, int] | None:
        """(path, size) when this exact dataset is stored already; None when the UID is new (or its
        file went missing in the same series); :class:`StoreError` for a different-content duplicate."""
        row = self.rx.one("SELECT series_uid, path, size FROM instances WHERE sop_uid=?", (info.sop_uid,))
        if row is None:
            return None
        stored = stored_dataset(Path(row["path"]))
        if stored is None and row["series_uid"] == info.series_uid:
            return None  # the old file is gone: write this copy in its place
        if stored is not None and stored == dataset:
            return Path(row["path"]), int(row["size"] or 0)
        raise _collision(info, str(row["series_uid"]))

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
        reindexed = partial = 0
        for path in sorted(self.incoming.glob("*/*/*.dcm")):
            if str(path) in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                info = info_from_dataset(
                    ds, str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)
                )
                dataset = stored_dataset(path)  # None: not written by the node, indexed as it is
                verdict = None if dataset is None else validate_instance(
                    dataset, info.transfer_syntax, info.sop_class)
                if verdict is not None and not verdict.ok:  # cut short by a crash before its syncfs:
                    path.unlink()  # never acknowledged (what was passed these checks when it arrived)
                    partial += 1
                    event(log, "partial file removed", logging.WARNING, path=path, reason=verdict.comment)
                    continue
                self.index(info, path, path.stat().st_size, received_at=path.stat().st_mtime)
                reindexed += 1
            except Exception as exc:  # an unreadable file is reported, not fatal
                event(log, "unindexable file", logging.WARNING, path=path, error=error_text(exc))
                log.debug("unindexable file %s", path, exc_info=True)
        t = now()
        given_up = requeued = 0
        with self.db.tx() as con:
            # a series that was still arriving gets a fresh stability window (the sender may resend)
            con.execute(
                "UPDATE series SET last_received_at=? WHERE current_job IN"
                " (SELECT id FROM jobs WHERE state IN (?, ?))",
                (t, JobState.RECEIVING.value, JobState.COMPLETE.value),
            )
            interrupted = con.execute(
                "SELECT id, state, attempts FROM jobs WHERE state IN (?, ?) ORDER BY id",
                (JobState.COMPLETE.value, JobState.RUNNING.value),
            ).fetchall()
            for job_id, state, attempts in interrupted:
                if state == JobState.COMPLETE:  # stopped while being checked: check it again
                    jobs.move(con, job_id, JobState.RECEIVING, t)
                elif max_attempts is not None and attempts >= max_attempts:
                    jobs.move(con, job_id, JobState.FAILED, t, reason=Reason(
                        ReasonCode.RESTART_GAVE_UP, f"the node stopped during each of {attempts} attempts"))
                    given_up += 1
                else:
                    jobs.move(con, job_id, JobState.QUEUED, t, reason=Reason(
                        ReasonCode.RESTART_REQUEUED, "re-queued after restart (was running)"))
                    requeued += 1
        stats = {"tmp_removed": removed, "reindexed": reindexed, "requeued": requeued}
        if given_up:
            stats["failed"] = given_up
        if partial:
            stats["partial_removed"] = partial
        event(log, "store recovered", **stats)
        return stats
