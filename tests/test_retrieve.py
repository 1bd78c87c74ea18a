"""Prior retrieval against a real Orthanc: C-FIND by PatientID, then C-MOVE of the earlier CT to our SCP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.config import Settings
from dicomnode.db import opened
from dicomnode.external import have_dcmtk
from dicomnode.harness.capture import CapturingSCP
from dicomnode.harness.net import free_port, wait_for
from dicomnode.harness.orthanc import OrthancServer, have_orthanc
from dicomnode.harness.series import write_ct_series
from dicomnode.network import retrieve
from dicomnode.network.retrieve import (
    Candidates,
    PacsRefusal,
    SeriesHit,
    StudyHit,
    choose_series,
    find_studies,
    move_series,
    prior_candidates,
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
    base_study, scouts_study, follow_study = generate_uid(), generate_uid(), generate_uid()
    base_series = _ct_series(tmp_path / "base", pid, "20230105", 8, base_study)
    _ct_series(tmp_path / "scout", pid, "20230105", 2, base_study)  # a short series in the same study
    # a later study with a scout alone: preferred by its date, it gives way to the baseline
    _ct_series(tmp_path / "scouts-only", pid, "20230301", 2, scouts_study)
    _ct_series(tmp_path / "follow", pid, "20230610", 8, follow_study)
    _ct_series(tmp_path / "other", "SOMEONE-ELSE", "20220101", 8, generate_uid())
    for name in ("base", "scout", "scouts-only", "follow", "other"):
        orthanc.upload_folder(tmp_path / name)
    with CapturingSCP("THIGHNODE", orthanc.node_port) as node:
        received = node.received
        settings = _settings(tmp_path, orthanc)
        studies = find_studies(settings, pid)
        assert {s.study_instance_uid for s in studies} == {base_study, scouts_study, follow_study}

        outcome = retrieve_prior(settings, pid, before_date="20230610", known_study_uids={follow_study})
        assert outcome.moved, outcome.reason
        assert outcome.reason.endswith("; 2 earlier studies looked at")
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


def test_retrieval_fetches_the_admission_ct_of_the_sites_period(orthanc, tmp_path: Path) -> None:
    """A CT 20 days before surgery and one on the surgery day: by default (14 days) the first is
    older than the admission period and the surgery day's is fetched; a site that sets
    ``pairing.admission_window_days = 30`` gets the one of 20 days before."""
    pid = "RETRIEVE-004"
    surgery, early_study, day_study = "20230210", generate_uid(), generate_uid()
    early = _ct_series(tmp_path / "early", pid, "20230121", 6, early_study)  # 20 days before
    on_day = _ct_series(tmp_path / "day", pid, surgery, 6, day_study)
    for name in ("early", "day"):
        orthanc.upload_folder(tmp_path / name)
    settings = _settings(tmp_path, orthanc)
    with CapturingSCP("THIGHNODE", orthanc.node_port):
        moved = [retrieve_prior(settings, pid, "20230601", set(), surgery).series_instance_uid]
        settings.pairing.admission_window_days = 30
        moved.append(retrieve_prior(settings, pid, "20230601", set(), surgery).series_instance_uid)
    assert moved == [on_day, early]


def test_a_refused_move_and_a_pacs_that_is_down_are_errors(orthanc: OrthancServer, tmp_path: Path) -> None:
    """C-MOVE to an AE the PACS does not know ends in a failure status: an error naming it, not an empty
    success; a PACS that does not answer is a ConnectionError."""
    study = generate_uid()
    series = _ct_series(tmp_path / "s", "RETRIEVE-003", "20230105", 6, study)
    orthanc.upload_folder(tmp_path / "s")
    settings = _settings(tmp_path, orthanc)
    # Orthanc says no more than 0xC000 for an unknown destination: the error says what to check
    with pytest.raises(PacsRefusal, match=r"C-MOVE failed with status 0xC000 \(Unable to Process\): check "
                       r"the PACS's entry for the node \(AE title NOSUCHAE, this node's host, port 11112\)"):
        move_series(settings, study, series, destination="NOSUCHAE")
    settings.pacs.port = free_port()  # nobody listens there
    with pytest.raises(ConnectionError, match="no association"):
        find_studies(settings, "RETRIEVE-003")


def _measured_followup(settings: Settings, patient_id: str, study: str, date: str) -> None:
    """A follow-up as the pipeline records it (one structure's volumes): pairing asks for its prior."""
    out = settings.storage_dir / "results" / f"{study}.1"
    out.mkdir(parents=True)
    VolumeRecord(series_instance_uid=f"{study}.1", structures=()).save(out / "volumes.json")
    from dicomnode.clinical import pairing

    pairing.record_result(settings, pairing.ResultRecord(
        patient_id=patient_id, issuer_of_patient_id="", patient_sex="F", patient_size_m=None,
        study_instance_uid=study, study_date=date, study_time="090000", series_instance_uid=f"{study}.1",
        volumes_json=out / "volumes.json", seg_sop_instance_uid=f"{study}.1.9",
        sr_sop_instance_uid=f"{study}.1.8", result_dir=out))


def test_a_query_retrieve_pacs_says_which_destination_is_wrong(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """dcmtk's dcmqrscp, a PACS that tells its failures apart: an unknown destination (0xA801) and one it
    cannot store at (0xA702) are each named with what to check. A follow-up's request fails with that
    reason until the node gives up; `priors list` shows it, and once the node listens `priors retry`
    asks again (its attempts counted from one) and the series arrives."""
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from dicomnode.clinical import pairing
    from dicomnode.clinical.prior_requests import RetrievalStatus, ask, request_states
    from dicomnode.harness.dcmtk import QueryRetrieveSCP

    if not have_dcmtk("dcmqrscp", "dcmqridx"):
        pytest.skip("dcmtk's dcmqrscp not installed")
    study = generate_uid()
    series = _ct_series(tmp_path / "s", "RETRIEVE-QR", "20230105", 6, study)
    node_port = free_port()
    with QueryRetrieveSCP(tmp_path / "qr", {"THIGHNODE": node_port}) as qr:
        qr.index(sorted((tmp_path / "s").iterdir()))
        env = {"STORAGE_DIR": tmp_path / "var", "AE_TITLE": "THIGHNODE", "PORT": node_port,
               "PACS__PORT": qr.port, "PACS__AE_TITLE": qr.ae_title, "SELECTION__MIN_SLICES": 5,
               "SEND__ATTEMPTS": 2}
        for name, value in env.items():
            monkeypatch.setenv(f"DICOMNODE_{name}", str(value))
        settings = Settings()
        with pytest.raises(PacsRefusal, match=r"status 0xA801 \(Move destination unknown\): the PACS has no "
                           r"destination of that name: add the node to its DICOM nodes \(AE title ELSEWHERE"):
            move_series(settings, study, series, destination="ELSEWHERE")

        def states() -> list:
            with opened(settings.db_path) as db:
                return request_states(db.con)

        _measured_followup(settings, "RETRIEVE-QR", "1.2.826.0.3", "20230610")  # asked at once: fails
        wait_for(lambda: states() and states()[0].status == RetrievalStatus.FAILED, 30, what="attempt 1")
        [request] = pairing.still_wanted(settings, lambda s: True)
        assert ask(settings, request, failed_before=1) == RetrievalStatus.FAILED  # the second and last
        [state] = states()
        assert (state.standing(2), state.failed) == ("given up", 2)
        assert state.detail.startswith(
            "attempt 2 of 2: PacsRefusal: C-MOVE failed with status 0xA702 (Refused: Out of resources, "
            "unable to perform sub-operations): check the PACS's entry for the node (AE title THIGHNODE, "
            f"this node's host, port {node_port})"), state.detail

        cli = CliRunner()
        shown = cli.invoke(app, ["priors", "list"], env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        lines = shown.output.splitlines()
        assert lines[1].split()[2:5] == ["given", "up", "2/2"] and max(map(len, lines)) <= 80
        assert "attempt 2 of 2: PacsRefusal: C-MOVE failed with status 0xA702" in shown.output
        told = cli.invoke(app, ["patients", "timeline", "RETRIEVE-QR"], env={"COLUMNS": "80"}).output
        stated = ("· baseline asked of the PACS (given up, 2 of 2 attempts failed): attempt 2 of 2: "
                  "PacsRefusal: C-MOVE failed with status 0xA702")
        assert " ".join(told.split()).count(stated) == 1 and max(map(len, told.splitlines())) <= 80, told
        reported = cli.invoke(app, ["report", "patient", "RETRIEVE-QR"], env={"COLUMNS": "80"})
        assert reported.exit_code == 0 and reported.output.startswith("no comparison: "), reported.output
        assert " ".join(reported.output.split()).count(stated) == 1, reported.output
        assert max(map(len, reported.output.splitlines())) <= 80, reported.output

        with CapturingSCP("THIGHNODE", node_port) as node:
            asked = cli.invoke(app, ["priors", "retry"])
            assert asked.exit_code == 0, asked.output
            assert asked.output == ("asking the PACS again for 1 follow-up(s) without a baseline\n"
                                    "  1: baseline moved to the node (measured and paired as it arrives)\n")
            assert len(node.received) == 6
        [state] = states()
        assert (state.status, state.failed) == (RetrievalStatus.RETRIEVED, 0)  # counted anew from the retry
        assert cli.invoke(app, ["priors", "list"]).output.startswith("no prior requests waiting")
        [row] = json.loads(cli.invoke(app, ["patients", "timeline", "RETRIEVE-QR", "--json"]).output)
        assert row["prior_request"]["standing"] == "answered", row
        [answered] = json.loads(cli.invoke(app, ["priors", "list", "--all", "--json"]).output)
        assert answered["standing"] == "answered" and answered["attempts"] == 2
        assert {key: answered[key] for key in row["prior_request"]} == row["prior_request"]
        assert answered["detail"].startswith("moved 6 instance(s), 0 failed"), answered
        assert cli.invoke(app, ["priors", "retry"]).output.startswith("no prior request is waiting")


DAYS = 14  # pairing.admission_window_days as shipped: the tests below name their dates by it


def _order(studies: list[StudyHit], before_date: str, known: set[str],
           surgery_date: str | None = None, before_time: str = "", days: int = DAYS) -> list[str]:
    found = prior_candidates(studies, before_date, known, surgery_date, before_time=before_time,
                             admission_window_days=days)
    return [s.study_instance_uid for s in found.studies]


def test_prior_candidates_prefer_preoperative_then_nearest_and_skip_known() -> None:
    studies = [
        StudyHit("1", "20230101", modalities=["CT"]),
        StudyHit("2", "20230110", modalities=["CT"]),
        StudyHit("3", "20230112", modalities=["MR"]),
        StudyHit("4", "20230301", modalities=["CT"]),
        StudyHit("5", "20230601", modalities=["CT"]),
    ]
    assert _order(studies, "20230601", {"5"}) == ["4", "2", "1"]  # the nearest earlier CT first
    assert _order(studies, "20230601", {"5"}, surgery_date="20230111") == ["2", "1"]
    assert _order(studies, "20230601", {"2", "5"}, surgery_date="20230111") == ["1"]
    assert _order(studies, "20230601", {"1", "2"}, surgery_date="20230111") == []  # no pre-op CT left
    assert _order(studies, "20230601", {"1", "2", "4", "5"}) == []
    assert _order(studies, "20230101", set()) == []  # same day, no StudyTime: not a prior


def test_prior_candidates_want_the_admission_ct_pairing_will_take() -> None:
    """With a surgery date the admission CT is wanted, the one pairing takes as baseline (the
    latest pre-operative): the CTs of the admission period before the surgery day come first,
    latest first; then the surgery day's, earliest first (the admission CT of the morning precedes
    the check CT); the CTs older than the admission period only after them, latest first."""
    surgery = "20240301"
    older = StudyHit("older", "20231105", "100000", ["CT"])  # four months before
    year = StudyHit("year", "20230301", "100000", ["CT"])  # a year before the fracture
    before = StudyHit("before", "20240229", "100000", ["CT"])  # the day before
    edge = StudyHit("edge", "20240216", "100000", ["CT"])  # 14 days before: still admission
    morning = StudyHit("morning", surgery, "080000", ["CT"])
    check = StudyHit("check", surgery, "160000", ["CT", "SR"])
    follow = StudyHit("follow", "20240603", "100000", ["CT"])
    studies = [follow, check, morning, before, edge, older, year]

    # not the later check CT of the surgery day before the admission CT
    assert _order(studies, "20240603", {"follow"}, surgery) == [
        "before", "edge", "morning", "check", "older", "year"]
    # a CT a year before and the admission CT of the surgery morning: the morning's first (it was
    # fetched after the year-old one, which stood as the baseline)
    assert _order(studies, "20240603", {"follow", "before", "edge"}, surgery) == [
        "morning", "check", "older", "year"]
    assert _order(studies, "20240603", {"follow", "before", "edge", "morning"}, surgery) == [
        "check", "older", "year"]  # its metal QA will place it
    # the check CT's own request (placed post-operative): the admission period, the admission CT of
    # its morning, then the older CTs; never itself nor a later one
    assert _order(studies, surgery, {"follow", "check"}, surgery, "160000") == [
        "before", "edge", "morning", "older", "year"]
    assert _order(studies, surgery, {"follow", "check", "before", "edge"}, surgery, "160000") == [
        "morning", "older", "year"]
    assert _order(studies, surgery, {"follow", "morning"}, surgery, "080000") == [
        "before", "edge", "older", "year"]
    undated_time = StudyHit("no-time", surgery, "", ["CT"])  # no StudyTime: sorts first on its day
    assert _order([check, undated_time], "20240603", set(), surgery) == ["no-time", "check"]
    # pairing holds the year-old CT as its baseline and asks for the admission period's alone
    only = prior_candidates(studies, "20240603", {"follow", "year"}, surgery, not_before="20240216",
                            admission_window_days=DAYS)
    assert [s.study_instance_uid for s in only.studies] == ["before", "edge", "morning", "check"]
    # without a surgery date there is no admission period: the most recent earlier day first
    assert _order(studies, "20240603", {"follow"}) == [
        "check", "morning", "before", "edge", "older", "year"]


def test_the_admission_period_is_the_sites_setting() -> None:
    """``pairing.admission_window_days`` moves the edge of the admission period: with 7 days a CT
    14 days before surgery is an older one, fetched after the surgery day's; with 180 a CT four
    months before is the admission period's, fetched before them."""
    surgery = "20240301"
    older = StudyHit("older", "20231105", "100000", ["CT"])  # 117 days before
    year = StudyHit("year", "20230301", "100000", ["CT"])  # 366 days before
    before = StudyHit("before", "20240229", "100000", ["CT"])
    edge = StudyHit("edge", "20240216", "100000", ["CT"])  # 14 days before
    morning = StudyHit("morning", surgery, "080000", ["CT"])
    studies = [morning, before, edge, older, year]
    assert _order(studies, "20240603", set(), surgery) == [
        "before", "edge", "morning", "older", "year"]
    assert _order(studies, "20240603", set(), surgery, days=7) == [
        "before", "morning", "edge", "older", "year"]
    assert _order(studies, "20240603", set(), surgery, days=13) == [
        "before", "morning", "edge", "older", "year"]  # 14 > 13: just outside
    assert _order(studies, "20240603", set(), surgery, days=180) == [
        "before", "edge", "older", "morning", "year"]
    assert _order(studies, "20240603", set(), surgery, days=365) == [
        "before", "edge", "older", "morning", "year"]  # 366 > 365: a leap year before


def test_a_same_day_study_is_a_prior_only_when_both_times_tell() -> None:
    """On the asking study's own day the StudyTime decides: an earlier one is a candidate (with a
    surgery date earliest first among the surgery day's, without one after every earlier day); an
    equal or later one never is; a missing or unreadable StudyTime, the asking study's or the
    other's, leaves that day's study out as its date alone would, and says how many."""
    surgery = "20240301"
    before = StudyHit("before", "20240229", "100000", ["CT"])
    admission = StudyHit("admission", surgery, "0800", ["CT"])  # reduced precision: 08:00
    noon = StudyHit("noon", surgery, "12:00:00", ["CT"])  # ACR-NEMA form
    check = StudyHit("check", surgery, "160000", ["CT"])
    twin = StudyHit("twin", surgery, "160000.0", ["CT"])  # the same moment: not earlier
    later = StudyHit("later", surgery, "170000", ["CT"])
    studies = [later, twin, check, noon, admission, before]

    def candidates(surgery_date: str | None, at: str, hits: list[StudyHit] = studies) -> Candidates:
        return prior_candidates(hits, surgery, {"check"}, surgery_date, before_time=at,
                                admission_window_days=DAYS)

    with_date = candidates(surgery, "160000")
    assert [s.study_instance_uid for s in with_date.studies] == ["before", "admission", "noon"]
    assert with_date.untimed_note() == ""
    without = candidates(None, "16:00")
    assert [s.study_instance_uid for s in without.studies] == ["before", "admission", "noon"]
    assert [s.study_instance_uid for s in candidates(None, "160000", [noon, admission]).studies] == [
        "admission", "noon"]  # the day's earliest first: it will be the baseline

    untimed = StudyHit("untimed", surgery, "", ["CT"])
    garbled = StudyHit("garbled", surgery, "25:00", ["CT"])
    some = candidates(surgery, "160000", [before, admission, untimed, garbled])
    assert [s.study_instance_uid for s in some.studies] == ["before", "admission"]
    assert some.untimed == 2
    assert some.untimed_note() == ("; 2 CT studies of the same day not considered: their StudyTime"
                                   " is missing or unreadable")
    for at in ("", "4 pm"):  # the asking study's own time unread: as by its date alone
        own = candidates(surgery, at, [before, admission, noon])
        assert [s.study_instance_uid for s in own.studies] == ["before"]
        assert own.untimed_note() == ("; 2 CT studies of the same day not considered: this study's"
                                      " StudyTime is missing or unreadable")
    assert candidates(None, "160000", [untimed]).untimed_note().startswith(
        "; 1 CT study of the same day not considered: its StudyTime")
    # a follow-up of a later day: the surgery day's studies by their date alone, no note
    after = prior_candidates([untimed, check], "20240603", set(), surgery, before_time="100000",
                             admission_window_days=DAYS)
    assert [s.study_instance_uid for s in after.studies] == ["untimed", "check"]
    assert after.untimed == 0


def test_a_study_without_a_usable_series_gives_way_to_the_next_at_most_three(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The preferred prior holds only scouts: the next candidate is queried and moved; the bound
    stops the search after three studies, and the reason says how many were looked at."""
    studies = [StudyHit(str(n), f"2023010{n}", modalities=["CT"]) for n in range(1, 6)]
    queried: list[str] = []

    def series_of(_settings: Settings, study_uid: str) -> list[SeriesHit]:
        queried.append(study_uid)
        n = 140 if study_uid in usable else 2
        return [SeriesHit(study_uid + ".1", "CT", n), SeriesHit(study_uid + ".2", "SR", 1)]

    moved: list[str] = []

    def move(_settings: Settings, _study_uid: str, series_uid: str) -> tuple[int, int]:
        moved.append(series_uid)
        return 140, 0

    monkeypatch.setattr(retrieve, "find_studies", lambda *_: studies)
    monkeypatch.setattr(retrieve, "find_series", series_of)
    monkeypatch.setattr(retrieve, "move_series", move)
    settings = Settings(storage_dir=Path("var"), pairing={"retrieve_priors": True})

    usable = {"3"}
    outcome = retrieve_prior(settings, "PID", "20230110", set())
    assert outcome.moved and outcome.series_instance_uid == "3.1" and moved == ["3.1"]
    assert queried == ["5", "4", "3"]
    assert outcome.reason == "moved 140 instance(s), 0 failed; 3 earlier studies looked at (of 5)"

    queried.clear()
    usable = {"2"}  # fourth in line: beyond the bound
    outcome = retrieve_prior(settings, "PID", "20230110", set())
    assert not outcome.moved and queried == ["5", "4", "3"] and moved == ["3.1"]
    assert outcome.reason == ("no CT series with enough slices in the 3 earlier studies looked at"
                              " (of 5)")

    queried.clear()
    usable = {"5"}
    outcome = retrieve_prior(settings, "PID", "20230110", set())
    assert outcome.moved and queried == ["5"]
    assert outcome.reason.endswith("; 1 earlier study looked at (of 5)")


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


def test_a_prior_the_pacs_could_not_give_is_asked_for_again_when_it_is_back(tmp_path: Path) -> None:
    """The PACS was down when the follow-up was measured: the request was made once per follow-up,
    so the baseline never came, though the job's sends were retried. Now the attempt is recorded as
    failed, the node's retry loop asks again after the send backoff, and once the PACS is back the
    baseline arrives; a request left "requested" by a stopped node is asked again at the next start,
    one that has run out of attempts is not."""
    import sqlite3
    import threading
    from datetime import UTC, datetime, timedelta

    from dicomnode.clinical import pairing
    from dicomnode.clinical.prior_retries import PriorRequestRetries

    if not have_orthanc():
        pytest.skip("Orthanc not installed")
    pid = "RETRIEVE-DOWN"
    base_study, follow_study = generate_uid(), generate_uid()
    base_series = _ct_series(tmp_path / "base", pid, "20230105", 8, base_study)
    pacs = OrthancServer(tmp_path / "orthanc", lua_scripts=None, dicomweb=False)  # not started: down
    settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE",
                        send={"attempts": 30, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5})
    settings.pacs.port = pacs.dicom_port
    settings.selection.min_slices = 5

    def statuses() -> list[tuple[str, str | None]]:
        con = sqlite3.connect(settings.db_path)
        try:
            return con.execute("SELECT status, detail FROM pairing_retrievals WHERE study_instance_uid=?"
                               " ORDER BY rowid", (follow_study,)).fetchall()
        finally:
            con.close()

    out = tmp_path / "var" / "results" / "follow"
    out.mkdir(parents=True)
    sartorius = StructureVolume(label=1, name="sartorius", group="anterior", volume_cm3=160.0,
                                left_cm3=80.0, right_cm3=80.0)
    VolumeRecord(series_instance_uid="1.2.826.0.1.77", structures=(sartorius,)).save(out / "volumes.json")
    pairing.record_result(settings, pairing.ResultRecord(
        patient_id=pid, issuer_of_patient_id="", patient_sex="F", patient_size_m=None,
        study_instance_uid=follow_study, study_date="20230610", study_time="090000",
        series_instance_uid="1.2.826.0.1.77", volumes_json=out / "volumes.json",
        seg_sop_instance_uid="1.2.826.0.1.77.9", sr_sop_instance_uid="1.2.826.0.1.77.8", result_dir=out))
    wait_for(lambda: len(statuses()) >= 2, 30, what="the first attempt's outcome")
    first = statuses()[1]
    assert first[0] == "failed" and first[1] is not None
    assert first[1].startswith("attempt 1 of 30: NoAssociation: no association with ")
    assert "no connection" in first[1]
    # once its backoff is over, the failed request is due, with one failed attempt
    soon = datetime.now(UTC) + timedelta(seconds=60)
    assert [(r.study_instance_uid, n) for r, n in pairing.due_prior_requests(settings, soon)] == [
        (follow_study, 1)]

    stop = threading.Event()
    retries = PriorRequestRetries(settings)
    loop = threading.Thread(target=retries.run, args=(stop,), daemon=True)
    with CapturingSCP("THIGHNODE", pacs.node_port) as node:
        loop.start()
        try:
            wait_for(lambda: len(statuses()) >= 4, 30, what="a retry while the PACS is down")
            assert [s for s, _ in statuses()[1:]] == ["failed"] * (len(statuses()) - 1)
            with pacs:
                pacs.upload_folder(tmp_path / "base")
                wait_for(lambda: len(node.received) >= 8, 60,
                         what=f"the baseline once the PACS is back ({len(node.received)} instances)")
                wait_for(lambda: statuses()[-1][0] == "retrieved", 30, what="the retrieval's outcome")
        finally:
            stop.set()
            loop.join(10)
        assert {ds.SeriesInstanceUID for ds in node.received} == {base_series}
    failed = sum(s == "failed" for s, _ in statuses())
    assert statuses()[-1][1] is not None and f"attempt {failed} of 30" in statuses()[-2][1]
    # answered: nothing is due any more, at any time
    assert pairing.due_prior_requests(settings, soon + timedelta(days=1)) == []


def test_a_prior_request_out_of_attempts_or_answered_is_not_due(tmp_path: Path) -> None:
    """The index decides what the retry loop asks: a failed request is due only once its backoff is
    over and while attempts are left; a "requested" one only when it was left by an earlier run."""
    from datetime import UTC, datetime, timedelta

    from dicomnode.clinical import pairing
    from dicomnode.clinical.prior_requests import RetrievalStatus

    settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE",
                        send={"attempts": 3, "initial_backoff_seconds": 10, "max_backoff_seconds": 15})
    settings.pacs.port = free_port()  # nobody listens: every attempt fails
    out = tmp_path / "var" / "results" / "f"
    out.mkdir(parents=True)
    VolumeRecord(series_instance_uid="1.2.826.0.2.1", structures=()).save(out / "volumes.json")
    result = pairing.ResultRecord(
        patient_id="P-DUE", issuer_of_patient_id="", patient_sex="M", patient_size_m=None,
        study_instance_uid="1.2.826.0.2", study_date="20230610", study_time="090000",
        series_instance_uid="1.2.826.0.2.1", volumes_json=out / "volumes.json",
        seg_sop_instance_uid="1.2.826.0.2.1.9", sr_sop_instance_uid="1.2.826.0.2.1.8", result_dir=out)
    pairing.record_result(settings, result)

    def last() -> str:
        with pairing.reading(settings) as con:
            return con.execute("SELECT status FROM pairing_retrievals ORDER BY rowid DESC").fetchone()[0]

    wait_for(lambda: last() == RetrievalStatus.FAILED, 30, what="the first attempt failing")
    now = datetime.now(UTC)
    assert pairing.due_prior_requests(settings, now) == []  # backoff: 10 s after attempt 1
    assert pairing.due_prior_requests(settings, now, unanswered_before=now) == []  # failed, not requested
    due = pairing.due_prior_requests(settings, now + timedelta(seconds=11))
    assert [(r.study_instance_uid, r.before_date, n) for r, n in due] == [("1.2.826.0.2", "20230610", 1)]
    from dicomnode.clinical.prior_requests import ask

    assert ask(settings, due[0][0], failed_before=1) == RetrievalStatus.FAILED  # attempt 2: 20 s backoff
    assert pairing.due_prior_requests(settings, datetime.now(UTC) + timedelta(seconds=12)) == []
    assert len(pairing.due_prior_requests(settings, datetime.now(UTC) + timedelta(seconds=16))) == 1
    assert ask(settings, due[0][0], failed_before=2) == RetrievalStatus.FAILED  # attempt 3 of 3: the last
    assert pairing.due_prior_requests(settings, datetime.now(UTC) + timedelta(days=1)) == []
    # another patient's request whose first attempt never recorded an outcome (its process stopped)
    settings.pairing.retrieve_priors = False  # recorded without asking; the row is written by hand
    pairing.record_result(settings, replace(result, patient_id="P-ORPHAN", study_instance_uid="1.2.826.0.3",
                                            series_instance_uid="1.2.826.0.3.1"))
    with pairing.writing(settings) as con:
        con.execute("INSERT INTO pairing_retrievals VALUES (?,?,?,?,?,?)",
                    ("P-ORPHAN", "", "1.2.826.0.3", datetime.now(UTC).isoformat(), RetrievalStatus.REQUESTED,
                     None))
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert pairing.due_prior_requests(settings, later) == []  # it may still be asking
    orphans = pairing.due_prior_requests(settings, later, unanswered_before=later)
    assert [(r.patient_id, n) for r, n in orphans] == [("P-ORPHAN", 0)]  # the node started after it
    # what `dicomnode status` tells the administrator of them
    from typer.testing import CliRunner

    from dicomnode.cli import app

    env = {"DICOMNODE_STORAGE_DIR": str(settings.storage_dir), "DICOMNODE_SEND__ATTEMPTS": "3"}
    shown = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert json.loads(shown.output)["prior_requests"] == {"asking": 1, "given up": 1}, shown.output
    said = CliRunner().invoke(app, ["status"], env=env).output
    assert "prior requests: asking 1, given up 1 (each: dicomnode priors list)" in said
    # and Prometheus, from the operations page's registry
    from prometheus_client import generate_latest

    from dicomnode.db import Database
    from dicomnode.ops.metrics import node_registry

    db = Database(settings.db_path)
    try:
        scraped = generate_latest(node_registry(db, settings.storage_dir, 3)).decode()
    finally:
        db.close()
    for standing, count in (("asking", 1), ("waiting to ask again", 0), ("given up", 1), ("answered", 0)):
        assert f'dicomnode_prior_requests{{standing="{standing}"}} {count:.1f}' in scraped, standing
    hour = later + timedelta(seconds=pairing.UNANSWERED_AFTER_SECONDS)
    assert [(r.patient_id, n) for r, n in pairing.due_prior_requests(settings, hour)] == [("P-ORPHAN", 0)]


def test_priors_retry_names_each_request_while_it_asks(tmp_path: Path) -> None:
    """Several requests are asked one after the other, each up to the network timeout where the PACS
    hangs: stderr names the one being asked, stdout keeps the counts. Here the PACS is still down:
    each is asked once more, and each failure is counted from one again."""
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from dicomnode.clinical import pairing
    from dicomnode.clinical.prior_requests import request_states

    port = free_port()  # nobody listens: every attempt fails
    settings = Settings(storage_dir=tmp_path / "var", ae_title="THIGHNODE", send={"attempts": 1})
    settings.pacs.port = port
    follow_ups = ["1.2.826.0.4.1", "1.2.826.0.4.2"]
    for n, study in enumerate(follow_ups):
        out = tmp_path / "var" / "results" / str(n)
        out.mkdir(parents=True)
        VolumeRecord(series_instance_uid=f"{study}.1", structures=()).save(out / "volumes.json")
        pairing.record_result(settings, pairing.ResultRecord(
            patient_id=f"P-RETRY-{n}", issuer_of_patient_id="", patient_sex="F", patient_size_m=None,
            study_instance_uid=study, study_date="20230610", study_time="090000",
            series_instance_uid=f"{study}.1", volumes_json=out / "volumes.json",
            seg_sop_instance_uid=f"{study}.1.9", sr_sop_instance_uid=f"{study}.1.8", result_dir=out))

    def states() -> list:
        with pairing.reading(settings) as con:
            return request_states(con)

    wait_for(lambda: [s.standing(1) for s in states()] == ["given up"] * 2, 30,
             what="both first attempts failing")
    env = {"DICOMNODE_STORAGE_DIR": str(settings.storage_dir), "DICOMNODE_SEND__ATTEMPTS": "1",
           "DICOMNODE_PACS__PORT": str(port)}
    asked = CliRunner().invoke(app, ["priors", "retry"], env=env)
    assert asked.exit_code == 0, asked.output
    named = [f"  asking {n} of 2: follow-up {uid}" for n, uid in enumerate(follow_ups, 1)]
    assert asked.stderr.splitlines() == named
    assert asked.stdout == ("asking the PACS again for 2 follow-up(s) without a baseline\n"
                            "  2: the PACS could not be asked (the node asks again: dicomnode priors list)\n")
    assert [(s.study_instance_uid, s.failed) for s in states()] == [(uid, 1) for uid in follow_ups]


def test_a_linked_patients_prior_is_asked_for_under_each_of_its_ids(orthanc, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-operative CT is in the PACS under the hospital system's ID (012345), the follow-ups
    arrive under the PACS's (12345): asked under 12345 alone, the PACS holds no earlier CT; when an
    operator links the two IDs (`patients link`), that follow-up is asked for again under both and
    the CT arrives, and so does a new follow-up's. The answer counts the IDs (the detail is logged at
    INFO), never names them."""
    import sqlite3

    from typer.testing import CliRunner

    from dicomnode.cli import app
    from dicomnode.clinical import pairing, registry

    pid, other = "12345", "012345"
    base_study = generate_uid()
    base_series = _ct_series(tmp_path / "base", other, "20230105", 8, base_study)
    orthanc.upload_folder(tmp_path / "base")
    settings = _settings(tmp_path, orthanc)
    reg = tmp_path / "reg.csv"
    reg.write_text("patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                   f"{pid},1.60,F,ITF,left,20230110\n")
    registry.import_csv(settings, reg)

    def record(patient_id: str, study: str, date: str) -> None:
        series = study + ".1"
        out = tmp_path / "var" / "results" / series
        out.mkdir(parents=True, exist_ok=True)
        sartorius = StructureVolume(label=1, name="sartorius", group="anterior", volume_cm3=160.0,
                                    left_cm3=80.0, right_cm3=80.0)
        VolumeRecord(series_instance_uid=series, structures=(sartorius,)).save(out / "volumes.json")
        pairing.record_result(settings, pairing.ResultRecord(
            patient_id=patient_id, issuer_of_patient_id="", patient_sex="F", patient_size_m=None,
            study_instance_uid=study, study_date=date, study_time="090000",
            series_instance_uid=series, volumes_json=out / "volumes.json",
            seg_sop_instance_uid=series + ".9", sr_sop_instance_uid=series + ".8", result_dir=out,
            patient_birth_date="19400312"))

    def answer(study: str) -> tuple[str, str] | None:
        con = sqlite3.connect(settings.db_path)
        try:
            row = con.execute("SELECT status, detail FROM pairing_retrievals WHERE study_instance_uid=?"
                              " ORDER BY rowid DESC", (study,)).fetchone()
        finally:
            con.close()
        return row if row and row[0] != pairing.RetrievalStatus.REQUESTED else None

    with CapturingSCP("THIGHNODE", orthanc.node_port) as node:
        first, second, third = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"
        record(pid, first, "20230301")
        alone = wait_for(lambda: answer(first), 30, what="the first follow-up's retrieval")
        assert alone == ("none", "the PACS holds no earlier CT study for this patient")
        settings.pairing.retrieve_priors = False  # the other ID's follow-up, measured before the link
        record(other, second, "20230401")
        settings.pairing.retrieve_priors = True
        assert not node.received
        for name, value in (("STORAGE_DIR", settings.storage_dir), ("AE_TITLE", "THIGHNODE"),
                            ("PACS__PORT", orthanc.dicom_port), ("SELECTION__MIN_SLICES", 5)):
            monkeypatch.setenv(f"DICOMNODE_{name}", str(value))
        linked = CliRunner().invoke(app, ["patients", "link", pid, other], env={"COLUMNS": "80"})
        assert linked.exit_code == 0, linked.output
        assert ("asking the PACS again for 1 follow-up(s) without a baseline, now under 2 linked "
                "PatientIDs\n  1: baseline moved to the node") in linked.output, linked.output
        assert answer(first) == ("retrieved", "moved 8 instance(s), 0 failed; 1 earlier study looked at;"
                                 " asked under 2 linked PatientIDs")
        assert len(node.received) == 8

        record(pid, third, "20230601")
        status, detail = wait_for(lambda: answer(third), 30, what="the linked patient's retrieval")
        assert status == "retrieved", detail
        assert detail == ("moved 8 instance(s), 0 failed; 1 earlier study looked at; asked under 2"
                          " linked PatientIDs")
        assert {ds.SeriesInstanceUID for ds in node.received} == {base_series}
        assert {ds.PatientID for ds in node.received} == {other} and len(node.received) == 16


def test_a_linked_patients_candidates_share_one_order_and_one_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ID's studies join one list of candidates: the admission period's CT under the second ID
    comes before an older one under the first, and the three-study bound counts them together; a
    study both IDs list is one candidate."""
    by_id = {
        "A": [StudyHit("old", "20220101", modalities=["CT"]), StudyHit("s1", "20230105", modalities=["CT"])],
        "B": [StudyHit("adm", "20230108", modalities=["CT"]), StudyHit("s1", "20230105", modalities=["CT"]),
              StudyHit("s2", "20230104", modalities=["CT"])],
    }
    asked: list[str] = []
    queried: list[str] = []

    def studies_of(_settings: Settings, patient_id: str) -> list[StudyHit]:
        asked.append(patient_id)
        return by_id[patient_id]

    def series_of(_settings: Settings, study_uid: str) -> list[SeriesHit]:
        queried.append(study_uid)
        return [SeriesHit(study_uid + ".1", "CT", 2)]  # scouts only: every study gives way

    monkeypatch.setattr(retrieve, "find_studies", studies_of)
    monkeypatch.setattr(retrieve, "find_series", series_of)
    settings = Settings(storage_dir=Path("var"), pairing={"retrieve_priors": True})
    outcome = retrieve_prior(settings, "A", "20230601", set(), "20230110", linked_ids=("A", "B"))
    assert asked == ["A", "B"]
    assert queried == ["adm", "s1", "s2"]  # "old" is fourth: beyond the bound
    assert outcome.reason == ("no CT series with enough slices in the 3 earlier studies looked at"
                              " (of 4); asked under 2 linked PatientIDs")
    asked.clear()
    alone = retrieve_prior(settings, "A", "20230601", set(), "20230110")
    assert asked == ["A"] and "linked" not in alone.reason
