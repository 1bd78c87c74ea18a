"""Pairing: timelines by patient, baseline/previous comparisons, stated reasons, and the synthetic cohort."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.clinical import pairing, registry
from dicomnode.clinical.pairing import ResultRecord, record_result
from dicomnode.config import Settings
from dicomnode.harness.net import free_port
from seg.dates import display_date
from seg.labels import ANALYSED_MUSCLES, LABEL_OF, structures
from seg.records import (
    NOT_COMPARED,
    ChangeRecord,
    MetalLocation,
    ReasonCode,
    Side,
    StructureChange,
    StructureVolume,
    TimePoint,
    VolumeQA,
    VolumeRecord,
)

ROOT = Path(__file__).resolve().parents[1]


def _volumes(path: Path, series: str, factor: float = 1.0, left_only: bool = False,
             qa: VolumeQA | None = None) -> Path:
    """A volumes.json whose structure ``label`` has (10·label, 10·label) cm³ × factor (left, right).

    Without ``qa``, written in the version-less layout of releases before typed records (pairing
    must still read it; it has no QA); with it, as the node writes it now.
    """
    structs = []
    for s in structures()[1:]:
        left = 10.0 * s.label * factor
        right = 10.0 * s.label * (1.0 if left_only else factor)
        structs.append(StructureVolume(label=s.label, name=s.name, group=s.group, voxels=0,
                                       volume_cm3=left + right, left_cm3=left, right_cm3=right))
    record = VolumeRecord(series_instance_uid=series, structures=tuple(structs), qa=qa or VolumeQA())
    path.mkdir(parents=True, exist_ok=True)
    if qa is not None:
        return record.save(path / "volumes.json")
    legacy = record.model_dump(mode="json", exclude={"schema_version", "model", "qa"})
    (path / "volumes.json").write_text(json.dumps(legacy))
    return path / "volumes.json"


def _record(
    settings: Settings,
    pid: str,
    study: str,
    date: str,
    factor: float = 1.0,
    time_: str = "100000",
    issuer: str = "",
    size: float | None = None,
    series: str | None = None,
    left_only: bool = False,
    qa: VolumeQA | None = None,
) -> list[ChangeRecord]:
    series = series or f"{study}.1"
    out = Path(settings.storage_dir) / "results" / series
    vj = _volumes(out, series, factor, left_only, qa)
    return record_result(
        settings,
        ResultRecord(
            patient_id=pid,
            issuer_of_patient_id=issuer,
            patient_sex="F",
            patient_size_m=size,
            study_instance_uid=study,
            study_date=date,
            study_time=time_,
            series_instance_uid=series,
            volumes_json=vj,
            seg_sop_instance_uid=f"{series}.seg",
            sr_sop_instance_uid=f"{series}.sr",
            result_dir=out,
        ),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(storage_dir=tmp_path / "var")
    s.pairing.retrieve_priors = False
    return s


def _registry(settings: Settings, tmp_path: Path, text: str) -> None:
    path = tmp_path / "reg.csv"
    path.write_text(text)
    registry.import_csv(settings, path)


def _both(change: ChangeRecord, name: str) -> StructureChange:
    return next(s for s in change.structures if s.name == name and s.side == "both")


def test_single_study_has_a_stated_reason(settings: Settings) -> None:
    assert _record(settings, "P1", "1.1", "20230101") == []
    st = pairing.status_of(settings, "1.1.1")
    assert st.role == "baseline"
    assert {ReasonCode.BASELINE_EARLIEST, ReasonCode.SINGLE_STUDY} <= {r.code for r in st.reasons}
    entry = pairing.cohort_entries(settings)[0]
    assert entry.change is None and [r.code for r in entry.reasons] == [ReasonCode.SINGLE_STUDY]
    assert entry.reason_text.startswith("single study")


def test_roles_and_retrieval_statuses_keep_their_stored_words() -> None:
    """The index stores a role and a retrieval status as these words: an index written by an earlier
    release reads back only while they stay the same."""
    roles = ["baseline", "followup", "pre-operative", "superseded", "unplaced"]
    assert [r.value for r in pairing.Role] == roles
    assert [s.value for s in pairing.RetrievalStatus] == ["requested", "retrieved", "none", "failed"]


def test_baseline_and_previous_make_a_trajectory(settings: Settings) -> None:
    _record(settings, "P1", "1.1", "20230101", 1.0)
    first = _record(settings, "P1", "1.2", "20230401", 0.9)
    assert [c.comparison for c in first] == ["baseline"]
    c = first[0]
    assert c.baseline.series_instance_uid == "1.1.1" and c.followup.series_instance_uid == "1.2.1"
    assert c.baseline.seg_sop_instance_uid == "1.1.1.seg" and c.days_between == 90
    s = _both(c, "sartorius")
    assert (s.pre_cm3, s.post_cm3) == (20.0, 18.0)
    assert s.delta_cm3 == pytest.approx(-2.0) and s.loss_pct == pytest.approx(10.0)
    second = _record(settings, "P1", "1.3", "20230701", 0.8)
    assert sorted(c.comparison for c in second) == ["baseline", "previous"]
    prev = next(c for c in second if c.comparison == "previous")
    assert prev.baseline.series_instance_uid == "1.2.1"
    assert _both(prev, "sartorius").delta_cm3 == pytest.approx(-2.0)
    base = next(c for c in second if c.comparison == "baseline")
    assert _both(base, "sartorius").loss_pct == pytest.approx(20.0)
    assert [r.role for r in pairing.timeline(settings, "P1")] == ["baseline", "followup", "followup"]
    # The cohort uses the last follow-up by default, the first on request.
    assert pairing.cohort_entries(settings)[0].change.followup.series_instance_uid == "1.3.1"
    assert (
        pairing.cohort_entries(settings, "first")[0].change.followup.series_instance_uid == "1.2.1"
    )


def test_rerecording_a_series_replaces_it(settings: Settings) -> None:
    _record(settings, "P1", "1.1", "20230101", 1.0)
    _record(settings, "P1", "1.2", "20230401", 0.9)
    again = _record(settings, "P1", "1.2", "20230401", 0.5)
    assert len(again) == 1 and _both(again[0], "sartorius").post_cm3 == 10.0
    con = sqlite3.connect(settings.db_path)
    assert con.execute("SELECT COUNT(*) FROM pairing_results").fetchone()[0] == 2
    assert con.execute("SELECT COUNT(*) FROM pairing_changes").fetchone()[0] == 1
    # A second series of the same study represents the study; the first is marked superseded.
    _record(settings, "P1", "1.2", "20230401", 0.7, series="1.2.2")
    assert len(pairing.timeline(settings, "P1")) == 2
    assert pairing.status_of(settings, "1.2.1").role == "superseded"
    assert con.execute("SELECT COUNT(*) FROM pairing_changes").fetchone()[0] == 1


def test_same_day_studies_are_not_compared(settings: Settings) -> None:
    _record(settings, "P1", "1.1", "20230101", 1.0, time_="080000")
    assert _record(settings, "P1", "1.2", "20230101", 0.9, time_="170000") == []
    st = pairing.status_of(settings, "1.2.1")
    assert st.role == "followup" and ReasonCode.SAME_DAY_AS_BASELINE in {r.code for r in st.reasons}
    # the cohort lists it by code among the "not compared" reasons, the text for people
    entry = pairing.cohort_entries(settings)[0]
    assert entry.change is None and {r.code for r in entry.reasons} <= NOT_COMPARED
    assert "same day as the baseline" in entry.reason_text
    # Recorded in the wrong order, StudyTime still decides which is the baseline.
    assert _record(settings, "P2", "2.2", "20230101", 0.9, time_="170000") == []
    assert _record(settings, "P2", "2.1", "20230101", 1.0, time_="080000") == []
    assert pairing.status_of(settings, "2.1.1").role == "baseline"
    # ... read as the time it is: an archive's "08:05" sorted as written came after "0810"
    assert _record(settings, "P3", "3.2", "20230101", 0.9, time_="0810") == []
    assert _record(settings, "P3", "3.1", "20230101", 1.0, time_="08:05") == []
    assert pairing.status_of(settings, "3.1.1").role == "baseline"


def test_surgery_date_splits_pre_and_post(settings: Settings, tmp_path: Path) -> None:
    _registry(
        settings,
        tmp_path,
        "patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\nP1,1.60,F,ITF,left,20230110\n",
    )
    _record(settings, "P1", "1.0", "20221201", 1.1)  # an older pre-operative scan
    _record(settings, "P1", "1.1", "20230109", 1.0)  # the pre-operative CT closest to surgery
    assert ReasonCode.NO_LATER_STUDY in {r.code for r in pairing.status_of(settings, "1.1.1").reasons}
    changes = _record(settings, "P1", "1.2", "20230601", 0.8, left_only=True)
    assert [c.comparison for c in changes] == ["baseline"]
    c = changes[0]
    assert c.baseline.series_instance_uid == "1.1.1" and c.baseline_preoperative is True
    assert pairing.status_of(settings, "1.0.1").role == "pre-operative"
    assert c.fracture_type == "ITF" and c.fractured_side == "left" and c.height_source == "registry"
    s = _both(c, "gluteus_maximus")
    assert s.delta_index_cm3_m2 == pytest.approx(s.delta_cm3 / 1.60**2)
    ovc = next(r for r in c.operated_vs_contralateral if r.name == "gluteus_maximus")
    assert ovc.operated_loss_pct == pytest.approx(20.0) and ovc.contralateral_loss_pct == pytest.approx(
        0.0
    )


SURGERY_DAY_REGISTRY = ("patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                        "P1,1.60,F,ITF,left,20230110\n")


def _metal(side: Side | None) -> VolumeQA:
    """The QA of a CT with metal on ``side`` (None: none), as the measurement locates it."""
    if side is None:
        return VolumeQA(metal=False, metal_voxels=0)
    voxels = {"left": (500, 0), "right": (0, 500), "both": (500, 500)}[side]
    return VolumeQA(metal=True, metal_voxels=sum(voxels), metal_where=MetalLocation(
        side=side, left_voxels=voxels[0], right_voxels=voxels[1], z_range_mm=(-90.0, -10.0),
        centroid_mm=(80.0, 0.0, -50.0)))


def test_a_surgery_day_ct_with_the_implant_is_a_followup(settings: Settings, tmp_path: Path) -> None:
    """The post-operative check CT of the afternoon of the operation: every CT dated on the surgery
    day was pre-operative, so it became the baseline and the follow-up was compared with a thigh
    already operated on. Its implant on the fractured side makes it a follow-up of the earlier CT."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.1", "20230105", 1.0, qa=_metal(None))
    changes = _record(settings, "P1", "1.2", "20230110", 0.95, time_="160000", qa=_metal("left"))
    assert [(c.comparison, c.baseline.series_instance_uid) for c in changes] == [("baseline", "1.1.1")]
    assert changes[0].baseline_preoperative is True
    why = {r.code: r.text for r in pairing.status_of(settings, "1.2.1").reasons}
    assert why[ReasonCode.SURGERY_DAY_POSTOPERATIVE] == (
        "same day as surgery (2023-01-10) with an implant on the left: post-operative")
    assert pairing.status_of(settings, "1.1.1").role == "baseline"
    # the later follow-up: against the pre-operative baseline, and the check CT as its previous
    later = _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    assert sorted((c.comparison, c.baseline.series_instance_uid) for c in later) == [
        ("baseline", "1.1.1"), ("previous", "1.2.1")]
    # metal on both sides includes the fractured one
    _record(settings, "P1", "1.2", "20230110", 0.95, time_="160000", qa=_metal("both"))
    assert pairing.status_of(settings, "1.2.1").role == "followup"


