"""End-to-end through a real Orthanc: routing script, then the node's results back in the PACS.

The routing test needs only Orthanc and a pynetdicom SCP standing in for the node; the node tests
start ``dicomnode serve`` and use the phantom, the pipeline and the demo model, and skip with the
reason when one of those is not available.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from orthanc import OrthancServer, free_port, requires_orthanc, wait_for
from peers import NodeProcess
from pynetdicom.sop_class import CTImageStorage as CT_IMAGE
from pynetdicom.sop_class import LegacyConvertedEnhancedCTImageStorage as LEGACY_CT
from pynetdicom.sop_class import MRImageStorage as MR_IMAGE

from dicomnode.harness.capture import CapturingSCP
from dicomnode.harness.scu import send_series
from dicomnode.network.sop import is_ct, output_kind
from seg.records import ChangeRecord, Evaluation, VolumeRecord

pytestmark = [pytest.mark.e2e, requires_orthanc]


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


def test_route_lua_forwards_only_thigh_like_ct(tmp_path: Path) -> None:
    node_port = free_port()
    scp = CapturingSCP("THIGHNODE", node_port).start()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, stable_age=1)
    try:
        orthanc.start()
        data = tmp_path / "data"
        routed = {
            "z-extent": write_series(data / "a", n=21, thickness=10.0, seed=1),  # 210 mm, no hint
            "hint": write_series(data / "c", n=6, description="CT THIGHS BILATERAL", seed=3),
            "legacy": write_series(data / "h", n=6, description="THIGH", sop_class=LEGACY_CT, seed=8),
        }
        not_routed = {
            "chest": write_series(data / "b", n=30, thickness=10.0, body_part="CHEST", seed=2),
            "mr": write_series(data / "d", n=25, thickness=10.0, modality="MR", sop_class=MR_IMAGE, seed=4),
            "short": write_series(data / "e", n=6, seed=5),
            "scout": write_series(data / "f", n=25, thickness=10.0, description="Topogram 0.6 T20f", seed=6),
            "from-node": write_series(data / "g", n=25, thickness=10.0, body_part="LEG", seed=7),
        }
        for name in ("a", "b", "c", "d", "e", "f", "h"):
            orthanc.upload_folder(data / name)
        send_series(data / "g", orthanc.dicom_port, "ORTHANC", calling_aet="THIGHNODE")

        expected = {routed["z-extent"]: 21, routed["hint"]: 6, routed["legacy"]: 6}
        wait_for(lambda: all(scp.series_counts().get(uid) == n for uid, n in expected.items()), 60,
                 what="routed series complete at the stand-in node")
        # A series whose upload stalls for longer than the stable age (a loaded machine) is decided
        # early and again once complete, so wait for a decision on each of the 8 series and for
        # each expected reason rather than for 7 decision lines.
        reasons = ("is not CT", "BodyPartExamined CHEST", "mentions TOPOGRAM", "sent by the node itself",
                   "z-extent 18 mm < 200 mm")

        def all_decided() -> bool:
            log = orthanc.log_path.read_text()
            decided = set(re.findall(r"thigh-routing: series (\S+) (?:not )?routed", log))
            return len(decided) >= 8 and all(r in log for r in reasons)

        wait_for(all_decided, 60, what="a routing decision with its reason for each of the 8 series")
        time.sleep(1.5)  # let any (wrong) routing job finish before asserting absence
        received = scp.series_counts()
        assert {uid: received.get(uid) for uid in expected} == expected
        for name, uid in not_routed.items():
            assert received.get(uid, 0) == 0, f"{name} series was routed"
        log = orthanc.log_path.read_text()
        assert "Routing^Test" not in log and "ROUTE1" not in log  # no PHI in the routing log
    finally:
        orthanc.stop()
        scp.stop()


def test_routing_jobs_that_failed_are_resubmitted_when_the_node_is_back(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, stable_age=1)
    scp = None
    try:
        orthanc.start()
        data = tmp_path / "data"
        first = write_series(data / "first", n=5, description="THIGH", seed=31)
        orthanc.upload_folder(data / "first")  # the node is down: the routing job fails
        wait_for(lambda: "to the node failed" in orthanc.log_path.read_text(), 30,
                 what="a failed routing job")
        scp = CapturingSCP("THIGHNODE", node_port).start()
        second = write_series(data / "second", n=5, description="THIGH", seed=32)
        orthanc.upload_folder(data / "second")
        wait_for(lambda: scp.series_counts().get(second) == 5 and scp.series_counts().get(first) == 5, 30,
                 what="both series at the node")
        assert "resubmitted" in orthanc.log_path.read_text()
    finally:
        orthanc.stop()
        if scp is not None:
            scp.stop()


def test_deploy_files_agree() -> None:
    """deploy/node.toml and deploy/orthanc/orthanc.json describe the same two AEs and ports."""
    import tomllib

    from orthanc import DEPLOY, render

    from dicomnode.config import load_settings

    cfg = render.render()
    node_cfg = tomllib.loads((DEPLOY.parent / "node.toml").read_text())
    settings = load_settings(DEPLOY.parent / "node.toml")
    target = cfg["DicomModalities"][cfg["ThighRouting"]["NodeModality"]]
    assert (target["AET"], target["Port"]) == (settings.ae_title, settings.port)
    assert (node_cfg["ae_title"], node_cfg["port"]) == (settings.ae_title, settings.port)
    assert settings.ae_title in cfg["ThighRouting"]["NodeAets"]
    assert (settings.pacs.ae_title, settings.pacs.port) == (cfg["DicomAet"], cfg["DicomPort"])
    assert cfg["DicomAet"] in settings.allowed_calling_aets
    assert target["AllowStore"] and target["AllowFind"] and target["AllowMove"]
    assert cfg["LuaScripts"] == ["/etc/orthanc/thigh/route.lua"] and cfg["OverwriteInstances"] is True
    assert cfg["ThighRouting"]["MinZExtentMm"] <= settings.selection.min_z_extent_mm
    rendered = render.render(node_host="dicomnode", dicom_port=104, extra={"Name": "x"})
    assert rendered["DicomModalities"]["thighnode"]["Host"] == "dicomnode" and rendered["DicomPort"] == 104


def test_render_cli_registers_users_and_refuses_a_malformed_one(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--user NAME:PASSWORD`` fills RegisteredUsers (authentication stays on); a bad value exits 2."""
    from orthanc import render

    out = tmp_path / "orthanc.json"
    assert render.main(["--user", "admin:s3:cret", "--user", "viewer:pw", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    assert cfg["AuthenticationEnabled"] is True
    assert cfg["RegisteredUsers"] == {"admin": "s3:cret", "viewer": "pw"}
    assert out.stat().st_mode & 0o777 == 0o640  # the passwords are in plain text
    assert "warning" not in capsys.readouterr().err

    assert render.main(["--out", str(tmp_path / "locked.json")]) == 0  # the shipped file: nobody gets in
    assert "no RegisteredUsers" in capsys.readouterr().err
    for bad in ("admin", "admin:", ":hunter2", " admin:hunter2"):
        with pytest.raises(SystemExit) as exc:
            render.main(["--user", bad, "--out", str(tmp_path / "bad.json")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "NAME:PASSWORD" in err and "hunter2" not in err
    assert not (tmp_path / "bad.json").exists()


def test_rendered_user_opens_the_rest_api_and_dicomweb(tmp_path: Path) -> None:
    """The documented render (user, DICOMweb) gives an Orthanc that answers that user and 401 to others."""
    import base64
    import subprocess
    import urllib.error
    import urllib.request

    from orthanc import ORTHANC_BIN, ROUTE_LUA, render

    from dicomnode.harness.net import dcmtk_env

    http_port, dicom_port = free_port(), free_port()
    dicomweb = render.dicomweb_plugin() is not None
    config = tmp_path / "orthanc.json"
    render.main(["--http-port", str(http_port), "--dicom-port", str(dicom_port),
                 "--storage", str(tmp_path / "db"), "--lua", str(ROUTE_LUA), "--user", "admin:pw:1",
                 *(["--dicomweb"] if dicomweb else []), "--out", str(config)])

    def status(path: str, user: str | None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}")
        if user:
            request.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return error.code

    def up() -> bool:
        try:
            return status("/system", None) == 401
        except OSError:
            return False

    with (tmp_path / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC_BIN, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env=dcmtk_env(), cwd=tmp_path, start_new_session=True)
    try:
        wait_for(up, 30, what="Orthanc to start")
        assert status("/system", "admin:pw:1") == 200
        assert status("/jobs?expand", "admin:pw:1") == 200
        assert status("/system", "admin:wrong") == 401
        if dicomweb:
            assert status("/dicom-web/studies", "admin:pw:1") == 200
            assert status("/dicom-web/studies", None) == 401
    finally:
        proc.terminate()
        proc.wait(20)


# --------------------------------------------------------------------------------------------
# The node behind Orthanc with NODE's stand-in pipeline: wiring, outage, rejection, re-routing
# --------------------------------------------------------------------------------------------
@dataclass
class Wired:
    orthanc: OrthancServer
    node: NodeProcess
    tmp: Path


def wire(tmp: Path, pipeline: str | None, **node_overrides: Any) -> Wired:
    """Orthanc (shipped config + route.lua, StableAge 1 s) and ``dicomnode serve`` pointed at each other."""
    pacs_port = free_port()
    node = NodeProcess(tmp / "node", pipeline=pipeline, allowed_calling_aets=["ORTHANC"],
                       pacs={"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
                       send={"attempts": 10, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 2.0},
                       pairing={"retrieve_priors": False}, **node_overrides)
    orthanc = OrthancServer(tmp / "orthanc", node_port=node.port, dicom_port=pacs_port, stable_age=1)
    return Wired(orthanc, node, tmp)


@pytest.fixture(scope="module")
def wired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wired]:
    w = wire(tmp_path_factory.mktemp("wired"), "orthanc:slow_stand_in",
             selection={"min_z_extent_mm": 250.0, "min_slices": 50})
    try:
        w.orthanc.start()
        w.node.start()
        yield w
    finally:
        w.node.stop()
        w.orthanc.stop()


def outputs_in(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Non-CT objects of a study in Orthanc by kind: seg, sr, summary, other (lists of instance IDs)."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for inst in orthanc.instances_of_study(study_uid):
        cls = orthanc.get_bytes(f"/instances/{inst['ID']}/metadata/SopClassUid").decode()
        if is_ct(cls):
            continue
        kinds[output_kind(cls).lower()].append(inst["ID"])  # seg, sr, summary or other
    return kinds


def uploaded(w: Wired, name: str, **series: Any) -> tuple[str, str]:
    """A series written under ``name`` and uploaded to Orthanc, which routes it by its rules:
    (SeriesInstanceUID, StudyInstanceUID)."""
    import pydicom

    folder = w.tmp / name
    series_uid = write_series(folder, **series)
    w.orthanc.upload_folder(folder)
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    return series_uid, str(ds.StudyInstanceUID)


def test_results_reach_orthanc_after_an_outage(wired: Wired) -> None:
    w = wired
    series, study = uploaded(w, "thigh", n=60, thickness=5.0, description="CT LOWER EXTREMITY", seed=21)
    # Orthanc routes it once stable; the node takes it; Orthanc goes down while the node works on it.
    w.node.wait_job(series, ("running",), timeout=120)
    w.orthanc.stop()

    def send_failed() -> bool:
        return bool(w.node.sql("SELECT 1 FROM outbox o JOIN jobs j ON j.id=o.job_id "
                               "WHERE j.series_uid=? AND o.last_error IS NOT NULL", (series,)))

    wait_for(send_failed, 60, what="a failed send while Orthanc is down")
    assert w.node.jobs(series)[-1]["state"] == "sending"
    w.orthanc.start()
    job = w.node.wait_job(series, ("done",), timeout=120)
    assert job["reason"] is None
    kinds = wait_for(lambda: outputs_in(w.orthanc, study) or None, 30, what="the result in Orthanc")
    assert sum(len(v) for v in kinds.values()) == 1 and len(kinds["summary"]) == 1
    assert len(w.node.pipeline_runs()) == 1


def test_non_thigh_series_routed_by_mistake_is_rejected_visibly(wired: Wired,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    w = wired
    monkeypatch.setenv("COLUMNS", "300")  # rich folds the reason column in a narrow table
    # the THIGH hint routes it; the node knows better
    series, study = uploaded(w, "short", n=6, thickness=3.0, description="CT THIGH LOCAL", seed=22)
    job = w.node.wait_job(series, ("rejected",), timeout=120)
    assert "z-coverage" in job["reason"] and "< 250 mm" in job["reason"]
    table = w.node.cli("jobs")
    assert table.returncode == 0, table.stderr
    assert "rejected" in table.stdout and "z-coverage" in table.stdout
    as_json = json.loads(w.node.cli("jobs", "--json").stdout)
    mine = [j for j in as_json if j["series_instance_uid"] == series]
    assert mine and mine[0]["state"] == "rejected" and mine[0]["reason"] == job["reason"]
    time.sleep(1.5)
    assert not any(outputs_in(w.orthanc, study).values())
    assert not [r for r in w.node.pipeline_runs() if series in r]


def test_same_series_routed_twice_gives_one_set_of_outputs(wired: Wired) -> None:
    w = wired
    series, study = uploaded(w, "twice", n=60, thickness=5.0, body_part="LEG", seed=23)
    w.node.wait_job(series, ("done",), timeout=120)
    before = sorted(i["ID"] for i in w.orthanc.instances_of_study(study))
    series_id = w.orthanc.lookup(series, "Series")
    answer = w.orthanc.post("/modalities/thighnode/store", {"Resources": [series_id], "Synchronous": True})
    assert answer["InstancesCount"] == 60 and answer["FailedInstancesCount"] == 0  # really sent again
    time.sleep(2.5)  # > the node's stable_seconds: a re-opened series would complete again by now

    def settled() -> bool:
        jobs = w.node.jobs(series)
        return bool(jobs) and all(j["state"] in ("done", "rejected", "failed", "superseded") for j in jobs)

    wait_for(settled, 60, what="the node to settle the re-routed series")
    assert len([r for r in w.node.pipeline_runs() if series in r]) == 1
    after = sorted(i["ID"] for i in w.orthanc.instances_of_study(study))
    assert after == before
    assert len(outputs_in(w.orthanc, study)["summary"]) == 1


# --------------------------------------------------------------------------------------------
# The real pipeline behind Orthanc: a phantom patient, pre-op and follow-up
# --------------------------------------------------------------------------------------------
SPACING = (3.0, 3.0, 5.0)  # coarse phantoms keep the suite's CPU time modest
# iliac crest to mid-shin is 605 mm; 440 mm (hip to below the knee) keeps every analysed muscle and
# cuts the inference time by a quarter
PATIENT = {"patient_id": "E2E-0001", "patient_name": "E2E^Patient", "sex": "F", "height_m": 1.60,
           "z_range_mm": (-330.0, 110.0)}
ATROPHY = {"gluteus_medius": 0.7, "gluteus_minimus": 0.7, "vastus_lateralis": 0.75}
DEFAULT_TOLERANCE_PCT = 20.0  # relative volume error allowed when the model states none


def missing_science() -> list[str]:
    """Parts of other issues the real-pipeline test needs; listed in the skip reason when absent."""
    import importlib

    needed = (("seg.phantom", "make_phantom"), ("seg.io", "load_dicom_series"), ("seg.infer", "segment"),
              ("seg.model", "load_model"), ("seg.measure", "measure_volumes"),
              ("reporting.seg", "build_seg_frames"), ("reporting.sr", "build_measurement_sr"),
              ("reporting.summary", "build_summary"),
              ("reporting.followup_sr", "build_followup_sr"), ("dicomnode.clinical.pairing", "record_result"))
    missing = []
    for module, attr in needed:
        try:
            if not hasattr(importlib.import_module(module), attr):
                missing.append(f"{module}.{attr}")
        except ImportError as exc:
            missing.append(f"{module} ({type(exc).__name__})")
    if not missing:
        try:
            from seg.model import load_model

            load_model(None, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure means: no usable demo model yet
            missing.append(f"the shipped demo model ({type(exc).__name__}: {str(exc)[:120]})")
    return missing


def phantom_study(tmp: Path, name: str, **options: Any) -> tuple[str, str, Path, VolumeRecord]:
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    ph = make_phantom(PhantomOptions(spacing_mm=SPACING, **options))
    folder = Path(write_phantom(ph, tmp / "phantoms" / name))
    truth = VolumeRecord.load(folder / "truth" / "volumes.json")
    return str(ph.header.study_instance_uid), str(ph.header.series_instance_uid), folder / "dicom", truth


def sr_volumes(ds: Any) -> dict[str, float]:
    """{tracking identifier, e.g. "Vastus lateralis left": volume cm³} from a TID 1500 SR."""
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
                if child.ValueType == "NUM" and value is None and "MeasuredValueSequence" in child:
                    mv = child.MeasuredValueSequence[0]
                    if mv.MeasurementUnitsCodeSequence[0].CodeValue == "cm3":
                        value = float(mv.NumericValue)
            if tid and value is not None:
                found[tid] = value
            walk(children)

    walk(ds.get("ContentSequence", []))
    return found


def _find(tree: Any, key: str) -> float | None:
    """The first numeric value stored under ``key`` anywhere in a nested dict/list."""
    if isinstance(tree, dict):
        if isinstance(tree.get(key), int | float):
            return float(tree[key])
        children = list(tree.values())
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _find(child, key)
        if found is not None:
            return found
    return None


def held_out(model_path: Path | None = None) -> Evaluation | None:
    """The model package's held-out evaluation (``dicomnode evaluate``'s evaluation.json), if it ships one."""
    from seg.package import DEMO_DIR

    path = (model_path or DEMO_DIR) / "evaluation.json"
    return Evaluation.load(path) if path.is_file() else None


def model_json(model_path: Path | None = None) -> dict:
    """The package's model.json: free-form provenance (training validation, a stated tolerance)."""
    from seg.package import DEMO_DIR

    path = (model_path or DEMO_DIR) / "model.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tolerances_pct(model_path: Path | None = None) -> tuple[float, float]:
    """(total, per-muscle) relative volume tolerance, from the model package's own held-out evaluation.

    "Within the model's tolerance": a package that states its measured volume errors
    (``volume_tolerance_pct`` in its model.json, or the total and median per-muscle absolute errors
    of its evaluation.json from ``dicomnode evaluate``) is held to twice those (at
    least 5 % / 10 %); a package that states nothing is held to 20 %.
    """
    stated = _find(model_json(model_path), "volume_tolerance_pct")
    if stated is not None:
        return stated, stated
    ev = held_out(model_path)
    total = ev.total_muscle_abs_volume_error_pct if ev else None
    median = ev.median_abs_muscle_volume_error_pct if ev else None
    return (max(2 * total, 5.0) if total is not None else DEFAULT_TOLERANCE_PCT,
            max(2 * median, 10.0) if median is not None else DEFAULT_TOLERANCE_PCT)


def sr_matches_volumes(w: Wired, series_uid: str, kinds: dict[str, list[str]]) -> VolumeRecord:
    """The TID 1500 report stored in Orthanc carries the node's volumes.json numbers, per muscle and side."""
    from seg.labels import ANALYSED_MUSCLES, by_name

    measured = VolumeRecord.load(w.node.storage_dir / "results" / series_uid / "volumes.json")
    got = measured.by_name()
    from reporting.rules import is_found
    from reporting.sr import SR_SERIES_NUMBER

    reports = [w.orthanc.instance_dataset(i) for i in kinds["sr"]]
    # both SRs are TID 1500 "Imaging Measurement Report"s; the follow-up SR is another series
    in_sr = [sr_volumes(sr) for sr in reports
             if sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
             and int(sr.SeriesNumber) == SR_SERIES_NUMBER]
    assert len(in_sr) == 1 and in_sr[0], "not exactly one TID 1500 measurement report in the study"
    for m in ANALYSED_MUSCLES:
        for side in ("left", "right"):
            label = f"{by_name(m).display_name} {side}"  # the SR's tracking identifier
            value = got[m].side_volume(side)
            if is_found(value):  # not found (no voxel, or a speck): no segment, an "absent" group
                assert in_sr[0][label] == pytest.approx(value, abs=0.1), (m, side)
            else:
                assert label not in in_sr[0], (m, side)
    return measured


def volume_errors(measured: VolumeRecord, truth: VolumeRecord, tol_total: float, tol: float) -> list[str]:
    """What is outside the model's tolerance: the analysed-muscle total, or > 1/5 of the big muscles."""
    from seg.labels import ANALYSED_MUSCLES

    want, got = truth.by_name(), measured.by_name()
    problems = []
    total_want = sum(want[m].volume_cm3 for m in ANALYSED_MUSCLES)
    total_got = sum(got[m].volume_cm3 for m in ANALYSED_MUSCLES)
    err = (total_got - total_want) / total_want * 100
    if abs(err) > tol_total:
        problems.append(f"total {total_got:.0f} vs {total_want:.0f} cm³ ({err:+.1f} % > {tol_total:g} %)")
    big = [m for m in ANALYSED_MUSCLES if want[m].volume_cm3 >= 100]  # small ones: few voxels at 3 mm
    off = {m: f"{got[m].volume_cm3:.0f}/{want[m].volume_cm3:.0f}" for m in big
           if abs(got[m].volume_cm3 - want[m].volume_cm3) / want[m].volume_cm3 * 100 > tol}
    if len(off) > len(big) // 5:
        problems.append(f"{len(off)} of {len(big)} big muscles off by > {tol:g} % (measured/truth): {off}")
    return problems


def wait_outputs(w: Wired, study_uid: str, series_uid: str, followup: bool,
                 timeout: float = 900) -> dict[str, list[str]]:
    def ready() -> dict[str, list[str]] | None:
        jobs = w.node.jobs(series_uid)
        if jobs and jobs[-1]["state"] in ("failed", "rejected"):
            raise AssertionError(f"job {jobs[-1]['state']}: {jobs[-1]['reason']}\n{w.node.log()[-2000:]}")
        if not jobs or jobs[-1]["state"] != "done":
            return None
        kinds = outputs_in(w.orthanc, study_uid)
        enough = kinds["seg"] and kinds["summary"] and len(kinds["sr"]) >= (2 if followup else 1)
        return kinds if enough else None

    return wait_for(ready, timeout, interval=1.0, what="SEG, SR and summary in Orthanc")


@dataclass
class PatientRun:
    w: Wired
    pre: tuple[str, str, Path, VolumeRecord]
    post: tuple[str, str, Path, VolumeRecord]
    kinds: dict[str, dict[str, list[str]]]
    measured: dict[str, VolumeRecord]


@pytest.fixture(scope="module")
def patient_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PatientRun]:
    """A phantom patient's pre-op and follow-up studies uploaded to Orthanc, routed, measured, returned."""
    missing = missing_science()
    if missing:
        pytest.skip("real pipeline not complete yet: " + ", ".join(missing))
    tmp = tmp_path_factory.mktemp("patient")
    w = wire(tmp, None, worker={"device": "cpu", "poll_seconds": 0.2})
    pre = phantom_study(tmp, "pre", seed=5, study_date="20240110", **PATIENT)
    post = phantom_study(tmp, "post", seed=5, study_date="20240520", postop=True, implant_side="left",
                         atrophy=ATROPHY, series_number=2, **PATIENT)
    try:
        w.orthanc.start()
        w.node.start(timeout=120)
        w.orthanc.upload_folder(pre[2])
        pre_kinds = wait_outputs(w, pre[0], pre[1], followup=False)
        w.orthanc.upload_folder(post[2])
        post_kinds = wait_outputs(w, post[0], post[1], followup=True)
        measured = {name: VolumeRecord.load(w.node.storage_dir / "results" / st[1] / "volumes.json")
                    for name, st in (("pre", pre), ("post", post))}
        yield PatientRun(w, pre, post, {"pre": pre_kinds, "post": post_kinds}, measured)
    finally:
        w.node.stop()
        w.orthanc.stop()


@pytest.mark.slow
def test_phantom_patient_gets_seg_sr_summary_and_followup_sr_in_orthanc(patient_run: PatientRun) -> None:
    r = patient_run
    pre_kinds, post_kinds = r.kinds["pre"], r.kinds["post"]
    assert len(pre_kinds["seg"]) == 1 and len(pre_kinds["sr"]) == 1 and len(pre_kinds["summary"]) == 1
    assert len(post_kinds["seg"]) == 1 and len(post_kinds["sr"]) == 2 and len(post_kinds["summary"]) == 1
    seg = r.w.orthanc.instance_dataset(pre_kinds["seg"][0])
    assert seg.StudyInstanceUID == r.pre[0] and seg.PatientID == PATIENT["patient_id"]
    sr_matches_volumes(r.w, r.pre[1], pre_kinds)
    sr_matches_volumes(r.w, r.post[1], post_kinds)
    from reporting.followup_sr import FOLLOWUP_SERIES_NUMBER
    from reporting.sr import SR_SERIES_NUMBER

    reports = [r.w.orthanc.instance_dataset(i) for i in post_kinds["sr"]]
    # the measurement report and the follow-up report: both TID 1500, in two series
    assert {ds.ConceptNameCodeSequence[0].CodeMeaning for ds in reports} == {"Imaging Measurement Report"}
    assert sorted(int(ds.SeriesNumber) for ds in reports) == [SR_SERIES_NUMBER, FOLLOWUP_SERIES_NUMBER]
    changes = sorted((r.w.node.storage_dir / "results" / r.post[1]).glob("change-*.json"))
    assert changes, "no change record for the follow-up"
    change = ChangeRecord.load(changes[0])
    assert change.baseline.study_instance_uid == r.pre[0]
    assert change.followup.study_instance_uid == r.post[0]
    assert outputs_in(r.w.orthanc, r.pre[0]) == pre_kinds  # nothing new in the baseline study
    from reporting.summary import key_images_size

    pre_sc, post_sc = (r.w.orthanc.instance_dataset(k["summary"][0]) for k in (pre_kinds, post_kinds))
    # the follow-up's page adds a row of key images (the baseline's, from its stored CT and label map)
    # and the change chart to the baseline's page; without the baseline row it would be shorter
    assert post_sc.Rows - pre_sc.Rows > key_images_size(2)[0] - key_images_size(1)[0]


# A model that cannot segment (its own validation says so) makes volume accuracy meaningless to assert.
MIN_VALIDATION_DICE = 0.5
# Each muscle side must lie within this multiple of the worst error of one side in the package's
# held-out evaluation (at least SIDE_FLOOR_PCT): the e2e phantom is one more held-out case. The
# pre-operative study is held to the pre-operative held-out cases' worst (where the package states it),
# the post-operative one to the worst of all.
SIDE_MARGIN, SIDE_FLOOR_PCT = 1.5, 5.0


def side_tolerances_pct(model_path: Path | None = None, preop: bool = True) -> dict[str, float] | None:
    """Per analysed muscle, the relative volume error one side may have, from the held-out evaluation:
    of a pre-operative study, its pre-operative cases' worst (all cases' in an older evaluation.json);
    of a post-operative one (``preop=False``), all cases' worst."""
    from seg.labels import ANALYSED_MUSCLES

    ev = held_out(model_path)

    def worst_side(m: str) -> float | None:
        if not ev or m not in ev.per_class:
            return None
        c = ev.per_class[m]
        pre = c.max_abs_side_volume_error_pct_preop
        return pre if preop and pre is not None else c.max_abs_side_volume_error_pct

    worst = {m: worst_side(m) for m in ANALYSED_MUSCLES}
    if any(w is None for w in worst.values()):
        return None
    return {m: max(SIDE_MARGIN * float(w or 0.0), SIDE_FLOOR_PCT) for m, w in worst.items()}


def sr_side_errors(sr_values: dict[str, float], truth: VolumeRecord,
                   tolerances: dict[str, float]) -> list[str]:
    """Every analysed muscle side whose SR volume is outside its tolerance of the phantom's truth."""
    from seg.labels import by_name

    want = truth.by_name()
    problems = []
    for name, tol in tolerances.items():
        for side in ("left", "right"):
            true_cm3 = float(want[name].side_volume(side))
            got = sr_values.get(f"{by_name(name).display_name} {side}", 0.0)  # absent: not found
            err = (got - true_cm3) / true_cm3 * 100
            if abs(err) > tol:
                problems.append(f"{name} {side}: {got:.1f} vs {true_cm3:.1f} cm³ "
                                f"({err:+.1f} % > {tol:.0f} %)")
    return problems


def study_volume_problems(r: PatientRun, name: str) -> list[str]:
    """One study's 21 muscles per side (from the SR in Orthanc) and its muscle total against truth."""
    from reporting.sr import SR_SERIES_NUMBER

    ev = held_out()  # its held-out Dice, else its training validation's
    dice = ev.mean_dice_muscles if ev else _find(model_json(), "mean_dice_muscles")
    if dice is not None and dice < MIN_VALIDATION_DICE:
        pytest.skip(f"the shipped model's own validation mean muscle Dice is {dice:.2f} "
                    f"(< {MIN_VALIDATION_DICE}): volume accuracy is not asserted for it")
    tolerances = side_tolerances_pct(preop=name == "pre")
    if tolerances is None:
        pytest.skip("the model package states no per-side held-out volume error (evaluation.json)")
    tol_total, _ = tolerances_pct()
    st = r.pre if name == "pre" else r.post
    reports = [r.w.orthanc.instance_dataset(i) for i in r.kinds[name]["sr"]]
    measurement = [sr for sr in reports if int(sr.SeriesNumber) == SR_SERIES_NUMBER]
    assert len(measurement) == 1, f"{name}: not exactly one measurement SR"
    problems = sr_side_errors(sr_volumes(measurement[0]), st[3], tolerances)
    problems += volume_errors(r.measured[name], st[3], tol_total, 100.0)
    return problems


@pytest.mark.slow
def test_phantom_patient_volumes_match_truth_within_the_model_tolerance(patient_run: PatientRun) -> None:
    """Pre-operative study: all 21 muscles, each side, as the SR stored in Orthanc states them, against
    the phantom's truth within the package's own held-out error; the total within its held-out total
    error. The follow-up's loss shows on the operated side."""
    problems = study_volume_problems(patient_run, "pre")
    assert not problems, problems
    r = patient_run
    changes = sorted((r.w.node.storage_dir / "results" / r.post[1]).glob("change-*.json"))
    loss = {(s.name, s.side): s.loss_pct for s in ChangeRecord.load(changes[0]).structures}
    # the phantom's 30 % atrophy on the operated (left) side shows as a left-right difference
    assert loss[("gluteus_medius", "left")] > loss[("gluteus_medius", "right")] + 10


@pytest.mark.slow
def test_followup_volumes_match_truth_within_the_model_tolerance(patient_run: PatientRun) -> None:
    """Post-operative study (implant, atrophy): the same check as the pre-operative one. (A strict
    xfail until 0.9.1 on phantom 1.1, with the metal artefact reduction, passed it; 0.9.0 missed by
    tensor fasciae latae on the operated side, -33.3 % against a bound of 33 %.)"""
    problems = study_volume_problems(patient_run, "post")
    assert not problems, problems


# Bones a package segments reliably on held-out data: a geometry check independent of the muscles.
RELIABLE_DICE = 0.85
BONES = ("femur", "iliac_bone")


@pytest.mark.slow
def test_bones_match_truth_within_their_held_out_error(
        patient_run: PatientRun) -> None:
    """Through Orthanc and the node, femur and iliac bone (when their held-out Dice >= 0.85) measure
    within their held-out error of the truth: three times the mean absolute error (for normal errors
    the mean absolute error is 0.8 sigma, so about a 98 % bound for one study), or the worst per-side
    error if larger (the same reference as the muscle check above), at least 10 %; so a broken
    geometry, preprocessing or inverse resampling fails here whatever the model's muscles. (0.4.0:
    iliac bone held-out mean absolute error 5.0 %, this study +12.1 %.)
    The pre-operative study only: the follow-up's implant is metal the phantom's truth does not count
    as bone, and the follow-up's volumes are checked above."""
    ev = held_out()
    if ev is None or not ev.per_class:
        pytest.skip("the model package has no held-out evaluation.json with per-class figures")
    reliable = {name: max(3 * c.abs_volume_error_pct, c.max_abs_side_volume_error_pct or 0.0, 10.0)
                for name, c in ev.per_class.items()
                if name in BONES and c.dice >= RELIABLE_DICE and c.abs_volume_error_pct is not None}
    if not reliable:
        pytest.skip(f"no structure reaches held-out Dice {RELIABLE_DICE}")
    r = patient_run
    problems = []
    for study, st in (("pre", r.pre),):
        want = {s.name: s.volume_cm3 for s in st[3].structures}
        got = {s.name: s.volume_cm3 for s in r.measured[study].structures}
        for name, tol in reliable.items():
            err = (got.get(name, 0.0) - want[name]) / want[name] * 100
            if abs(err) > tol:
                problems.append(f"{study} {name}: {got.get(name, 0.0):.0f} vs {want[name]:.0f} cm³ "
                                f"({err:+.1f} % > {tol:.0f} %)")
    assert not problems, problems
