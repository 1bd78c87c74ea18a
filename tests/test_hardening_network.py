"""Network-layer hardening of ``dicomnode serve`` (issue 15), against a real node over 127.0.0.1.

What a well-behaved SCU never sends (a PDU header declaring gigabytes, half a PDU and then silence)
goes over raw sockets; everything else uses a real pynetdicom SCU. The node runs as a subprocess, so
its memory is read from ``/proc/PID/status``. One node serves the module, configured with short
timeouts (ARTIM 1 s, network 2 s) and a 4 MB instance limit so that each test takes seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import NodeProcess, rejection, wait_for
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import MaximumLengthNotification
from pynetdicom.sop_class import Verification
from series_factory import CT_IMAGE, MR_IMAGE, write_ct_series

from dicomnode.config import Settings
from dicomnode.harness.scu import echoed
from dicomnode.harness.series import dataset_bytes, part10
from dicomnode.logs import KeyValueFormatter
from dicomnode.network import retrieve
from dicomnode.network.scp import _address_in

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")

MAX_ASSOCIATIONS = 3
ACSE_TIMEOUT = 1.0
NETWORK_TIMEOUT = 2.0
MAX_INSTANCE_MB = 4.0
NODE_MAX_PDU = 1 << 20  # dicomnode.network.scp.MAX_PDU, what the node offers as its maximum receive length
FORGED = "2026-12-01T00:00:00.000Z\tWARNING\tdicomnode.scp\tforged"  # no space: not quoted before


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path_factory.mktemp("hardening") / "node",
        allowed_calling_aets=["PYSCU", "PINNED", "LOCALPIN"],
        calling_aet_hosts={"PINNED": ["192.0.2.1"], "LOCALPIN": ["127.0.0.0/8"]},
        max_associations=MAX_ASSOCIATIONS,
        acse_timeout_seconds=ACSE_TIMEOUT,
        network_timeout_seconds=NETWORK_TIMEOUT,
        max_instance_mb=MAX_INSTANCE_MB,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


# -- helpers -----------------------------------------------------------------------------------------
def rss_mib(node: NodeProcess) -> float:
    """Resident memory of the node process (MiB), as the kernel counts it."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the node has closed this connection (EOF or reset), reading whatever it sent first."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def scu(aet: str = "PYSCU") -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = 60  # never the SCU's own idle timer: what closes an association here is the node
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    return ae


def associate(node: NodeProcess, aet: str = "PYSCU", called: str = "THIGHNODE") -> Association:
    """Associate, retrying for up to 3 s while the node answers "local limit exceeded" (transient):
    the associations of the test before may still be ending (pynetdicom lingers 0.1 s after an abort)."""
    deadline = time.monotonic() + 3.0
    while True:
        assoc = scu(aet).associate("127.0.0.1", node.port, ae_title=called)
        busy = assoc.is_rejected and (assoc.acceptor.primitive.result_source,
                                      assoc.acceptor.primitive.diagnostic) == (0x03, 0x02)
        if not busy or time.monotonic() > deadline:
            return assoc
        time.sleep(0.1)


def echo_ok(node: NodeProcess) -> bool:
    return echoed(associate(node))


