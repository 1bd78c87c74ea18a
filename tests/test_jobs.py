"""The job lifecycle (dicomnode.processing.jobs) and the queue contract (dicomnode.processing.queue)."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.db import MIGRATIONS, SCHEMA_V1, Database
from dicomnode.network.sender import retry
from dicomnode.processing import jobs
from dicomnode.processing.jobs import TRANSITIONS, IllegalTransition, Job, JobState, Reason, ReasonCode
from dicomnode.processing.queue import JobQueue, SQLiteJobQueue

S = JobState
T0 = 1_000_000.0


def job_in(db: Database, state: JobState, series: str = "1.2.3") -> int:
    """A job placed directly in ``state`` (set-up only: the lifecycle never writes like this)."""
    with db.tx() as con:
        job_id = jobs.create(con, series, T0)
        con.execute("UPDATE jobs SET state=? WHERE id=?", (state.value, job_id))
    return job_id


def row(db: Database, job_id: int) -> sqlite3.Row:
    found = db.one("SELECT * FROM jobs WHERE id=?", (job_id,))
    assert found is not None
    return found


# ---------------------------------------------------------------- lifecycle


def test_illegal_transitions_are_refused_and_legal_ones_written(db: Database) -> None:
    """Every (from, to) pair: outside TRANSITIONS it raises and writes nothing; inside it moves."""
    for current, to in itertools.product(JobState, JobState):
        job_id = job_in(db, current)
        before = dict(row(db, job_id))
        with db.tx() as con:
            if to in TRANSITIONS[current]:
                assert jobs.move(con, job_id, to, T0 + 1) is current
            else:
                with pytest.raises(IllegalTransition, match=f"{current} -> {to}"):
                    jobs.move(con, job_id, to, T0 + 1)
        after = dict(row(db, job_id))
        if to in TRANSITIONS[current]:
            assert after["state"] == to
        else:
            assert after == before


def test_the_table_has_no_exit_from_superseded_and_no_way_back_to_running(db: Database) -> None:
    assert TRANSITIONS[S.SUPERSEDED] == frozenset()
    assert [s for s, targets in TRANSITIONS.items() if S.RUNNING in targets] == [S.QUEUED]
    assert TRANSITIONS[None] == {S.RECEIVING}


def test_move_writes_timestamps_reason_code_and_attempts(db: Database) -> None:
    job_id = job_in(db, S.QUEUED)
    with db.tx() as con:
        jobs.move(con, job_id, S.RUNNING, T0 + 1)
    r = row(db, job_id)
    assert (r["state"], r["attempts"], r["started_at"], r["finished_at"]) == ("running", 1, T0 + 1, None)
    with db.tx() as con:
        jobs.move(con, job_id, S.FAILED, T0 + 2, reason=Reason(ReasonCode.PIPELINE_ERROR, "attempt 1: boom"))
    r = row(db, job_id)
    assert (r["reason"], r["reason_code"], r["finished_at"], r["updated_at"]) == (
        "attempt 1: boom", "pipeline-error", T0 + 2, T0 + 2)
    assert retry(db, job_id) == f"job {job_id}: re-queued for processing"  # operator: attempts start over
    r = row(db, job_id)
    assert (r["state"], r["attempts"], r["reason_code"], r["finished_at"]) == (
        "queued", 0, "retry-requested", None)


def test_a_lost_race_writes_nothing(db: Database) -> None:
    """``expect`` names what the caller saw; a job that moved on meanwhile is left alone."""
    job_id = job_in(db, S.SUPERSEDED)
    before = dict(row(db, job_id))
    with db.tx() as con:
        assert jobs.move(con, job_id, S.DONE, T0 + 1, expect={S.RUNNING}) is None
    assert dict(row(db, job_id)) == before


def test_operator_retry_refuses_what_the_table_refuses(db: Database) -> None:
    with pytest.raises(ValueError, match="rejected"):
        retry(db, job_in(db, S.REJECTED))
    with pytest.raises(LookupError):
        retry(db, 999)


def test_an_unversioned_index_is_migrated(tmp_path: Path) -> None:
    """A file written before schema versions (user_version 0, no reason_code) opens and gains it."""
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(SCHEMA_V1)
    con.execute("INSERT INTO jobs (series_uid, state, reason) VALUES ('1.2', 'rejected', 'too short')")
    con.commit()
    con.close()
    db = Database(path)
    try:
        assert db.one("PRAGMA user_version")[0] == len(MIGRATIONS)
        assert dict(db.one("SELECT state, reason, reason_code FROM jobs")) == {
            "state": "rejected", "reason": "too short", "reason_code": None}
    finally:
        db.close()
    Database(path).close()  # current already: opens without migrating again


def test_an_index_from_before_run_ends_is_migrated(tmp_path: Path) -> None:
    """Version 5 (no run_ended_at): the column is added; a run that ended the job (a pipeline failure)
    gets its end from finished_at, a job whose results were sent has none (its finished_at may be a
    re-send), and the job table shows no run time for it rather than a wrong one."""
    path = tmp_path / "v5.sqlite"
    con = sqlite3.connect(path)
    for script in MIGRATIONS[:5]:
        con.executescript(script)
    con.execute("PRAGMA user_version=5")
    con.executemany("INSERT INTO jobs (series_uid, state, reason_code, started_at, finished_at) VALUES "
                    "(?, ?, ?, ?, ?)", [("1.1", "failed", "pipeline-timeout", T0, T0 + 1800),
                                        ("1.2", "done", None, T0, T0 + 7200)])
    con.commit()
    con.close()
    db = Database(path)
    try:
        assert db.one("PRAGMA user_version")[0] == len(MIGRATIONS)
        assert [r[0] for r in db.query("SELECT run_ended_at FROM jobs ORDER BY id")] == [T0 + 1800, None]
        views = {v.series_instance_uid: v for v in jobs.listing(db)}
    finally:
        db.close()
    assert views["1.1"].run_end == T0 + 1800 and views["1.2"].run_end is None


def test_the_ran_column_is_the_run_not_a_later_re_send(db: Database, queue: JobQueue,
                                                        tmp_path: Path) -> None:
    """`dicomnode jobs` "ran": from the start of the last attempt to when it left running. Sending the
    results, and an operator's re-send two hours later, do not count."""
    from dicomnode.commands.node import job_lines

    job = enqueue(db, queue)
    with db.tx() as con:
        jobs.move(con, job.id, S.RUNNING, T0 + 10)
        jobs.move(con, job.id, S.SENDING, T0 + 40)
        jobs.move(con, job.id, S.DONE, T0 + 45)
        jobs.move(con, job.id, S.SENDING, T0 + 7200)  # dicomnode retry JOB
        jobs.move(con, job.id, S.DONE, T0 + 7210)
    (view,) = jobs.listing(db)
    assert (view.started_at, view.run_ended_at, view.finished_at) == (T0 + 10, T0 + 40, T0 + 7210)
    header, line, _ = job_lines([view], None)
    assert header.split()[-2:] == ["ran", "sent"] and "30.0 s" in line and "min" not in line, line
    with db.tx() as con:  # failed, then re-run by the operator: the new attempt's run only
        jobs.move(con, job.id, S.SENDING, T0 + 8000)
        jobs.move(con, job.id, S.FAILED, T0 + 8001)
        jobs.move(con, job.id, S.QUEUED, T0 + 9000, reset_attempts=True)
        jobs.move(con, job.id, S.RUNNING, T0 + 9001)
    assert row(db, job.id)["run_ended_at"] is None  # running: the table counts to now
    with db.tx() as con:
        jobs.move(con, job.id, S.REJECTED, T0 + 9003)
    assert row(db, job.id)["run_ended_at"] == T0 + 9003


