"""The sender's concurrent associations (``send.max_associations``) against a PACS slow to store.

The PACS is the harness's capturing SCP (a real pynetdicom storage SCP on 127.0.0.1) with a request
hook that holds a C-STORE until the test lets it go, without holding the other associations (storescp
cannot be held); the node's side is the real sender, SQLite index and job queue.
Waits are bounds for a failure to show, never timings asserted.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from series_factory import write_ct_series

from dicomnode.config import ConfigError, SendSettings, Settings, load_settings
from dicomnode.db import Database, now
from dicomnode.harness.capture import CapturingSCP
from dicomnode.harness.net import free_port, wait_for
from dicomnode.network.sender import Sender
from dicomnode.processing import jobs
from dicomnode.processing.jobs import JobState
from dicomnode.processing.queue import SQLiteJobQueue
from dicomnode.processing.wakeups import OUTPUTS_READY

BOUND = 30.0  # seconds a wait may take before the test fails (never reached when the sender is right)
REFUSED = 0xA700  # out of resources: a failure status a PACS answers


@dataclass(frozen=True)
class Receipt:
    """One step of a C-STORE at the PACS: ``what`` is "arrived" or "stored"; ``assoc`` its association."""

    what: str
    sop_uid: str
    assoc: Any


class SlowPACS:
    """Storage SCP that answers a held SOP Instance UID only once the test releases it."""

    def __init__(self) -> None:
        self.ae_title, self.port = "SLOWPACS", free_port()
        self.receipts: list[Receipt] = []
        self.held: set[str] = set()
        self.status: dict[str, int] = {}  # answer other than success, by SOP Instance UID
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], threading.Event] = defaultdict(threading.Event)
        self._server: Any = None

    def event(self, what: str, sop_uid: str) -> threading.Event:
        """("arrived" | "stored" | "release", uid): set when that happened or was allowed."""
        with self._lock:
            return self._events[(what, sop_uid)]

    def _note(self, what: str, uid: str, assoc: Any) -> None:
        with self._lock:
            self.receipts.append(Receipt(what, uid, assoc))
        self.event(what, uid).set()

    def start(self) -> SlowPACS:
        def on_store(ev: Any) -> int:
            uid = str(ev.request.AffectedSOPInstanceUID)
            self._note("arrived", uid, ev.assoc)
            if uid in self.held and not self.event("release", uid).wait(BOUND):
                return REFUSED  # never released: the test has failed already
            self._note("stored", uid, ev.assoc)
            return self.status.get(uid, 0x0000)

        self._server = CapturingSCP(self.ae_title, self.port, keep=False, on_request=on_store).start()
        return self

    def release(self, uid: str) -> None:
        self.event("release", uid).set()

    def stop(self) -> None:
        for uid in list(self.held):
            self.release(uid)
        self._server.stop()

    def steps(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.what, r.sop_uid) for r in self.receipts]

    def association_of(self, uid: str) -> Any:
        with self._lock:
            return next(r.assoc for r in self.receipts if r.sop_uid == uid)

    def stored(self, uid: str) -> int:
        """How many times ``uid`` was stored (each output must be exactly once)."""
        return self.steps().count(("stored", uid))


@pytest.fixture
def pacs() -> Iterator[SlowPACS]:
    scp = SlowPACS().start()
    yield scp
    scp.stop()


@dataclass
class Bench:
    """A node's send side without the network listener: index, queue, one running job, its outputs."""

    sender: Sender
    db: Database
    queue: SQLiteJobQueue
    job_id: int
    outputs: dict[str, Path]  # "SEG", "SR", "summary": stand-in DICOM files
    uids: dict[str, str]

    def hand_on(self, name: str) -> None:
        """What the worker does with an output written early: an outbox row, then the wake-up."""
        assert self.queue.early_output(self.job_id, self.outputs[name])
        OUTPUTS_READY.set()

    def state(self) -> str:
        return str(self.db.one("SELECT state FROM jobs WHERE id=?", (self.job_id,))[0])

    def reason(self) -> str | None:
        return self.db.one("SELECT reason FROM jobs WHERE id=?", (self.job_id,))[0]

    def moves_to(self, state: str) -> int:
        """How many times the job's state was written as ``state`` (a trigger of the test's index)."""
        return int(self.db.one("SELECT COUNT(*) FROM moves WHERE job_id=? AND state=?",
                               (self.job_id, state))[0])

    def rows(self) -> list[tuple[str, int]]:
        rows = self.db.query("SELECT state, attempts FROM outbox WHERE job_id=? ORDER BY id", (self.job_id,))
        return [(r["state"], r["attempts"]) for r in rows]


