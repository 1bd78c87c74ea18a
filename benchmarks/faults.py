"""Fault harness: kill -9, malformed inputs, stalls, disk low, PACS faults, partial series, UID collisions.

Why: "crash safe" and "hardened" are claims about what happens when things go wrong at moments
nobody chose; this drives a real ``dicomnode serve`` (kill, fuzz, stall: worker off, receive and
index only) through such moments and counts. Seven parts, each printing one line of figures
(pacs: one per mode):

- **kill**: a pynetdicom SCU sends a series; the node is killed with SIGKILL at a random moment of
  the receive, then restarted. Every instance whose C-STORE got status 0x0000 must be on disk,
  readable with its SOP Instance UID and indexed (lost = acknowledged but not so); no temporary file
  may remain, and no SOP Instance UID may be stored twice.
- **fuzz**: seeded random mutations (bit flips, truncation, insertion, forged length fields) of a
  valid CT data set, sent as C-STOREs byte for byte, and of a valid A-ASSOCIATE-RQ, sent over raw
  sockets. The node must not exit (crashes), its resident memory must not grow by 100 MB or more,
  and a C-ECHO must work at the end. (Hypothesis is not a dependency; the mutator is seeded, so a
  run is reproducible with ``--seed``.)
- **stall**: sockets that send half an association request and go silent are held open (re-opened
  as the node closes them; 4 × ``max_associations`` of them, from the callers' own address 127.0.0.1,
  the worst case for the node's per-address bound on pending connections) while real C-ECHOs are
  attempted every 0.25 s, each with one association try: echoes served, refused and the longest time
  without one. CI asserts at least 90 % served.

- **disk**: a node started below its disk threshold (``min_free_disk_mb`` above any disk's free space):
  every attempted store refused (transient association reject or 0xA700), no file written, the node
  alive; restarted on the same folder with a normal threshold, the same stores succeed.
- **pacs**: a node (test pipeline) whose PACS is down (closed port), refusing (A-ASSOCIATE-RJ) and
  hanging (accepts TCP, never answers): each job ends failed with its reason after the configured send
  attempts; then a working PACS (dcmtk storescp, a file per receipt) on the same port and
  ``dicomnode retry JOB``: each result arrives exactly once.
- **interrupted**: 60 % of a series whose ImagesInAcquisition announces all of it: held, then rejected
  "incomplete", never measured; the rest arrives: measured once, on every slice, one result sent.
- **collision**: the scenario of tests/test_hardening_data.py: another patient's series claims one of
  a series' SOP Instance UIDs, and a changed copy of one comes in the same series: both refused
  "uid-collision"; the first series re-sent byte for byte: accepted, no new job; the UID's index row
  stays with the first series over two restarts.

``--parts`` picks parts (comma-separated; default all).
Short form (CI, ``tests/test_faults.py``): ``--kill-trials 3 --fuzz-inputs 100 --stall-seconds 5
--disk-stores 3``.
Long form: ``nice -n 19 .venv/bin/python benchmarks/faults.py --kill-trials 50 --fuzz-inputs 1000
--stall-seconds 30``. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dicomnode.harness import node as _node
from dicomnode.harness import scu
from dicomnode.harness.dcmtk import StoreSCP
from dicomnode.harness.net import free_port, wait_for
from dicomnode.harness.series import CT_IMAGE, dataset_bytes, part10, rewrite, write_ct_series

REPO = Path(__file__).resolve().parents[1]


def NodeProcess(workdir: Path, **overrides: object) -> _node.NodeProcess:  # noqa: N802 - stands for the class
    """The harness node running the tests' stand-in pipeline (``tests/node_pipeline.py``, via PYTHONPATH)."""
    return _node.NodeProcess(workdir, pipeline="node_pipeline:run", pythonpath=(REPO / "tests", REPO),
                             **overrides)  # type: ignore[arg-type]

