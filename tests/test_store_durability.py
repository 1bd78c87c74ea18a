"""Durable before acknowledged, with one flush per instance: ``Store.write`` renames and then runs one
``syncfs`` of the file's own descriptor (Linux ≥ 5.8), or fsync + rename + a folder fsync shared by
concurrent C-STOREs (``store._FolderSync``: nobody returns before an fsync that began after their
rename has finished, and callers that queue behind one share the next); ``Store.recover`` deletes an
unindexed partial file (what a power cut between rename and syncfs leaves) and re-indexes whole ones.

Real folders, files, SQLite and syncs; only the order is observed or steered (an fsync held until the
test lets it go, a syncfs made to fail).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from series_factory import write_ct_series

import dicomnode.storage.store as store_module
from dicomnode import logs
from dicomnode.db import Database
from dicomnode.harness.ingest import store_files
from dicomnode.harness.series import dataset_bytes
from dicomnode.storage.store import Store, encode_file_meta, info_from_dataset


def new_store(root: Path, one_flush: bool) -> Store:
    return Store(root / "var", Database(root / "var" / "index.sqlite"), one_flush=one_flush)


def observe(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record renames, syncfs calls and folder fsyncs of the store, in order (each still done for real)."""
    calls: list[tuple[str, Any]] = []
    real_replace, real_syncfs, real_fsync_dir = os.replace, store_module._syncfs, store_module._fsync_dir

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        calls.append(("rename", Path(dst)))

    def syncfs(fd: int) -> None:
        real_syncfs(fd)
        calls.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        calls.append(("fsync-dir", Path(path)))

    monkeypatch.setattr(store_module.os, "replace", replace)
    monkeypatch.setattr(store_module, "_syncfs", syncfs)
    monkeypatch.setattr(store_module, "_fsync_dir", fsync_dir)
    return calls


@pytest.mark.skipif(not store_module._one_flush_supported(), reason="syncfs reports errors on Linux >= 5.8")
def test_one_flush_renames_then_syncs_the_files_own_descriptor(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path, one_flush=None)  # type: ignore[arg-type]  # the default where supported
    assert store.one_flush
    s = write_ct_series(tmp_path / "in", name="flush", n=3, size=8)
    store_files(store, s.files[:1])  # the series folder exists from here on
    calls = observe(monkeypatch)
    store_files(store, s.files[1:])
    final = [store.incoming / s.study_uid / s.series_uid / f"{uid}.dcm" for uid in s.sop_uids[1:]]
    assert calls == [("rename", final[0]), ("syncfs", str(final[0])),  # the fd follows the rename
                     ("rename", final[1]), ("syncfs", str(final[1]))]
    for f, path in zip(s.files[1:], final, strict=True):
        assert store_module.stored_dataset(path) == dataset_bytes(f)
    assert store.db.one("SELECT COUNT(*) FROM instances")[0] == 3


def test_two_fsyncs_where_syncfs_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path, one_flush=False)
    s = write_ct_series(tmp_path / "in", name="fsyncs", n=3, size=8)
    store_files(store, s.files[:1])
    calls = observe(monkeypatch)
    store_files(store, s.files[1:])
    folder = store.incoming / s.study_uid / s.series_uid
    assert calls == [("rename", folder / f"{s.sop_uids[1]}.dcm"), ("fsync-dir", folder),
                     ("rename", folder / f"{s.sop_uids[2]}.dcm"), ("fsync-dir", folder)]