def test_a_surgery_day_ct_without_the_implant_is_the_baseline(settings: Settings, tmp_path: Path) -> None:
    """The admission CT of the morning of the operation: no metal, or an old implant on the other
    side only, is pre-operative and, closest to surgery, the baseline."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.1", "20230105", 1.0, qa=_metal(None))
    _record(settings, "P1", "1.2", "20230110", 1.0, time_="070000", qa=_metal(None))
    st = pairing.status_of(settings, "1.2.1")
    assert st.role == "baseline" and pairing.status_of(settings, "1.1.1").role == "pre-operative"
    assert {r.code: r.text for r in st.reasons}[ReasonCode.SURGERY_DAY_PREOPERATIVE] == (
        "same day as surgery (2023-01-10), no implant: pre-operative")
    changes = _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    assert [(c.comparison, c.baseline.series_instance_uid) for c in changes] == [("baseline", "1.2.1")]
    # an old hip implant on the right (the unfractured side) does not make it post-operative
    _record(settings, "P1", "1.2", "20230110", 1.0, time_="070000", qa=_metal("right"))
    st = pairing.status_of(settings, "1.2.1")
    assert st.role == "baseline" and "metal on the unfractured right: pre-operative" in {
        r.text for r in st.reasons if r.code is ReasonCode.SURGERY_DAY_PREOPERATIVE}.pop()


def test_a_surgery_day_ct_without_qa_is_not_placed(settings: Settings, tmp_path: Path,
                                                   monkeypatch) -> None:
    """A surgery-day CT whose result has no metal QA (measured without its CT) is neither the
    baseline nor a follow-up: the timeline says why, no change is made with it, and it is placed
    when a result with QA replaces it."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.1", "20230105", 1.0, qa=_metal(None))
    assert _record(settings, "P1", "1.2", "20230110", 0.95, time_="160000") == []  # no QA
    st = pairing.status_of(settings, "1.2.1")
    assert st.role == "unplaced" and [r.code for r in st.reasons] == [ReasonCode.SURGERY_DAY_QA_UNKNOWN]
    assert pairing.changes_for_earlier_series(settings, "1.1.1") == []
    assert ReasonCode.SURGERY_DAY_QA_UNKNOWN in NOT_COMPARED
    entry = pairing.cohort_entries(settings)[0]
    assert entry.change is None and "metal QA unknown: not placed" in entry.reason_text
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    out = CliRunner().invoke(app, ["patients", "timeline", "P1"], env={"COLUMNS": "80"}).output
    assert "unplaced" in out and max(len(line) for line in out.splitlines()) <= 80, out
    # a later follow-up is compared with the pre-operative baseline, never with the unplaced CT
    later = _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    assert [(c.comparison, c.baseline.series_instance_uid) for c in later] == [("baseline", "1.1.1")]
    # measured again with its CT: placed (an implant) and compared
    again = _record(settings, "P1", "1.2", "20230110", 0.95, time_="160000", qa=_metal("left"))
    assert [(c.comparison, c.baseline.series_instance_uid) for c in again] == [("baseline", "1.1.1")]
    assert pairing.status_of(settings, "1.2.1").role == "followup"