MAX_ASSOCIATIONS = 4
NODE_SETTINGS = {
    "worker": {"enabled": False},
    "max_associations": MAX_ASSOCIATIONS,
    "acse_timeout_seconds": 1.0,
    "network_timeout_seconds": 2.0,
    "log_level": "WARNING",
}


@dataclass(frozen=True)
class KillReport:
    trials: int
    acknowledged: int  # instances answered 0x0000 before the kill
    lost: int  # acknowledged, yet not on disk, readable and indexed after the restart
    temp_files_left: int  # partial files still there after the restart's recovery
    duplicate_instances: int  # SOP Instance UIDs stored under more than one file


@dataclass(frozen=True)
class FuzzReport:
    inputs: int
    dicom_inputs: int
    pdu_inputs: int
    accepted: int  # mutated instances answered 0x0000 (still valid DICOM after the mutation)
    refused: int  # answered with a failure status, or the association aborted
    crashes: int  # times the node process was found dead (it is restarted to go on)
    rss_start_mb: float
    rss_end_mb: float
    rss_peak_mb: float  # VmHWM: the highest resident size of the node's process
    echo_after: bool


@dataclass(frozen=True)
class StallReport:
    seconds: float
    stalled_sockets: int  # held open at a time (re-opened as the node closes them)
    sockets_opened: int
    echoes: int
    echoes_served: int
    longest_gap_s: float  # longest time between two served echoes (or from the start)


