"""Receive in several processes (``receive_processes = 2``, dicomnode/network/receive_pool.py), against a real
``dicomnode serve`` over 127.0.0.1 with real pynetdicom callers.

What must hold with worker processes as without them: every acknowledged instance on disk and indexed
exactly once, under concurrent associations and when one worker is killed with SIGKILL mid-transfer
(the others keep serving, the parent starts a replacement); the allow-list, called-AE and host
checks, PDU caps, deadlines and failure statuses in the workers (the network hardening tests run here
again against a two-process node); the pending pool and ``max_associations`` counted node-wide.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
from peers import NodeProcess, wait_for
from pydantic import ValidationError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from series_factory import CT_IMAGE, SeriesFiles, write_ct_series

# the hardening and disk back-pressure tests, collected here again: pytest gives them this module's
# ``node`` and ``full_node`` (two processes); the TLS helpers and CA from test_tls
from test_disk_pressure import (  # noqa: F401
    HUGE_MB,
    test_dcmtk_storescu_is_refused_by_a_node_below_its_threshold,
    test_node_below_its_threshold_rejects_associations_transiently,
)
from test_hardening_network import (  # noqa: F401
    ACSE_TIMEOUT,
    MAX_ASSOCIATIONS,
    MAX_INSTANCE_MB,
    NETWORK_TIMEOUT,
    test_called_ae_title_must_be_the_nodes,
    test_calling_ae_title_pinned_to_a_host,
    test_idle_abort_while_a_pdu_arrives_is_logged_once_it_is_whole,
    test_idle_association_is_aborted_with_the_nodes_own_event,
    test_max_associations_still_bounds_real_associations,
    test_newline_in_a_header_value_does_not_forge_a_log_line,
    test_pdata_pdu_over_the_negotiated_maximum_is_not_read,
    test_pending_connections_do_not_take_association_slots,
    test_stalled_connections_are_closed_and_real_echoes_get_through,
    test_store_failure_statuses,
)
from test_tls import Pki, echoscu, pki, refusals, stored, tls_section, with_cert  # noqa: F401

from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.harness.dcmtk import storescu
from dicomnode.harness.series import dataset_bytes
from dicomnode.network.receive_channel import Message, Op
from dicomnode.network.receive_pool import ConnectionTable
from dicomnode.storage.store import Store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PROCESSES = 2
T = TypeVar("T")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The hardening tests' node (same limits), with two receive processes."""
    with NodeProcess(
            tmp_path_factory.mktemp("hardening-p2") / "node",
            allowed_calling_aets=["PYSCU", "PINNED", "LOCALPIN"],
            calling_aet_hosts={"PINNED": ["192.0.2.1"], "LOCALPIN": ["127.0.0.0/8"]},
            max_associations=MAX_ASSOCIATIONS, acse_timeout_seconds=ACSE_TIMEOUT,
            network_timeout_seconds=NETWORK_TIMEOUT, max_instance_mb=MAX_INSTANCE_MB,
            receive_processes=PROCESSES,
        ) as proc:
        yield proc


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A two-process node that receives only (worker off, series never complete during the tests)."""
    with NodeProcess(tmp_path_factory.mktemp("pool") / "node", pipeline=None, stable_seconds=600,
                           allowed_calling_aets=["SENDER"], receive_processes=PROCESSES,
                           worker={"enabled": False}) as proc:
        yield proc


@pytest.fixture(scope="module")
def full_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The disk back-pressure tests' node (below its threshold from the start), two processes."""
    with NodeProcess(tmp_path_factory.mktemp("diskfull-p2") / "node", pipeline=None,
                           min_free_disk_mb=HUGE_MB, receive_processes=PROCESSES) as proc:
        yield proc


# -- helpers -----------------------------------------------------------------------------------------
def workers(node: NodeProcess) -> set[int]:
    """Process ids of the node's receive workers (its children running dicomnode.network.receive_worker)."""
    assert node.proc is not None
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == node.proc.pid and b"dicomnode.network.receive_worker" in cmdline:
            found.add(int(entry.name))
    return found


def serving_process(node: NodeProcess, assoc: Association) -> int:
    """The process id holding the node's end of this association's TCP connection."""
    pid = holder(node, assoc.dul.socket.socket.getsockname())
    assert pid is not None, "no worker holds the connection"
    return pid


