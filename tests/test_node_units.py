"""Node internals without the network: selection reasons, the store's state machine, queue, worker, logs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pydicom
import pytest
from log_capture import captured_info_log
from series_factory import write_ct_series, write_enhanced_ct

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database
from dicomnode.harness.ingest import store_files
from dicomnode.logs import pseudonym
from dicomnode.network.sender import retry
from dicomnode.processing.queue import SQLiteJobQueue
from dicomnode.processing.worker import Worker
from dicomnode.storage.series import StabilityWatcher, content_hash, select_series
from dicomnode.storage.store import PREAMBLE, Store
from seg.records import ReasonCode

SEL = SelectionSettings(min_z_extent_mm=30.0, min_slices=5)


def reason(folder: Path, **kw: object) -> str:
    s = write_ct_series(folder, size=8, **kw)  # type: ignore[arg-type]
    sel = select_series(s.files, SEL)
    return "accepted" if sel.accepted else sel.reason


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"n": 12, "slice_mm": 3.0}, "accepted"),
        ({"n": 8, "slice_mm": 2.5}, "z-coverage 20 mm < 30 mm"),
        ({"n": 4, "slice_mm": 10.0}, "4 slices < 5"),
        ({"n": 3, "slice_mm": 2.0}, "z-coverage 6 mm < 30 mm; 3 slices < 5"),
        ({"n": 12, "skip": {5}}, "missing slices: gap of 6 mm after -18 mm (slice spacing 3 mm)"),
        ({"n": 12, "duplicate": {3}}, "duplicate slice position at -9 mm (2 slices share positions)"),
        ({"n": 12, "orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)},
         "not axial: slice normal 90° from the patient z axis (sagittal)"),
        ({"n": 12, "modality": "MR"}, "modality MR is not CT"),
    ],
)
def test_selection_reasons(tmp_path: Path, kw: dict, expected: str) -> None:
    name = hashlib.sha1(str(kw).encode()).hexdigest()[:8]
    assert reason(tmp_path / "s", name=name, **kw) == expected


def test_selection_inconsistent_matrix(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", name="m", n=6, size=8)
    b = write_ct_series(tmp_path / "b", name="m", n=12, size=16)
    files = a.files + b.files[6:]
    assert select_series(files, SEL).reason == "inconsistent matrix: 8×8, 16×16"


def test_content_hash_is_order_free_and_size_sensitive() -> None:
    items = [("1.2.3", 10), ("1.2.4", 11)]
    assert content_hash(items) == content_hash(list(reversed(items)))
    assert content_hash(items) != content_hash([("1.2.3", 10), ("1.2.4", 12)])


@pytest.fixture
def node(tmp_path: Path) -> tuple[Settings, Database, Store]:
    settings = Settings(storage_dir=tmp_path / "var", stable_seconds=0.0, host="127.0.0.1",
                        min_free_disk_mb=0, max_disk_used_pct=100,
                        selection=SEL, worker={"max_attempts": 2, "poll_seconds": 0.0})
    db = Database(settings.db_path)
    yield settings, db, Store(settings.storage_dir, db)
    db.close()


def states(db: Database) -> list[tuple[int, str]]:
    return [(r["id"], r["state"]) for r in db.query("SELECT id, state FROM jobs ORDER BY id")]


def test_stored_file_is_the_received_bytes(node: tuple, tmp_path: Path) -> None:
    _, db, store = node
    s = write_ct_series(tmp_path / "in", name="bytes", n=2, size=8)
    store_files(store, s.files[:1])
    stored = Path(db.one("SELECT path FROM instances")["path"])
    assert stored.read_bytes().startswith(PREAMBLE)
    back = pydicom.dcmread(stored)
    orig = pydicom.dcmread(s.files[0])
    assert back.SOPInstanceUID == orig.SOPInstanceUID and back.PixelData == orig.PixelData
    assert back.file_meta.SourceApplicationEntityTitle == "TEST"
    assert not list(store.incoming.rglob("*.tmp"))


def test_series_state_machine_late_instance_and_resend(node: tuple, tmp_path: Path) -> None:
    settings, db, store = node
    watcher = StabilityWatcher(settings, db)
    s = write_ct_series(tmp_path / "in", name="late", n=12, size=8)
    assert set(store_files(store, s.files[:10])) == {1}
    assert watcher.check_once() == [1]
    assert states(db) == [(1, "queued")]
    store_files(store, s.files[:10])  # identical re-send: nothing re-opens
    assert states(db) == [(1, "queued")]
    store_files(store, s.files[10:])  # late instances: new job supersedes the unfinished one
    assert states(db) == [(1, "superseded"), (2, "receiving")]
    assert db.one("SELECT superseded_by FROM jobs WHERE id=1")[0] == 2
    watcher.check_once()
    assert states(db) == [(1, "superseded"), (2, "queued")]
    assert db.one("SELECT n_instances FROM jobs WHERE id=2")[0] == 12


def test_short_series_rejected_with_reason(node: tuple, tmp_path: Path) -> None:
    settings, db, store = node
    store_files(store, write_ct_series(tmp_path / "in", name="short", n=4, size=8).files)
    StabilityWatcher(settings, db).check_once()
    row = db.one("SELECT state, reason, reason_code FROM jobs")
    assert tuple(row) == ("rejected", "z-coverage 12 mm < 30 mm; 4 slices < 5", "short-z-coverage")


def test_a_gap_is_held_then_rejected_with_its_code(node: tuple, tmp_path: Path) -> None:
    """The hold and the rejection after it carry the cause's code; the state tells them apart."""
    settings, db, store = node
    s = write_ct_series(tmp_path / "in", name="gap", n=12, size=8, skip={5})
    store_files(store, s.files)
    StabilityWatcher(settings, db).check_once()
    held = "incomplete: gap of 6 mm after -18 mm (slice spacing 3 mm)"
    assert tuple(db.one("SELECT state, reason, reason_code FROM jobs")) == (
        "receiving", f"held: {held}", "slice-gap")
    ended = settings.model_copy(update={"selection": SEL.model_copy(update={"incomplete_hold_seconds": 0})})
    assert StabilityWatcher(ended, db).close(1, s.series_uid)  # the hold has ended
    assert tuple(db.one("SELECT state, reason, reason_code FROM jobs")) == ("rejected", held, "slice-gap")


