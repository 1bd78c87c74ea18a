"""Issue 15, data validity and protection: nothing corrupt, colliding or partial is acknowledged or
measured, results are named by their content, patient data is private at rest, and a locked index
makes a C-STORE fail fast (0xA700) instead of stalling.

Real parts throughout: ``dicomnode serve`` subprocesses with a pynetdicom SCU sending raw file bytes
and dcmtk storescp as the PACS; in-process tests use the real store, SQLite index and watcher.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from log_capture import captured_info_log
from peers import REPO, NodeProcess, StoreSCP, requires_dcmtk, wait_for
from pydicom.uid import RLELossless
from series_factory import CT_IMAGE, write_ct_series

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database
from dicomnode.harness.ingest import store_files
from dicomnode.harness.scu import send_verbatim
from dicomnode.harness.series import dataset_bytes, rewrite
from dicomnode.processing.queue import SQLiteJobQueue
from dicomnode.processing.worker import Worker
from dicomnode.storage.series import StabilityWatcher
from dicomnode.storage.store import Store

HOLD_S = 30.0  # the shared node's incomplete_hold_seconds: long enough to send the rest


# -- helpers ---------------------------------------------------------------------------------------
def pixel_length_at(raw: bytes) -> int:
    """Offset of the 4-byte length of the (explicit VR little endian, OW) Pixel Data element."""
    at = raw.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert at > 0
    return at + 8


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, StoreSCP]]:
    """One node (PACS = dcmtk storescp) for the network tests of this module."""
    root = tmp_path_factory.mktemp("hardening")
    pacs = StoreSCP(root / "pacs").start()
    node = NodeProcess(root / "node", selection={"incomplete_hold_seconds": HOLD_S},
                       pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port})
    old = os.umask(0o022)  # what a plain shell gives; the node must narrow its own
    try:
        node.start()
    finally:
        os.umask(old)
    try:
        yield node, pacs
    finally:
        node.stop()
        pacs.stop()


# -- 1. corrupt or mismatched instances are refused before success ---------------------------------
@requires_dcmtk
def test_corrupt_and_mismatched_instances_refused(peers: tuple[NodeProcess, StoreSCP],
                                                  tmp_path: Path) -> None:
    node, _ = peers
    made = {k: write_ct_series(tmp_path / k, name=f"bad-{k}", n=1, size=128, random_pixels=True)
            for k in ("short", "huge", "cut", "modality", "good")}
    made["rle"] = write_ct_series(tmp_path / "rle", name="bad-rle", n=1, size=128, random_pixels=True,
                                  transfer_syntax=RLELossless)
    made["mr"] = write_ct_series(tmp_path / "mr", name="bad-mr", n=1, size=128, modality="MR")
    raw = {k: s.files[0].read_bytes() for k, s in made.items()}
    files: dict[str, Path] = {}
    at = pixel_length_at(raw["short"])
    length = struct.unpack_from("<L", raw["short"], at)[0]
    # pixel data 10,000 bytes short, its length field consistent with that: a well-formed stream
    files["short"] = tmp_path / "short.dcm"
    files["short"].write_bytes(raw["short"][:at] + struct.pack("<L", length - 10_000)
                               + raw["short"][at + 4:-10_000])
    at = pixel_length_at(raw["huge"])
    files["huge"] = tmp_path / "huge.dcm"  # declares 0xFFFFFFF0 bytes
    files["huge"].write_bytes(raw["huge"][:at] + struct.pack("<L", 0xFFFFFFF0) + raw["huge"][at + 4:])
    files["cut"] = tmp_path / "cut.dcm"  # the stream simply ends 10,000 bytes early
    files["cut"].write_bytes(raw["cut"][:-10_000])
    files["rle"] = tmp_path / "rle.dcm"  # an encapsulated fragment cut short, no delimiter
    files["rle"].write_bytes(raw["rle"][:-3_000])
    # an MR dataset on the CT Image Storage context, and a CT dataset whose Modality says MR
    files["mr"] = rewrite(made["mr"].files[0], tmp_path / "mr.dcm",
                          file_meta__MediaStorageSOPClassUID=CT_IMAGE)
    files["modality"] = rewrite(made["modality"].files[0], tmp_path / "modality.dcm", Modality="MR")
    files["good"] = made["good"].files[0]

    order = ["short", "huge", "cut", "rle", "mr", "modality", "good"]
    got = dict(zip(order, send_verbatim(node.port, [files[k] for k in order]), strict=True))
    expected = {"short": (0xC000, "pixel-length"), "huge": (0xC000, "pixel-truncated"),
                "cut": (0xC000, "pixel-truncated"), "rle": (0xC000, "encapsulation"),
                "mr": (0xA900, "sop-class-mismatch"), "modality": (0xA900, "modality-mismatch"),
                "good": (0x0000, "")}
    assert {k: (s, c.split(":")[0]) for k, (s, c) in got.items()} == expected, got
    assert got["short"][1] == "pixel-length: 22768 bytes where the header implies 32768"
    assert got["huge"][1] == "pixel-truncated: declares 4294967280 bytes, 32768 received"
    assert got["mr"][1].startswith("sop-class-mismatch: dataset is MR Image Storage on the CT Image")
    for k in order[:-1]:  # nothing of a refused instance is kept: no file, no row, no job
        assert not list(node.storage_dir.rglob(f"{made[k].sop_uids[0]}.dcm")), k
        assert not node.sql("SELECT 1 FROM instances WHERE sop_uid=?", (made[k].sop_uids[0],)), k
        assert not node.jobs(made[k].series_uid), k
    assert node.sql("SELECT 1 FROM instances WHERE sop_uid=?", (made["good"].sop_uids[0],))
    assert not list(node.storage_dir.rglob("*.tmp"))
    wait_for(lambda: "sop-class-mismatch" in node.log(), 5, what="the refusal in the node log")


# -- 2. SOP Instance UID collisions are deterministic -----------------------------------------------
@requires_dcmtk
def test_uid_collision_refused_identical_resend_idempotent(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", stable_seconds=30.0).start()  # series stay open: indexing only
    try:
        _collisions(node, tmp_path)
    finally:
        node.stop()


def _collisions(node: NodeProcess, tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", name="col-a", n=4, size=16, patient_id="PAT-ALPHA",
                        patient_name="Alpha^Anna")
    b = write_ct_series(tmp_path / "b", name="col-b", n=4, size=16, patient_id="PAT-BETA",
                        patient_name="Beta^Bert")
    stolen = a.sop_uids[2]  # b's third instance claims a's UID (another patient, another series)
    b_files = list(b.files)
    b_files[2] = rewrite(b.files[2], tmp_path / "b2.dcm", SOPInstanceUID=stolen,
                         file_meta__MediaStorageSOPInstanceUID=stolen)
    changed = rewrite(a.files[3], tmp_path / "a3.dcm",  # same UID, same series, other pixels
                      PixelData=np.full((16, 16), 7, dtype=np.int16).tobytes())

    assert send_verbatim(node.port, a.files) == [(0, "")] * 4
    got_b = send_verbatim(node.port, b_files)
    assert [s for s, _ in got_b] == [0, 0, 0xC000, 0]
    assert got_b[2][1].startswith("uid-collision: ") and "another series" in got_b[2][1]
    got_changed = send_verbatim(node.port, [changed])
    assert got_changed[0][0] == 0xC000 and got_changed[0][1].startswith("uid-collision: ")
    assert "same series" in got_changed[0][1]
    assert send_verbatim(node.port, a.files) == [(0, "")] * 4  # identical re-send: accepted, nothing redone

    def where(uid: str) -> tuple[str, str]:
        row = node.sql("SELECT series_uid, path FROM instances WHERE sop_uid=?", (uid,))[0]
        return row["series_uid"], row["path"]

    first = where(stolen)
    assert first[0] == a.series_uid
    assert dataset_bytes(Path(first[1])) == dataset_bytes(a.files[2])  # a's dataset, not b's
    assert dataset_bytes(Path(where(a.sop_uids[3])[1])) == dataset_bytes(a.files[3])  # the first copy
    assert [j["id"] for j in node.jobs(a.series_uid)] == [1]
    assert node.sql("SELECT COUNT(*) AS n FROM instances WHERE series_uid=?", (b.series_uid,))[0]["n"] == 3
    for _ in range(2):  # restarts never move the row
        node.stop()
        node.start()
        assert where(stolen) == first
    log = node.log()
    assert "code=uid-collision" in log and f"stored_series={a.series_uid}" in log
    assert "PAT-BETA" not in log and "Beta" not in log and "Alpha" not in log


# -- 3. a quiet series is not necessarily complete ------------------------------------------------
@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Settings, Database, Store]]:
    settings = Settings(storage_dir=tmp_path / "var", stable_seconds=0.0, host="127.0.0.1",
                        min_free_disk_mb=0, max_disk_used_pct=100,
                        selection=SelectionSettings(min_z_extent_mm=20.0, min_slices=5,
                                                    incomplete_hold_seconds=0.5),
                        worker={"max_attempts": 1, "poll_seconds": 0.0})
    db = Database(settings.db_path)
    store = Store(settings.storage_dir, db)
    yield settings, db, store
    store.close()
    db.close()


def job(db: Database) -> tuple[str, str | None]:
    row = db.one("SELECT state, reason FROM jobs ORDER BY id DESC LIMIT 1")
    return row["state"], row["reason"]


def test_series_with_gap_is_held_then_ready_when_completed(local: tuple, tmp_path: Path) -> None:
    settings, db, store = local
    watcher = StabilityWatcher(settings, db)
    s = write_ct_series(tmp_path / "gap", name="gap", n=12, size=8)
    store_files(store, s.files[:5] + s.files[6:])  # slice 5 missing: a 6 mm gap in 3 mm spacing
    assert watcher.check_once() == []
    assert job(db) == ("receiving", "held: incomplete: gap of 6 mm after -18 mm (slice spacing 3 mm)")
    assert watcher.check_once() == []  # still held: not re-read on every tick
    store_files(store, [s.files[5]])  # the missing slice arrives within the hold
    assert watcher.check_once() == [1]
    assert job(db) == ("queued", None)


def test_series_with_gap_rejected_incomplete_after_hold(local: tuple, tmp_path: Path) -> None:
    settings, db, store = local
    watcher = StabilityWatcher(settings, db)
    s = write_ct_series(tmp_path / "gap", name="gap-never", n=12, size=8)
    store_files(store, s.files[:5] + s.files[6:])
    assert watcher.check_once() == [] and job(db)[0] == "receiving"
    time.sleep(0.6)
    assert watcher.check_once() == [1]
    assert job(db) == ("rejected", "incomplete: gap of 6 mm after -18 mm (slice spacing 3 mm)")


def test_expected_count_from_images_in_acquisition(local: tuple, tmp_path: Path) -> None:
    """An interrupted transfer without a gap: the first 8 of 12 announced images (the issue's 60 of 99)."""
    settings, db, store = local
    watcher = StabilityWatcher(settings, db)
    s = write_ct_series(tmp_path / "cut", name="cut-short", n=12, size=8)
    files = [rewrite(f, f, ImagesInAcquisition=12, AcquisitionNumber=1) for f in s.files]
    store_files(store, files[:8])
    watcher.check_once()
    time.sleep(0.6)
    watcher.check_once()
    assert job(db) == ("rejected",
                       "incomplete: 8 of 12 images of acquisition 1 received (ImagesInAcquisition)")
    store_files(store, files[8:])  # the rest comes after all: a new job, complete, queued
    watcher.check_once()
    assert job(db) == ("queued", None)


@requires_dcmtk
def test_interrupted_transfer_is_held_and_measured_only_when_whole(
        peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    s = write_ct_series(tmp_path / "part", name="interrupted", n=12, size=16)
    files = [rewrite(f, f, ImagesInAcquisition=12) for f in s.files]
    assert send_verbatim(node.port, files[:8]) == [(0, "")] * 8
    held = wait_for(lambda: [j for j in node.jobs(s.series_uid) if (j["reason"] or "").startswith("held:")],
                    15, what="the series to be held")
    assert held[0]["state"] == "receiving"
    assert "incomplete: 8 of 12 images" in held[0]["reason"]
    assert not [r for r in node.pipeline_runs() if s.series_uid in r]  # nothing measured
    assert send_verbatim(node.port, files[8:]) == [(0, "")] * 4
    done = node.wait_job(s.series_uid, ("done", "failed", "rejected"), timeout=30)
    assert done["state"] == "done" and done["n_instances"] == 12
    assert [r.split()[2] for r in node.pipeline_runs() if s.series_uid in r] == ["12"]  # measured once, whole


# -- 4. output UIDs name the content -------------------------------------------------------------
def test_output_uids_derive_from_content_and_model(tmp_path: Path) -> None:
    from reporting.seg import build_seg_frames
    from reporting.sr import build_measurement_sr, measurement_sr_uid
    from reporting.summary import build_summary
    from seg.io import load_dicom_series, load_nifti
    from seg.measure import measure_volumes
    from seg.phantom import PhantomOptions, make_phantom, write_phantom
    from seg.records import ModelInfo

    model = ModelInfo(name="unetr-test", version="1.0", demo=True)
    write_phantom(make_phantom(PhantomOptions(seed=5, spacing_mm=(6.0, 6.0, 10.0), z_range_mm=(-40.0, 40.0))),
                  tmp_path)
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    full = load_dicom_series(files)
    truth = load_nifti(tmp_path / "truth" / "labels.nii.gz")
    labels = full.with_array(np.asarray(truth.array, dtype=np.uint8))

    def outputs(ct: Any, lab_array: np.ndarray, info: ModelInfo,
                height: tuple[float, str] | None = None) -> list[tuple[str, str]]:
        lab = ct.with_array(lab_array)
        h_m, h_source = height or (None, None)
        vols = measure_volumes(lab, ct, model=info, height_m=h_m, height_source=h_source)
        seg = build_seg_frames(ct, lab, vols, info).dataset
        sr = build_measurement_sr(ct, seg, vols, info)
        assert str(sr.SOPInstanceUID) == measurement_sr_uid(ct, vols, info)  # the node names it first
        sc = build_summary(ct, vols, info)
        return [(str(d.SOPInstanceUID), str(d.SeriesInstanceUID)) for d in (seg, sr, sc)]

    whole = outputs(full, labels.array, model)
    assert outputs(full, labels.array, model) == whole  # a re-run replaces
    keep = [k for k in range(full.shape[2]) if k != 0]  # the same series, one slice short
    partial = load_dicom_series([full.source_files[k] for k in keep])
    part = outputs(partial, labels.array[:, :, keep], model)
    newer = outputs(full, labels.array, model.model_copy(update={"version": "1.1"}))
    import reporting.uids as uids

    revision = uids.OUTPUT_REVISION
    try:  # a release that changes what the objects contain gives them new UIDs too
        uids.OUTPUT_REVISION = revision + 1
        revised = outputs(full, labels.array, model)
    finally:
        uids.OUTPUT_REVISION = revision
    for other in (part, newer, revised):
        flat = {u for pair in other for u in pair}
        assert not flat & {u for pair in whole for u in pair}  # no UID reused for other content
    # a height imported after the first report: the SR and the page show an index now, and the
    # registry's height later differs again; the SEG (no height in it) keeps its UID
    first = outputs(full, labels.array, model, (1.70, "registry"))
    second = outputs(full, labels.array, model, (1.72, "registry"))
    assert outputs(full, labels.array, model, (1.70, "registry")) == first
    for a, b in ((whole, first), (first, second)):
        assert a[0] == b[0]  # the SEG
        assert a[1][0] != b[1][0] and a[2][0] != b[2][0]  # the SR's and the page's instance UIDs
        assert a[1][1] == b[1][1] and a[2][1] == b[2][1]  # in the same series as before


def test_superseded_results_are_logged_without_phi(local: tuple, tmp_path: Path) -> None:
    import node_pipeline

    settings, db, store = local
    watcher = StabilityWatcher(settings, db)
    worker = Worker(settings, store, SQLiteJobQueue(db), node_pipeline.run)
    s = write_ct_series(tmp_path / "s", name="supersede", n=12, size=8, patient_id="SECRET-77",
                        patient_name="Secret^Person")
    store_files(store, s.files[:10])  # measured complete as far as anyone could tell (no gap, no count)
    assert watcher.check_once() == [1] and worker.run_once() == 1
    first_uid = Path(db.one("SELECT path FROM outbox WHERE job_id=1")["path"]).stem
    with captured_info_log() as stream:
        store_files(store, s.files[10:])  # the rest arrives: new content, new job
        assert watcher.check_once() == [2]
    text = stream.getvalue()
    line = next(x for x in text.splitlines() if "earlier results superseded" in x)
    assert "job=2" in line and "earlier_jobs=1" in line and f"superseded_sop_uids={first_uid}" in line
    assert "SECRET" not in text and "Secret" not in text


def test_a_seg_sent_early_by_a_superseded_job_is_announced(local: tuple, tmp_path: Path) -> None:
    """A late instance supersedes a running job whose SEG the sender already stored: the PACS
    administrator hears of that SEG too (the new content gets new UIDs); an unsent one never goes."""
    settings, db, store = local
    queue = SQLiteJobQueue(db)
    watcher = StabilityWatcher(settings, db)
    s = write_ct_series(tmp_path / "s", name="early-superseded", n=12, size=8)
    store_files(store, s.files[:10])
    assert watcher.check_once() == [1] and queue.claim() is not None
    sent, unsent = tmp_path / "2.25.111.dcm", tmp_path / "2.25.222.dcm"
    assert queue.early_output(1, sent) and queue.early_output(1, unsent)
    with db.tx() as con:  # the sender's success for the first (set-up: no PACS here)
        con.execute("UPDATE outbox SET state='sent', attempts=1 WHERE path=?", (str(sent),))
    with captured_info_log() as stream:
        store_files(store, s.files[10:])  # the rest arrives while job 1 runs: it is superseded
        assert watcher.check_once() == [2]
    line = next(x for x in stream.getvalue().splitlines() if "earlier results superseded" in x)
    assert "earlier_jobs=1" in line and "superseded_sop_uids=2.25.111" in line and "2.25.222" not in line
    assert db.one("SELECT state FROM jobs WHERE id=1")["state"] == "superseded"


# -- 5. data at rest -------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@requires_dcmtk
def test_files_and_folders_private_under_the_node(peers: tuple[NodeProcess, StoreSCP],
                                                  tmp_path: Path) -> None:
    node, _ = peers  # started under umask 0022
    s = write_ct_series(tmp_path / "m", name="modes", n=8, size=16)
    assert send_verbatim(node.port, s.files) == [(0, "")] * 8
    assert node.wait_job(s.series_uid, ("done", "failed", "rejected"))["state"] == "done"
    root = node.storage_dir
    series_dir = root / "incoming" / s.study_uid / s.series_uid
    for folder in (root, root / "incoming", series_dir.parent, series_dir, root / "jobs"):
        assert _mode(folder) == 0o750, folder
    assert {_mode(p) for p in series_dir.glob("*.dcm")} == {0o640}
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        assert _mode(root / name) == 0o600, name
    everything = [p for p in root.rglob("*")]
    assert len(everything) > 10
    assert [p for p in everything if _mode(p) & 0o007] == []  # nothing open to other users
    assert [p for p in everything if _mode(p) & 0o020] == []  # nor writable by the group


def test_store_modes_ignore_umask_and_rename_is_followed_by_a_flush(
        local: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rename, then what makes it durable: one syncfs of the file's filesystem (Linux >= 5.8) or
    its folder's fsync (tests/test_store_durability.py has the order in both modes)."""
    import dicomnode.storage.store as store_module

    _, _, store = local
    calls: list[tuple[str, Path]] = []
    real_replace, real_fsync_dir, real_syncfs = os.replace, store_module._fsync_dir, store_module._syncfs

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        calls.append(("rename", Path(dst).parent))

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        calls.append(("fsync-dir", Path(path)))

    def syncfs(fd: int) -> None:
        real_syncfs(fd)
        calls.append(("syncfs", Path(os.readlink(f"/proc/self/fd/{fd}")).parent))

    monkeypatch.setattr(store_module.os, "replace", replace)
    monkeypatch.setattr(store_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(store_module, "_syncfs", syncfs)
    s = write_ct_series(tmp_path / "f", name="fsync", n=3, size=8)
    old = os.umask(0)  # even a careless umask leaves nothing open
    try:
        store_files(store, s.files)
    finally:
        os.umask(old)
    renames = [i for i, c in enumerate(calls) if c[0] == "rename"]
    assert len(renames) == 3
    for i in renames:
        flush = "syncfs" if store.one_flush else "fsync-dir"
        assert calls[i + 1] == (flush, calls[i][1])  # every rename, then a flush covering it
    folder = store.incoming / s.study_uid / s.series_uid
    assert {_mode(p) for p in folder.glob("*.dcm")} == {0o640}
    assert _mode(folder) == _mode(folder.parent) == 0o750


def test_systemd_unit_sandboxes_the_node() -> None:
    lines = (REPO / "deploy" / "systemd" / "dicomnode.service").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    wanted = {"UMask": "0027", "StateDirectory": "dicomnode", "StateDirectoryMode": "0750",
              "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes"}
    assert {k: settings.get(k) for k in wanted} == wanted


# -- 6. a locked index makes a C-STORE fail fast and transiently -----------------------------------
@requires_dcmtk
def test_locked_index_answers_a700_quickly(peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    s = write_ct_series(tmp_path / "l", name="locked", n=2, size=16)
    holder = sqlite3.connect(node.db_path, timeout=5, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process (a backup, an operator's tool) holds the write lock
    try:
        t0 = time.monotonic()
        got = send_verbatim(node.port, s.files[:1])
        elapsed = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert got[0][0] == 0xA700 and got[0][1].startswith("index-busy"), got
    assert elapsed < 6.0, elapsed
    assert not list(node.storage_dir.rglob(f"{s.sop_uids[0]}.dcm"))  # nothing kept unacknowledged
    assert not list(node.storage_dir.rglob("*.tmp"))
    assert send_verbatim(node.port, s.files) == [(0, ""), (0, "")]  # lock gone: the sender's retry succeeds