def holder(node: NodeProcess, client: tuple[str, int]) -> int | None:
    """The worker holding the node's end of the connection from ``client`` (address, port); None while
    none does (the parent has not handed it over yet, or it is in flight on the channel)."""
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        here, (there_ip, there_port) = fields[1], fields[2].split(":")
        there = (socket.inet_ntoa(struct.pack("=I", int(there_ip, 16))), int(there_port, 16))
        if int(here.split(":")[1], 16) == node.port and there == (client[0], client[1]):
            inode = fields[9]
    assert inode, "the node's end of the connection was not found"
    for pid in workers(node):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def one_in_each_worker(node: NodeProcess, open_one: Callable[[], T], client: Callable[[T], tuple[str, int]],
                       close: Callable[[T], None]) -> dict[int, T]:
    """Open connections until each worker holds one; worker pid → its connection.

    Why not assume two in a row land in two workers: the parent hands a connection to the worker it
    counts as least busy, and connections of an earlier test may still be counted for a moment (their
    close not yet reported by the worker). So each connection's worker is looked up; the extra ones
    (kept open meanwhile, they count too and push the next one to the other worker) are closed after.
    """
    want = workers(node)
    chosen: dict[int, T] = {}
    extra: list[T] = []
    try:
        for _ in range(3 * PROCESSES):
            if set(chosen) == want:
                break
            item = open_one()
            pid = wait_for(lambda item=item: holder(node, client(item)), 10.0,
                           what="a worker to take the connection")
            if pid in chosen:
                extra.append(item)
            else:
                chosen[pid] = item
        assert set(chosen) == want, f"connections reached {sorted(chosen)} of the workers {sorted(want)}"
    except BaseException:
        extra += chosen.values()
        raise
    finally:
        for item in extra:
            close(item)
    return chosen


def pending_connection(node: NodeProcess, sources: Iterator[int]) -> socket.socket:
    """A connection that sends nothing yet (pending in a worker), each from its own loopback address
    so that no more than PENDING_PER_ADDRESS of them ever come from one."""
    return socket.create_connection(("127.0.0.1", node.port), source_address=(f"127.0.0.{next(sources)}", 0))


def association_request(calling: str, called: str = "THIGHNODE") -> bytes:
    """A whole A-ASSOCIATE-RQ PDU (Verification) as a pynetdicom requestor sends it."""
    ctx = build_context(Verification)
    ctx.context_id = 1
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = calling, called
    request.presentation_context_definition_list = [ctx]
    max_length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    max_length.maximum_length_received = 16382
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    request.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return bytes(pdu.encode())


def rejection_over(sock: socket.socket, request: bytes) -> tuple[int, int, int]:
    """Send ``request`` on a connection the node holds pending; (result, source, diagnostic) of the
    A-ASSOCIATE-RJ it answers (an A-ASSOCIATE-AC or a close fails the test)."""
    sock.settimeout(10.0)
    sock.sendall(request)
    answer = b""
    while len(answer) < 10:
        chunk = sock.recv(10 - len(answer))
        assert chunk, f"the node closed the connection after {answer!r}"
        answer += chunk
    assert answer[0] == 0x03, f"PDU type 0x{answer[0]:02X} instead of an A-ASSOCIATE-RJ"
    return answer[7], answer[8], answer[9]


def caller(aet: str = "SENDER") -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    return ae


def open_association(node: NodeProcess, aet: str = "SENDER") -> Association:
    assoc = caller(aet).associate("127.0.0.1", node.port, ae_title="THIGHNODE")
    assert assoc.is_established, f"association as {aet} not established"
    return assoc


def send_all(assoc: Association, files: list[Path], acked: list[str], uids: list[str]) -> None:
    """C-STORE each file in turn, recording the SOP UIDs answered with success; stop at a failure."""
    for path, sop in zip(files, uids, strict=True):
        if not assoc.is_established:
            return
        status = assoc.send_c_store(path)
        if not status or status.Status != 0:
            return
        acked.append(sop)
    if assoc.is_established:
        assoc.release()


def index_counts(node: NodeProcess, uids: list[str]) -> dict[str, int]:
    """How many index rows each SOP UID has."""
    rows = node.sql("SELECT sop_uid, COUNT(*) AS n FROM instances GROUP BY sop_uid")
    have = {r["sop_uid"]: int(r["n"]) for r in rows}
    return {sop: have.get(sop, 0) for sop in uids}