def test_recover_after_crash(node: tuple, tmp_path: Path) -> None:
    _, db, store = node
    s = write_ct_series(tmp_path / "in", name="crash", n=6, size=8)
    store_files(store, s.files[:4])
    # a partial write, and a file whose index row was lost (crash between rename and commit)
    folder = store.incoming / s.study_uid / s.series_uid
    (folder / ".partial.123.tmp").write_bytes(b"half")
    db.con.execute("DELETE FROM instances WHERE path LIKE ?", (f"%{s.sop_uids[3]}%",))
    stats = store.recover()
    assert stats == {"tmp_removed": 1, "reindexed": 1, "requeued": 0}
    assert db.one("SELECT COUNT(*) FROM instances")[0] == 4
    assert not list(folder.glob("*.tmp")) and len(list(folder.glob("*.dcm"))) == 4
    assert states(db) == [(1, "receiving")]


def test_recover_requeues_running_jobs(node: tuple, tmp_path: Path) -> None:
    _, db, store = node
    store_files(store, write_ct_series(tmp_path / "in", name="run", n=6, size=8).files)
    db.con.execute("UPDATE jobs SET state='running'")  # the worker was mid-job when the node died
    assert store.recover()["requeued"] == 1
    row = db.one("SELECT state, reason FROM jobs")
    assert (row["state"], row["reason"]) == ("queued", "re-queued after restart (was running)")
    db.con.execute("UPDATE jobs SET state='running', attempts=2")  # it died again, at the last attempt
    assert store.recover(max_attempts=2)["failed"] == 1
    row = db.one("SELECT state, reason FROM jobs")
    assert (row["state"], row["reason"]) == ("failed", "the node stopped during each of 2 attempts")


def _pipeline_ok(job, settings):  # noqa: ANN001
    from dicomnode.processing.pipeline import JobOutput

    out = job.work_dir / "result.dcm"
    out.write_bytes(b"x")
    return JobOutput(outputs=[out], message="ok")


def _pipeline_boom(job, settings):  # noqa: ANN001
    raise RuntimeError("boom")


def _pipeline_no(job, settings):  # noqa: ANN001
    from dicomnode.processing.pipeline import SeriesRejected

    raise SeriesRejected("not a thigh")


