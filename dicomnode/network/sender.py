"""Send-back: C-STORE SCU of each job's outputs to the PACS, from a durable outbox, with backoff.

Why an outbox table: one row per output file, so a restart, a PACS outage or a ``dicomnode retry``
resumes exactly the sends still owed. Each row is retried with exponential backoff
(``send.initial_backoff_seconds`` doubling up to ``send.max_backoff_seconds``, ``send.attempts`` in
all); then the row and its job become ``failed`` with the reason. Output SOP Instance UIDs are the
pipeline's deterministic ones, so a re-send overwrites in the PACS instead of adding a copy.

Rows of a job still running are sent too: the pipeline hands its SEG on as soon as the file is
written (:meth:`~dicomnode.processing.queue.SQLiteJobQueue.early_output`), so that Orthanc stores
it while the SR and summary are built. Such a pass never moves the job (only ``sending`` jobs end
here; the worker's :meth:`~dicomnode.processing.queue.SQLiteJobQueue.finish` settles a job whose
rows were all sent early). Rows of a job that is not running or sending (superseded, re-queued,
failed in its pipeline) wait: a re-run keeps what was sent and builds nothing different under its UID
(:func:`dicomnode.processing.pipeline._check_same_content`).

Why several associations (``send.max_associations``, 2 by default): Orthanc takes over a second to
store a FRACTIONAL SEG of thousands of frames; the SR written meanwhile would wait behind it and be
sent only after the job ended. Each pass runs in its own thread on its own association; the rows it
sends are in flight (:class:`InFlight`) until its outcome is committed, and no other pass takes them.
A job's state is counted from its rows in the same transaction, so passes of one job may end in
either order: the one that leaves no row pending moves it (``done``, or ``failed`` when a row failed
for good), and a pass that leaves another's row pending keeps it ``sending``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.db import Database, now
from dicomnode.logs import event
from dicomnode.network.pacs_association import NoAssociation, associate, pacs_peer
from dicomnode.network.reactor_handshake import application_entity
from dicomnode.processing import jobs, outbox
from dicomnode.processing.jobs import JobState, Reason, ReasonCode
from dicomnode.processing.outbox import OutboxState
from dicomnode.processing.wakeups import OUTPUTS_READY

log = logging.getLogger(__name__)

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def _ae(settings: Settings) -> Any:
    ae = application_entity(settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.send.timeout_seconds
    ae.connection_timeout = min(settings.send.timeout_seconds, 10.0)
    return ae


def echo(settings: Settings) -> tuple[bool, str]:
    """C-ECHO the configured PACS; (ok, message)."""
    from pynetdicom.sop_class import Verification

    ae = _ae(settings)
    ae.add_requested_context(Verification)
    try:
        assoc = associate(ae, settings)
    except NoAssociation as exc:
        return False, str(exc)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.Status == 0:
        return True, f"C-ECHO {pacs_peer(settings)}: success"
    return False, f"C-ECHO {pacs_peer(settings)}: status {getattr(status, 'Status', 'none')}"


def _streamable(assoc: Any, sop_class: str, syntax: str) -> bool:
    """Whether the peer accepted ``sop_class`` in the file's own transfer syntax (no conversion)."""
    return any(c.abstract_syntax == sop_class and c.transfer_syntax[0] == syntax
               for c in assoc.accepted_contexts)


def _store(assoc: Any, path: Path, meta: Any) -> Any:
    """C-STORE one output: streamed from its file when the peer takes the file's transfer syntax.

    Why streamed: decoding a SEG of thousands of frames and encoding it again for the network takes
    seconds; pynetdicom sends a file's bytes as they are when ``STORE_SEND_CHUNKED_DATASET`` is on
    (only calls given a path, which in the node only this module makes). Otherwise the file is read
    and pynetdicom converts it to the accepted transfer syntax, as before.
    """
    import pydicom
    from pynetdicom import _config

    if _streamable(assoc, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)):
        _config.STORE_SEND_CHUNKED_DATASET = True
        return assoc.send_c_store(path)
    return assoc.send_c_store(pydicom.dcmread(path))