@contextmanager
def bytes_as_they_are() -> Iterator[None]:
    """Make pynetdicom send a file's data set bytes unparsed (malformed inputs must reach the node)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def store(assoc: Association, item: Path | Dataset) -> Dataset:
    status = assoc.send_c_store(item)
    assert status and "Status" in status, "no C-STORE response"
    return status


def big_ct(folder: Path, name: str, megabytes: int) -> Dataset:
    """A valid CT slice of about ``megabytes`` MiB (16-bit, 1024 columns)."""
    src = write_ct_series(folder, name=name, n=1, size=8)
    ds = pydicom.dcmread(src.files[0])
    ds.Rows, ds.Columns = megabytes * 512, 1024
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.int16).tobytes()
    return ds


# -- 1. PDU length is capped; the buffer grows only as bytes arrive -------------------------------------
@pytest.mark.parametrize("declared", [256 << 20, 0xFFFFFFFF], ids=["256MiB", "4GiB"])
def test_association_pdu_declaring_gigabytes_is_dropped_without_allocating(
        node: NodeProcess, declared: int) -> None:
    before = rss_mib(node)
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, declared) + b"\x00\x01")  # A-ASSOCIATE-RQ header
        closed = closed_by_peer(sock, 5.0)
        grown = rss_mib(node) - before
    assert grown < 64, f"node RSS grew by {grown:.0f} MiB for a {declared}-byte PDU header"
    assert closed, "the node kept the connection open"
    assert echo_ok(node)
    assert f"connection dropped reason=pdu-too-long address=127.0.0.1 pdu_type=1 length={declared}" \
        in node.log()


def test_pdata_pdu_declaring_gigabytes_aborts_the_association(node: NodeProcess) -> None:
    assoc = associate(node)
    assert assoc.is_established
    before = rss_mib(node)
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))  # P-DATA-TF header
    wait_for(lambda: assoc.is_aborted, 5.0, what="the node to abort the association")
    grown = rss_mib(node) - before
    assert grown < 64, f"node RSS grew by {grown:.0f} MiB"
    assert echo_ok(node)


def test_pdata_pdu_over_the_negotiated_maximum_is_not_read(node: NodeProcess, tmp_path: Path) -> None:
    ds = big_ct(tmp_path / "over", "pdu-over", 2)  # 2 MiB of pixels
    assoc = associate(node)
    assert assoc.is_established and assoc.acceptor.maximum_length == NODE_MAX_PDU
    for item in assoc.acceptor.user_information:  # a sender that ignores the node's maximum
        if isinstance(item, MaximumLengthNotification):
            item.maximum_length_received = 4 * NODE_MAX_PDU
    status = assoc.send_c_store(ds)  # one P-DATA-TF PDU of 2 MiB > 1 MiB negotiated
    assert not status  # no response: the association was aborted
    wait_for(lambda: assoc.is_aborted, 5.0, what="the node to abort the association")
    assert not list(node.storage_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert echo_ok(node)


# -- 2. half-sent PDUs and idle associations do not hold association slots -----------------------------
def drops(node: NodeProcess, reason: str) -> list[dict[str, str]]:
    """The fields of each ``connection dropped reason=REASON`` line in the node's log (their values
    have no spaces, so no quotes), in the order written."""
    found = []
    for line in node.log().splitlines():
        _, hit, rest = line.partition(" connection dropped ")
        fields = dict(pair.split("=", 1) for pair in rest.split()) if hit else {}
        if fields.get("reason") == reason:
            found.append(fields)
    return found


def evictions(node: NodeProcess) -> list[dict[str, str]]:
    return drops(node, "pending-connections-full")


def test_idle_association_is_aborted_with_the_nodes_own_event(node: NodeProcess) -> None:
    """A caller that associates and then sends nothing is aborted at network_timeout_seconds, logged
    as the node's ``connection dropped reason=network-timeout`` WARNING with its address, calling AE
    title and idle time (docs/pacs-admin.md §9), not only as pynetdicom's field-less ERROR."""
    before = len(drops(node, "network-timeout"))
    assoc = associate(node)
    assert assoc.is_established
    started = time.monotonic()
    try:
        wait_for(lambda: assoc.is_aborted, NETWORK_TIMEOUT + 3.0, what="the idle association's abort")
        assert time.monotonic() - started >= NETWORK_TIMEOUT - 0.1
        wait_for(lambda: len(drops(node, "network-timeout")) > before, 5.0, what="the network-timeout line")
    finally:
        if assoc.is_established:
            assoc.abort()
    (fields,) = drops(node, "network-timeout")[before:]
    assert list(fields) == ["reason", "address", "calling_aet", "idle_s"], fields
    assert fields["address"] == "127.0.0.1" and fields["calling_aet"] == "PYSCU"
    assert NETWORK_TIMEOUT <= float(fields["idle_s"]) < NETWORK_TIMEOUT + 1.0
    line = [line for line in node.log().splitlines() if "reason=network-timeout" in line][-1]
    assert " WARNING dicomnode.network.scp connection dropped " in line
    assert "Network timeout reached" not in node.log()  # pynetdicom's own line: DEBUG only
    assert echo_ok(node)


def test_idle_abort_while_a_pdu_arrives_is_logged_once_it_is_whole(node: NodeProcess) -> None:
    """pynetdicom's idle timer counts from the last whole PDU, so a PDU that starts before it runs out
    and arrives whole (within its own deadline) only after is still aborted for idleness: logged as
    network-timeout once that PDU is whole, not left without a line."""
    before = len(drops(node, "network-timeout"))
    stalls = len(drops(node, "pdu-stalled"))
    assoc = associate(node)
    assert assoc.is_established
    body = struct.pack(">LBB", 2 + 98, 1, 0x00) + bytes(98)  # one PDV: context 1, a data set fragment
    pdu = struct.pack(">BBL", 0x04, 0, len(body)) + body
    sock = assoc.dul.socket.socket
    try:
        time.sleep(NETWORK_TIMEOUT / 2)
        sock.sendall(pdu[:8])  # its deadline: NETWORK_TIMEOUT from now
        time.sleep(NETWORK_TIMEOUT * 3 / 4)  # the idle timer runs out meanwhile
        sock.sendall(pdu[8:])
        wait_for(lambda: len(drops(node, "network-timeout")) > before, 5.0, what="the network-timeout line")
        wait_for(lambda: assoc.is_aborted, 5.0, what="the idle association's abort")
    finally:
        if assoc.is_established:
            assoc.abort()
    (fields,) = drops(node, "network-timeout")[before:]
    assert fields["calling_aet"] == "PYSCU"
    assert NETWORK_TIMEOUT <= float(fields["idle_s"]) < NETWORK_TIMEOUT + 1.0
    assert len(drops(node, "pdu-stalled")) == stalls