@pytest.fixture
def bench_factory(tmp_path: Path, pacs: SlowPACS) -> Iterator[Any]:
    dbs: list[Database] = []

    def make(max_associations: int, attempts: int = 5) -> Bench:
        settings = Settings(storage_dir=tmp_path / f"var-{len(dbs)}", host="127.0.0.1",
                            min_free_disk_mb=0, max_disk_used_pct=100,
                            pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
                            send={"max_associations": max_associations, "attempts": attempts,
                                  "initial_backoff_seconds": 60, "timeout_seconds": BOUND + 10})
        db = Database(settings.db_path)
        dbs.append(db)
        with db.tx() as con:  # every write of a job's state, as SQLite itself sees them
            con.execute("CREATE TABLE moves (job_id INTEGER, state TEXT)")
            con.execute("CREATE TRIGGER job_moves AFTER UPDATE OF state ON jobs"
                        " BEGIN INSERT INTO moves VALUES (NEW.id, NEW.state); END")
            t = now()
            job_id = jobs.create(con, f"1.2.826.0.1.3680043.8.498.{len(dbs)}", t)
            jobs.move(con, job_id, JobState.COMPLETE, t)
            jobs.move(con, job_id, JobState.QUEUED, t)
        queue = SQLiteJobQueue(db)
        job = queue.claim()
        assert job is not None and job.id == job_id
        series = write_ct_series(tmp_path / f"outputs-{len(dbs)}", name=f"out{len(dbs)}", n=3, size=8)
        names = ("SEG", "SR", "summary")
        return Bench(Sender(settings, db), db, queue, job_id, dict(zip(names, series.files, strict=True)),
                     dict(zip(names, series.sop_uids, strict=True)))

    yield make
    for db in dbs:
        db.close()


def test_an_output_handed_on_during_a_slow_store_is_stored_beside_it(
        bench_factory: Any, pacs: SlowPACS) -> None:
    """The node's loop, woken as the worker wakes it: the SR goes out on a second association and is
    in the PACS while the PACS is still storing the SEG; then the job ends done, each output once."""
    b = bench_factory(max_associations=2)
    seg, sr, summary = b.uids["SEG"], b.uids["SR"], b.uids["summary"]
    pacs.held.add(seg)
    stop = threading.Event()
    loop = threading.Thread(target=b.sender.run, args=(stop,), daemon=True)
    loop.start()
    try:
        b.hand_on("SEG")
        assert pacs.event("arrived", seg).wait(BOUND)
        b.hand_on("SR")  # while the PACS holds the SEG
        assert pacs.event("stored", sr).wait(BOUND), pacs.steps()
        assert not pacs.event("stored", seg).is_set()  # the SEG's store is still going on
        assert pacs.association_of(sr) is not pacs.association_of(seg)
        assert b.state() == "running"  # a pass of a running job never moves it
        pacs.release(seg)
        assert pacs.event("stored", seg).wait(BOUND)
        assert b.queue.finish(b.job_id, list(b.outputs.values()), "ok") in (JobState.SENDING, JobState.DONE)
        OUTPUTS_READY.set()
        wait_for(lambda: b.state() == "done", BOUND, what="the job done")
    finally:
        pacs.release(seg)
        stop.set()
        loop.join(BOUND)
    assert not loop.is_alive()
    assert pacs.steps()[:4] == [("arrived", seg), ("arrived", sr), ("stored", sr), ("stored", seg)]
    assert [pacs.stored(uid) for uid in (seg, sr, summary)] == [1, 1, 1]
    assert b.rows() == [("sent", 1)] * 3
    assert b.moves_to("done") == 1