def send_files(settings: Settings, paths: list[Path]) -> dict[Path, str | None]:
    """C-STORE files over one association; maps each path to None (stored) or an error."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    results: dict[Path, str | None] = {}
    metas: dict[Path, Any] = {}
    for path in paths:
        try:  # the file meta is enough to choose a context; the body is streamed
            metas[path] = read_file_meta_info(path)
            _ = metas[path].MediaStorageSOPClassUID, metas[path].TransferSyntaxUID
        except Exception as exc:  # missing, unreadable or not DICOM (of several kinds): that row fails alone
            metas.pop(path, None)
            results[path] = f"cannot read output: {type(exc).__name__}: {exc}"
    if not metas:
        return results
    ae = _ae(settings)
    contexts: dict[str, set[str]] = defaultdict(set)
    for meta in metas.values():
        ts = UID(str(meta.TransferSyntaxUID))
        contexts[str(meta.MediaStorageSOPClassUID)].add(str(ts))
        if not ts.is_compressed:
            contexts[str(meta.MediaStorageSOPClassUID)].update(
                {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)})
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    try:
        assoc = associate(ae, settings)
    except NoAssociation as exc:
        results.update({p: str(exc) for p in metas})
        return results
    try:
        for path, meta in metas.items():
            if not assoc.is_established:
                results[path] = f"association with {pacs_peer(settings)} lost"
                continue
            try:
                status = _store(assoc, path, meta)
            except Exception as exc:
                results[path] = f"C-STORE failed: {type(exc).__name__}: {exc}"
                continue
            code = getattr(status, "Status", None)
            if code in SUCCESS_STATUSES:
                results[path] = None
            elif code is None:
                results[path] = f"no C-STORE response from {pacs_peer(settings)}"
            else:
                results[path] = f"C-STORE status 0x{int(code):04X} from {pacs_peer(settings)}"
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class InFlight:
    """The outbox rows being sent now and the passes sending them: the sender's one shared state.

    Why one owner: a pass must never take a row another pass is sending (the node would store it
    twice), and no more than ``send.max_associations`` passes (one association each) may run at once.
    ``lock`` is held from reading the due rows to taking them, and a pass lets its rows go only after
    its outcome is committed, so a row is either seen ``sent`` or seen in flight, never neither.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self._rows: dict[threading.Thread, frozenset[int]] = {}

    def __contains__(self, row_id: int) -> bool:
        return any(row_id in ids for ids in self._rows.values())

    def full(self) -> bool:
        return len(self._rows) >= self.limit

    def take(self, thread: threading.Thread, ids: frozenset[int]) -> None:
        """Under ``lock``: ``thread`` will send rows ``ids``."""
        self._rows[thread] = ids

    def release(self, thread: threading.Thread) -> None:
        with self.lock:
            self._rows.pop(thread, None)

    def passes(self) -> list[threading.Thread]:
        with self.lock:
            return list(self._rows)


class SendPass(threading.Thread):
    """One job's due rows over one association, in a thread of its own; ``sent`` once it has ended."""

    def __init__(self, send: Callable[[int, list[Any]], int], in_flight: InFlight, job_id: int,
                 rows: list[Any]) -> None:
        super().__init__(name=f"dicomnode-send-{job_id}", daemon=True)
        self._send, self._in_flight, self.job_id, self.rows = send, in_flight, job_id, rows
        self.sent = 0

    def run(self) -> None:
        try:
            self.sent = self._send(self.job_id, self.rows)
        except Exception:
            log.exception("send pass")
        finally:
            self._in_flight.release(self)  # after the outcome is committed (see InFlight)
            OUTPUTS_READY.set()  # an association is free: rows left waiting for one go now