def test_stalled_connections_are_closed_and_real_echoes_get_through(node: NodeProcess) -> None:
    idle_drops = len(drops(node, "network-timeout"))
    assoc = associate(node)  # a real association that will send half a P-DATA-TF and stall
    assert assoc.is_established
    stalled: list[socket.socket] = []
    start = time.monotonic()
    for _ in range(MAX_ASSOCIATIONS + 2):  # half an A-ASSOCIATE-RQ, then silence
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01\x00\x00" + b"THIGHNODE".ljust(16))
        stalled.append(sock)
    silent = socket.create_connection(("127.0.0.1", node.port))  # connects, never sends a byte
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00\x00\x00\x10\x01\x03")
    try:
        bound = ACSE_TIMEOUT + NETWORK_TIMEOUT + 3.0
        for sock in [*stalled, silent]:
            assert closed_by_peer(sock, bound - (time.monotonic() - start)), "a stalled socket stayed open"
        wait_for(lambda: assoc.is_aborted, bound, what="the node to drop the stalled association")
        wait_for(lambda: echo_ok(node), 5.0, interval=0.2, what="a real C-ECHO to be served")
        assert time.monotonic() - start < bound + 5.0
        # the stalled association ran out pynetdicom's idle timer too: logged once, as pdu-stalled
        wait_for(lambda: any(f.get("received") == "12" for f in drops(node, "pdu-stalled")), 5.0,
                 what="the stalled association's pdu-stalled line")
        assert len(drops(node, "network-timeout")) == idle_drops
    finally:
        for sock in [*stalled, silent]:
            sock.close()
        if assoc.is_established:
            assoc.abort()


HALF_RQ = struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01\x00\x00" + b"THIGHNODE".ljust(16)


