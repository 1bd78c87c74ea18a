"""Prior retrieval against a real Orthanc: C-FIND by PatientID, then C-MOVE of the earlier CT to our SCP."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from dicomnode.config import Settings
from dicomnode.external import ORTHANC_FALLBACK, dcmtk_tool, orthanc_binary, require_dcmtk_tool
from dicomnode.harness.net import free_port
from dicomnode.network.retrieve import (
    SeriesHit,
    StudyHit,
    choose_prior,
    choose_series,
    find_studies,
    retrieve_prior,
)
from seg.records import ChangeRecord, StructureVolume, VolumeRecord

ORTHANC = orthanc_binary() or ORTHANC_FALLBACK


def _ct_series(folder: Path, patient_id: str, study_date: str, n: int, study_uid: str) -> str:
    """A tiny synthetic CT series (n slices of 16×16) as DICOM files; returns its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientSex = patient_id, "Synthetic^Retrieve", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.Modality = study_date, "090000", "CT"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 1, k + 1, ""
        ds.ImagePositionPatient = [0.0, 0.0, float(-5 * k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], 5.0
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = (np.full((16, 16), 40 + k, dtype=np.int16)).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return series_uid


@pytest.fixture
def orthanc(tmp_path: Path):
    if not Path(ORTHANC).exists() or dcmtk_tool("storescu") is None:
        pytest.skip("Orthanc/dcmtk not installed")
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()
    cfg = {
        "Name": "pairing-test",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "DicomModalities": {"node": ["THIGHNODE", "127.0.0.1", node_port]},
    }
    cfg_path = tmp_path / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, TCP_NODELAY="1")
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1).read()
                break
            except OSError as exc:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        "Orthanc did not start: " + (tmp_path / "orthanc.log").read_text()[-2000:]
                    ) from exc
                time.sleep(0.2)
        yield {"dicom_port": dicom_port, "http_port": http_port, "node_port": node_port, "env": env}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _store(folder: Path, port: int, env: dict) -> None:
    subprocess.run(
        [
            require_dcmtk_tool("storescu"),
            "-aec",
            "ORTHANC",
            "-aet",
            "LOADER",
            "127.0.0.1",
            str(port),
            *map(str, sorted(folder.glob("*.dcm"))),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )


def test_prior_arrives_at_the_node_by_c_move(orthanc, tmp_path: Path) -> None:
    pid = "RETRIEVE-001"
    base_study, follow_study = generate_uid(), generate_uid()
    base_series = _ct_series(tmp_path / "base", pid, "20230105", 8, base_study)
    _ct_series(tmp_path / "scout", pid, "20230105", 2, base_study)  # a short series in the same study
    _ct_series(tmp_path / "follow", pid, "20230610", 8, follow_study)
    _ct_series(tmp_path / "other", "SOMEONE-ELSE", "20220101", 8, generate_uid())
    for name in ("base", "scout", "follow", "other"):
        _store(tmp_path / name, orthanc["dicom_port"], orthanc["env"])

    received: list[Dataset] = []
    done = threading.Event()

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    node = AE(ae_title="THIGHNODE")
    node.supported_contexts = StoragePresentationContexts
    server = node.start_server(
        ("127.0.0.1", orthanc["node_port"]), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE")
        settings.pacs.port = orthanc["dicom_port"]
        settings.selection.min_slices = 5
        studies = find_studies(settings, pid)
        assert {s.study_instance_uid for s in studies} == {base_study, follow_study}

        outcome = retrieve_prior(settings, pid, before_date="20230610", known_study_uids={follow_study})
        done.set()
        assert outcome.moved, outcome.reason
        assert outcome.study_instance_uid == base_study
        assert outcome.series_instance_uid == base_series
        assert outcome.completed == 8 and outcome.failed == 0
        assert len(received) == 8
        assert {ds.SeriesInstanceUID for ds in received} == {base_series}
        assert {ds.PatientID for ds in received} == {pid}

        # Nothing earlier than the baseline itself: stated reason, nothing moved.
        again = retrieve_prior(settings, pid, before_date="20230105", known_study_uids={follow_study})
        assert not again.moved and "no earlier" in again.reason

        settings.pairing.retrieve_priors = False
        off = retrieve_prior(settings, pid, before_date="20230610", known_study_uids={follow_study})
        assert not off.moved and "switched off" in off.reason
        assert len(received) == 8
    finally:
        server.shutdown()


def test_choose_prior_prefers_preoperative_then_nearest_and_skips_known() -> None:
    studies = [
        StudyHit("1", "20230101", modalities=["CT"]),
        StudyHit("2", "20230110", modalities=["CT"]),
        StudyHit("3", "20230112", modalities=["MR"]),
        StudyHit("4", "20230301", modalities=["CT"]),
        StudyHit("5", "20230601", modalities=["CT"]),
    ]
    assert choose_prior(studies, "20230601", {"5"}).study_instance_uid == "4"  # the nearest earlier CT
    assert choose_prior(studies, "20230601", {"5"}, surgery_date="20230111").study_instance_uid == "2"
    assert choose_prior(studies, "20230601", {"2", "5"}, surgery_date="20230111").study_instance_uid == "1"
    assert choose_prior(studies, "20230601", {"1", "2"}, surgery_date="20230111") is None  # no pre-op CT left
    assert choose_prior(studies, "20230601", {"1", "2", "4", "5"}) is None
    assert choose_prior(studies, "20230101", set()) is None  # same day is not a prior


def test_choose_series_wants_a_volume() -> None:
    series = [SeriesHit("a", "CT", 2), SeriesHit("b", "CT", 140), SeriesHit("c", "SR", 1)]
    assert choose_series(series, 50).series_instance_uid == "b"
    assert choose_series([SeriesHit("a", "CT", 2)], 50) is None


def test_pairing_asks_for_the_prior_and_pairs_it_when_it_arrives(orthanc, tmp_path: Path) -> None:
    """record_result of a lone follow-up → C-FIND/C-MOVE by the pairing thread → baseline at the node."""
    from dicomnode.clinical import pairing

    pid = "RETRIEVE-002"
    base_study, follow_study = generate_uid(), generate_uid()
    base_series = _ct_series(tmp_path / "base", pid, "20230105", 8, base_study)
    _store(tmp_path / "base", orthanc["dicom_port"], orthanc["env"])
    received: list[Dataset] = []
    arrived = threading.Event()

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        if len(received) == 8:
            arrived.set()
        return 0x0000

    node = AE(ae_title="THIGHNODE")
    node.supported_contexts = StoragePresentationContexts
    server = node.start_server(
        ("127.0.0.1", orthanc["node_port"]), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE")
        settings.pacs.port = orthanc["dicom_port"]
        settings.selection.min_slices = 5

        def record(study: str, series: str, date: str, factor: float) -> list[ChangeRecord]:
            out = tmp_path / "var" / "results" / series
            out.mkdir(parents=True, exist_ok=True)
            sartorius = StructureVolume(label=1, name="sartorius", group="anterior",
                                        volume_cm3=200.0 * factor, left_cm3=100.0 * factor,
                                        right_cm3=100.0 * factor)
            VolumeRecord(series_instance_uid=series, structures=(sartorius,)).save(out / "volumes.json")
            return pairing.record_result(
                settings,
                pairing.ResultRecord(
                    patient_id=pid,
                    issuer_of_patient_id="",
                    patient_sex="F",
                    patient_size_m=None,
                    study_instance_uid=study,
                    study_date=date,
                    study_time="090000",
                    series_instance_uid=series,
                    volumes_json=out / "volumes.json",
                    seg_sop_instance_uid=series + ".9",
                    sr_sop_instance_uid=series + ".8",
                    result_dir=out,
                ),
            )

        assert record(follow_study, generate_uid(), "20230610", 0.8) == []
        assert arrived.wait(30), f"the baseline did not arrive ({len(received)} instances)"
        assert {ds.SeriesInstanceUID for ds in received} == {base_series}
        # The node measures the arrived baseline; pairing then has the comparison for the follow-up.
        assert record(base_study, base_series, "20230105", 1.0) == []
        late = pairing.changes_for_earlier_series(settings, base_series)
        assert len(late) == 1 and late[0].structures[0].loss_pct == pytest.approx(20.0)
    finally:
        server.shutdown()