def test_cli_reads_jobs_through_the_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(tmp_path / "var"))
    db = Database(tmp_path / "var" / "index.sqlite")
    try:
        job_id = job_in(db, S.COMPLETE)
        with db.tx() as con:
            jobs.move(con, job_id, S.REJECTED, T0, reason=Reason(ReasonCode.NOT_SELECTED, "4 slices < 50"))
        job_in(db, S.QUEUED, series="1.2.4")
    finally:
        db.close()
    out = CliRunner().invoke(app, ["jobs", "--json", "--state", "rejected"])
    assert out.exit_code == 0, out.output
    (only,) = json.loads(out.output)
    assert (only["job"], only["state"], only["reason"], only["reason_code"]) == (
        job_id, "rejected", "4 slices < 50", "not-selected")
    status = CliRunner().invoke(app, ["status", "--json"])
    assert json.loads(status.output)["jobs"] == {"queued": 1, "rejected": 1}


# ---------------------------------------------------------------- the queue contract, both engines

@pytest.fixture
def queue(db: Database) -> JobQueue:
    return SQLiteJobQueue(db)


def enqueue(db: Database, queue: JobQueue, series: str = "1.2.3") -> Job:
    """What the stability watcher does for an accepted series: receiving → complete → queued."""
    with db.tx() as con:
        job_id = jobs.create(con, series, T0)
        jobs.move(con, job_id, S.COMPLETE, T0)
        jobs.move(con, job_id, S.QUEUED, T0)
        job = jobs.get(con, job_id)
    assert job is not None
    return job