def proc_status(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def echo(port: int, patience: float = 0.0) -> bool:
    """One C-ECHO; retried for ``patience`` s while the association is refused (slots still ending)."""
    return scu.echo("127.0.0.1", port, "THIGHNODE", "FAULTS", patience=patience)


# -- kill -9 ---------------------------------------------------------------------------------------------
def send_noting_acks(port: int, files: list[Path], uids: list[str], acked: list[str]) -> None:
    """C-STORE ``files`` over one association, appending each UID answered 0x0000 to ``acked``.

    Short timeouts: once the node is killed the SCU only notices at its DIMSE timeout."""
    def note(i: int, status: int | None) -> None:
        if status == 0:
            acked.append(uids[i])

    try:
        scu.pynetdicom_send(port, files, aet="KILLSCU", timeout=1.5, on_status=note)
    except ConnectionError:
        pass  # killed before the association: nothing acknowledged


def kill_trials(workdir: Path, trials: int, rng: random.Random, slices: int = 40) -> KillReport:
    """``trials`` series, each cut by a kill -9 at a random moment of its receive; one node folder."""
    import pydicom

    node = NodeProcess(workdir / "kill-node", **NODE_SETTINGS)
    node.start()
    acknowledged = lost = temp_left = 0
    try:
        for trial in range(trials):
            s = write_ct_series(workdir / f"kill-{trial}", name=f"kill-{trial}", n=slices, size=64,
                                random_pixels=True)
            acked: list[str] = []
            killer = threading.Timer(rng.uniform(0.05, 0.5), node.kill)
            killer.start()
            try:
                send_noting_acks(node.port, s.files, s.sop_uids, acked)
            except Exception:  # noqa: BLE001 - the association dies with the node
                pass
            killer.join()
            node.start()  # recovery runs before the node listens
            temp_left += len(list(node.storage_dir.rglob("*.tmp")))
            rows = node.sql("SELECT sop_uid, path FROM instances WHERE series_uid=?", (s.series_uid,))
            indexed = {r["sop_uid"]: Path(r["path"]) for r in rows}
            for uid in acked:
                path = indexed.get(uid)
                try:
                    ok = path is not None and pydicom.dcmread(path).SOPInstanceUID == uid
                except Exception:  # noqa: BLE001 - unreadable counts as lost
                    ok = False
                lost += not ok
            acknowledged += len(acked)
        files = [p.stem for p in (node.storage_dir / "incoming").rglob("*.dcm")]
        duplicates = len(files) - len(set(files))
    finally:
        node.stop()
    return KillReport(trials, acknowledged, lost, temp_left, duplicates)


# -- malformed inputs -----------------------------------------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip bytes, cut, insert, forge a 16/32-bit length, repeat a chunk."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        at = rng.randrange(len(buf))
        kind = rng.randrange(5)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del buf[at:]
        elif kind == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 3:
            value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, rng.getrandbits(32)])
            size = rng.choice([2, 4])
            buf[at:at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        else:
            end = min(len(buf), at + rng.randint(1, 256))
            buf[at:at] = buf[at:end] * rng.randint(1, 16)
    return bytes(buf)


def associate_rq(called: str = "THIGHNODE", calling: str = "FUZZ") -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification (the seed the PDU mutations start from)."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def send_bytes(port: int, data: bytes) -> None:
    """Send bytes on a fresh connection, read briefly what the node answers, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendall(data)
            sock.recv(65536)
        except OSError:
            pass


def store_raw(port: int, path: Path, patience: float = 3.0) -> int | None:
    """C-STORE the file's data set byte for byte; its status (None: no response, association gone).

    A refused association is retried for ``patience`` s: the slots of the inputs just before may still
    be ending (pynetdicom lingers after a release or abort), and that is not what is measured here."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return scu.send_verbatim(port, [path], aet="FUZZ", timeout=10.0)[0][0]
        except ConnectionError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        except Exception:  # noqa: BLE001 - an aborted association: a refusal, not a crash
            return None


def fuzz(workdir: Path, inputs: int, rng: random.Random) -> FuzzReport:
    """``inputs`` mutated inputs, alternating C-STORE data sets and raw association PDUs."""
    import pydicom

    node = NodeProcess(workdir / "fuzz-node", **NODE_SETTINGS)
    node.start()
    seed = write_ct_series(workdir / "fuzz-seed", name="fuzz-seed", n=1, size=16)
    base = dataset_bytes(seed.files[0])
    sop_class = str(pydicom.dcmread(seed.files[0], stop_before_pixels=True).SOPClassUID)
    pdu = associate_rq()
    accepted = refused = crashes = dicom_inputs = 0
    try:
        store_raw(node.port, seed.files[0])  # warm-up: imports and first-use allocations
        assert node.proc is not None
        rss_start = proc_status(node.proc.pid, "VmRSS")
        peak = rss_start
        for i in range(inputs):
            if i % 2 == 0:
                dicom_inputs += 1
                path = part10(workdir / "fuzz-input.dcm", mutate(base, rng), sop_class=sop_class,
                              sop_uid=f"2.25.{rng.getrandbits(100)}")
                status = store_raw(node.port, path)
                accepted += status == 0
                refused += status != 0
            else:
                noise = rng.random() < 0.1
                send_bytes(node.port, rng.randbytes(rng.randint(1, 64)) if noise else mutate(pdu, rng))
            if node.proc.poll() is not None:
                crashes += 1
                node.start()
            peak = max(peak, proc_status(node.proc.pid, "VmHWM"))
        time.sleep(0.5)
        rss_end = proc_status(node.proc.pid, "VmRSS")
        peak = max(peak, proc_status(node.proc.pid, "VmHWM"))
        echo_after = echo(node.port, patience=3.0)
    finally:
        node.stop()
    return FuzzReport(inputs, dicom_inputs, inputs - dicom_inputs, accepted, refused, crashes,
                      round(rss_start, 1), round(rss_end, 1), round(peak, 1), echo_after)


# -- stalled sockets ------------------------------------------------------------------------------------
def stall(workdir: Path, seconds: float, sockets: int = 4 * MAX_ASSOCIATIONS) -> StallReport:
    """Hold ``sockets`` half-sent association requests open for ``seconds`` while echoing every 0.25 s."""
    node = NodeProcess(workdir / "stall-node", **NODE_SETTINGS)
    node.start()
    half = associate_rq()[:40]
    opened = 0
    held: list[socket.socket] = []
    stop = threading.Event()

    def attacker() -> None:
        nonlocal opened
        while not stop.is_set():
            for sock in list(held):
                sock.setblocking(False)
                try:
                    closed = sock.recv(4096) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    held.remove(sock)
                    sock.close()
            while len(held) < sockets:
                sock = socket.create_connection(("127.0.0.1", node.port), timeout=2)
                sock.sendall(half)
                held.append(sock)
                opened += 1
            stop.wait(0.05)

    thread = threading.Thread(target=attacker, daemon=True)
    echoes = served = 0
    gap = 0.0
    try:
        thread.start()
        start = last = time.monotonic()
        while time.monotonic() - start < seconds:
            echoes += 1
            if echo(node.port):
                served += 1
                now = time.monotonic()
                gap, last = max(gap, now - last), now
            time.sleep(0.25)
        gap = max(gap, time.monotonic() - last)
    finally:
        stop.set()
        thread.join(5)
        for sock in held:
            sock.close()
        node.stop()
    return StallReport(seconds, sockets, opened, echoes, served, round(gap, 2))


# -- disk below its threshold ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskReport:
    stores: int  # association + C-STORE attempts against a node below min_free_disk_mb
    refused: int  # rejected transiently (congestion) or answered 0xA700
    files_written: int  # instance files in incoming/ afterwards (must be 0)
    alive: bool  # the node process still running after the refusals
    stored_after_restart: int  # instances accepted (0x0000) once restarted with a normal threshold


def disk(workdir: Path, stores: int) -> DiskReport:
    """A node whose ``min_free_disk_mb`` is above any disk's free space; ``stores`` attempted stores."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    s = write_ct_series(workdir / "disk-series", name="disk", n=stores, size=16)
    low = NodeProcess(workdir / "disk-node", **{**NODE_SETTINGS, "min_free_disk_mb": 1e12})
    low.start()
    refused = 0
    try:
        for path in s.files:
            ae = AE(ae_title="DISKSCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15  # a loaded machine answers late
            ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", low.port, ae_title="THIGHNODE")
            if assoc.is_rejected:
                rj = assoc.acceptor.primitive
                refused += (int(rj.result), int(rj.result_source), int(rj.diagnostic)) == (2, 3, 1)
            elif assoc.is_established:
                status = assoc.send_c_store(path)
                refused += bool(status) and int(status.Status) == 0xA700
                assoc.release()
        files = len(list((low.storage_dir / "incoming").rglob("*.dcm"))) if (
            low.storage_dir / "incoming").exists() else 0
        alive = low.proc is not None and low.proc.poll() is None
    finally:
        low.stop()
    normal = NodeProcess(workdir / "disk-node", **NODE_SETTINGS)  # same folder, normal threshold
    normal.start()
    try:
        stored = sum(st == 0 for st in scu.pynetdicom_send(normal.port, s.files, aet="DISKSCU"))
    finally:
        normal.stop()
    return DiskReport(stores, refused, files, alive, stored)


# -- PACS down, refusing, hanging -----------------------------------------------------------------------
@dataclass(frozen=True)
class PacsReport:
    mode: str  # down: closed port; refusing: A-ASSOCIATE-RJ; hanging: accepts TCP, never answers
    attempts: int  # send attempts the job's reason counts
    connections: int  # TCP connections the fake PACS saw (down: none can be counted)
    final_state: str
    seconds: float  # from the job queued to its final state
    received_after_retry: int  # objects the working PACS (storescp +uf: a file per receipt) holds (1)
    duplicates: int  # objects received more than once
    reason: str  # the failed job's reason (spaces as _)


class FakePacs:
    """A TCP listener on ``port``: ``refusing`` answers every A-ASSOCIATE-RQ with a permanent
    A-ASSOCIATE-RJ (called AE title not recognised); ``hanging`` reads and never answers."""

    def __init__(self, port: int, mode: str) -> None:
        self.mode, self.connections = mode, 0
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.stop_event = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            if self.mode == "refusing":
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 1, 1, 7))
                    time.sleep(0.1)
                except OSError:
                    pass
                conn.close()
            else:
                self.held.append(conn)  # never read from, never answered

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()


def pacs_faults(workdir: Path, slices: int = 8) -> list[PacsReport]:
    """One node (test pipeline, 2 send attempts); its PACS down, then refusing, then hanging: each
    series' job must end failed with its reason; then a working PACS and ``dicomnode retry``."""
    import re

    import pydicom

    pacs_port = free_port()
    send = {"attempts": 2, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.4,
            "timeout_seconds": 1.0}
    node = NodeProcess(workdir / "pacs-node", stable_seconds=0.5, log_level="WARNING", send=send,
                       pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port})
    node.start()
    partial: list[tuple[str, int, int, str, float, str]] = []
    jobs: dict[str, dict] = {}
    try:
        for mode in ("down", "refusing", "hanging"):
            fake = FakePacs(pacs_port, mode) if mode != "down" else None
            s = write_ct_series(workdir / f"pacs-{mode}", name=f"pacs-{mode}", n=slices, size=16,
                                patient_id=f"PACS-{mode.upper()}")
            try:
                scu.pynetdicom_send(node.port, s.files, aet="PACSSCU")
                started = time.monotonic()
                job = node.wait_job(s.series_uid, ("failed", "done", "rejected"), timeout=60)
                seconds = time.monotonic() - started
            finally:
                connections = fake.connections if fake else 0
                if fake:
                    fake.close()
            match = re.search(r"after (\d+) attempts", job["reason"] or "")
            partial.append((mode, int(match.group(1)) if match else 0, connections, job["state"], seconds,
                            (job["reason"] or "").replace(" ", "_")))
            jobs[mode] = job
        pacs = StoreSCP(workdir / "pacs-working", port=pacs_port).start()
        try:
            for job in jobs.values():
                node.cli("retry", str(job["id"]))
            for job in jobs.values():
                node.wait_job(job["series_uid"], ("done", "failed"), timeout=30)
            time.sleep(1.0)  # a second send, were there one, would arrive now
            received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]
        finally:
            pacs.stop()
    finally:
        node.stop()
    reports = []
    for mode, attempts, connections, state, seconds, reason in partial:
        mine = [str(d.SOPInstanceUID) for d in received if str(d.PatientID) == f"PACS-{mode.upper()}"]
        reports.append(PacsReport(mode, attempts, connections, state, round(seconds, 1), len(mine),
                                  len(mine) - len(set(mine)), reason))
    return reports


