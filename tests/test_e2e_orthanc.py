"""End-to-end through a real Orthanc: routing script, then the node's results back in the PACS.

The routing test needs only Orthanc and a pynetdicom SCP standing in for the node; the node tests
start ``dicomnode serve`` and use the phantom, the pipeline and the demo model, and skip with the
reason when one of those is not available.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from orthanc import OrthancServer, free_port, requires_orthanc, wait_for

pytestmark = [pytest.mark.e2e, requires_orthanc]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SC_CLASSES = {SECONDARY_CAPTURE, "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.4"}
SR_CLASSES = {COMPREHENSIVE_3D_SR, "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}


# --------------------------------------------------------------------------------------------
# Routing script alone: a pynetdicom SCP stands in for the node
# --------------------------------------------------------------------------------------------
def write_series(folder: Path, *, n: int, thickness: float = 3.0, modality: str = "CT", body_part: str = "",
                 description: str = "", sop_class: str = CT_IMAGE, seed: int = 1) -> str:
    """A tiny synthetic series (8×8 pixels); returns its SeriesInstanceUID."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=["study", str(seed)])
    series = generate_uid(entropy_srcs=["series", str(seed), modality, description, body_part, str(n)])
    frame = generate_uid(entropy_srcs=["for", str(seed)])
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.PatientName, ds.PatientID, ds.PatientSex = "Routing^Test", f"ROUTE{seed}", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1 + seed, k + 1
        ds.SeriesDescription = description
        if body_part:
            ds.BodyPartExamined = body_part
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, -k * thickness]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], thickness
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full((8, 8), k, dtype=np.int16).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return series