@pytest.mark.parametrize(
    ("pipeline", "final", "why"),
    [(_pipeline_ok, "sending", None), (_pipeline_boom, "failed", "attempt 2: RuntimeError: boom"),
     (_pipeline_no, "rejected", "not a thigh")],
)
def test_worker_outcomes(node: tuple, tmp_path: Path, pipeline, final: str, why: str | None) -> None:  # noqa: ANN001
    """Watcher → queue → worker → outcome."""
    settings, db, store = node
    queue = SQLiteJobQueue(db)
    store_files(store, write_ct_series(tmp_path / "in", name="w", n=12, size=8).files)
    StabilityWatcher(settings, db).check_once()
    worker = Worker(settings, store, queue, pipeline)
    while worker.run_once() is not None:
        pass
    row = db.one("SELECT state, reason, attempts FROM jobs")
    assert (row["state"], row["reason"]) == (final, why)
    if final == "failed":
        assert row["attempts"] == 2
        assert retry(db, 1) == "job 1: re-queued for processing"
        assert db.one("SELECT state FROM jobs")[0] == "queued"
    if final == "sending":
        assert db.one("SELECT COUNT(*) FROM outbox WHERE state='pending'")[0] == 1
    if final == "rejected":
        with pytest.raises(ValueError, match="rejected"):
            retry(db, 1)


def test_no_phi_in_info_logs(node: tuple, tmp_path: Path) -> None:
    _, _, store = node
    with captured_info_log(root_level=logging.DEBUG) as stream:
        store_files(store, write_ct_series(tmp_path / "in", name="phi", n=2, size=8, patient_id="SECRET-ID",
                                       patient_name="Secret^Name").files)
    text = stream.getvalue()
    assert "series opened" in text and pseudonym("SECRET-ID") in text
    assert "SECRET-ID" not in text and "Secret" not in text


def test_selection_reads_enhanced_ct_frames_and_refuses_them_by_their_cause(tmp_path: Path) -> None:
    """Every frame is read (12 slices), and the series is refused as multi-frame: the loader measures
    single-frame CT only (the worker used to reject it as "no DICOM images with position")."""
    sel = select_series(write_enhanced_ct(tmp_path / "a.dcm", name="enh-a", frames=12).files, SEL)
    assert (sel.accepted, sel.code, sel.n_slices) == (False, ReasonCode.MULTI_FRAME, 12)
    assert sel.reason == ("multi-frame images (Enhanced CT) are not measured: 1 instance(s);"
                          " export the series as single-frame CT images")


def test_fast_c_store_response_matches_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from dicomnode.network.pynetdicom_tuning import encode_c_store_success

    for sop in ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45"):  # odd and even lengths (padding)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0x0000
        rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        assert encode_c_store_success(rsp.AffectedSOPClassUID, sop, 7) == encode(msg.command_set, True, True)