def half_requests(node: NodeProcess, count: int, source: str) -> list[socket.socket]:
    """``count`` connections from ``source`` that send half an A-ASSOCIATE-RQ and go silent."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", node.port), source_address=(source, 0))
        sock.sendall(HALF_RQ)
        socks.append(sock)
    return socks


def test_pending_connections_do_not_take_association_slots(node: NodeProcess) -> None:
    """Half-sent requests, far more than max_associations, from the caller's own address and from
    another: a real association made at once (no retry) is accepted, and past 4 pending per address
    the oldest are closed long before ARTIM."""
    other = half_requests(node, 3 * MAX_ASSOCIATIONS, "127.0.0.2")
    own = half_requests(node, 3 * MAX_ASSOCIATIONS, "127.0.0.1")
    try:
        started = time.monotonic()
        assoc = scu().associate("127.0.0.1", node.port, ae_title="THIGHNODE")  # one try, no back-off
        assert assoc.is_established, "a real caller was kept out by half-sent requests"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        # PENDING_PER_ADDRESS (4) kept per address at most: the oldest others are closed, well before ARTIM
        early = sum(closed_by_peer(sock, max(ACSE_TIMEOUT / 2 - (time.monotonic() - started), 0.01))
                    for sock in other[:-4])
        assert early == len(other) - 4
        # each one the pool closed is logged with the fields of docs/pacs-admin.md §9, whether one
        # process closed it or a receive worker did (test_receive_processes runs this test too); how
        # many the pool closed depends on how many were accepted before ARTIM closed the first
        wait_for(lambda: any(f.get("from_address") == "127.0.0.2" for f in evictions(node)), 5.0,
                 what="a log line for a closed connection")
        for fields in evictions(node):
            assert list(fields) == ["reason", "address", "from_address", "pending"], fields
            assert fields["address"] in (fields["from_address"], "-") and 1 <= int(fields["pending"]) <= 32
    finally:
        for sock in [*other, *own]:
            sock.close()


def test_max_associations_still_bounds_real_associations(node: NodeProcess) -> None:
    """Only admitted associations count, and they still count: one past max_associations is refused
    as transient "local limit exceeded", and a slot freed is a slot usable."""
    held = [associate(node) for _ in range(MAX_ASSOCIATIONS)]
    try:
        assert all(assoc.is_established for assoc in held)
        extra = scu().associate("127.0.0.1", node.port, ae_title="THIGHNODE")
        assert extra.is_rejected
        assert rejection(extra) == (0x02, 0x03, 0x02)  # transient, service provider, local limit exceeded
    finally:
        for assoc in held:
            assoc.release()
    assert echo_ok(node)


# -- 3. called AE title and calling AE title pinned to a host ------------------------------------------
def test_called_ae_title_must_be_the_nodes(node: NodeProcess) -> None:
    assoc = associate(node, called="OTHERNODE")
    assert assoc.is_rejected and not assoc.is_established
    assert rejection(assoc) == (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
    wait_for(lambda: 'reason="called AE title not recognised"' in node.log(), 5, what="the rejection log")
    assert echo_ok(node)


def test_calling_ae_title_pinned_to_a_host(node: NodeProcess) -> None:
    pinned = associate(node, aet="PINNED")  # allowed only from 192.0.2.1
    assert pinned.is_rejected
    assert rejection(pinned) == (0x01, 0x01, 0x03)  # calling AE title not recognised
    local = associate(node, aet="LOCALPIN")  # allowed from 127.0.0.0/8
    assert local.is_established
    assert local.send_c_echo().Status == 0
    local.release()
    wait_for(lambda: "calling_aet=PINNED" in node.log(), 5, what="the pinning rejection in the log")


def test_calling_aet_hosts_must_be_addresses() -> None:
    assert Settings(calling_aet_hosts={"ORTHANC": ["10.0.0.5", "fd00::/64"]}).calling_aet_hosts
    for bad in ({"ORTHANC": ["pacs.example.org"]}, {"ORTHANC": []}):
        with pytest.raises(ValidationError):
            Settings(calling_aet_hosts=bad)
    net = [ipaddress.ip_network("10.0.0.0/24")]
    assert _address_in("10.0.0.5", net) and _address_in("::ffff:10.0.0.5", net)  # IPv4-mapped peer
    assert not _address_in("10.0.1.5", net) and not _address_in("fd00::1", net)


# -- 4. each failure class gets its status --------------------------------------------------------------
def test_store_failure_statuses(node: NodeProcess, tmp_path: Path) -> None:
    s = write_ct_series(tmp_path / "st", name="status", n=5, size=16)
    good = dataset_bytes(s.files[0])
    truncated = part10(tmp_path / "truncated.dcm", good[:300], sop_uid=s.sop_uids[1])  # cut inside the UIDs
    mr = pydicom.dcmread(s.files[2])
    mr.SOPClassUID, mr.Modality = MR_IMAGE, "MR"
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    mr_on_ct = part10(tmp_path / "mr-on-ct.dcm", dataset_bytes(tmp_path / "mr.dcm"), sop_uid=s.sop_uids[2])
    no_study = pydicom.dcmread(s.files[3])
    del no_study.StudyInstanceUID
    unwritable = write_ct_series(tmp_path / "uw", name="status-unwritable", n=1, size=16)
    blocker = node.storage_dir / "incoming" / unwritable.study_uid
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")  # a file where the study folder must go: the write fails
    assoc = associate(node)
    assert assoc.is_established
    try:
        with bytes_as_they_are():
            assert store(assoc, truncated).Status == 0xC000  # cannot understand
            assert store(assoc, mr_on_ct).Status == 0xA900  # data set does not match SOP class
        assert store(assoc, no_study).Status == 0xA900  # a Type 1 identifier missing
        full = store(assoc, unwritable.files[0])
        assert full.Status == 0xA700 and "cannot store" in full.ErrorComment  # out of resources
        assert store(assoc, s.files[4]).Status == 0x0000  # and the association still works
    finally:
        assoc.release()
        blocker.unlink()


# -- 5. log values cannot forge lines -------------------------------------------------------------------
def test_newline_in_a_header_value_does_not_forge_a_log_line(node: NodeProcess, tmp_path: Path) -> None:
    """End to end: whichever way the value reaches the log (refusal reason or series event)."""
    s = write_ct_series(tmp_path / "log", name="log-forge", n=1, size=16)
    ds = pydicom.dcmread(s.files[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom: too long for VR CS (the point)
        ds.Modality = f"CT\n{FORGED}=1"
    assoc = associate(node)
    try:
        status = store(assoc, ds)
    finally:
        assoc.release()
    lines = node.log().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)]
    if status.Status == 0:  # filed: the series-opened event carries the value, escaped on one line
        assert [line for line in lines if f'modality="CT\\n{FORGED}=1"' in line]


def test_a_mis_framed_element_puts_no_patient_data_in_the_log(node: NodeProcess, tmp_path: Path) -> None:
    """A SOP Class UID whose length field swallows the elements after it, up to the PatientID: before,
    the refusal's reason and pydicom's value warnings (logger and stderr) quoted them at WARNING."""
    name, patient_id = "Hidden^Harriet", "PHI-ID-90210"
    s = write_ct_series(tmp_path / "phi", name="log-phi", n=1, size=16, patient_id=patient_id,
                        patient_name=name)
    data = bytearray(dataset_bytes(s.files[0]))  # explicit VR little endian
    at, pid = data.find(b"\x08\x00\x16\x00UI"), data.find(b"\x10\x00\x20\x00LO")
    assert 0 < at < pid
    end = pid + 8 + struct.unpack_from("<H", data, pid + 6)[0]
    struct.pack_into("<H", data, at + 6, end - at - 8)  # (0008,0016) now ends where PatientID ends
    framed = part10(tmp_path / "mis-framed.dcm", bytes(data), sop_uid=s.sop_uids[0])
    assoc = associate(node)
    try:
        with bytes_as_they_are():
            status = store(assoc, framed)
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "characters>" in status.ErrorComment
    log = node.log()
    assert "c-store refused status=0xA900" in log
    assert name not in log and patient_id not in log


def test_prior_retrieval_logs_the_study_by_uid_not_by_its_date(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A study date is the patient's (PHI): at INFO the moved prior is named by its UID only."""
    study = retrieve.StudyHit("1.2.3.4", "19610312", modalities=["CT"])
    monkeypatch.setattr(retrieve, "find_studies", lambda *_: [study])
    monkeypatch.setattr(retrieve, "find_series", lambda *_: [retrieve.SeriesHit("1.2.3.4.5", "CT", 50)])
    monkeypatch.setattr(retrieve, "move_series", lambda *_: (50, 0))
    settings = Settings(storage_dir=Path("var"), pairing={"retrieve_priors": True})
    with caplog.at_level(logging.INFO, logger="dicomnode.network.retrieve"):
        outcome = retrieve.retrieve_prior(settings, "PID", "20240101", set())
    assert outcome.moved and outcome.study_instance_uid == "1.2.3.4"
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert shown and "1.2.3.4" in shown[0]
    assert not [m for m in shown if "19610312" in m]