class CapturingSCP:
    """A pynetdicom storage SCP that records which SeriesInstanceUIDs it received (the stand-in node)."""

    def __init__(self, ae_title: str, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        ae = AE(ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")

        def on_store(event: Any) -> int:
            with self._lock:
                self.received[str(event.dataset.SeriesInstanceUID)] += 1
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self) -> None:
        self.server.shutdown()


def store_as(ae_title: str, port: int, called: str, folder: Path) -> None:
    """C-STORE a folder into Orthanc under a chosen calling AE title (pynetdicom SCU)."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title)
    ae.add_requested_context(CT_IMAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        for f in sorted(folder.glob("*.dcm")):
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status and status.Status == 0
    finally:
        assoc.release()


def test_route_lua_forwards_only_thigh_like_ct(tmp_path: Path) -> None:
    node_port = free_port()
    scp = CapturingSCP("THIGHNODE", node_port)
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, stable_age=1)
    try:
        orthanc.start()
        data = tmp_path / "data"
        routed = {
            "z-extent": write_series(data / "a", n=70, thickness=3.0, seed=1),  # 210 mm, no hint
            "hint": write_series(data / "c", n=6, description="CT THIGHS BILATERAL", seed=3),
        }
        not_routed = {
            "chest": write_series(data / "b", n=80, body_part="CHEST", seed=2),
            "mr": write_series(data / "d", n=70, modality="MR", sop_class=MR_IMAGE, seed=4),
            "short": write_series(data / "e", n=6, seed=5),
            "scout": write_series(data / "f", n=70, description="Topogram 0.6 T20f", seed=6),
            "from-node": write_series(data / "g", n=70, body_part="LEG", seed=7),
        }
        for name in ("a", "b", "c", "d", "e", "f"):
            orthanc.upload_folder(data / name)
        store_as("THIGHNODE", orthanc.dicom_port, "ORTHANC", data / "g")

        wait_for(lambda: all(scp.received.get(uid) for uid in routed.values()), 60,
                 what="routed series at the stand-in node")
        # every series has had its stable event once all 7 decisions are in the log
        wait_for(lambda: len(re.findall(r"thigh-routing: series \S+ (?:not )?routed",
                                        orthanc.log_path.read_text())) >= 7, 30, what="7 routing decisions")
        time.sleep(1.5)  # let any (wrong) routing job finish before asserting absence
        assert scp.received[routed["z-extent"]] == 70
        assert scp.received[routed["hint"]] == 6
        for name, uid in not_routed.items():
            assert scp.received.get(uid, 0) == 0, f"{name} series was routed"
        log = orthanc.log_path.read_text()
        assert "is not CT" in log and "BodyPartExamined CHEST" in log and "mentions TOPOGRAM" in log
        assert "sent by the node itself" in log and "z-extent 18 mm < 200 mm" in log
        assert "Routing^Test" not in log and "ROUTE1" not in log  # no PHI in the routing log
    finally:
        orthanc.stop()
        scp.close()


def test_orthanc_restart_keeps_instances(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", lua_scripts=[])
    try:
        orthanc.start()
        uid = write_series(tmp_path / "s", n=3, seed=11)
        answers = orthanc.upload_folder(tmp_path / "s")
        assert {a["Status"] for a in answers} == {"Success"}
        port = orthanc.dicom_port
        orthanc.restart()
        assert orthanc.dicom_port == port
        sid = orthanc.lookup(uid, "Series")
        assert sid and len(orthanc.get(f"/series/{sid}")["Instances"]) == 3
        ds = orthanc.instance_dataset(orthanc.get(f"/series/{sid}")["Instances"][0])
        assert ds.SeriesInstanceUID == uid
    finally:
        orthanc.stop()


# --------------------------------------------------------------------------------------------
# The node behind Orthanc: pre-op + follow-up, outage, non-thigh, routed twice
# --------------------------------------------------------------------------------------------
SPACING = (3.0, 3.0, 5.0)  # coarse phantoms keep the suite's CPU time modest
PATIENT = {"patient_id": "E2E-0001", "patient_name": "E2E^Patient", "sex": "F", "height_m": 1.60}
ATROPHY = {"gluteus_medius": 0.75, "gluteus_minimus": 0.75, "vastus_lateralis": 0.8}
DEFAULT_TOLERANCE_PCT = 20.0  # relative volume error allowed when the model states none


def missing_pieces() -> list[str]:
    """What the node e2e tests need from other parts of the project and is not there yet."""
    import importlib

    missing = []
    needed = (("seg.phantom", "make_phantom"), ("seg.infer", "segment"), ("seg.model", "load_model"),
              ("seg.measure", "measure_volumes"), ("reporting.seg", "build_seg"),
              ("reporting.sr", "build_measurement_sr"), ("reporting.summary", "build_summary"),
              ("reporting.followup_sr", "build_followup_sr"), ("dicomnode.pairing", "record_result"))
    for module, attr in needed:
        try:
            if not hasattr(importlib.import_module(module), attr):
                missing.append(f"{module}.{attr}")
        except ImportError as exc:
            missing.append(f"{module} ({exc.__class__.__name__})")
    from dicomnode.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    if "serve" not in names:
        missing.append("`dicomnode serve`")
    if "jobs" not in names:
        missing.append("`dicomnode jobs`")
    if not missing:
        demo = REPO_ROOT / "seg" / "models" / "demo"
        if not demo.is_dir() or not any(demo.iterdir()):
            missing.append("the shipped demo model (seg/models/demo)")
    return missing


REPO_ROOT = Path(__file__).resolve().parents[1]


class Node:
    """``dicomnode serve`` as its own process on a free port, sending results to the test Orthanc."""

    def __init__(self, workdir: Path, port: int, pacs_port: int) -> None:
        self.workdir, self.port = workdir, port
        self.storage = workdir / "var"
        self.config = workdir / "node.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'ae_title = "THIGHNODE"\nhost = "127.0.0.1"\nport = {port}\nstorage_dir = "{self.storage}"\n'
            'allowed_calling_aets = ["ORTHANC"]\nstable_seconds = 1\nlog_level = "INFO"\n\n'
            f'[pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n\n'
            '[worker]\ndevice = "cpu"\npoll_seconds = 0.2\n\n'
            '[send]\nattempts = 8\ninitial_backoff_seconds = 0.5\nmax_backoff_seconds = 2\n'
            'timeout_seconds = 10\n\n'
            '[pairing]\nretrieve_priors = false\n')
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(self.config)]

    def start(self) -> Node:
        import socket

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cli("serve"), stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, 120, what="the node to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        db = self.storage / "index.sqlite"
        if not db.exists():
            return []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def jobs_of(self, series_uid: str) -> list[sqlite3.Row]:
        return self.rows("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"node is not running:\n{self.log.read_text()[-3000:]}")


@dataclass
class Study:
    study_uid: str
    series_uid: str
    folder: Path
    truth: dict


@dataclass
class Deployment:
    orthanc: OrthancServer
    node: Node
    tmp: Path
    studies: dict[str, Study] = field(default_factory=dict)


def make_study(tmp: Path, name: str, **options: Any) -> Study:
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    ph = make_phantom(PhantomOptions(spacing_mm=SPACING, **options))
    folder = Path(write_phantom(ph, tmp / "phantoms" / name))
    truth = json.loads((folder / "truth" / "volumes.json").read_text())
    return Study(str(ph.meta["StudyInstanceUID"]), str(ph.meta["SeriesInstanceUID"]), folder / "dicom", truth)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    missing = missing_pieces()
    if missing:
        pytest.skip("node e2e needs parts not in the repository yet: " + ", ".join(missing))
    tmp = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    orthanc = OrthancServer(tmp / "orthanc", node_port=node_port, stable_age=2)
    orthanc.start()
    node = Node(tmp / "node", node_port, orthanc.dicom_port)
    try:
        node.start()
        yield Deployment(orthanc, node, tmp)
    finally:
        node.stop()
        orthanc.stop()


def outputs_in(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Non-CT objects of a study in Orthanc by kind: seg, sr, summary, other (lists of instance IDs)."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for inst in orthanc.instances_of_study(study_uid):
        cls = orthanc.get_bytes(f"/instances/{inst['ID']}/metadata/SopClassUid").decode()
        if cls in (CT_IMAGE, "1.2.840.10008.5.1.4.1.1.2.1"):
            continue
        kind = ("seg" if cls in (SEG_STORAGE, LABELMAP_SEG_STORAGE) else "sr" if cls in SR_CLASSES
                else "summary" if cls in SC_CLASSES else "other")
        kinds[kind].append(inst["ID"])
    return kinds


def complete(kinds: dict[str, list[str]], followup: bool) -> bool:
    return (len(kinds["seg"]) >= 1 and len(kinds["sr"]) >= (2 if followup else 1)
            and len(kinds["summary"]) >= 1)


def wait_results(dep: Deployment, study: Study, followup: bool, timeout: float = 600) -> dict[str, list[str]]:
    def ready() -> dict[str, list[str]] | None:
        dep.node.alive()
        for job in dep.node.jobs_of(study.series_uid):
            if job["state"] in ("failed", "rejected"):
                raise AssertionError(f"job {job['id']} {job['state']}: {job['reason']}")
        if not dep.orthanc.running:
            return None
        kinds = outputs_in(dep.orthanc, study.study_uid)
        return kinds if complete(kinds, followup) else None

    return wait_for(ready, timeout, interval=1.0, what="results in Orthanc")


def sr_volumes(ds: Any) -> dict[str, float]:
    """{tracking identifier ("vastus_lateralis left"): volume cm³} from a TID 1500 SR."""
    found: dict[str, float] = {}

    def walk(items: Any) -> None:
        for item in items:
            children = item.get("ContentSequence", [])
            tid, value = None, None
            for child in children:
                concept = child.get("ConceptNameCodeSequence")
                name = concept[0].CodeMeaning if concept else ""
                if child.ValueType == "TEXT" and name == "Tracking Identifier":
                    tid = str(child.TextValue)
                if child.ValueType == "NUM" and value is None:
                    mv = child.MeasuredValueSequence[0]
                    if mv.MeasurementUnitsCodeSequence[0].CodeValue == "cm3":
                        value = float(mv.NumericValue)
            if tid and value is not None:
                found[tid] = value
            walk(children)

    walk(ds.get("ContentSequence", []))
    return found


def tolerance_pct(node_volumes: dict) -> float:
    model = node_volumes.get("model") or {}
    for key in ("volume_tolerance_pct", "tolerance_pct"):
        if isinstance(model.get(key), int | float):
            return float(model[key])
    return DEFAULT_TOLERANCE_PCT


def check_volumes(dep: Deployment, study: Study, kinds: dict[str, list[str]]) -> None:
    """Node's volumes.json vs phantom truth (model tolerance) and vs the SR stored in Orthanc."""
    from seg.labels import ANALYSED_MUSCLES

    measured = json.loads((dep.node.storage / "results" / study.series_uid / "volumes.json").read_text())
    tol = tolerance_pct(measured)
    truth = {s["name"]: s for s in study.truth["structures"]}
    got = {s["name"]: s for s in measured["structures"]}
    total_truth = sum(truth[m]["volume_cm3"] for m in ANALYSED_MUSCLES)
    total_got = sum(got[m]["volume_cm3"] for m in ANALYSED_MUSCLES)
    assert abs(total_got - total_truth) / total_truth * 100 <= tol, (total_got, total_truth, tol)
    big = [m for m in ANALYSED_MUSCLES if truth[m]["volume_cm3"] >= 100]  # small muscles: too few voxels
    bad = {m: (round(got[m]["volume_cm3"], 1), round(truth[m]["volume_cm3"], 1)) for m in big
           if abs(got[m]["volume_cm3"] - truth[m]["volume_cm3"]) / truth[m]["volume_cm3"] * 100 > tol}
    assert len(bad) <= len(big) // 5, f"muscles off by more than {tol}%: {bad}"

    srs = [dep.orthanc.instance_dataset(i) for i in kinds["sr"]]
    measurement = [sr for sr in srs if sr_volumes(sr)]
    assert measurement, "no SR with volume measurements in Orthanc"
    values = sr_volumes(measurement[0])
    for m in big:
        for side in ("left", "right"):
            key = f"{m} {side}"
            assert key in values, f"{key} missing from the SR"
            assert values[key] == pytest.approx(got[m][f"{side}_cm3"], abs=0.1)


def test_pre_op_study_gets_seg_sr_summary(deployment: Deployment) -> None:
    dep = deployment
    pre = make_study(dep.tmp, "pre", seed=5, study_date="20240110", **PATIENT)
    dep.studies["pre"] = pre
    dep.orthanc.upload_folder(pre.folder)
    kinds = wait_results(dep, pre, followup=False)
    assert len(kinds["seg"]) == 1 and len(kinds["summary"]) >= 1
    seg = dep.orthanc.instance_dataset(kinds["seg"][0])
    assert seg.StudyInstanceUID == pre.study_uid and seg.PatientID == PATIENT["patient_id"]
    check_volumes(dep, pre, kinds)


def test_followup_survives_orthanc_outage_and_gets_followup_sr(deployment: Deployment) -> None:
    dep = deployment
    if "pre" not in dep.studies:
        pytest.skip("needs the pre-op study of the previous test")
    post = make_study(dep.tmp, "post", seed=5, study_date="20240520", postop=True, implant_side="left",
                      atrophy=ATROPHY, series_number=2, **PATIENT)
    dep.studies["post"] = post
    dep.orthanc.upload_folder(post.folder)
    # Orthanc goes down once the node has the whole series and works on it.
    wait_for(lambda: any(j["state"] in ("running", "sending") for j in dep.node.jobs_of(post.series_uid)),
             300, interval=0.2, what="the follow-up job to run")
    dep.orthanc.stop()

    def send_failed() -> bool:
        dep.node.alive()
        return bool(dep.node.rows("SELECT 1 FROM outbox o JOIN jobs j ON j.id=o.job_id "
                                  "WHERE j.series_uid=? AND o.last_error IS NOT NULL", (post.series_uid,)))

    wait_for(send_failed, 600, interval=0.5, what="a failed send while Orthanc is down")
    assert not any(j["state"] == "failed" for j in dep.node.jobs_of(post.series_uid))
    dep.orthanc.start()
    kinds = wait_results(dep, post, followup=True)
    check_volumes(dep, post, kinds)
    change_files = list((dep.node.storage / "results" / post.series_uid).glob("change-*.json"))
    assert change_files, "no change record for the follow-up"
    change = json.loads(change_files[0].read_text())
    assert change["baseline"]["study_instance_uid"] == dep.studies["pre"].study_uid
    loss = {(s["name"], s["side"]): s["loss_pct"] for s in change["structures"]}
    assert loss[("gluteus_medius", "left")] > loss[("gluteus_medius", "right")] + 10


def test_non_thigh_series_is_rejected_with_reason_and_no_outputs(deployment: Deployment) -> None:
    dep = deployment
    short = make_study(dep.tmp, "short", seed=9, z_range_mm=(-40.0, 40.0), patient_id="E2E-0002",
                       patient_name="E2E^Short")  # BodyPartExamined HIP: routed by the hint, by mistake
    dep.orthanc.upload_folder(short.folder)
    job = wait_for(lambda: next((j for j in dep.node.jobs_of(short.series_uid) if j["state"] == "rejected"),
                                None), 120, what="the short series to be rejected")
    assert job["reason"]
    table = subprocess.run(dep.node.cli("jobs"), capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert "rejected" in table.stdout
    words = [w for w in re.findall(r"[A-Za-z]{4,}", job["reason"])][:3]
    assert all(w in table.stdout for w in words), (job["reason"], table.stdout)
    time.sleep(2)
    assert not any(outputs_in(dep.orthanc, short.study_uid).values())


def test_same_series_routed_twice_gives_one_set_of_outputs(deployment: Deployment) -> None:
    dep = deployment
    if "pre" not in dep.studies:
        pytest.skip("needs the pre-op study")
    pre = dep.studies["pre"]
    before = sorted(i["ID"] for i in dep.orthanc.instances_of_study(pre.study_uid))
    jobs_before = len(dep.node.jobs_of(pre.series_uid))
    series_id = dep.orthanc.lookup(pre.series_uid, "Series")
    dep.orthanc.post("/modalities/thighnode/store", {"Resources": [series_id], "Synchronous": True})

    def settled() -> bool:
        jobs = dep.node.jobs_of(pre.series_uid)
        return bool(jobs) and all(j["state"] in ("done", "rejected", "failed", "superseded") for j in jobs)

    time.sleep(3)  # > the node's stable_seconds: the re-sent series completes again
    wait_for(settled, 300, interval=0.5, what="the node to settle the re-sent series")
    time.sleep(2)
    after = sorted(i["ID"] for i in dep.orthanc.instances_of_study(pre.study_uid))
    assert after == before
    kinds = outputs_in(dep.orthanc, pre.study_uid)
    assert len(kinds["seg"]) == 1 and len(kinds["sr"]) == 1
    assert len(dep.node.jobs_of(pre.series_uid)) >= jobs_before