def test_an_unplaced_surgery_day_ct_is_named_where_it_may_be_the_baseline(
        settings: Settings, tmp_path: Path) -> None:
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.1", "20230110", 1.0)  # no QA
    _record(settings, "P1", "1.2", "20230601", 0.8, qa=_metal("left"))
    why = pairing.status_of(settings, "1.2.1").reasons
    assert ReasonCode.BASELINE_POSTOPERATIVE in {r.code for r in why}
    assert "1 study on the surgery day without metal QA may be the pre-operative one" in \
        " ".join(r.text for r in why)


def test_a_surgery_day_ct_with_the_implant_asks_for_the_prior(settings: Settings, tmp_path: Path) -> None:
    """A post-operative check CT without a pre-operative study in the node asks the PACS for one,
    as a later follow-up does (it asked only for studies after the surgery date)."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY + "P2,1.60,F,ITF,left,20230110\n")
    settings.pairing.retrieve_priors = True
    settings.pacs.port = free_port()  # nobody listens: the request is recorded, then fails
    _record(settings, "P1", "1.2", "20230110", 1.0, time_="160000", qa=_metal("left"))
    deadline = time.time() + 20
    while len(_retrievals(settings)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert [r[0] for r in _retrievals(settings)] == ["requested", "failed"]
    _record(settings, "P2", "2.1", "20230110", 1.0, time_="070000", qa=_metal(None))  # a baseline
    time.sleep(0.3)
    assert len(_retrievals(settings)) == 2


def test_the_admission_ct_is_the_baseline_not_a_ct_of_the_year_before(
        settings: Settings, tmp_path: Path) -> None:
    """A CT a year before the fracture and the admission CT of the surgery morning: the admission CT
    (latest pre-operative, the paper's pre-operative CT) is the baseline, whatever arrived first;
    the year-old CT is an earlier pre-operative one, and the follow-up's change carries no flag."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    _record(settings, "P1", "1.1", "20220110", 1.1, qa=_metal(None))
    _record(settings, "P1", "1.2", "20230110", 1.0, time_="070000", qa=_metal(None))
    assert [pairing.status_of(settings, f"1.{n}.1").role for n in (1, 2, 3)] == [
        "pre-operative", "baseline", "followup"]
    (change,) = pairing.changes_for_earlier_series(settings, "1.2.1")
    assert change.baseline_preoperative is True and not [
        n for n in change.notes if n.code is ReasonCode.BASELINE_BEFORE_ADMISSION]


def test_a_baseline_older_than_the_admission_period_is_used_and_flagged(
        settings: Settings, tmp_path: Path) -> None:
    """The only pre-operative CT held is a year old: it is the baseline (the latest pre-operative
    one), but it is not the admission CT, so it and each comparison with it say so (the cohort
    names it under comparability); one 14 days before surgery is the admission CT, unflagged."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY)
    _record(settings, "P1", "1.1", "20220110", 1.1, qa=_metal(None))
    changes = _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    _record(settings, "P1", "1.4", "20231201", 0.7, qa=_metal("left"))
    why = {r.code: r.text for r in pairing.status_of(settings, "1.1.1").reasons}
    assert why[ReasonCode.BASELINE_BEFORE_ADMISSION] == (
        "baseline 365 days before surgery (2023-01-10), more than 14: not the admission CT; the "
        "change includes the time before the fracture")
    flagged = {(c.comparison, c.followup.series_instance_uid): any(
        n.code is ReasonCode.BASELINE_BEFORE_ADMISSION for n in c.notes)
        for c in pairing.changes_for_earlier_series(settings, "1.1.1")
        + pairing.changes_for_earlier_series(settings, "1.3.1")}
    assert flagged == {("baseline", "1.3.1"): True, ("baseline", "1.4.1"): True,
                       ("previous", "1.4.1"): False}  # follow-up to follow-up: no baseline in it
    assert [c.baseline_preoperative for c in changes] == [True]
    from seg.records import COMPARABILITY_CODES
    assert ReasonCode.BASELINE_BEFORE_ADMISSION in COMPARABILITY_CODES

    _record(settings, "P1", "1.2", "20221227", 1.0, qa=_metal(None))  # 14 days before surgery
    assert pairing.status_of(settings, "1.2.1").role == "baseline"
    assert ReasonCode.BASELINE_BEFORE_ADMISSION not in {
        r.code for r in pairing.status_of(settings, "1.2.1").reasons}


def _baseline_flags(settings: Settings) -> dict[str, str | None]:
    """The baseline-before-admission text of each baseline (1.1.1, 2.1.1; None: unflagged), which
    its comparison with the follow-up carries too."""
    out: dict[str, str | None] = {}
    for uid in ("1.1.1", "2.1.1"):
        assert pairing.status_of(settings, uid).role == "baseline"
        why = {r.code: r.text for r in pairing.status_of(settings, uid).reasons}
        out[uid] = why.get(ReasonCode.BASELINE_BEFORE_ADMISSION)
        (change,) = pairing.changes_for_earlier_series(settings, uid)
        noted = [n.text for n in change.notes if n.code is ReasonCode.BASELINE_BEFORE_ADMISSION]
        assert noted == ([out[uid]] if out[uid] else [])
    return out


def test_the_admission_period_is_the_sites_setting(settings: Settings, tmp_path: Path) -> None:
    """``pairing.admission_window_days`` decides which baseline is flagged: a CT 10 days before
    surgery is the admission CT by default (14) but not where a site sets 7; a CT a year before,
    flagged by default, is not where a site sets 365. Stored flags follow the setting at the next
    re-pairing (``patients import`` or ``refresh``), and the flag's text names the setting's value."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY + "P2,1.60,F,ITF,left,20230110\n")
    _record(settings, "P1", "1.1", "20221231", 1.1, qa=_metal(None))  # 10 days before surgery
    _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    _record(settings, "P2", "2.1", "20220110", 1.1, qa=_metal(None))  # 365 days before
    _record(settings, "P2", "2.3", "20230601", 0.8, qa=_metal("left"))

    assert settings.pairing.admission_window_days == 14
    text = ("baseline {} days before surgery (2023-01-10), more than {}: not the admission CT; the "
            "change includes the time before the fracture")
    assert _baseline_flags(settings) == {"1.1.1": None, "2.1.1": text.format(365, 14)}
    settings.pairing.admission_window_days = 7
    assert pairing.refresh_all(settings).patients == 2
    assert _baseline_flags(settings) == {"1.1.1": text.format(10, 7), "2.1.1": text.format(365, 7)}
    settings.pairing.admission_window_days = 365
    pairing.refresh_all(settings)
    assert _baseline_flags(settings) == {"1.1.1": None, "2.1.1": None}


def test_patients_refresh_applies_a_changed_admission_window(
        settings: Settings, tmp_path: Path, monkeypatch) -> None:
    """A site sets ``admission_window_days = 7`` after two patients were paired with 14: the stored
    flags stay as they were (listing or reading re-pairs nothing) until ``patients refresh``, which
    pairs them with the file's value and says how much changed; run again, it changes nothing."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY + "P2,1.60,F,ITF,left,20230110\n")
    _record(settings, "P1", "1.1", "20221231", 1.1, qa=_metal(None))  # 10 days before surgery
    _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    _record(settings, "P2", "2.1", "20220110", 1.1, qa=_metal(None))  # 365 days before
    _record(settings, "P2", "2.3", "20230601", 0.8, qa=_metal("left"))
    text = ("baseline {} days before surgery (2023-01-10), more than {}: not the admission CT; the "
            "change includes the time before the fracture")
    config = tmp_path / "node.toml"
    config.write_text(f"storage_dir = {str(settings.storage_dir)!r}\n\n"
                      "[pairing]\nretrieve_priors = false\nadmission_window_days = 7\n")
    for name in ("DICOMNODE_STORAGE_DIR", "DICOMNODE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    assert runner.invoke(app, ["patients", "list", "--config", str(config)]).exit_code == 0
    assert _baseline_flags(settings) == {"1.1.1": None, "2.1.1": text.format(365, 14)}

    res = runner.invoke(app, ["patients", "refresh", "--config", str(config)],
                        env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "re-paired 2 measured patient(s), 2 with a changed pairing",
        "comparisons: 0 added, 0 removed, 2 changed, 0 unchanged"]
    assert res.stderr == ""  # two patients: no progress lines
    assert _baseline_flags(settings) == {"1.1.1": text.format(10, 7), "2.1.1": text.format(365, 7)}

    res = runner.invoke(app, ["patients", "refresh", "--config", str(config)])
    assert res.stdout.splitlines() == [
        "re-paired 2 measured patient(s), 0 with a changed pairing",
        "comparisons: 0 added, 0 removed, 0 changed, 2 unchanged"]


def test_refresh_counts_the_comparisons_it_adds_and_removes(settings: Settings, tmp_path: Path) -> None:
    """A surgery date arrives between a patient's second and third CT (written to the registry
    without re-pairing): the baseline moves from the first CT to the second, so the three
    comparisons of the earliest-baseline timeline go and one comes; another patient is untouched."""
    for n, day in enumerate(("20230101", "20230201", "20230601"), start=1):
        _record(settings, "P1", f"1.{n}", day, 1.0 - n / 10)
    _record(settings, "P2", "2.1", "20230101")
    _record(settings, "P2", "2.2", "20230301", 0.9)
    _registry(settings, tmp_path, "patient_id,surgery_date\nP1,20230301\n")
    seen: list[tuple[int, int]] = []
    counts = pairing.refresh_all(settings, lambda done, total: seen.append((done, total)))
    assert counts == pairing.RefreshCounts(patients=2, patients_changed=1, added=1, removed=3,
                                           changed=0, unchanged=1)
    assert seen == [(1, 2), (2, 2)]
    assert [c.comparison for c in pairing.changes_for_earlier_series(settings, "1.2.1")] == ["baseline"]
    assert pairing.changes_for_earlier_series(settings, "1.1.1") == []


def test_patients_refresh_shows_its_progress_for_many_patients(
        settings: Settings, monkeypatch) -> None:
    """30 patients: a progress line on stderr every 25 and at the end; the summary on stdout."""
    for n in range(30):
        _record(settings, f"P{n:02d}", f"{n}.1", "20230101")
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    monkeypatch.setenv("DICOMNODE_PAIRING__RETRIEVE_PRIORS", "false")
    res = CliRunner().invoke(app, ["patients", "refresh"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["re-pairing: 25/30 patients", "re-pairing: 30/30 patients"]
    assert res.stdout.splitlines()[0] == "re-paired 30 measured patient(s), 0 with a changed pairing"


def test_refresh_waits_for_the_running_nodes_write(settings: Settings) -> None:
    """Another process (the node's worker recording a result) holds the index's write lock: the
    refresh waits for it instead of failing, and re-pairs once it is released."""
    import threading

    _record(settings, "P1", "1.1", "20230101")
    _record(settings, "P1", "1.2", "20230301", 0.9)
    holder = sqlite3.connect(settings.db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released: list[float] = []

    def release() -> None:
        time.sleep(1.0)
        released.append(time.monotonic())
        holder.execute("COMMIT")

    thread = threading.Thread(target=release)
    thread.start()
    try:
        counts = pairing.refresh_all(settings)
        finished = time.monotonic()
    finally:
        thread.join()
        holder.close()
    assert finished >= released[0]
    assert counts.patients == 1 and counts.unchanged == 1


def test_a_followup_with_an_old_baseline_asks_for_the_admission_ct(
        settings: Settings, tmp_path: Path) -> None:
    """A pre-operative baseline older than the admission period does not end the search: a new
    follow-up asks the PACS (for the admission period's CTs alone, tests/test_surgery_day_prior.py);
    one whose admission CT is held asks for nothing."""
    _registry(settings, tmp_path, SURGERY_DAY_REGISTRY + "P2,1.60,F,ITF,left,20230110\n")
    settings.pairing.retrieve_priors = True
    settings.pacs.port = free_port()  # nobody listens: the request is recorded, then fails
    _record(settings, "P2", "2.1", "20230109", 1.1, qa=_metal(None))
    _record(settings, "P2", "2.3", "20230601", 0.8, qa=_metal("left"))
    _record(settings, "P1", "1.1", "20220110", 1.1, qa=_metal(None))
    _record(settings, "P1", "1.3", "20230601", 0.8, qa=_metal("left"))
    deadline = time.time() + 20
    while len(_retrievals(settings)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    con = sqlite3.connect(settings.db_path)
    try:
        asked = con.execute("SELECT patient_id, study_instance_uid, status FROM pairing_retrievals"
                            " ORDER BY rowid").fetchall()
    finally:
        con.close()
    assert asked == [("P1", "1.3", "requested"), ("P1", "1.3", "failed")]


def test_the_surgery_day_rule_and_its_texts() -> None:
    """Every branch of the rule, its texts within 80 columns (the widest date, side and wording)."""
    from dicomnode.clinical.surgery_day import Placement, place

    day = "20230110"
    cases = [
        (None, "left", Placement.UNKNOWN),  # volumes.json not readable
        (VolumeQA(), "left", Placement.UNKNOWN),  # measured without its CT
        (_metal(None), "left", Placement.PREOPERATIVE),
        (_metal("right"), "left", Placement.PREOPERATIVE),  # an old implant on the other side
        (_metal("left"), "left", Placement.POSTOPERATIVE),
        (_metal("both"), "right", Placement.POSTOPERATIVE),
        (_metal("right"), None, Placement.POSTOPERATIVE),  # no fractured side: metal counts
        (VolumeQA(metal=True, metal_voxels=9), "left", Placement.POSTOPERATIVE),  # side not located
    ]
    for qa, fractured, expected in cases:
        got = place(qa, day, fractured)
        assert got.placement is expected, (qa, fractured)
        assert got.reason.text.startswith("same day as surgery (2023-01-10)") and len(got.reason.text) <= 80
        assert got.reason.text.endswith({Placement.UNKNOWN: "not compared",
                                         Placement.PREOPERATIVE: ": pre-operative",
                                         Placement.POSTOPERATIVE: ": post-operative"}[expected])


def test_the_outputs_state_the_time_point_pairing_places_a_surgery_day_ct_at() -> None:
    """The page and measurement SR of a surgery-day CT say what pairing decided: post-operative day 0
    with the implant, pre-operative without, nothing when its QA cannot tell (and the placement is
    part of the outputs' UID key)."""
    facts = registry.Resolved(height_m=1.6, height_source="registry", sex="F", sex_source="registry",
                              fracture_type="ITF", fractured_side="left", surgery_date="20230110",
                              koval_grade=None)
    post = facts.time_point("20230110", _metal("left"))
    assert (post.time_point, post.days_since_surgery) == (TimePoint.POSTOPERATIVE, 0)
    assert facts.time_point("20230110", _metal(None)).time_point is TimePoint.PREOPERATIVE
    assert facts.time_point("20230110", _metal("right")).time_point is TimePoint.PREOPERATIVE
    assert facts.time_point("20230110", None).time_point is None
    assert facts.time_point("20230109", _metal("left")).time_point is TimePoint.PREOPERATIVE  # by date
    assert facts.time_point("20230111", None).time_point is TimePoint.POSTOPERATIVE
    assert post.key() != facts.time_point("20230110", _metal(None)).key()


def test_late_baseline_creates_the_comparison(settings: Settings, tmp_path: Path) -> None:
    _registry(settings, tmp_path, "patient_id,fracture_type,surgery_date\nP1,FNF,20230110\n")
    assert _record(settings, "P1", "1.2", "20230601", 0.8) == []
    assert ReasonCode.BASELINE_POSTOPERATIVE in {r.code for r in pairing.status_of(settings, "1.2.1").reasons}
    assert _record(settings, "P1", "1.1", "20230108", 1.0) == []  # the prior, retrieved late
    late = pairing.changes_for_earlier_series(settings, "1.1.1")
    assert len(late) == 1 and late[0].followup.series_instance_uid == "1.2.1"
    assert pairing.cohort_entries(settings)[0].reasons == ()


def test_an_undated_study_is_named_where_it_may_be_the_baseline(settings: Settings, tmp_path: Path) -> None:
    """A pre-op without StudyDate: the post-op became the baseline "with no pre-operative study" while
    the undated study may be that very one; the baseline's reason now says so."""
    _registry(settings, tmp_path, "patient_id,fracture_type,surgery_date\nP1,FNF,20230110\n")
    _record(settings, "P1", "1.1", "", 1.0)
    _record(settings, "P1", "1.2", "20230601", 0.8)
    why = pairing.status_of(settings, "1.2.1").reasons
    assert ReasonCode.BASELINE_POSTOPERATIVE in {r.code for r in why}
    assert "1 study without StudyDate could not be placed and may be the pre-operative one" in \
        " ".join(r.text for r in why)
    # the timeline calls it what it is: not a follow-up (it was labelled "followup")
    undated = pairing.status_of(settings, "1.1.1")
    assert undated.role == "unplaced" and ReasonCode.NO_STUDY_DATE in {r.code for r in undated.reasons}
    assert [r.role for r in pairing.timeline(settings, "P1")] == ["baseline", "unplaced"]


def test_an_undated_study_is_never_the_baseline(settings: Settings) -> None:
    """Without a surgery date the earliest dated study is the baseline; a lone undated study was
    labelled the baseline (of nothing it could be placed against)."""
    _record(settings, "P1", "1.1", "", 1.0)
    assert pairing.status_of(settings, "1.1.1").role == "unplaced"
    assert _record(settings, "P1", "1.2", "20230601", 0.8) == []
    assert [r.role for r in pairing.timeline(settings, "P1")] == ["baseline", "unplaced"]
    assert [c.comparison for c in _record(settings, "P1", "1.3", "20230901", 0.7)] == ["baseline"]


def test_missing_height_means_no_index(settings: Settings) -> None:
    _record(settings, "P1", "1.1", "20230101")
    c = _record(settings, "P1", "1.2", "20230401", 0.9)[0]
    assert c.height_m is None and c.height_source == "missing"
    assert all(s.delta_index_cm3_m2 is None for s in c.structures)
    assert ReasonCode.NO_HEIGHT in {n.code for n in c.notes}
    # A plausible PatientSize is used when the registry has no height; an implausible one is not.
    _record(settings, "P2", "2.1", "20230101", size=1.7)
    c = _record(settings, "P2", "2.2", "20230401", 0.9, size=1.7)[0]
    assert (c.height_m, c.height_source) == (1.7, "PatientSize")
    _record(settings, "P3", "3.1", "20230101", size=17.0)
    c = _record(settings, "P3", "3.2", "20230401", 0.9, size=17.0)[0]
    assert c.height_m is None and c.height_source.startswith("implausible")


def test_unknown_fracture_type_is_stated_and_left_out_of_groups(settings: Settings, tmp_path: Path) -> None:
    from reporting.cohort.report import build_cohort

    _registry(settings, tmp_path, "patient_id,height_m,sex\nP1,1.6,F\n")
    _record(settings, "P1", "1.1", "20230101")
    c = _record(settings, "P1", "1.2", "20230401", 0.9)[0]
    assert c.fracture_type is None and ReasonCode.FRACTURE_TYPE_UNKNOWN in {n.code for n in c.notes}
    report = build_cohort(pairing.cohort_entries(settings), n_boot=10)
    assert report.patients.empty and "not FNF/ITF" in report.excluded.iloc[0]["reason"]


def test_issuer_keeps_patients_apart(settings: Settings) -> None:
    _record(settings, "P1", "1.1", "20230101", issuer="HOSP_A")
    assert _record(settings, "P1", "2.1", "20230401", issuer="HOSP_B") == []
    assert len(_record(settings, "P1", "1.2", "20230401", 0.9, issuer="HOSP_A")) == 1


def test_prior_retrieval_is_attempted_once_and_can_be_off(settings: Settings, tmp_path: Path) -> None:
    _record(settings, "P0", "0.1", "20230101")
    assert _retrievals(settings) == []  # switched off: nothing asked
    settings.pairing.retrieve_priors = True
    settings.pacs.port = free_port()  # a port nobody listens on: the PACS is down
    _record(settings, "P1", "1.2", "20230601", 0.9)
    deadline = time.time() + 20
    while len(_retrievals(settings)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert [r[0] for r in _retrievals(settings)] == ["requested", "failed"]
    _record(settings, "P1", "1.2", "20230601", 0.9)  # the same follow-up again: not asked twice
    time.sleep(0.3)
    assert len(_retrievals(settings)) == 2
    # With a surgery date: a lone pre-operative study is a baseline, nothing to ask for; a follow-up is.
    _registry(settings, tmp_path, "patient_id,surgery_date\nP2,20230110\nP3,20230110\n")
    _record(settings, "P2", "2.1", "20230105")
    _record(settings, "P2", "2.2", "20230601", 0.9)
    time.sleep(0.3)
    assert len(_retrievals(settings)) == 2
    _record(settings, "P3", "3.2", "20230601", 0.9)
    deadline = time.time() + 20
    while len(_retrievals(settings)) < 4 and time.time() < deadline:
        time.sleep(0.1)
    assert [r[0] for r in _retrievals(settings)][2:] == ["requested", "failed"]

def _count_registry_reads(monkeypatch) -> list[tuple[str, str]]:
    """The (patient ID, issuer) of every registry row read from now on (the real read still runs)."""
    reads: list[tuple[str, str]] = []
    exact_row = registry._exact_row

    def counted(con: sqlite3.Connection, patient_id: str, issuer: str) -> registry.ClinicalInfo | None:
        reads.append((patient_id, issuer))
        return exact_row(con, patient_id, issuer)

    monkeypatch.setattr(registry, "_exact_row", counted)
    return reads


def test_a_recorded_follow_up_reads_the_registry_once_and_still_asks_for_the_prior(
        settings: Settings, tmp_path: Path, monkeypatch) -> None:
    """Pairing a new result reads the patient's registry row once: the surgery date that decides
    whether the PACS is asked for a prior is the one the timeline was planned with (it was read
    again after the pairing transaction)."""
    _registry(settings, tmp_path, "patient_id,surgery_date\nP3,20230110\n")
    settings.pairing.retrieve_priors = True
    settings.pacs.port = free_port()  # nobody listens: the request is recorded, then fails
    reads = _count_registry_reads(monkeypatch)
    _record(settings, "P3", "3.2", "20230601", 0.9)  # post-operative, no pre-operative CT held
    assert reads == [("P3", "")]
    deadline = time.time() + 20
    while len(_retrievals(settings)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert [r[0] for r in _retrievals(settings)] == ["requested", "failed"]


def test_patients_list_shows_a_registry_row_with_the_studies_it_applies_to(
        settings: Settings, tmp_path: Path, monkeypatch) -> None:
    """A registry row imported without an issuer applies to the measured patient whose studies carry
    one (as pairing uses it): `patients list` shows them as one patient, not two half-rows."""
    _registry(settings, tmp_path, "patient_id,height_m,fracture_type,fractured_side\nP5,1.70,FNF,right\n"
                                  "P6,1.55,ITF,left\n")
    _record(settings, "P5", "5.1", "20230101", issuer="HOSP_A")
    _record(settings, "P5", "5.2", "20230401", 0.9, issuer="HOSP_A")
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    res = CliRunner().invoke(app, ["patients", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    p5 = [r for r in rows if r["patient_id"] == "P5"]
    assert len(p5) == 1, p5
    assert (p5[0]["issuer"], p5[0]["height_source"], p5[0]["fracture_type"]) == ("HOSP_A", "registry", "FNF")
    assert (p5[0]["studies"], p5[0]["comparisons"]) == (2, 1)
    p6 = [r for r in rows if r["patient_id"] == "P6"]  # in the registry only: listed, no studies
    assert len(p6) == 1 and p6[0]["studies"] == 0 and p6[0]["fracture_type"] == "ITF"
    table = CliRunner().invoke(app, ["patients", "list"], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and max(len(line) for line in table.output.splitlines()) <= 80
    assert table.output.count("P5") == 1 and "HOSP_A" in table.output


def test_patients_list_shows_the_height_and_sex_pairing_uses(
        settings: Settings, tmp_path: Path, monkeypatch) -> None:
    """A registry row without a height, or no row at all: the list shows the DICOM PatientSize the
    cohort and the change records use, not "missing"; the issuer heads its table instead of being
    folded into the patient column."""
    _registry(settings, tmp_path, "patient_id,fracture_type\nP7,FNF\n")
    _record(settings, "P7", "7.1", "20230101", size=1.71, issuer="DICOMNODE-PHANTOM-ISSUER")
    _record(settings, "P8", "8.1", "20230101", size=1.58)
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    res = CliRunner().invoke(app, ["patients", "list", "--json"])
    rows = {r["patient_id"]: r for r in json.loads(res.output)}
    assert (rows["P7"]["height_m"], rows["P7"]["height_source"], rows["P7"]["fracture_type"]) == (
        1.71, "PatientSize", "FNF")
    assert (rows["P8"]["height_m"], rows["P8"]["sex"], rows["P8"]["in_registry"]) == (1.58, "F", False)
    table = CliRunner().invoke(app, ["patients", "list"], env={"COLUMNS": "80"})
    lines = table.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert all(line == line.rstrip() for line in lines), lines  # no padding after a row's last value
    assert "IssuerOfPatientID DICOMNODE-PHANTOM-ISSUER" in lines
    assert any(line.startswith("P7 ") and "1.71 m" in line and "PatientSize" in line for line in lines)
    assert any(line.startswith("P8 *") for line in lines) and lines[-1].startswith("* not in the registry")
    # an ID of 18 characters fits 80 columns (one space between columns; two made it 88)
    _registry(settings, tmp_path, "patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                                  "PHANTOM00000000001,1.70,M,FNF,left,20240105\n")
    _record(settings, "PHANTOM00000000001", "9.1", "20240101", size=1.7)
    lines = CliRunner().invoke(app, ["patients", "list"], env={"COLUMNS": "80"}).output.splitlines()
    assert max(len(line) for line in lines) == 80, lines
    # a longer ID is never cut across lines, even piped (`patients list | grep` found "PHANTOM00" / "01")
    _registry(settings, tmp_path, "patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                                  "PHANTOM0000000000000000001,1.70,M,FNF,left,20240105\n")
    _record(settings, "PHANTOM0000000000000000001", "9.2", "20240101", size=1.7)
    lines = CliRunner().invoke(app, ["patients", "list"], env={"COLUMNS": "80"}).output.splitlines()
    assert max(len(line) for line in lines) > 80  # piped: one line per patient, as wide as needed
    # the ID and the surgery date whole (the date was cut "2024010" / "5"), and no column dropped;
    # the date as timeline and the reasons give it, --json keeps the registry's YYYYMMDD
    assert any(line.startswith("PHANTOM0000000000000000001 ") and "registry" in line
               and " 2024-01-05 " in line for line in lines), lines
    assert any("pairs" in line for line in lines)
    rows = {r["patient_id"]: r for r in json.loads(
        CliRunner().invoke(app, ["patients", "list", "--json"]).output)}
    assert rows["PHANTOM0000000000000000001"]["surgery_date"] == "20240105"


def test_patients_list_reads_each_registry_row_once(
        settings: Settings, tmp_path: Path, monkeypatch) -> None:
    """`patients list` reads a patient's registry row once: a measured patient outside the registry
    was looked up a second time (its missing row read as "not read yet"). What it lists is the same."""
    _registry(settings, tmp_path, "patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                                  "P5,1.70,M,FNF,right,20230105\nP6,1.55,F,ITF,left,\n")
    _record(settings, "P5", "5.1", "20230101", issuer="HOSP_A")
    _record(settings, "P5", "5.2", "20230401", 0.9, issuer="HOSP_A")
    _record(settings, "P8", "8.1", "20230101", size=1.58)
    _record(settings, "P8", "8.2", "20230301", 0.95, size=1.58)
    reads = _count_registry_reads(monkeypatch)
    rows = pairing.patients(settings)
    # P5's row was imported without an issuer: HOSP_A is tried first, then ""; P6 is read with all rows
    assert sorted(reads) == [("P5", ""), ("P5", "HOSP_A"), ("P8", "")]
    facts = [(r.patient_id, r.issuer, r.in_registry, r.height_m, r.height_source, r.sex, r.sex_source,
              r.fracture_type, r.fractured_side, r.surgery_date, r.studies, r.comparisons) for r in rows]
    assert facts == [
        ("P5", "HOSP_A", True, 1.70, "registry", "M", "registry", "FNF", "right", "20230105", 2, 1),
        ("P6", "", True, 1.55, "registry", "F", "registry", "ITF", "left", None, 0, 0),
        ("P8", "", False, 1.58, "PatientSize", "F", "PatientSex", None, None, None, 2, 1),
    ]


def _retrievals(settings: Settings) -> list[tuple]:
    con = sqlite3.connect(settings.db_path)
    try:
        return con.execute("SELECT status FROM pairing_retrievals ORDER BY requested_at").fetchall()
    finally:
        con.close()


def test_cli_timeline_and_reports(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    _registry(
        settings,
        tmp_path,
        "patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\nP1,1.60,F,ITF,left,20230102\n",
    )
    _record(settings, "P1", "1.1", "20230101")
    _record(settings, "P1", "1.2", "20230401", 0.9)
    _record(settings, "P2", "2.1", "20230101")
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    monkeypatch.setenv("DICOMNODE_PAIRING__RETRIEVE_PRIORS", "false")
    runner = CliRunner()
    res = runner.invoke(app, ["patients", "timeline", "P1"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "vs baseline" in res.output and "loss 10.0 %" in res.output
    # dates as the reasons and the page give them
    assert res.output.startswith("2023-01-01") and "vs baseline of 2023-01-01 (90 days)" in res.output
    long_uid = "2.25." + "9" * 59  # a series UID of the full 64 characters
    _record(settings, "P1", "1.3", "20230701", 0.8, series=long_uid)
    res = runner.invoke(app, ["patients", "timeline", "P1"])
    assert long_uid in res.output and max(len(line) for line in res.output.splitlines()) <= 80
    res = runner.invoke(app, ["report", "patient", "P1", "--out", str(tmp_path / "p1")])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "p1").glob("change-baseline-*.json"))
    assert "baseline: 2023-01-01 → 2023-04-01 (90 days)" in res.output
    # each structure per side, the fractured side first, display names, within 80 columns
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("fractured side: left" in line and "other side: right" in line for line in lines)
    row = next(line for line in lines if line.startswith("Sartorius "))
    assert row.split()[1:] == ["10.0", "9.0", "10.0", "10.0", "9.0", "10.0"]  # pre, post, loss % per side
    res = runner.invoke(app, ["report", "patient", "P2"])
    assert res.exit_code == 0 and "single study" in res.output
    res = runner.invoke(app, ["report", "cohort", "--out", str(tmp_path / "cohort"), "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    assert "Female ITF 1" in res.output and "P2: single study" in res.output
    assert (tmp_path / "cohort" / "report.html").is_file()
    res = runner.invoke(app, ["report", "cohort", "--out", str(tmp_path / "c2"), "--filter", "fracture_type"])
    assert res.exit_code != 0
    # the registry's words work in a filter, a typo is refused rather than giving an empty report
    for words in (["sex=Female", "side=L"], ["fracture=intertrochanteric"]):
        res = runner.invoke(app, ["report", "cohort", "--out", str(tmp_path / "c3"), "--bootstrap", "20",
                                  *(a for w in words for a in ("--filter", w))])
        assert res.exit_code == 0 and "Female ITF 1" in res.output, res.output
    for bad, said in ((["--filter", "fracture_typ=FNF"], "no fact 'fracture_typ'"),
                      (["--filter", "sex=W0man"], "'W0man' is not a sex value"),
                      (["--bootstrap", "0"], "Input should be greater than or equal to 10")):
        res = runner.invoke(app, ["report", "cohort", "--out", str(tmp_path / "c4"), *bad])
        assert res.exit_code == 2 and said in " ".join(res.output.replace("│", " ").split()), res.output
    # one PatientID at two hospitals: two patients, and the timeline says which study is whose
    _record(settings, "P2", "2.2", "20230301", issuer="HOSP_B")
    res = runner.invoke(app, ["patients", "timeline", "P2"])
    assert res.output.count("a patient of its own (2 issuers use this PatientID)") == 2, res.output
    assert "IssuerOfPatientID HOSP_B" in res.output and "IssuerOfPatientID (none)" in res.output
    res = runner.invoke(app, ["report", "patient", "P2"])
    assert res.exit_code == 2 and "used by 2 issuers ('' (none)," in res.output, res.output
    assert runner.invoke(app, ["report", "patient", "P2", "--issuer", "HOSP_B"]).exit_code == 0


# ---------------------------------------------------------------- the synthetic cohort (phantoms)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cohort", ROOT / "benchmarks" / "cohort.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_cohort"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`benchmarks/cohort.py --storage DIR --spacing 5` run once for the tests below: its module,
    the storage it kept, the node settings it recorded with and its run (labels kept)."""
    bench = _bench()
    kept: dict = {"bench": bench, "storage": tmp_path_factory.mktemp("cohort") / "storage"}
    run_cohort = bench.run_cohort

    def run_keeping_labels(settings: Settings, work_dir: Path, spacing_mm: float = 5.0) -> dict:
        kept["settings"] = settings
        kept["run"] = run_cohort(settings, work_dir, spacing_mm=spacing_mm, keep_labels=True)
        return kept["run"]

    bench.run_cohort = run_keeping_labels  # this module object is the fixture's own (_bench)
    t0 = time.perf_counter()
    assert bench.main(["--storage", str(kept["storage"]), "--spacing", "5"]) == 0
    kept["elapsed_s"] = time.perf_counter() - t0
    return kept


@pytest.mark.slow
def test_synthetic_cohort_pairs_and_changes_equal_truth(synthetic_cohort: dict, tmp_path: Path) -> None:
    from reporting.cohort.report import build_cohort, write_report

    run, settings = synthetic_cohort["run"], synthetic_cohort["settings"]
    results = run["results"]
    assert len(results) == 18
    for pid, r in results.items():
        spec = r["spec"]
        assert r["pre_changes"] == [], pid
        assert len(r["post_changes"]) == 1, pid
        c = r["post_changes"][0]
        assert c.comparison == "baseline" and c.baseline_preoperative is True
        assert (c.sex, c.fracture_type, c.fractured_side) == (
            spec.sex,
            spec.fracture_type,
            spec.fractured_side,
        )
        assert c.height_m == pytest.approx(spec.height_m) and c.height_source == "registry"
        pre, post = r["pre_labels"].array, r["post_labels"].array
        vox = r["pre_labels"].voxel_volume_cm3
        ovc = {o.name: o for o in c.operated_vs_contralateral}
        for m in ANALYSED_MUSCLES:
            lab = LABEL_OF[m]
            n_pre, n_post = int(np.count_nonzero(pre == lab)), int(np.count_nonzero(post == lab))
            s = _both(c, m)
            # The reported change is the truth (voxel counts of the ground-truth labels).
            assert s.pre_cm3 == pytest.approx(n_pre * vox, abs=1e-3), (pid, m)
            assert s.delta_cm3 == pytest.approx((n_post - n_pre) * vox, abs=2e-3), (pid, m)
            assert s.delta_index_cm3_m2 == pytest.approx(
                (n_post - n_pre) * vox / spec.height_m**2, abs=1e-3
            )
            # ... and it is the atrophy that was asked for, on the operated side only.
            o = ovc[m]
            n_op = o.operated_pre_cm3 / vox
            if n_op >= 100:  # voxelisation at 5 mm: a few % for small or thin muscles
                kept = o.operated_post_cm3 / o.operated_pre_cm3
                assert kept == pytest.approx(spec.atrophy[m], abs=max(0.02, 1.0 / n_op**0.5)), (pid, m)
            assert abs(o.contralateral_loss_pct) < 1.0, (pid, m)

    entries = pairing.cohort_entries(settings)
    assert sum(1 for e in entries if e.change is not None and not e.reasons) == 18
    report = build_cohort(entries, n_boot=200)
    assert report.group_sizes == {"Female FNF": 2, "Female ITF": 10, "Male FNF": 4, "Male ITF": 2}
    for g in report.group_sizes:
        truth = []
        for r in results.values():
            if r["spec"].group != g:
                continue
            vox = r["pre_labels"].voxel_volume_cm3
            labs = [LABEL_OF[m] for m in ANALYSED_MUSCLES]
            truth.append(
                sum(
                    int(np.count_nonzero(r["pre_labels"].array == lb))
                    - int(np.count_nonzero(r["post_labels"].array == lb))
                    for lb in labs
                )
                * vox
            )
        assert report.table2.loc["Mean", ("Raw (cm³)", g)] == pytest.approx(np.mean(truth), abs=0.01)
        assert report.table2.loc["Max", ("Raw (cm³)", g)] == pytest.approx(np.max(truth), abs=0.01)
    written = write_report(report, tmp_path / "report")
    assert written["html"].stat().st_size > 50_000
    print(f"synthetic cohort: 36 phantoms measured, paired and reported in "
          f"{synthetic_cohort['elapsed_s']:.1f} s")


def test_concurrent_workers_keep_one_consistent_timeline(settings: Settings) -> None:
    import threading

    from dicomnode.db import opened

    with opened(settings.db_path):  # the index exists before any worker runs, as the node makes it
        pass  # (8 threads creating it at once could meet SQLite's lock on the switch to WAL)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            _record(settings, "P1", f"1.{i}", f"202301{i + 1:02d}", 1.0 - i / 100)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = pairing.timeline(settings, "P1")
    assert [r.study.study_date for r in rows] == [f"202301{i + 1:02d}" for i in range(8)]
    assert [len(r.changes) for r in rows] == [0, 1] + [2] * 6
    with opened(settings.db_path) as db:
        assert db.one("SELECT COUNT(*) FROM pairing_changes")[0] == 1 + 2 * 6


def test_synthetic_cohort_kept_for_the_command_line(synthetic_cohort: dict, tmp_path: Path,
                                                    monkeypatch) -> None:
    """`benchmarks/cohort.py --storage DIR` keeps the node's index, registry and results, so a
    researcher can query the cohort with `dicomnode report cohort` as the docs show; a folder that
    already holds something is refused rather than mixed."""
    bench, storage = synthetic_cohort["bench"], synthetic_cohort["storage"]
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(storage))
    res = CliRunner().invoke(app, ["report", "cohort", "--out", str(tmp_path / "report"),
                                   "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    assert "Female FNF 2, Female ITF 10, Male FNF 4, Male ITF 2" in res.output
    # the notes (here: FNF 33 % women, ITF 83 %) wrapped within 80 columns like the rest
    assert "note: FNF vs ITF pools both sexes" in res.output
    assert max(len(line) for line in res.output.splitlines() if str(tmp_path) not in line) <= 80
    # the participant flow on the terminal, and the phantoms' PatientAge in Table 0 (age at baseline)
    assert ("    18  included in the tables\n        FNF 6 (women 2, men 4)\n"
            "        ITF 12 (women 10, men 2)\n") in res.output
    with (tmp_path / "report" / "table0_baseline.csv").open() as f:
        table0 = {row[0]: row[1:] for row in csv.reader(f)}
    assert table0["  patients with a known age"][-1] == "18 of 18"
    res = CliRunner().invoke(app, ["patients", "list", "--json"])
    assert sum(r["comparisons"] for r in json.loads(res.output)) == 18
    with pytest.raises(SystemExit):
        bench.main(["--storage", str(storage)])


def test_a_legacy_study_date_is_ordered_by_its_day(settings: Settings, tmp_path: Path) -> None:
    """Recorded as the loader reads it ("2024.03.01" → "20240301"), a follow-up is after the surgery
    of 10 February; as text it sorted before "20240210" and became the pre-operative baseline."""
    from seg.dates import da_date

    _registry(settings, tmp_path, "patient_id,fracture_type,surgery_date\nP1,FNF,2024-02-10\n")
    _record(settings, "P1", "1.1", da_date("2024.02.01"), 1.0)
    changes = _record(settings, "P1", "1.2", da_date("2024.03.01"), 0.8)
    assert [c.comparison for c in changes] == ["baseline"] and changes[0].baseline_preoperative is True


def test_one_scan_sent_twice_under_new_uids_is_named(settings: Settings, tmp_path: Path) -> None:
    """Two pre-operative studies at the very same second: one became the baseline and the other an
    "earlier pre-operative study" by StudyInstanceUID order, and nothing said why."""
    _registry(settings, tmp_path, "patient_id,fracture_type,surgery_date\nP1,FNF,20230110\n")
    _record(settings, "P1", "1.1", "20230109", 1.0, time_="101500")
    _record(settings, "P1", "2.7", "20230109", 1.0, time_="101500.250")
    _record(settings, "P1", "1.3", "20230109", 1.0, time_="141500")  # same day, another scan
    for uid in ("1.1.1", "2.7.1"):
        why = [r for r in pairing.status_of(settings, uid).reasons if r.code is ReasonCode.SAME_DATE_AND_TIME]
        assert len(why) == 1 and "2 studies share StudyDate 2023-01-09 and StudyTime 101500" in why[0].text
    assert ReasonCode.SAME_DATE_AND_TIME not in {r.code for r in pairing.status_of(settings, "1.3.1").reasons}


def test_pairing_logs_no_dates_at_info(settings: Settings, tmp_path: Path) -> None:
    """A study or surgery date is the patient's (PHI): the reasons' texts name them ("surgery
    2023-01-10", "same day as the baseline (2023-01-09)"), so INFO carries the reasons' codes only."""
    from log_capture import captured_info_log

    _registry(settings, tmp_path, "patient_id,fracture_type,surgery_date\nP1,FNF,20230110\n")
    with captured_info_log(logging.DEBUG) as stream:
        _record(settings, "P1", "1.1", "20230109", 1.0)
        _record(settings, "P1", "1.2", "20230109", 1.0, time_="150000")
    log = stream.getvalue()
    assert "recorded as baseline" in log and ReasonCode.BASELINE_PREOPERATIVE.value in log
    stated = " ".join(r.text for uid in ("1.1.1", "1.2.1") for r in pairing.status_of(settings, uid).reasons)
    assert "(surgery 2023-01-10)" in stated  # the texts name the date as a reader reads it ...
    for day in ("20230109", "20230110"):
        assert day not in log and display_date(day) not in log  # ... and INFO in neither form