def stored_files(node: NodeProcess, series: SeriesFiles) -> set[str]:
    folder = node.storage_dir / "incoming" / series.study_uid / series.series_uid
    return {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()


def temp_files(node: NodeProcess) -> list[Path]:
    return list((node.storage_dir / "incoming").rglob(".*.tmp"))


# -- the parent's bookkeeping, on its own ------------------------------------------------------------
def test_pending_pool_is_node_wide_oldest_closed_first() -> None:
    table = ConnectionTable(max_pending=3, max_associations=2, per_address=2)
    assert table.add(1, worker=0, address="10.0.0.1") == []
    assert table.add(2, worker=1, address="10.0.0.1") == []
    assert [key for key, _ in table.add(3, worker=0, address="10.0.0.1")] == [1]  # per address: oldest
    assert table.add(4, worker=1, address="10.0.0.2") == []
    evicted = table.add(5, worker=0, address="10.0.0.3")  # 4 pending > 3 in all, whatever the worker
    assert [(key, c.worker) for key, c in evicted] == [(2, 1)]
    assert table.counts() == (3, 0)


def test_admission_counts_only_admitted_associations_node_wide() -> None:
    table = ConnectionTable(max_pending=8, max_associations=2)
    for conn, worker in ((1, 0), (2, 1), (3, 0)):
        table.add(conn, worker, "10.0.0.1")
    assert table.admit(1) and table.admit(2)  # one in each worker
    assert not table.admit(3)  # the third is over max_associations, although worker 0 holds only one
    assert not table.admit(99)  # evicted while its request was on the way: refused, never uncounted
    table.close(1)
    table.add(4, 0, "10.0.0.1")
    assert table.admit(4)  # a slot freed is a slot usable
    assert table.load(0) == 1 and table.load(1) == 1
    assert table.drop_worker(1) == 1 and table.counts() == (0, 1)  # a dead worker's connections go


def test_channel_messages_round_trip() -> None:
    for message in (Message(Op.CONN, conn=7, address=("127.0.0.1", 40000)),
                    Message(Op.ANSWER, conn=7, ok=False),
                    Message(Op.EVICT, conn=7, pending=31),
                    Message(Op.SETTINGS, settings=Settings(receive_processes=3).model_dump(mode="json"))):
        assert Message.decode(message.encode()) == message
    assert Settings.model_validate(Message.decode(Message(Op.SETTINGS, settings=Settings(
        receive_processes=3, port=4).model_dump(mode="json")).encode()).settings).port == 4


def test_receive_processes_setting_is_strict() -> None:
    assert Settings().receive_processes == 1
    assert Settings(receive_processes="4").receive_processes == 4  # an environment variable is text
    for bad in (0, 65, "two", 2.5):
        with pytest.raises(ValidationError):
            Settings(receive_processes=bad)


# -- a real node with two receive processes ----------------------------------------------------------
def test_concurrent_associations_are_served_by_both_processes_and_indexed_once(
        pool: NodeProcess, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "conc", name="concurrent", n=48, size=32)
    associations = [open_association(pool) for _ in range(4)]
    serving = {serving_process(pool, assoc) for assoc in associations}
    assert serving == workers(pool) and len(serving) == PROCESSES  # each worker holds two of the four
    acked: list[list[str]] = [[] for _ in associations]
    threads = [threading.Thread(target=send_all,
                                args=(assoc, series.files[i::4], acked[i], series.sop_uids[i::4]))
               for i, assoc in enumerate(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(sop for part in acked for sop in part) == sorted(series.sop_uids)
    assert set(index_counts(pool, series.sop_uids).values()) == {1}
    assert stored_files(pool, series) == set(series.sop_uids)
    row = pool.sql("SELECT n_instances FROM series WHERE series_uid=?", (series.series_uid,))[0]
    assert row["n_instances"] == len(series.files)
    assert len(pool.jobs(series.series_uid)) == 1  # one series opened once, whichever process came first


def test_allow_list_is_enforced_in_every_worker(pool: NodeProcess) -> None:
    """Each worker refuses an unknown calling AE title and a wrong called AE title, and serves the
    allowed caller: every connection's worker is looked up, none is assumed (see one_in_each_worker)."""
    held = one_in_each_worker(pool, lambda: open_association(pool),
                              lambda assoc: assoc.dul.socket.socket.getsockname(), Association.release)
    sources = itertools.count(2)  # 127.0.0.2, .3, ...
    try:
        for calling, called, expected in (
                ("INTRUDER", "THIGHNODE", (0x01, 0x01, 0x03)),  # permanent, calling AE title not recognised
                ("SENDER", "NOTTHENODE", (0x01, 0x01, 0x07))):  # permanent, called AE title not recognised
            pending = one_in_each_worker(pool, lambda: pending_connection(pool, sources),
                                         lambda sock: sock.getsockname(), lambda sock: sock.close())
            try:
                for pid, sock in pending.items():
                    assert rejection_over(sock, association_request(calling, called)) == expected, (
                        f"worker {pid} answered {calling} calling {called}")
            finally:
                for sock in pending.values():
                    sock.close()
        assert all(assoc.send_c_echo().Status == 0 for assoc in held.values())
    finally:
        for assoc in held.values():
            assoc.release()


def test_pending_connections_beyond_the_pool_are_closed_across_workers(tmp_path: Path) -> None:
    """max_pending_connections = 3, five silent callers from five addresses, spread over both workers:
    the two oldest are closed at once (not at ARTIM), a real caller still gets in."""
    node = NodeProcess(tmp_path / "node", pipeline=None, max_pending_connections=3, acse_timeout_seconds=30,
                       receive_processes=PROCESSES, worker={"enabled": False}).start()
    socks = []
    try:
        for i in range(5):
            source = (f"127.0.0.{11 + i}", 0)
            socks.append(socket.create_connection(("127.0.0.1", node.port), source_address=source))
            time.sleep(0.2)  # handed over in this order: the oldest are the first ones
        closed = []
        for sock in socks:
            sock.settimeout(5.0 if len(closed) < 2 else 0.5)
            try:
                closed.append(sock.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
            except ConnectionResetError:
                closed.append(True)
        assert closed == [True, True, False, False, False]
        assoc = open_association(node, "ANY")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        for sock in socks:
            sock.close()
        node.stop()


def test_kill_9_of_a_worker_mid_transfer_loses_no_acknowledged_instance(
        pool: NodeProcess, tmp_path: Path) -> None:
    """Two associations, one in each worker; the first one's worker is killed with SIGKILL after 15
    acknowledged instances. The other association completes; every acknowledged instance is on disk
    and indexed once; the dead worker's temp files are gone; a replacement serves; a re-send of the
    interrupted series completes it exactly once."""
    victim_series = write_ct_series(tmp_path / "v", name="victim", n=120, size=64)
    other_series = write_ct_series(tmp_path / "o", name="bystander", n=120, size=64)
    victim_assoc, other_assoc = open_association(pool), open_association(pool)
    victim, other = serving_process(pool, victim_assoc), serving_process(pool, other_assoc)
    assert victim != other
    before = workers(pool)
    acked_victim: list[str] = []
    acked_other: list[str] = []
    threads = [
        threading.Thread(target=send_all, args=(victim_assoc, victim_series.files, acked_victim,
                                                victim_series.sop_uids)),
        threading.Thread(target=send_all, args=(other_assoc, other_series.files, acked_other,
                                                other_series.sop_uids)),
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acked_victim) >= 15, 60, interval=0.01, what="15 acknowledged instances")
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert 15 <= len(acked_victim) < len(victim_series.files), "the kill did not land mid-transfer"
    assert acked_other == other_series.sop_uids, "the other worker's association did not complete"
    for series, acked in ((victim_series, acked_victim), (other_series, acked_other)):
        assert set(acked) <= stored_files(pool, series)
        assert set(index_counts(pool, acked).values()) == {1}
    replaced = wait_for(lambda: len(workers(pool)) == PROCESSES and workers(pool) != before and workers(pool),
                        60, what="a replacement worker")
    assert victim not in replaced and other in replaced
    wait_for(lambda: not temp_files(pool), 10, what="the dead worker's temp files to be removed")
    wait_for(lambda: "receive worker died" in pool.log(), 10, what="the death in the log")
    # the caller sends the interrupted series again: completed, each instance indexed exactly once
    again = [open_association(pool), open_association(pool)]
    assert {serving_process(pool, assoc) for assoc in again} == replaced  # both serve, the new one too
    acked_again: list[list[str]] = [[], []]
    for i, assoc in enumerate(again):
        send_all(assoc, victim_series.files[i::2], acked_again[i], victim_series.sop_uids[i::2])
    assert sorted(acked_again[0] + acked_again[1]) == sorted(victim_series.sop_uids)
    assert set(index_counts(pool, victim_series.sop_uids).values()) == {1}
    assert stored_files(pool, victim_series) == set(victim_series.sop_uids)
    assert len([j for j in pool.jobs(victim_series.series_uid) if j["state"] != "superseded"]) == 1


def test_uid_collision_is_seen_across_workers(pool: NodeProcess, tmp_path: Path) -> None:
    """A different data set under a SOP UID that the other worker stored is refused; the row stays."""
    series = write_ct_series(tmp_path / "c", name="collide", n=2, size=16)
    first, second = open_association(pool), open_association(pool)
    assert serving_process(pool, first) != serving_process(pool, second)
    try:
        assert first.send_c_store(series.files[0]).Status == 0
        changed = pydicom.dcmread(series.files[0])  # the same UIDs, other content
        changed.ImageComments = "another copy"
        refused = second.send_c_store(changed)
        assert refused.Status == 0xC000 and "uid-collision" in refused.ErrorComment
        assert second.send_c_store(series.files[0]).Status == 0  # the identical copy: acknowledged
    finally:
        first.release()
        second.release()
    assert index_counts(pool, [series.sop_uids[0]]) == {series.sop_uids[0]: 1}
    folder = pool.storage_dir / "incoming" / series.study_uid / series.series_uid
    assert dataset_bytes(folder / f"{series.sop_uids[0]}.dcm") == dataset_bytes(series.files[0])


@pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="dcmtk not installed")
def test_tls_is_served_by_the_workers(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    node = NodeProcess(tmp_path / "node", pipeline=None, worker={"enabled": False}, acse_timeout_seconds=3.0,
                       receive_processes=PROCESSES, tls=tls_section(pki)).start()
    try:
        series = write_ct_series(tmp_path / "t", name="tls-p2", n=4, size=8)
        result = storescu(node.port, series.files, extra=with_cert(pki))
        assert result.returncode == 0, result.stdout + result.stderr
        assert stored(node, series) == 4
        assert echoscu(node.port, []).returncode != 0  # plain DICOM to the TLS port
        wait_for(lambda: refusals(node), 10, what="a tls-handshake-failed log line")
        assert echoscu(node.port, with_cert(pki)).returncode == 0
    finally:
        node.stop()


HOLDER = """
import sys, threading, time
from pathlib import Path
from dicomnode.db import Database
from dicomnode.storage.store import Store
root, mine, theirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = Store(root, Database(root / "index.sqlite"), cross_process=True)
held = store._sop_lock(mine)
held.__enter__()
print("holding", flush=True)
sys.stdin.readline()  # the test process now holds ``theirs`` and one of its threads waits for ``mine``
def want() -> None:
    with store._sop_lock(theirs):
        print("got", flush=True)
thread = threading.Thread(target=want)
thread.start()
time.sleep(0.5)  # this thread waits for ``theirs`` too: two processes, each waiting on the other
held.__exit__(None, None, None)
thread.join()
"""


def test_sop_locks_across_processes_wait_instead_of_failing_as_a_deadlock(tmp_path: Path) -> None:
    """Two processes, two threads each, waiting on each other's slots (never on one a thread of their
    own holds): each request waits its turn. Process-owned POSIX locks failed one with EDEADLK here."""
    import subprocess
    import zlib

    mine, theirs = "1.2.3.1", "1.2.3.2"
    assert zlib.crc32(mine.encode()) % 64 != zlib.crc32(theirs.encode()) % 64
    store = Store(tmp_path, Database(tmp_path / "index.sqlite"), cross_process=True)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), theirs, mine],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline().strip() == "holding"
        errors: list[BaseException] = []
        with store._sop_lock(mine):
            def want() -> None:
                try:
                    with store._sop_lock(theirs):
                        pass
                except BaseException as exc:  # EDEADLK with process-owned locks
                    errors.append(exc)
            waiter = threading.Thread(target=want)
            waiter.start()
            time.sleep(0.2)  # the waiter is blocked on the child's slot
            child.stdin.write("go\n")
            child.stdin.flush()
            waiter.join(10)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        store.close()
    assert not errors, errors
    assert child.returncode == 0 and out.strip() == "got", err