# -- an interrupted transfer ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InterruptedReport:
    slices: int
    sent_first: int  # slices of the first, interrupted part (ImagesInAcquisition announces all)
    first_state: str  # the first part's job: rejected
    first_reason: str
    measured_before_completion: int  # pipeline runs on the series before the rest arrived (must be 0)
    measured_after_completion: int  # pipeline runs after (1), on every slice
    results_sent: int  # objects the PACS received for the series (1)


def interrupted(workdir: Path, slices: int = 10, fraction: float = 0.6) -> InterruptedReport:
    """60 % of a series whose ImagesInAcquisition announces all of it, then (after the hold) the rest."""
    pacs = StoreSCP(workdir / "int-pacs").start()
    node = NodeProcess(workdir / "int-node", stable_seconds=0.5, log_level="WARNING",
                       selection={"incomplete_hold_seconds": 1.5},
                       pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port})
    node.start()
    try:
        s = write_ct_series(workdir / "int-series", name="interrupted", n=slices, size=16)
        files = [rewrite(f, f, ImagesInAcquisition=slices, AcquisitionNumber=1) for f in s.files]
        first = int(slices * fraction)
        scu.send_verbatim(node.port, files[:first])
        job = node.wait_job(s.series_uid, ("rejected", "done", "failed"), timeout=30)
        before = [r for r in node.pipeline_runs() if s.series_uid in r]
        scu.send_verbatim(node.port, files[first:])
        wait_for(lambda: any(j["state"] in ("done", "failed") for j in node.jobs(s.series_uid)), 30,
                 what="the completed series' job")
        time.sleep(1.0)  # a second run or send, were there one, would show now
        after = [r for r in node.pipeline_runs() if s.series_uid in r]
        whole = [r for r in after if r.split()[2] == str(slices)]
        sent = len(pacs.files())
    finally:
        node.stop()
        pacs.stop()
    return InterruptedReport(slices, first, job["state"], (job["reason"] or "").replace(" ", "_"),
                             len(before), len(whole) if len(whole) == len(after) - len(before) else -1, sent)