class Sender:
    """Drains the outbox: due rows grouped by job, one association per job and pass, up to
    ``send.max_associations`` passes at once (a row handed on while another is being stored goes out
    at once on another association, instead of waiting behind it)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.in_flight = InFlight(settings.send.max_associations)

    def backoff(self, attempts: int) -> float:
        s = self.settings.send
        return min(s.initial_backoff_seconds * (2 ** max(0, attempts - 1)), s.max_backoff_seconds)

    def dispatch(self) -> list[SendPass]:
        """Start a pass for each job with due rows not in flight, while associations are free."""
        started: list[SendPass] = []
        with self.in_flight.lock:
            if self.in_flight.full():
                return started
            rows = self.db.query(
                "SELECT o.id, o.job_id, o.path, o.attempts FROM outbox o JOIN jobs j ON j.id = o.job_id"
                " WHERE o.state=? AND j.state IN (?, ?)"
                " AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)"
                " ORDER BY o.job_id, o.id",
                (OutboxState.PENDING.value, JobState.SENDING.value, JobState.RUNNING.value, now()),
            )
            by_job: dict[int, list[Any]] = defaultdict(list)
            for row in rows:
                if int(row["id"]) not in self.in_flight:
                    by_job[int(row["job_id"])].append(row)
            for job_id, job_rows in by_job.items():
                if self.in_flight.full():
                    break  # left due: the next dispatch, woken when a pass ends, takes them
                send_pass = SendPass(self._send_job, self.in_flight, job_id, job_rows)
                self.in_flight.take(send_pass, frozenset(int(r["id"]) for r in job_rows))
                started.append(send_pass)
        for send_pass in started:
            send_pass.start()
        return started

    def run_once(self) -> int:
        """One dispatch, waited for; returns how many files were stored in the PACS."""
        started = self.dispatch()
        for send_pass in started:
            send_pass.join()
        return sum(p.sent for p in started)

    def _send_job(self, job_id: int, rows: list[Any]) -> int:
        results = send_files(self.settings, [Path(r["path"]) for r in rows])
        t = now()
        sent = 0
        last_error = None
        with self.db.tx() as con:
            for row in rows:
                error = results.get(Path(row["path"]), "not sent")
                attempts = int(row["attempts"]) + 1
                if error is None:
                    sent += 1
                    outbox.mark_sent(con, int(row["id"]), job_id, str(row["path"]), attempts, t)
                    continue
                last_error = error
                if attempts >= self.settings.send.attempts:
                    outbox.mark_failed(con, int(row["id"]), attempts, error)
                else:
                    outbox.retry_later(con, int(row["id"]), attempts, error, t + self.backoff(attempts))
            counts = outbox.counts(con, job_id)
            reason: Reason | None = None
            if counts.get(OutboxState.PENDING):  # this pass's rows to retry, or another pass's in flight
                owed = con.execute(  # the reason is the job's: a pass of its other rows may have failed
                    "SELECT attempts, last_error FROM outbox WHERE job_id=? AND state=?"
                    " AND last_error IS NOT NULL ORDER BY attempts DESC, id DESC LIMIT 1",
                    (job_id, OutboxState.PENDING.value),
                ).fetchone()
                if owed is not None:
                    reason = Reason(ReasonCode.SEND_RETRYING,
                                    f"send attempt {owed['attempts']} failed: {owed['last_error']}; "
                                    f"retrying in {self.backoff(int(owed['attempts'])):g} s")
                state = JobState.SENDING
            elif counts.get(OutboxState.FAILED):
                error = con.execute(
                    "SELECT last_error, attempts FROM outbox WHERE job_id=? AND state=?"
                    " ORDER BY id LIMIT 1",
                    (job_id, OutboxState.FAILED.value),
                ).fetchone()
                peer = pacs_peer(self.settings)
                reason = Reason(ReasonCode.SEND_FAILED, f"send to {peer} failed after {error['attempts']} "
                                f"attempts: {error['last_error']}")
                state = JobState.FAILED
            else:
                state = JobState.DONE
            if jobs.move(con, job_id, state, t, reason=reason, expect={JobState.SENDING}) is None:
                state = jobs.state_of(con, job_id) or state  # changed meanwhile (an operator retry)
        event(
            log,
            "send pass",
            logging.INFO if state is not JobState.FAILED else logging.ERROR,
            job=job_id,
            sent=sent,
            of=len(rows),
            state=state,
            error=last_error or "",
        )
        return sent

    def run(self, stop: threading.Event) -> None:
        """Dispatch until ``stop``; then wait for the passes still sending (each ends within its
        association's timeouts), so that none writes to the index after the node closed it."""
        interval = max(0.05, min(0.5, self.settings.send.initial_backoff_seconds / 2))
        try:
            while not stop.is_set():
                OUTPUTS_READY.clear()
                try:
                    self.dispatch()
                except Exception:
                    log.exception("sender loop")
                # the next poll, or at once when the worker hands outputs on or a pass frees an association
                OUTPUTS_READY.wait(interval)
        finally:
            for send_pass in self.in_flight.passes():
                send_pass.join()


def retry(db: Database, job_id: int) -> str:
    """Operator retry: re-send a job's outputs (failed or done), or re-queue a job whose pipeline failed.

    A re-queued job is claimed by the serving node's queue (the index is its queue), or at its next start.
    """
    t = now()
    with db.tx() as con:
        state = jobs.state_of(con, job_id)
        if state is None:
            raise LookupError(f"no job {job_id}")
        row = con.execute("SELECT (SELECT COUNT(*) FROM outbox WHERE job_id=?), reason_code FROM jobs"
                          " WHERE id=?", (job_id, job_id)).fetchone()
        n_out, code = int(row[0]), row[1]
        # a job failed in its pipeline is run again, even when it had sent its SEG early
        resend = state in (JobState.DONE, JobState.SENDING) or (
            state is JobState.FAILED and code == ReasonCode.SEND_FAILED.value)
        if resend and n_out:
            outbox.resend(con, job_id, t)
            jobs.move(con, job_id, JobState.SENDING, t,
                      reason=Reason(ReasonCode.RESEND_REQUESTED, "re-send requested"))
            return f"job {job_id}: {n_out} output(s) queued for sending again"
        if state is JobState.FAILED:
            jobs.move(con, job_id, JobState.QUEUED, t, reset_attempts=True,
                      reason=Reason(ReasonCode.RETRY_REQUESTED, "retry requested"))
            return f"job {job_id}: re-queued for processing"
    raise ValueError(f"job {job_id} is {state}: only failed jobs, or jobs with outputs, can be retried")
