"""``dicomnode serve`` against real peers: dcmtk echoscu/storescu and a pynetdicom SCU as senders,
dcmtk storescp as the PACS that receives results. One node serves all tests of this module."""

from __future__ import annotations

import json
import queue
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from peers import (
    NodeProcess,
    StoreSCP,
    dcmtk_env,
    echoscu,
    pynetdicom_send,
    requires_dcmtk,
    storescu,
    wait_for,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from series_factory import write_ct_series, write_enhanced_ct

from dicomnode.external import require_dcmtk_tool
from dicomnode.harness.series import dataset_bytes

pytestmark = requires_dcmtk

ALLOWED = ["STORESCU", "PYSCU", "ECHOSCU", "FINDSCU"]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, StoreSCP]]:
    root = tmp_path_factory.mktemp("node-net")
    pacs = StoreSCP(root / "pacs").start()
    node = NodeProcess(root / "node", allowed_calling_aets=ALLOWED,
                       pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port})
    node.start()
    try:
        yield node, pacs
    finally:
        node.stop()
        pacs.stop()


def pacs_sops(pacs: StoreSCP) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()]


def test_echo_and_calling_aet_allow_list(peers: tuple[NodeProcess, StoreSCP]) -> None:
    node, _ = peers
    assert echoscu(node.port, aet="ECHOSCU").returncode == 0
    refused = echoscu(node.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    wait_for(lambda: "association rejected" in node.log(), 5, what="rejection in the node log")


def test_echo_command_reaches_the_pacs(peers: tuple[NodeProcess, StoreSCP]) -> None:
    node, pacs = peers
    out = node.cli("echo")
    assert out.returncode == 0 and f"C-ECHO PACS@127.0.0.1:{pacs.port}: success" in out.stdout


def test_a_query_the_node_does_not_serve_is_refused_cleanly(peers: tuple[NodeProcess, StoreSCP]) -> None:
    """dcmtk findscu proposes the query SOP classes, which the node does not negotiate; a C-FIND, C-MOVE
    or C-GET sent on the Verification context anyway is answered 0x0122 (SOP class not supported) with
    one WARNING each, and the association goes on to its release. pynetdicom logged each at ERROR with
    a traceback and aborted."""
    node, _ = peers
    seen = len(node.log())
    found = subprocess.run([require_dcmtk_tool("findscu"), "-S", "-aet", "FINDSCU", "-aec", "THIGHNODE",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=P1", "127.0.0.1",
                            str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)
    assert found.returncode != 0 and "No Acceptable Presentation Contexts" in found.stdout + found.stderr

    received: queue.Queue[object] = queue.Queue()  # what the node answers, before the SCU's reactor
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="THIGHNODE", evt_handlers=[
        (evt.EVT_DIMSE_RECV, lambda event: received.put(event.message.message_to_primitive()))])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID = "STUDY", "PHI-7731"
    requests = [(C_FIND(), StudyRootQueryRetrieveInformationModelFind),
                (C_MOVE(), StudyRootQueryRetrieveInformationModelMove),
                (C_GET(), StudyRootQueryRetrieveInformationModelGet)]
    for message_id, (request, sop_class) in enumerate(requests, start=7):
        request.MessageID, request.Priority = message_id, 2
        request.AffectedSOPClassUID = sop_class
        request.Identifier = BytesIO(encode(query, True, True))
        if isinstance(request, C_MOVE):
            request.MoveDestination = "FINDSCU"
        assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
        answer = received.get(timeout=10)
        assert type(answer) is type(request)
        assert (answer.MessageIDBeingRespondedTo, answer.Status) == (message_id, 0x0122)
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted
    assert echoscu(node.port, aet="ECHOSCU").returncode == 0

    log = wait_for(lambda: node.log()[seen:] if "request refused" in node.log()[seen:] else "", 5,
                   what="the refusal in the node log")
    assert "Traceback" not in log and " ERROR " not in log
    refused = [line for line in log.splitlines() if "request refused" in line]
    assert len(refused) == 3 and all(" WARNING " in line for line in refused)
    for line, operation in zip(refused, ("C-FIND", "C-MOVE", "C-GET"), strict=True):
        assert f"operation={operation}" in line and "status=0x0122" in line
    assert "PHI-7731" not in log  # the identifier's patient ID is not logged
    assert "aborted" not in log


def test_non_ct_sop_class_is_refused(peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    s = write_ct_series(tmp_path / "mr", name="net-mr", n=2, size=16, modality="MR")
    sent = storescu(node.port, s.files)
    assert sent.returncode != 0  # no accepted presentation context for MR Image Storage
    assert not node.jobs(s.series_uid)


def test_series_goes_through_states_and_a_resend_gives_one_result(
        peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, pacs = peers
    s = write_ct_series(tmp_path / "a", name="net-ok", n=10, size=16)
    before = set(pacs_sops(pacs))
    sent = storescu(node.port, s.files)
    assert sent.returncode == 0, sent.stderr
    job = node.wait_job(s.series_uid, ("done", "failed", "rejected"))
    assert job["state"] == "done", job
    assert job["n_instances"] == 10 and job["complete_at"] and job["started_at"] and job["finished_at"]
    new = set(pacs_sops(pacs)) - before
    assert len(new) == 1
    # every acknowledged instance is on disk under incoming/<study>/<series>/<sop>.dcm
    folder = node.storage_dir / "incoming" / s.study_uid / s.series_uid
    assert sorted(p.stem for p in folder.glob("*.dcm")) == sorted(s.sop_uids)

    assert storescu(node.port, s.files).returncode == 0  # the PACS routes the same series again
    wait_for(lambda: node.sql("SELECT COUNT(*) FROM instances WHERE series_uid=?", (s.series_uid,)), 5)
    time.sleep(2.5)  # > stable_seconds: a second job would have been queued by now
    assert [j["state"] for j in node.jobs(s.series_uid)] == ["done"]
    assert [r for r in node.pipeline_runs() if s.series_uid in r] == [f"{job['id']} {s.series_uid} 10 run"]
    assert set(pacs_sops(pacs)) - before == new  # one set of results

    listing = node.cli("jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["job"]: r for r in json.loads(listing.stdout)}
    assert rows[job["id"]]["state"] == "done" and rows[job["id"]]["patient"].startswith("P-")
    assert "NODE-TEST-1" not in listing.stdout  # pseudonymised
    table = node.cli("jobs")
    assert table.returncode == 0 and "done" in table.stdout


def test_short_series_rejected_with_reason(peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    s = write_ct_series(tmp_path / "short", name="net-short", n=3, slice_mm=3.0, size=16)
    assert storescu(node.port, s.files).returncode == 0
    job = node.wait_job(s.series_uid, ("rejected", "queued", "running", "done"))
    assert (job["state"], job["reason"]) == ("rejected", "z-coverage 9 mm < 20 mm; 3 slices < 5")
    assert not [r for r in node.pipeline_runs() if s.series_uid in r]


def test_compressed_transfer_syntaxes_stored_as_received(
        peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    files = []
    for i, ts in enumerate((RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian,
                            ExplicitVRLittleEndian)):
        if ts == DeflatedExplicitVRLittleEndian:
            s = write_ct_series(tmp_path / f"ts{i}", name=f"net-ts{i}", n=1, size=64, random_pixels=True)
            ds = pydicom.dcmread(s.files[0])
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
            ds.save_as(s.files[0], enforce_file_format=True)
        else:
            s = write_ct_series(tmp_path / f"ts{i}", name=f"net-ts{i}", n=1, size=64, random_pixels=True,
                                transfer_syntax=ts)
        files.append((s, ts))
    statuses = pynetdicom_send(node.port, [s.files[0] for s, _ in files])
    assert statuses == [0] * len(files)
    for s, ts in files:
        stored = node.storage_dir / "incoming" / s.study_uid / s.series_uid / f"{s.sop_uids[0]}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(s.files[0]), ts.name
        back = pydicom.dcmread(stored)
        assert back.file_meta.TransferSyntaxUID == ts
        assert (back.pixel_array == pydicom.dcmread(s.files[0]).pixel_array).all()


def test_malformed_instance_refused_and_node_keeps_serving(
        peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, _ = peers
    s = write_ct_series(tmp_path / "bad", name="net-bad", n=2, size=16)
    raw = s.files[0].read_bytes()
    body = raw[132:]
    meta_end = 132 + 12 + int.from_bytes(body[8:12], "little")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:meta_end + 300])  # cut before SeriesInstanceUID: cannot be filed
    no_uid = pydicom.dcmread(s.files[1])
    del no_uid.StudyInstanceUID
    statuses = pynetdicom_send(node.port, [truncated, no_uid, s.files[1]])
    assert statuses[0] is not None and statuses[0] >= 0xA000
    assert statuses[1] == 0xA900
    assert statuses[2] == 0  # the same association still works
    assert not list(node.storage_dir.rglob("*.tmp"))
    assert not list(node.storage_dir.rglob(f"{s.sop_uids[0]}.dcm"))
    assert echoscu(node.port, aet="ECHOSCU").returncode == 0


def test_late_instance_reopens_series_and_supersedes(
        peers: tuple[NodeProcess, StoreSCP], tmp_path: Path) -> None:
    node, pacs = peers
    s = write_ct_series(tmp_path / "late", name="net-late", n=10, size=16)
    before = set(pacs_sops(pacs))
    assert storescu(node.port, s.files[:8]).returncode == 0
    first = node.wait_job(s.series_uid, ("done", "failed", "rejected"))
    assert first["state"] == "done" and first["n_instances"] == 8
    assert storescu(node.port, s.files[8:]).returncode == 0
    second = node.wait_job(s.series_uid, ("done", "failed", "rejected"))
    assert second["id"] != first["id"] and second["state"] == "done" and second["n_instances"] == 10
    jobs = node.jobs(s.series_uid)
    expected = [(first["id"], second["id"]), (second["id"], None)]
    assert [(j["id"], j["superseded_by"]) for j in jobs] == expected
    assert len(set(pacs_sops(pacs)) - before) == 2  # partial content's result, then the full one's


def test_enhanced_ct_is_received_and_refused_with_its_reason(peers: tuple[NodeProcess, StoreSCP],
                                                              tmp_path: Path) -> None:
    """Stored (nothing a PACS sends is lost), then refused at selection by its cause: the loader reads
    one slice per instance, and the worker used to reject it as "no DICOM images with position"."""
    node, _ = peers
    s = write_enhanced_ct(tmp_path / "enh.dcm", name="net-enh", frames=8, size=16)
    assert pynetdicom_send(node.port, s.files) == [0]
    job = node.wait_job(s.series_uid, ("done", "failed", "rejected"))
    assert (job["state"], job["n_instances"]) == ("rejected", 1), job
    assert job["reason"] == ("multi-frame images (Enhanced CT) are not measured: 1 instance(s);"
                             " export the series as single-frame CT images"), job
    assert not [r for r in node.pipeline_runs() if s.series_uid in r]