def test_storage_failure_returns_a700_and_leaves_nothing(node: tuple, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from peers import free_port, pynetdicom_send

    from dicomnode.network.scp import StorageSCP
    from dicomnode.network.status import OUT_OF_RESOURCES

    settings, db, store = node
    settings = settings.model_copy(update={"port": free_port()})
    scp = StorageSCP(settings, store)
    scp.start()
    try:
        s = write_ct_series(tmp_path / "in", name="full", n=2, size=8)

        def disk_full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("dicomnode.storage.store.os.fsync", disk_full)
        assert pynetdicom_send(settings.port, s.files[:1]) == [OUT_OF_RESOURCES]
        assert not list(store.incoming.rglob("*.tmp")) and not list(store.incoming.rglob("*.dcm"))
        assert db.one("SELECT COUNT(*) FROM instances")[0] == 0
        monkeypatch.undo()
        assert pynetdicom_send(settings.port, s.files[1:]) == [0]  # disk back: the node kept serving
        assert db.one("SELECT COUNT(*) FROM instances")[0] == 1
    finally:
        scp.stop()


def test_json_log_lines() -> None:
    import json

    from dicomnode.logs import JsonFormatter

    record = logging.LogRecord("dicomnode.x", logging.INFO, __file__, 1, "series queued", None, None)
    record.fields = {"job": 3, "reason": "z-coverage 40 mm < 250 mm"}
    data = json.loads(JsonFormatter().format(record))
    assert data["event"] == "series queued" and data["job"] == 3 and data["reason"].startswith("z-coverage")


def test_pseudonym_is_keyed_per_node_and_stable(tmp_path: Path) -> None:
    from dicomnode.logs import load_pseudonym_key

    load_pseudonym_key(tmp_path / "a")
    first = pseudonym("12345")
    load_pseudonym_key(tmp_path / "b")
    other = pseudonym("12345")
    load_pseudonym_key(tmp_path / "a")
    assert pseudonym("12345") == first != other and first.startswith("P-") and "12345" not in first
    assert oct((tmp_path / "a" / ".pseudonym-key").stat().st_mode)[-3:] == "600"


def test_background_write_is_the_same_file_and_falls_back_to_the_parent(tmp_path: Path) -> None:
    """A file written by a forked child is the file the pipeline would write itself; when the child
    fails, the parent writes it (the job never depends on the child)."""
    import os
    from collections.abc import Callable

    from dicomnode.processing.forkwrite import BackgroundWrite
    from dicomnode.processing.pipeline import _save

    ds = pydicom.dcmread(write_ct_series(tmp_path / "in", name="bg", n=1, size=8).files[0])
    parent = os.getpid()
    writers: list[str] = []

    def child_fails(folder: Path) -> Path:
        if os.getpid() != parent:
            raise OSError("disk full in the child")
        writers.append("parent")
        return _save(ds, folder)

    def background(make: Callable[[Path], Path], folder: Path) -> Path:
        return BackgroundWrite(lambda: make(folder), folder / f"{ds.SOPInstanceUID}.dcm").wait()

    path = background(lambda folder: _save(ds, folder), tmp_path / "a")
    assert path == tmp_path / "a" / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == _save(ds, tmp_path / "b").read_bytes()
    fallback = background(child_fails, tmp_path / "c")
    assert writers == ["parent"] and fallback.read_bytes() == path.read_bytes()


def test_a_background_write_never_runs_the_finalizers_of_the_parents_garbage(tmp_path: Path) -> None:
    """The parent's uncollected cycles stay out of the child's garbage collector: here one whose
    finalizer takes a lock the parent holds at the fork, which a collection in the child would
    wait on for ever (the child then missed its deadline and the parent wrote the file itself)."""
    import gc
    import os
    import threading

    from dicomnode.processing.forkwrite import BackgroundWrite

    held = threading.Lock()

    class TakesTheLock:
        def __del__(self) -> None:
            with held:
                pass

    parent = os.getpid()

    def child_writes(path: Path) -> Path:
        if os.getpid() != parent:  # (the parent's own fallback must not wait on its own lock)
            gc.collect()  # what any allocation in the child may start
        path.write_text(str(os.getpid()))
        return path

    collecting = gc.isenabled()
    gc.disable()  # the cycle stays uncollected in the parent until the fork
    try:
        garbage = TakesTheLock()
        garbage.me = garbage  # type: ignore[attr-defined]
        del garbage
        target = tmp_path / "out.txt"
        with held:
            written = BackgroundWrite(lambda: child_writes(target), target).wait(deadline_s=5.0)
        assert written == target and target.read_text() != str(parent)  # the child wrote it
    finally:
        gc.collect()  # the cycle's finalizer, here, with the lock free
        if collecting:
            gc.enable()


@pytest.mark.hung_write_expected
def test_a_hung_background_write_says_where_it_hung_and_the_parent_writes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A child still running at the deadline is asked for its stack, killed, and the parent writes
    the file; the warning names the child's innermost frame (what a hang on a lock shows)."""
    import os
    import time

    from dicomnode.processing.forkwrite import BackgroundWrite

    parent = os.getpid()

    def waits_for_a_lock_for_ever(path: Path) -> Path:
        if os.getpid() != parent:
            time.sleep(600)
        path.write_text("written")
        return path

    target = tmp_path / "out.txt"
    t0 = time.monotonic()
    assert BackgroundWrite(lambda: waits_for_a_lock_for_ever(target), target).wait(deadline_s=0.5) == target
    assert target.read_text() == "written" and time.monotonic() - t0 < 5
    warning = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(warning) == 1 and "in waits_for_a_lock_for_ever" in warning[0], warning


def test_a_rebuilt_output_must_equal_the_one_handed_on_but_for_build_times(tmp_path: Path) -> None:
    """A re-run keeps a SEG an earlier attempt handed to the sender; its rebuild may differ only in the
    times of building, never in content (a UID must never name two contents)."""
    from dicomnode.processing.pipeline import OutputChanged, _check_same_content, _save

    ds = pydicom.dcmread(write_ct_series(tmp_path / "in", name="same", n=1, size=8).files[0])
    ds.ContentDate, ds.ContentTime = "20261202", "090000"
    equipment = pydicom.Dataset()
    equipment.ContributionDateTime, equipment.Manufacturer = "20261202090000", "node"
    ds.ContributingEquipmentSequence = [equipment]
    handed_on = _save(ds, tmp_path / "outputs")
    rebuilt = pydicom.dcmread(handed_on)
    rebuilt.ContentTime, rebuilt.InstanceCreationTime = "091500.123", "091500.123"
    rebuilt.ContributingEquipmentSequence[0].ContributionDateTime = "20261202091500.123"
    _check_same_content(rebuilt, handed_on, tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()
    arr = rebuilt.pixel_array.copy()
    arr[0, 0] += 1
    rebuilt.PixelData = arr.tobytes()
    with pytest.raises(OutputChanged, match=str(ds.SOPInstanceUID)):
        _check_same_content(rebuilt, handed_on, tmp_path / "scratch")
    assert handed_on.read_bytes() == _save(ds, tmp_path / "again").read_bytes()  # the sent file stays


def test_an_index_that_cannot_be_written_is_not_called_locked(node: tuple, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite error on receive was answered "index-busy: the index is locked, try again": a full
    disk or a damaged index too, which no retry mends. Busy or not is SQLite's result code."""
    import sqlite3

    from dicomnode.db import is_busy
    from dicomnode.storage.store import StoreError

    _, db, store = node
    holder = sqlite3.connect(db.path, timeout=0, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db.path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("BEGIN IMMEDIATE")
    holder.execute("ROLLBACK")
    assert is_busy(locked.value)
    full = sqlite3.OperationalError("database or disk is full")  # its text names the database too
    assert not is_busy(full)

    def index(*_: object, **__: object) -> None:
        raise full

    monkeypatch.setattr(store, "index", index)
    s = write_ct_series(tmp_path / "in", name="full", n=1, size=8)
    with pytest.raises(StoreError, match="^index-error: the node's index cannot be written "
                                         r"\(database or disk is full\)"):
        store_files(store, s.files)
    assert not list(store.incoming.rglob("*.dcm"))  # nothing kept unacknowledged


def test_a_damaged_file_is_unreadable_and_a_defect_is_not_hidden(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_headers`` counted any exception as "unreadable header", so a defect in the header reader
    would have rejected every series with nothing in the log to point at it."""
    from dicomnode.storage.series import read_headers

    s = write_ct_series(tmp_path / "in", name="hdr", n=3, size=8)
    s.files[1].write_bytes(s.files[1].read_bytes()[:60])  # cut short on disk
    headers, unreadable = read_headers([*s.files, tmp_path / "missing.dcm"])
    assert (len(headers), unreadable) == (2, 2)

    def broken(*_: object) -> None:
        raise AttributeError("a defect in the reader")

    monkeypatch.setattr("seg.native_dicom.read_file_header", broken)
    with pytest.raises(AttributeError, match="a defect"):
        read_headers(s.files)


def test_a_foreign_exceptions_text_stays_out_of_logs_above_debug() -> None:
    """pydicom, highdicom and pydantic quote the value they refuse (a name, an ID, a date): above DEBUG
    the log names the exception's type; our own exceptions and the system's keep their text."""
    from dicomnode.logs import error_text
    from seg.io import SeriesGeometryError

    class Foreign(ValueError):
        __module__ = "pydicom.valuerep"

    assert error_text(Foreign("Invalid value for VR PN: 'Hidden^Harriet'")) == (
        "Foreign (its text is logged at DEBUG)")
    assert error_text(ValueError("'Hidden^Harriet' is not a valid date")).startswith("ValueError (")
    assert error_text(SeriesGeometryError("missing slices")) == "SeriesGeometryError: missing slices"
    assert error_text(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"


def _pipeline_quotes(job, settings):  # noqa: ANN001
    raise ValueError("Invalid value for VR PN: 'Hidden^Harriet'")  # as pydicom words it


def test_a_failed_jobs_log_names_the_error_and_the_index_keeps_its_text(node: tuple, tmp_path: Path) -> None:
    """The job's reason is kept whole for `dicomnode jobs`; the WARNING/ERROR line carried it too."""
    settings, db, store = node
    queue = SQLiteJobQueue(db)
    store_files(store, write_ct_series(tmp_path / "in", name="q", n=12, size=8).files)
    StabilityWatcher(settings, db).check_once()
    worker = Worker(settings, store, queue, _pipeline_quotes)
    with captured_info_log() as stream:
        while worker.run_once() is not None:
            pass
    assert "Hidden" in db.one("SELECT reason FROM jobs")[0]
    log = stream.getvalue()
    assert "job failed" in log and "ValueError (its text is logged at DEBUG)" in log and "Hidden" not in log


def test_a_second_node_on_one_storage_folder_recovers_nothing(tmp_path: Path) -> None:
    """A second `serve` on a running node's storage_dir re-queued its running job, discarded its outputs
    and removed its half-received files, then stopped at the DICOM port already taken. It now stops at
    the storage folder's lock, first; the lock goes with the node that held it."""
    from dicomnode.harness.net import free_port
    from dicomnode.server import Node
    from dicomnode.storage.node_lock import NodeLockError

    settings = Settings(storage_dir=tmp_path / "var", host="127.0.0.1", port=free_port(),
                        min_free_disk_mb=0, max_disk_used_pct=100)
    first = Node(settings, worker_enabled=False)
    first.start()
    try:
        store_files(first.store, write_ct_series(tmp_path / "in", name="two", n=6, size=8).files)
        first.db.con.execute("UPDATE jobs SET state='running'")  # the first node's worker is on it
        partial = next(first.store.incoming.rglob("*.dcm")).with_name(".arriving.tmp")
        partial.write_bytes(b"half")  # a C-STORE the first node is receiving
        second = Node(settings.model_copy(update={"port": free_port()}), worker_enabled=False)
        with pytest.raises(NodeLockError, match=r"another node \(pid \d+\) is running on storage_dir"):
            second.start()
        assert first.db.one("SELECT state FROM jobs")[0] == "running" and partial.exists()
    finally:
        first.stop()
    again = Node(settings, worker_enabled=False)
    again.start()  # the stopped node's lock is gone
    again.stop()


def test_pynetdicom_info_lines_are_labelled_debug(capsys: pytest.CaptureFixture[str]) -> None:
    """With log_level DEBUG, pynetdicom dumped a C-FIND's PatientID on lines labelled INFO: a shipper
    keeping INFO and above kept it."""
    from dicomnode.logs import setup_logging

    root, pynetdicom_log = logging.getLogger(), logging.getLogger("pynetdicom")
    kept = (root.level, list(root.handlers), pynetdicom_log.level)
    try:
        setup_logging("DEBUG")
        logging.getLogger("pynetdicom.association").info("(0010,0020) LO [MRN-778899]  # 1 PatientID")
        logging.getLogger("dicomnode.test").info("node started")
    finally:  # the handler writes to this test's captured stderr: gone with it
        root.handlers[:] = kept[1]
        root.setLevel(kept[0])
        pynetdicom_log.setLevel(kept[2])
    err = capsys.readouterr().err
    assert " DEBUG pynetdicom.association (0010,0020)" in err and " INFO dicomnode.test node started" in err


def test_highdicom_narration_stays_out_of_the_info_log(capsys: pytest.CaptureFixture[str]) -> None:
    """highdicom wrote 8 INFO lines per object it built ("copy attributes of module ..."), most of
    the node's INFO log in journald: at INFO only its warnings remain, at DEBUG everything."""
    from dicomnode.logs import setup_logging

    root, hd_log, pynetdicom_log = (logging.getLogger(n) for n in ("", "highdicom", "pynetdicom"))
    kept = (root.level, list(root.handlers), hd_log.level, pynetdicom_log.level)
    try:
        setup_logging("INFO")
        logging.getLogger("highdicom.base").info('copy attributes of module "Patient"')
        logging.getLogger("highdicom.base").warning("a real warning")
        setup_logging("DEBUG")
        logging.getLogger("highdicom.base").info("shown at DEBUG")
    finally:
        root.handlers[:] = kept[1]
        root.setLevel(kept[0])
        hd_log.setLevel(kept[2])
        pynetdicom_log.setLevel(kept[3])
    err = capsys.readouterr().err
    assert "copy attributes" not in err and "a real warning" in err
    assert " DEBUG highdicom.base shown at DEBUG" in err  # labelled as what it is


def test_a_header_value_the_loader_cannot_read_is_rejected_without_quoting_it(tmp_path: Path) -> None:
    """A RescaleIntercept "Smith" was rejected as "could not convert string to float: 'Smith'": the
    library's text, which quotes the value, went to the job's reason and the WARNING line."""
    from dicomnode.processing.pipeline import JobInput, SeriesRejected, run_pipeline

    s = write_ct_series(tmp_path / "in", name="smith", n=6, size=8)
    for f in s.files:
        ds = pydicom.dcmread(f)
        ds.add_new(0x00281052, "LO", "Smith")  # as `dcmodify -m "(0028,1052)=Smith"` leaves it
        ds.save_as(f)
    job = JobInput(job_id=1, series_instance_uid=s.series_uid, files=s.files, work_dir=tmp_path / "work")
    with pytest.raises(SeriesRejected) as rejected:
        run_pipeline(job, Settings(storage_dir=tmp_path / "var"))
    assert str(rejected.value) == "a header value cannot be read: ValueError (its text is logged at DEBUG)"


def test_pynetdicom_connection_failures_are_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    """A send to a PACS that is down gave two pynetdicom ERROR lines per attempt for what the node
    retries: labelled WARNING, their text kept (a TLS error names its cause there); other pynetdicom
    errors stay errors."""
    from dicomnode.logs import setup_logging

    root, pynetdicom_log = logging.getLogger(), logging.getLogger("pynetdicom")
    kept = (root.level, list(root.handlers), pynetdicom_log.level)
    try:
        setup_logging("INFO")
        transport = logging.getLogger("pynetdicom.transport")
        transport.error("Association request failed: unable to connect to remote")
        transport.error("TCP Initialisation Error: [SSL: CERTIFICATE_VERIFY_FAILED]")
        logging.getLogger("pynetdicom.assoc").error("Received an invalid C-STORE response")
    finally:
        root.handlers[:] = kept[1]
        root.setLevel(kept[0])
        pynetdicom_log.setLevel(kept[2])
    err = capsys.readouterr().err
    assert " WARNING pynetdicom.transport Association request failed" in err
    assert " WARNING pynetdicom.transport TCP Initialisation Error: [SSL: CERTIFICATE_VERIFY_FAILED]" in err
    assert " ERROR pynetdicom.assoc Received an invalid C-STORE response" in err


def _idle_association(scp_timeout: float, scu_timeout: float) -> None:
    """A real pynetdicom association over 127.0.0.1 that sends nothing until one side's network
    timeout aborts it (the acceptor's with ``scp_timeout`` shorter, else the requestor's)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicomnode.harness.capture import CapturingSCP
    from dicomnode.harness.net import wait_for

    with CapturingSCP("IDLESCP", network_timeout=scp_timeout) as server:
        scu_ae = AE(ae_title="IDLESCU")
        scu_ae.acse_timeout = 5
        scu_ae.network_timeout = scu_timeout
        scu_ae.add_requested_context(Verification)
        assoc = scu_ae.associate("127.0.0.1", server.port, ae_title="IDLESCP")
        assert assoc.is_established
        wait_for(lambda: not assoc.is_alive(), min(scp_timeout, scu_timeout) + 5.0,
                 what="the idle association to be aborted")
        wait_for(lambda: not server.active_associations(), 5.0, what="the acceptor to end")


def test_pynetdicom_idle_abort_of_an_accepted_association_is_debug(
        capsys: pytest.CaptureFixture[str]) -> None:
    """pynetdicom's field-less "Network timeout reached" ERROR for an association the node accepted
    (which the node logs itself, as ``connection dropped reason=network-timeout``): only at DEBUG,
    labelled DEBUG. For an association the node requested (a send) it stays an ERROR."""
    from dicomnode.logs import setup_logging

    root, pynetdicom_log = logging.getLogger(), logging.getLogger("pynetdicom")
    kept = (root.level, list(root.handlers), pynetdicom_log.level)
    try:
        setup_logging("INFO")
        _idle_association(scp_timeout=0.5, scu_timeout=60)
        info_accepted = capsys.readouterr().err
        _idle_association(scp_timeout=60, scu_timeout=0.5)
        info_requested = capsys.readouterr().err
        setup_logging("DEBUG")
        _idle_association(scp_timeout=0.5, scu_timeout=60)
        debug_accepted = capsys.readouterr().err
    finally:
        root.handlers[:] = kept[1]
        root.setLevel(kept[0])
        pynetdicom_log.setLevel(kept[2])
    assert "Network timeout reached" not in info_accepted
    assert " ERROR pynetdicom.association Network timeout reached" in info_requested
    assert " DEBUG pynetdicom.association Network timeout reached" in debug_accepted