@pytest.mark.parametrize("max_associations", [1, 2])
def test_max_associations_bounds_the_passes_at_once(
        bench_factory: Any, pacs: SlowPACS, max_associations: int) -> None:
    """1 is the old serial sender: an output handed on during a send waits for that send to end (and
    then goes on its own association, as the next pass did before); 2 sends it at once."""
    b = bench_factory(max_associations=max_associations)
    seg, sr = b.uids["SEG"], b.uids["SR"]
    pacs.held.add(seg)
    b.hand_on("SEG")
    first = b.sender.dispatch()
    assert [p.job_id for p in first] == [b.job_id]
    assert pacs.event("arrived", seg).wait(BOUND)
    b.hand_on("SR")
    second = b.sender.dispatch()
    if max_associations == 1:
        assert second == []  # no free association: the SR stays due
        assert b.rows() == [("pending", 0), ("pending", 0)]
        pacs.release(seg)
        first[0].join(BOUND)
        second = b.sender.dispatch()
        assert len(second) == 1 and pacs.event("stored", seg).is_set()
    else:
        assert len(second) == 1
        assert pacs.event("stored", sr).wait(BOUND) and not pacs.event("stored", seg).is_set()
        pacs.release(seg)
    for send_pass in first + second:
        send_pass.join(BOUND)
    order = [("arrived", seg), ("stored", seg), ("arrived", sr), ("stored", sr)] if max_associations == 1 \
        else [("arrived", seg), ("arrived", sr), ("stored", sr), ("stored", seg)]
    assert pacs.steps() == order
    assert pacs.association_of(sr) is not pacs.association_of(seg)
    assert b.rows() == [("sent", 1), ("sent", 1)]
    assert b.sender.dispatch() == []  # nothing due, nothing sent again


@pytest.mark.parametrize("sr_outcome", ["stored", "refused once", "refused for good"])
@pytest.mark.parametrize("first_done", ["SEG", "SR"])
def test_two_passes_of_one_job_end_in_either_order(
        bench_factory: Any, pacs: SlowPACS, first_done: str, sr_outcome: str) -> None:
    """SEG and SR in flight on two associations when the job's pipeline finishes: the job is settled by
    the pass that leaves nothing pending, whichever ends last. A retry owed stays in the job's reason."""
    b = bench_factory(max_associations=3, attempts=1 if sr_outcome == "refused for good" else 2)
    seg, sr = b.uids["SEG"], b.uids["SR"]
    pacs.held.update({seg, sr})
    if sr_outcome != "stored":
        pacs.status[sr] = REFUSED
    b.hand_on("SEG")
    passes = b.sender.dispatch()
    assert pacs.event("arrived", seg).wait(BOUND)
    b.hand_on("SR")
    passes += b.sender.dispatch()
    assert pacs.event("arrived", sr).wait(BOUND)
    assert b.queue.finish(b.job_id, [b.outputs["SEG"], b.outputs["SR"]], "ok") is JobState.SENDING
    assert b.sender.dispatch() == []  # a free association, but both rows are in flight
    by_name = {"SEG": (seg, passes[0]), "SR": (sr, passes[1])}
    last_done = "SR" if first_done == "SEG" else "SEG"
    for name in (first_done, last_done):
        uid, send_pass = by_name[name]
        pacs.release(uid)
        send_pass.join(BOUND)
        assert not send_pass.is_alive()
        if name == first_done:
            assert b.state() == "sending"  # the other row is still in flight
    expected = {"stored": "done", "refused once": "sending", "refused for good": "failed"}[sr_outcome]
    assert b.state() == expected
    assert b.moves_to("done") == (1 if expected == "done" else 0)
    assert b.moves_to("failed") == (1 if expected == "failed" else 0)
    assert (pacs.stored(seg), pacs.stored(sr)) == (1, 1)  # each sent once (a refusal is an answer too)
    if sr_outcome == "refused once":  # the SEG's later success does not hide the SR's owed retry
        assert b.reason() == ("send attempt 1 failed: C-STORE status 0xA700 from "
                              f"SLOWPACS@127.0.0.1:{pacs.port}; retrying in 60 s")
        assert b.rows() == [("sent", 1), ("pending", 1)]
    if sr_outcome == "refused for good":
        assert b.reason() == (f"send to SLOWPACS@127.0.0.1:{pacs.port} failed after 1 attempts: "
                              f"C-STORE status 0xA700 from SLOWPACS@127.0.0.1:{pacs.port}")


