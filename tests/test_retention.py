"""Retention (issue 15): received instances are deleted ``retention_days`` after their series' results
were all sent, and never before.

In-process tests use the real store, SQLite index and stability watcher; what the worker and the
sender would have written (job ``done``, outbox rows ``sent`` at a given time) is set in SQLite, and the
clock is either the ``t`` argument or timestamps moved back. The last test runs ``dicomnode serve``
with dcmtk storescp as the PACS: the real pipeline stand-in and sender produce and send the results,
the send times are moved back in the index, and the restarted server deletes the instances itself.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from peers import StoreSCP, node_factory, pacs, requires_dcmtk, storescu, wait_for  # noqa: F401
from series_factory import SeriesFiles, write_ct_series

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database
from dicomnode.harness.ingest import store_files
from dicomnode.processing.jobs import ACTIVE, JobState
from dicomnode.storage.retention import DAY_SECONDS, Retention
from dicomnode.storage.series import StabilityWatcher
from dicomnode.storage.store import Store

DAYS = 2.0


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Settings, Database, Store]]:
    settings = Settings(storage_dir=tmp_path / "var", stable_seconds=0.0, host="127.0.0.1",
                        min_free_disk_mb=0, max_disk_used_pct=100,
                        retention_days=DAYS,
                        selection=SelectionSettings(min_z_extent_mm=20.0, min_slices=5))
    db = Database(settings.db_path)
    store = Store(settings.storage_dir, db)
    yield settings, db, store
    store.close()
    db.close()


def measured(local: tuple, tmp_path: Path, name: str) -> tuple[SeriesFiles, int]:
    """A series received and closed by the real watcher (queued, content hash set); returns its job."""
    settings, db, store = local
    series = write_ct_series(tmp_path / name, name=name, n=8, size=8)
    store_files(store, series.files)
    closed = StabilityWatcher(settings, db).check_once()
    assert len(closed) == 1
    return series, closed[0]


def results_sent(db: Database, job_id: int, sent_at: float, states: tuple[str, ...] = ("sent", "sent"),
                 job_state: str = "done") -> None:
    """What the worker and the sender leave behind: outputs in the outbox, the job's final state."""
    with db.tx() as con:
        for i, state in enumerate(states):
            con.execute("INSERT INTO outbox (job_id, path, state, attempts, sent_at) VALUES (?,?,?,1,?)",
                        (job_id, f"/results/{job_id}-{i}.dcm", state, sent_at if state == "sent" else None))
        con.execute("UPDATE jobs SET state=? WHERE id=?", (job_state, job_id))


def instance_rows(db: Database, series_uid: str) -> int:
    return int(db.one("SELECT COUNT(*) FROM instances WHERE series_uid=?", (series_uid,))[0])


def folder_of(store: Store, series: SeriesFiles) -> Path:
    return store.incoming / series.study_uid / series.series_uid


def test_instances_deleted_once_results_are_older_than_retention(local: tuple, tmp_path: Path) -> None:
    settings, db, store = local
    series, job_id = measured(local, tmp_path, "old")
    results = settings.storage_dir / "results" / series.series_uid
    results.mkdir(parents=True)
    (results / "volumes.json").write_text("{}")
    results_sent(db, job_id, sent_at=time.time() - (DAYS + 0.1) * DAY_SECONDS)

    purged = Retention(settings, store).purge_once()

    assert [(p.series_uid, p.instances, p.complete) for p in purged] == [(series.series_uid, 8, True)]
    assert instance_rows(db, series.series_uid) == 0
    assert not folder_of(store, series).exists() and not folder_of(store, series).parent.exists()
    assert list(store.incoming.iterdir()) == []
    # what pairing and the operator still need stays: results, the job, the patient and study rows
    assert (results / "volumes.json").is_file()
    assert db.one("SELECT state FROM jobs WHERE id=?", (job_id,))["state"] == "done"
    assert db.one("SELECT COUNT(*) FROM studies")[0] == 1 and db.one("SELECT COUNT(*) FROM patients")[0] == 1
    assert Retention(settings, store).purge_once() == []  # nothing left to do


def test_never_before_retention_days_after_the_last_send(local: tuple, tmp_path: Path) -> None:
    settings, db, store = local
    series, job_id = measured(local, tmp_path, "recent")
    sent = time.time() - 0.5 * DAY_SECONDS
    results_sent(db, job_id, sent_at=sent)
    retention = Retention(settings, store)

    assert retention.purge_once() == []
    assert retention.purge_once(t=sent + DAYS * DAY_SECONDS - 60) == []  # a minute early: kept
    assert len(list(folder_of(store, series).iterdir())) == 8
    assert [p.instances for p in retention.purge_once(t=sent + DAYS * DAY_SECONDS + 1)] == [8]
    assert instance_rows(db, series.series_uid) == 0