@pytest.mark.parametrize("one_flush", [True, False], ids=["syncfs", "fsyncs"])
def test_a_failed_flush_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      one_flush: bool) -> None:
    store = new_store(tmp_path, one_flush=one_flush)
    s = write_ct_series(tmp_path / "in", name="eio", n=2, size=8)
    store_files(store, s.files[:1])

    def failing(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "_syncfs" if one_flush else "_fsync_dir", failing)
    ds = pydicom.dcmread(s.files[1])
    info = info_from_dataset(ds, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    with pytest.raises(OSError, match="Input/output"):
        store.add(info, encode_file_meta(info), dataset_bytes(s.files[1]))
    folder = store.incoming / s.study_uid / s.series_uid
    assert sorted(p.name for p in folder.iterdir()) == [f"{s.sop_uids[0]}.dcm"]  # no file, no temp file
    assert store.db.one("SELECT COUNT(*) FROM instances")[0] == 1


def test_recover_deletes_an_unindexed_partial_file_and_indexes_whole_ones(tmp_path: Path) -> None:
    store = new_store(tmp_path, one_flush=True)
    s = write_ct_series(tmp_path / "in", name="cut", n=4, size=64, random_pixels=True)
    store_files(store, s.files)
    folder = store.incoming / s.study_uid / s.series_uid
    cut, whole = folder / f"{s.sop_uids[2]}.dcm", folder / f"{s.sop_uids[3]}.dcm"
    cut.write_bytes(cut.read_bytes()[:-1000])  # what a power cut before the syncfs can leave
    store.db.con.execute("DELETE FROM instances WHERE sop_uid IN (?, ?)", (s.sop_uids[2], s.sop_uids[3]))
    stats = store.recover()
    assert stats == {"tmp_removed": 0, "reindexed": 1, "requeued": 0, "partial_removed": 1}
    assert not cut.exists() and whole.exists()
    indexed = {r[0] for r in store.db.query("SELECT sop_uid FROM instances")}
    assert indexed == set(s.sop_uids) - {s.sop_uids[2]}
    store_files(store, s.files[2:3])  # the PACS, never acknowledged, sends it again: stored this time
    assert store_module.stored_dataset(cut) == dataset_bytes(s.files[2])


class HeldFsyncs:
    """Stands in for ``store._fsync_dir``: each call fsyncs for real, after the test releases it."""

    def __init__(self, fail_first: bool = False) -> None:
        self.started: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.release: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.finished: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.calls = 0
        self.fail_first = fail_first
        self._real = store_module._fsync_dir
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            n = self.calls
            self.calls += 1
        self.started[n].set()
        assert self.release[n].wait(30)
        try:
            if self.fail_first and n == 0:
                raise OSError(5, "Input/output error")
            self._real(path)
        finally:
            self.finished[n].set()


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def caller(sync: store_module._FolderSync, folder: Path, results: dict[str, object], name: str,
           done: dict[str, int], fsyncs: HeldFsyncs) -> threading.Thread:
    def run() -> None:
        try:
            sync.sync(folder)
            results[name] = "ok"
        except OSError as exc:
            results[name] = exc
        done[name] = sum(e.is_set() for e in fsyncs.finished)  # fsyncs finished when it returned

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_callers_behind_an_fsync_in_flight_share_the_next_one(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = HeldFsyncs()
    monkeypatch.setattr(store_module, "_fsync_dir", fsyncs)
    sync = store_module._FolderSync()
    results: dict[str, object] = {}
    done: dict[str, int] = {}
    a = caller(sync, tmp_path, results, "a", done, fsyncs)
    assert fsyncs.started[0].wait(30)
    b = caller(sync, tmp_path, results, "b", done, fsyncs)
    c = caller(sync, tmp_path, results, "c", done, fsyncs)
    until(lambda: sync._requested == 3, "b and c queued")
    assert not results  # nobody returns while the only fsync is held
    fsyncs.release[0].set()  # a's fsync began before b's and c's renames: it covers a only
    a.join(30)
    assert results == {"a": "ok"} and done["a"] == 1
    assert fsyncs.started[1].wait(30)  # one of b and c runs the next fsync, for both
    assert not fsyncs.started[2].is_set() and set(results) == {"a"}
    fsyncs.release[1].set()
    b.join(30)
    c.join(30)
    assert results == {"a": "ok", "b": "ok", "c": "ok"}
    assert done["b"] == done["c"] == 2  # both returned after the second fsync had finished
    assert fsyncs.calls == 2  # three callers, two fsyncs


def test_a_failed_fsync_covers_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = HeldFsyncs(fail_first=True)
    monkeypatch.setattr(store_module, "_fsync_dir", fsyncs)
    sync = store_module._FolderSync()
    results: dict[str, object] = {}
    done: dict[str, int] = {}
    a = caller(sync, tmp_path, results, "a", done, fsyncs)
    assert fsyncs.started[0].wait(30)
    b = caller(sync, tmp_path, results, "b", done, fsyncs)
    until(lambda: sync._requested == 2, "b queued")
    fsyncs.release[0].set()
    a.join(30)
    assert isinstance(results["a"], OSError)
    assert fsyncs.started[1].wait(30)  # b runs its own fsync rather than trusting the failed one
    assert "b" not in results
    fsyncs.release[1].set()
    b.join(30)
    assert results["b"] == "ok" and done["b"] == 2 and fsyncs.calls == 2


def test_a_caller_alone_runs_its_own_fsync_each_time(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda p: (real(p), calls.append(p)))
    sync = store_module._FolderSync()
    for _ in range(3):
        sync.sync(tmp_path)
    assert calls == [tmp_path] * 3


def test_receive_flush_setting_reaches_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``receive_flush`` picks the flush; a typo or syncfs on a kernel without it stops the node at start."""
    from pydantic import ValidationError

    from dicomnode.config import Settings
    from dicomnode.server import Node

    for choice, one_flush in (("fsync", False), ("auto", store_module._one_flush_supported())):
        node = Node(Settings(storage_dir=tmp_path / choice, receive_flush=choice), worker_enabled=False)
        assert node.store.one_flush is one_flush
    with pytest.raises(ValidationError, match="receive_flush"):
        Settings(storage_dir=tmp_path, receive_flush="syncfz")
    monkeypatch.setattr(store_module, "_one_flush_supported", lambda: False)
    with pytest.raises(ValueError, match="needs Linux"):
        Node(Settings(storage_dir=tmp_path / "old-kernel", receive_flush="syncfs"), worker_enabled=False)


def test_pseudonym_key_is_never_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key that links pseudonyms back to patient IDs is 0600 from its first byte on: it used to be
    written with the process umask's mode (0644 under 022) and narrowed by a chmod only afterwards."""
    monkeypatch.setattr(logs, "_pseudonym_key", logs._pseudonym_key)  # restored after the test
    monkeypatch.setattr(os, "chmod", lambda *_args, **_kwargs: None)  # nothing narrows it afterwards
    umask = os.umask(0o022)
    try:
        logs.load_pseudonym_key(tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / ".pseudonym-key").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / ".pseudonym-key").read_bytes()) == 32