def test_stop_waits_for_the_pass_in_flight(bench_factory: Any, pacs: SlowPACS) -> None:
    """The node joins the sender's loop on stop; the loop returns only once its passes have recorded
    their outcome, so none writes to an index the node has closed."""
    b = bench_factory(max_associations=2)
    seg = b.uids["SEG"]
    pacs.held.add(seg)
    stop = threading.Event()
    loop = threading.Thread(target=b.sender.run, args=(stop,), daemon=True)
    loop.start()
    b.hand_on("SEG")
    assert pacs.event("arrived", seg).wait(BOUND)
    stop.set()
    loop.join(2.0)  # far longer than the loop's poll (0.5 s at most): it would have returned by now
    alive_while_held = loop.is_alive()
    pacs.release(seg)
    loop.join(BOUND)
    assert alive_while_held and not loop.is_alive()
    assert b.rows() == [("sent", 1)]


def test_max_associations_below_one_or_misspelled_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    assert SendSettings().max_associations == 2
    for value in (0, -1):
        cfg.write_text(f"[send]\nmax_associations = {value}\n")
        with pytest.raises(ConfigError, match=r"send\.max_associations: Input should be greater than or"
                                              r" equal to 1"):
            load_settings(cfg)
    cfg.write_text("[send]\nmax_association = 4\n")
    with pytest.raises(ConfigError, match=r"send\.max_association: unknown key \(allowed here: .*"
                                          r"max_associations"):
        load_settings(cfg)
    cfg.write_text("[send]\nmax_associations = 1\n")
    assert load_settings(cfg).send.max_associations == 1


def test_echo_says_why_there_is_no_association(tmp_path) -> None:  # noqa: ANN001
    """`dicomnode echo` said only "no association with ORTHANC@host:port": a rejection (the AE titles),
    no connection, and TLS on against a plain port looked alike."""
    from dicomnode.config import Settings
    from dicomnode.harness.capture import CapturingSCP
    from dicomnode.network.sender import echo

    pacs = CapturingSCP("REALPACS", require_called_aet=True).start()
    try:
        ok, why = echo(Settings(storage_dir=tmp_path, pacs={"ae_title": "WRONG", "host": "127.0.0.1",
                                                            "port": pacs.port}))
        assert not ok and "rejected by the PACS (Called AE title not recognised)" in why
        assert echo(Settings(storage_dir=tmp_path, pacs={"ae_title": "REALPACS", "host": "127.0.0.1",
                                                         "port": pacs.port}))[0]
    finally:
        pacs.stop()
    ok, why = echo(Settings(storage_dir=tmp_path, pacs={"host": "127.0.0.1", "port": pacs.port}))
    assert not ok and "no connection (host or port wrong, the PACS down, or a firewall)" in why


class _NotAPacs:
    """A TCP server on 127.0.0.1 that takes every connection and then ``closes`` it, ``hangs`` (never
    answers) or ``aborts`` (an A-ABORT PDU for the association request)."""

    def __init__(self, mode: str) -> None:
        import socket

        self.mode, self.held = mode, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.mode == "closes":
                conn.close()
            elif self.mode == "aborts":
                conn.recv(65536)
                conn.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-ABORT-RQ, service-user

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize(("mode", "said"), [
    ("closes", "the PACS closed the connection without an answer"),
    ("hangs", "connected, but the PACS did not answer the association request within 1 s"),
    ("aborts", "the PACS aborted the association request: does it accept the node (THIGHNODE)"),
])
def test_a_pacs_that_connects_but_gives_no_association_is_told_apart(tmp_path, mode: str, said: str) -> None:  # noqa: ANN001
    """A connection that opens and then closes, hangs or is aborted said "no connection, or dropped
    (host or port wrong, ...)" as a closed port does, and the prior retrieval said only "no
    association": the administrator looked at the firewall for a PACS that was up. Each case now
    has its own reason, in the echo, the send and the retrieval alike."""
    from dicomnode.network.pacs_association import NoAssociation
    from dicomnode.network.retrieve import find_studies
    from dicomnode.network.sender import echo, send_files

    peer = _NotAPacs(mode)
    try:
        settings = Settings(storage_dir=tmp_path, ae_title="THIGHNODE", send={"timeout_seconds": 1.0},
                            pacs={"host": "127.0.0.1", "port": peer.port})
        ok, why = echo(settings)
        assert not ok and said in why, why
        out = write_ct_series(tmp_path / "ct", n=1, size=8).files[0]
        assert said in (send_files(settings, [out])[out] or ""), mode
        if mode != "hangs":  # the retrieval's own timeout is longer; its reason is the same function's
            with pytest.raises(NoAssociation, match=said.split(":")[0]):
                find_studies(settings, "P1")
    finally:
        peer.close()