def test_queue_claims_oldest_first_and_counts_attempts(db: Database, queue: JobQueue) -> None:
    assert queue.claim() is None
    first, second = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2")
    claimed = queue.claim()
    assert claimed == Job(first.id, "1.1", S.RUNNING, 1)
    assert queue.claim() == Job(second.id, "1.2", S.RUNNING, 1)
    assert queue.claim() is None


def test_queue_retry_waits_for_its_time(
    db: Database, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicomnode.processing.queue as queue_module

    clock = [T0 + 10]
    monkeypatch.setattr(queue_module, "now", lambda: clock[0])
    job = enqueue(db, queue)
    assert queue.claim() is not None
    assert queue.fail(job.id, "attempt 1: RuntimeError: boom", retry_after=60.0) is S.QUEUED
    r = row(db, job.id)
    assert (r["state"], r["reason_code"], r["next_attempt_at"]) == ("queued", "pipeline-error", T0 + 70)
    assert queue.claim() is None  # not due yet
    clock[0] = T0 + 71
    again = queue.claim()
    assert again is not None and (again.id, again.attempts) == (job.id, 2)
    assert queue.fail(job.id, "attempt 2: RuntimeError: boom", retry_after=None) is S.FAILED
    assert row(db, job.id)["finished_at"] == T0 + 71
    assert queue.claim() is None


def test_queue_outcomes(db: Database, queue: JobQueue, tmp_path: Path) -> None:
    sent, done, refused = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2"), enqueue(db, queue, "1.3")
    for _ in range(3):
        assert queue.claim() is not None
    out = tmp_path / "result.dcm"
    assert queue.finish(sent.id, [out], "1 object") is S.SENDING
    assert [tuple(r) for r in db.query("SELECT job_id, path, state FROM outbox")] == [
        (sent.id, str(out), "pending")]
    assert queue.finish(done.id, [], "nothing to send") is S.DONE
    assert queue.reject(refused.id, "not a thigh") is S.REJECTED
    r = row(db, refused.id)
    assert (r["reason"], r["reason_code"]) == ("not a thigh", "pipeline-rejected")
    assert row(db, done.id)["message"] == "nothing to send"


def test_queue_skips_and_discards_superseded_jobs(db: Database, queue: JobQueue, tmp_path: Path) -> None:
    """A late instance supersedes a queued job (never claimed) and a running one (outputs dropped)."""
    waiting, running = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2")
    with db.tx() as con:
        jobs.supersede(con, waiting.id, jobs.create(con, "1.1", T0), T0)
    claimed = queue.claim()
    assert claimed is not None and claimed.id == running.id
    with db.tx() as con:
        jobs.supersede(con, running.id, jobs.create(con, "1.2", T0), T0)
    assert queue.finish(running.id, [tmp_path / "late.dcm"], "too late") is S.SUPERSEDED
    assert queue.fail(running.id, "boom", retry_after=0.0) is S.SUPERSEDED
    assert db.one("SELECT COUNT(*) FROM outbox")[0] == 0
    assert row(db, running.id)["reason_code"] == "late-instance"
    assert queue.claim() is None


def outbox(db: Database) -> list[tuple[str, str, int]]:
    return [(Path(r["path"]).name, r["state"], r["attempts"]) for r in
            db.query("SELECT path, state, attempts FROM outbox ORDER BY id")]


def sent_by_the_pacs(db: Database, path: Path) -> None:
    """What the sender writes after the PACS's success for one row (set-up: no PACS in these tests)."""
    with db.tx() as con:
        con.execute("UPDATE outbox SET state='sent', attempts=attempts+1 WHERE path=?", (str(path),))


def test_early_outputs_are_handed_on_once_across_attempts(db: Database, queue: JobQueue,
                                                          tmp_path: Path) -> None:
    """The SEG reported while the job runs goes to the outbox at once; a failed attempt keeps what was
    sent, the next attempt is told of it and adds no second row; finish adds only what is new."""
    seg, sr = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    job = enqueue(db, queue)
    assert queue.early_output(job.id, seg) is False  # queued, not running: nothing is handed on
    assert queue.claim() is not None
    assert queue.outputs_in_outbox(job.id) == frozenset()
    assert queue.early_output(job.id, seg) is True
    assert outbox(db) == [("seg.dcm", "pending", 0)]
    sent_by_the_pacs(db, seg)
    assert queue.fail(job.id, "attempt 1: crashed", retry_after=0.0) is S.QUEUED
    again = queue.claim()
    assert again is not None and again.attempts == 2
    assert queue.outputs_in_outbox(job.id) == frozenset({seg})  # the pipeline keeps that file
    assert queue.early_output(job.id, seg) is True
    assert queue.finish(job.id, [seg, sr], "2 objects") is S.SENDING
    assert outbox(db) == [("seg.dcm", "sent", 1), ("sr.dcm", "pending", 0)]  # the SEG is not sent again


def test_finish_settles_a_job_whose_outputs_all_went_early(db: Database, queue: JobQueue,
                                                           tmp_path: Path) -> None:
    """No row left to send: done (or failed, when an early send gave up), not stuck in sending."""
    done, failed = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2")
    for _ in range(2):
        assert queue.claim() is not None
    for job, name in ((done, "a.dcm"), (failed, "b.dcm")):
        assert queue.early_output(job.id, tmp_path / name)
    sent_by_the_pacs(db, tmp_path / "a.dcm")
    with db.tx() as con:
        con.execute("UPDATE outbox SET state='failed', attempts=5, last_error='C-STORE status 0xA700'"
                    " WHERE path LIKE '%b.dcm'")
    assert queue.finish(done.id, [tmp_path / "a.dcm"], "1 object") is S.DONE
    assert queue.finish(failed.id, [tmp_path / "b.dcm"], "1 object") is S.FAILED
    r = row(db, failed.id)
    assert r["reason_code"] == "send-failed" and "0xA700" in r["reason"]


def test_early_outputs_of_a_superseded_or_failed_job_are_not_sent(db: Database, queue: JobQueue,
                                                                  tmp_path: Path) -> None:
    """A late instance or a failure for good: unsent early rows wait or go; what was sent stays
    recorded; a failed send gets its tries again with the next attempt."""
    superseded, failing = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2")
    for _ in range(2):
        assert queue.claim() is not None
    with db.tx() as con:
        jobs.supersede(con, superseded.id, jobs.create(con, "1.1", T0), T0)
    assert queue.early_output(superseded.id, tmp_path / "late.dcm") is False
    for name in ("sent.dcm", "unsent.dcm"):
        assert queue.early_output(failing.id, tmp_path / name)
    sent_by_the_pacs(db, tmp_path / "sent.dcm")
    assert queue.fail(failing.id, "attempt 1: timeout", retry_after=None) is S.FAILED
    assert outbox(db) == [("sent.dcm", "sent", 1)]
    # the operator's retry runs a job failed in its pipeline again (never a re-send of its early SEG)
    assert "re-queued for processing" in retry(db, failing.id)
    assert row(db, failing.id)["state"] == "queued"


def test_no_unsent_early_output_outlives_a_superseded_or_given_up_attempt(db: Database, queue: JobQueue,
                                                                            tmp_path: Path) -> None:
    """Superseded while running, or failed by the restart give-up: the attempt's sent rows stay recorded,
    its unsent ones go (the rule lives in jobs.move, so every path that ends a running attempt keeps it)."""
    late, crashed = enqueue(db, queue, "1.1"), enqueue(db, queue, "1.2")
    for _ in range(2):
        assert queue.claim() is not None
    for job in (late, crashed):
        for name in ("sent", "unsent"):
            assert queue.early_output(job.id, tmp_path / f"{job.id}-{name}.dcm")
        sent_by_the_pacs(db, tmp_path / f"{job.id}-sent.dcm")
    with db.tx() as con:
        jobs.supersede(con, late.id, jobs.create(con, "1.1", T0), T0)
        jobs.move(con, crashed.id, S.FAILED, T0, reason=Reason(ReasonCode.RESTART_GAVE_UP, "stopped 3 times"))
    assert outbox(db) == [(f"{late.id}-sent.dcm", "sent", 1), (f"{crashed.id}-sent.dcm", "sent", 1)]


def test_an_early_send_that_gave_up_is_tried_again_with_the_next_attempt(
        db: Database, queue: JobQueue, tmp_path: Path) -> None:
    job = enqueue(db, queue)
    assert queue.claim() is not None and queue.early_output(job.id, tmp_path / "seg.dcm")
    with db.tx() as con:  # the sender's last try failed while the pipeline still ran
        con.execute("UPDATE outbox SET state='failed', attempts=5, last_error='association lost'")
    assert queue.fail(job.id, "attempt 1: crashed", retry_after=0.0) is S.QUEUED
    assert queue.claim() is not None
    assert outbox(db) == [("seg.dcm", "pending", 0)]


def test_operator_retry_resends_a_job_whose_send_failed(db: Database, queue: JobQueue,
                                                        tmp_path: Path) -> None:
    job = enqueue(db, queue)
    assert queue.claim() is not None and queue.finish(job.id, [tmp_path / "a.dcm"], "1") is S.SENDING
    with db.tx() as con:
        jobs.move(con, job.id, S.FAILED, T0, reason=Reason(ReasonCode.SEND_FAILED, "PACS down"))
    assert "queued for sending again" in retry(db, job.id)
    assert row(db, job.id)["state"] == "sending"