# -- a SOP Instance UID collision ---------------------------------------------------------------------
@dataclass(frozen=True)
class CollisionReport:
    colliding_sent: int  # same UID, different content: one in another patient's series, one in the same
    colliding_refused: int  # answered 0xC000 "uid-collision"
    identical_resent: int  # the first series sent again, byte for byte
    identical_accepted: int  # answered 0x0000, nothing redone (still one job)
    jobs_of_first_series: int
    row_stays_after_restarts: bool  # the UID's index row stays with the first series over 2 restarts


def collision(workdir: Path) -> CollisionReport:
    """The scenario of tests/test_hardening_data.py: another patient's series claims one of a's UIDs."""
    import numpy as np
    node = NodeProcess(workdir / "col-node", stable_seconds=30.0, log_level="WARNING")  # indexing only
    node.start()
    try:
        a = write_ct_series(workdir / "col-a", name="col-a", n=4, size=16, patient_id="PAT-ALPHA")
        b = write_ct_series(workdir / "col-b", name="col-b", n=4, size=16, patient_id="PAT-BETA")
        stolen = a.sop_uids[2]
        b_files = list(b.files)
        b_files[2] = rewrite(b.files[2], workdir / "col-b2.dcm", SOPInstanceUID=stolen,
                             file_meta__MediaStorageSOPInstanceUID=stolen)
        changed = rewrite(a.files[3], workdir / "col-a3.dcm",
                          PixelData=np.full((16, 16), 7, dtype=np.int16).tobytes())
        scu.send_verbatim(node.port, a.files)
        got = [scu.send_verbatim(node.port, b_files)[2], scu.send_verbatim(node.port, [changed])[0]]
        refused = sum(st == 0xC000 and c.startswith("uid-collision") for st, c in got)
        again = scu.send_verbatim(node.port, a.files)

        def where() -> str:
            return node.sql("SELECT series_uid FROM instances WHERE sop_uid=?", (stolen,))[0]["series_uid"]

        stays = where() == a.series_uid
        for _ in range(2):
            node.stop()
            node.start()
            stays = stays and where() == a.series_uid
        jobs = len(node.jobs(a.series_uid))
    finally:
        node.stop()
    return CollisionReport(2, refused, len(again), sum(st == 0 for st, _ in again), jobs, stays)


PARTS = ("kill", "fuzz", "stall", "disk", "pacs", "interrupted", "collision")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=3)
    parser.add_argument("--fuzz-inputs", type=int, default=100)
    parser.add_argument("--stall-seconds", type=float, default=5.0)
    parser.add_argument("--disk-stores", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of: {','.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(chosen) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="dicomnode-faults-") as tmp:
        work = Path(tmp)
        runs = {"kill": lambda: kill_trials(work, args.kill_trials, rng),
                "fuzz": lambda: fuzz(work, args.fuzz_inputs, rng),
                "stall": lambda: stall(work, args.stall_seconds),
                "disk": lambda: disk(work, args.disk_stores),
                "pacs": lambda: pacs_faults(work),
                "interrupted": lambda: interrupted(work),
                "collision": lambda: collision(work)}
        for name in (p for p in PARTS if p in chosen):
            started = time.monotonic()
            result = runs[name]()
            for report in result if isinstance(result, list) else [result]:
                figures = " ".join(f"{k}={v}" for k, v in asdict(report).items())
                print(f"{name}: {figures} seconds={time.monotonic() - started:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