@pytest.mark.parametrize(("outbox", "job_state"), [
    (("sent", "pending"), "sending"),  # one result still owed to the PACS
    (("sent", "failed"), "failed"),  # the PACS never took one: the operator may retry
    ((), "rejected"),  # never measured: no results at all
])
def test_series_without_all_results_sent_is_kept(local: tuple, tmp_path: Path, outbox: tuple[str, ...],
                                                 job_state: str) -> None:
    settings, db, store = local
    series, job_id = measured(local, tmp_path, f"kept-{job_state}")
    results_sent(db, job_id, sent_at=time.time() - 100 * DAY_SECONDS, states=outbox, job_state=job_state)

    assert Retention(settings, store).purge_once(t=time.time() + 1000 * DAY_SECONDS) == []
    assert instance_rows(db, series.series_uid) == 8
    assert len(list(folder_of(store, series).iterdir())) == 8


@pytest.mark.parametrize("other", list(JobState))
def test_a_series_with_a_job_still_active_is_kept(local: tuple, tmp_path: Path, other: JobState) -> None:
    """Any job of the series that has not ended (receiving, ..., sending) holds it; an ended one does not."""
    settings, db, store = local
    series, job_id = measured(local, tmp_path, f"other-{other}")
    results_sent(db, job_id, sent_at=time.time() - 100 * DAY_SECONDS)
    with db.tx() as con:
        con.execute("INSERT INTO jobs (series_uid, state) VALUES (?, ?)", (series.series_uid, other.value))

    purged = Retention(settings, store).purge_once()
    assert [p.instances for p in purged] == ([] if other in ACTIVE else [8])
    assert ACTIVE == {JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED, JobState.RUNNING,
                      JobState.SENDING}


def test_retention_off_by_default_deletes_nothing(local: tuple, tmp_path: Path) -> None:
    settings, db, store = local
    assert Settings().retention_days is None
    series, job_id = measured(local, tmp_path, "off")
    results_sent(db, job_id, sent_at=time.time() - 100 * DAY_SECONDS)
    off = settings.model_copy(update={"retention_days": None})
    assert Retention(off, store).purge_once() == []
    assert instance_rows(db, series.series_uid) == 8


def test_retention_days_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retention_days"):
        Settings(retention_days=0)


def test_same_content_job_counts_the_sends_of_the_job_that_made_the_results(
        local: tuple, tmp_path: Path) -> None:
    """A same-content re-run is ``done`` without outputs of its own; its series still ages out."""
    settings, db, store = local
    series, job_id = measured(local, tmp_path, "dup")
    results_sent(db, job_id, sent_at=time.time() - (DAYS + 1) * DAY_SECONDS)
    with db.tx() as con:
        digest = con.execute("SELECT content_hash FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        dup = con.execute("INSERT INTO jobs (series_uid, state, content_hash) VALUES (?, 'done', ?)",
                          (series.series_uid, digest)).lastrowid
        con.execute("UPDATE series SET current_job=? WHERE series_uid=?", (dup, series.series_uid))
    assert [p.instances for p in Retention(settings, store).purge_once()] == [8]


def test_a_resend_after_the_purge_is_stored_again(local: tuple, tmp_path: Path) -> None:
    """The index forgets purged instances, so a PACS re-sending the series is not a UID collision."""
    settings, db, store = local
    series, job_id = measured(local, tmp_path, "again")
    results_sent(db, job_id, sent_at=time.time() - (DAYS + 1) * DAY_SECONDS)
    Retention(settings, store).purge_once()

    store_files(store, series.files)

    assert instance_rows(db, series.series_uid) == 8
    current = db.one("SELECT j.id, j.state FROM series s JOIN jobs j ON j.id = s.current_job"
                     " WHERE s.series_uid=?", (series.series_uid,))
    assert current["id"] != job_id and current["state"] == "receiving"


@requires_dcmtk
def test_the_server_purges_by_itself(node_factory, pacs: StoreSCP, tmp_path: Path) -> None:  # noqa: F811
    series = write_ct_series(tmp_path / "served", name="served", n=8, size=8)
    node = node_factory(pacs=pacs, retention_days=DAYS)
    assert storescu(node.port, series.files).returncode == 0
    job = node.wait_job(series.series_uid, ("done",))
    assert len(pacs.files()) == 1  # the stand-in pipeline's one result reached the PACS
    node.stop()
    folder = node.storage_dir / "incoming" / series.study_uid / series.series_uid
    assert len(list(folder.iterdir())) == 8  # kept while the results are recent

    with closing(sqlite3.connect(node.db_path)) as con, con:  # the node is stopped: move its clock back
        con.execute("UPDATE outbox SET sent_at = sent_at - ? WHERE job_id=?",
                    ((DAYS + 1) * DAY_SECONDS, job["id"]))
    node.start()  # the retention loop's first pass runs at start-up

    wait_for(lambda: "retention purged" in node.log(), 20, what="the node to delete the instances")
    assert not folder.exists() and not folder.parent.exists()
    assert node.sql("SELECT COUNT(*) FROM instances")[0][0] == 0
