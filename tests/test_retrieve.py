"""Prior retrieval against a real Orthanc: C-FIND by PatientID, then C-MOVE of the earlier CT to our SCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.config import Settings
from dicomnode.harness.capture import CapturingSCP
from dicomnode.harness.net import free_port, wait_for
from dicomnode.harness.orthanc import OrthancServer, have_orthanc
from dicomnode.harness.series import write_ct_series
from dicomnode.network.retrieve import (
    SeriesHit,
    StudyHit,
    choose_prior,
    choose_series,
    find_studies,
    move_series,
    retrieve_prior,
)
from seg.records import ChangeRecord, StructureVolume, VolumeRecord


def _ct_series(folder: Path, patient_id: str, study_date: str, n: int, study_uid: str) -> str:
    """A tiny synthetic CT series (n slices of 16×16) in ``study_uid``; returns its SeriesInstanceUID."""
    return write_ct_series(folder, name=f"{folder.name}-{study_uid[-8:]}", n=n, slice_mm=5.0,
                           pixel_mm=5.0, patient_id=patient_id, study_date=study_date,
                           study_uid=study_uid).series_uid


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A plain Orthanc (no routing script) that knows this node's AE as a C-MOVE destination."""
    if not have_orthanc():
        pytest.skip("Orthanc not installed")
    with OrthancServer(tmp_path / "orthanc", lua_scripts=None, dicomweb=False) as server:
        yield server


def _settings(tmp_path: Path, orthanc: OrthancServer) -> Settings:
    settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE")
    settings.pacs.port = orthanc.dicom_port
    settings.selection.min_slices = 5
    return settings


def test_prior_arrives_at_the_node_by_c_move(orthanc, tmp_path: Path) -> None:
    pid = "RETRIEVE-001"
    base_study, follow_study = generate_uid(), generate_uid()
    base_series = _ct_series(tmp_path / "base", pid, "20230105", 8, base_study)
    _ct_series(tmp_path / "scout", pid, "20230105", 2, base_study)  # a short series in the same study
    _ct_series(tmp_path / "follow", pid, "20230610", 8, follow_study)
    _ct_series(tmp_path / "other", "SOMEONE-ELSE", "20220101", 8, generate_uid())
    for name in ("base", "scout", "follow", "other"):
        orthanc.upload_folder(tmp_path / name)
    with CapturingSCP("THIGHNODE", orthanc.node_port) as node:
        received = node.received
        settings = _settings(tmp_path, orthanc)
        studies = find_studies(settings, pid)
        assert {s.study_instance_uid for s in studies} == {base_study, follow_study}

        outcome = retrieve_prior(settings, pid, before_date="20230610", known_study_uids={follow_study})
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


def test_a_refused_move_and_a_pacs_that_is_down_are_errors(orthanc: OrthancServer, tmp_path: Path) -> None:
    """C-MOVE to an AE the PACS does not know ends in a failure status: an error naming it, not an empty
    success; a PACS that does not answer is a ConnectionError."""
    study = generate_uid()
    series = _ct_series(tmp_path / "s", "RETRIEVE-003", "20230105", 6, study)
    orthanc.upload_folder(tmp_path / "s")
    settings = _settings(tmp_path, orthanc)
    with pytest.raises(RuntimeError, match=r"C-MOVE failed with status 0x"):
        move_series(settings, study, series, destination="NOSUCHAE")
    settings.pacs.port = free_port()  # nobody listens there
    with pytest.raises(ConnectionError, match="no association"):
        find_studies(settings, "RETRIEVE-003")


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


def test_choose_prior_takes_the_surgery_day_only_without_an_earlier_ct() -> None:
    """A study on the surgery day may be the check CT (implant in place): the CT before that day is
    taken first; without one, the surgery day's earliest (the admission CT precedes the check CT)."""
    surgery = "20240301"
    before = StudyHit("before", "20240229", "100000", ["CT"])
    morning = StudyHit("morning", surgery, "080000", ["CT"])
    check = StudyHit("check", surgery, "160000", ["CT", "SR"])
    follow = StudyHit("follow", "20240603", "100000", ["CT"])
    studies = [follow, check, morning, before]

    def chosen(before_date: str, known: set[str]) -> str | None:
        hit = choose_prior(studies, before_date, known, surgery_date=surgery)
        return hit.study_instance_uid if hit else None

    assert chosen("20240603", {"follow"}) == "before"  # not the later check CT of the surgery day
    assert chosen("20240603", {"follow", "before"}) == "morning"
    assert chosen("20240603", {"follow", "before", "morning"}) == "check"  # its metal QA will place it
    # the check CT's own request (placed post-operative): only a study before the surgery day
    assert chosen(surgery, {"follow", "check"}) == "before"
    assert chosen(surgery, {"follow", "check", "before"}) is None
    undated_time = StudyHit("no-time", surgery, "", ["CT"])  # no StudyTime: sorts first on its day
    hit = choose_prior([check, undated_time], "20240603", set(), surgery_date=surgery)
    assert hit is not None and hit.study_instance_uid == "no-time"


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
    orthanc.upload_folder(tmp_path / "base")
    with CapturingSCP("THIGHNODE", orthanc.node_port) as node:
        received = node.received
        settings = _settings(tmp_path, orthanc)

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
        wait_for(lambda: len(received) >= 8, 30, what=f"the baseline ({len(received)} instances so far)")
        assert {ds.SeriesInstanceUID for ds in received} == {base_series}
        # The node measures the arrived baseline; pairing then has the comparison for the follow-up.
        assert record(base_study, base_series, "20230105", 1.0) == []
        late = pairing.changes_for_earlier_series(settings, base_series)
        assert len(late) == 1 and late[0].structures[0].loss_pct == pytest.approx(20.0)