def test_key_value_formatter_escapes_values_message_and_exceptions() -> None:
    record = logging.LogRecord("dicomnode.x", logging.WARNING, __file__, 1, "bad\nmsg", None, None)
    record.fields = {"quote": 'a"b', "eq": "k=v", "nl": "x\r\ny", "ls": "p\u2028q", "c1": "n\x85m",
                     "tab": "t\tu", "bs": "c:\\x", "empty": "", "plain": "1.2.3"}
    line = KeyValueFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x85" not in line
    assert line.split(" ", 3)[3] == (
        r'bad\nmsg quote="a\"b" eq="k=v" nl="x\r\ny" ls="p\u2028q" c1="n\u0085m" tab="t\tu" bs="c:\\x"'
        ' empty="" plain=1.2.3')
    try:
        raise ValueError(f"boom\n{FORGED}")
    except ValueError:
        record.exc_info = sys.exc_info()
    first, *rest = KeyValueFormatter().format(record).splitlines()
    assert rest and all(line.startswith("  ") for line in rest)  # only the first line is at column 0


# -- 6. maximum instance size ---------------------------------------------------------------------------
def test_instance_over_the_maximum_is_refused_without_buffering_it(node: NodeProcess, tmp_path: Path) -> None:
    small = write_ct_series(tmp_path / "small", name="size-small", n=2, size=16)
    over = big_ct(tmp_path / "over", "size-over", 6)  # 6 MiB > 4 MB
    huge = big_ct(tmp_path / "huge", "size-huge", 48)  # 48 MiB: would show in the node's memory
    assoc = associate(node)
    assert assoc.is_established
    try:
        assert store(assoc, small.files[0]).Status == 0
        refused = store(assoc, over)
        assert refused.Status == 0xA700 and "max_instance_mb" in refused.ErrorComment
        before = rss_mib(node)
        assert store(assoc, huge).Status == 0xA700
        grown = rss_mib(node) - before
        assert grown < 24, f"node RSS grew by {grown:.0f} MiB while refusing a 48 MiB instance"
        assert store(assoc, small.files[1]).Status == 0  # same association, next instance stored
    finally:
        assoc.release()
    for ds in (over, huge):
        assert not list(node.storage_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
