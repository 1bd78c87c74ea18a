"""One patient under two PatientIDs: look-alike IDs are hinted, never paired by themselves; an
operator's link (``patients link A B``) pairs them as one patient until ``unlink`` (real SQLite)."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from test_pairing import _volumes
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.clinical import aliases, pairing, registry
from dicomnode.clinical.pairing import ResultRecord, record_result
from dicomnode.config import Settings
from dicomnode.db import MIGRATIONS, opened
from seg.records import ReasonCode

BORN = "19400312"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    s = Settings(storage_dir=tmp_path / "var")
    s.pairing.retrieve_priors = False
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(s.storage_dir))
    monkeypatch.setenv("DICOMNODE_PAIRING__RETRIEVE_PRIORS", "false")
    return s


def _record(settings: Settings, pid: str, study: str, date: str, *, born: str = BORN, sex: str = "F",
            factor: float = 1.0) -> None:
    series = f"{study}.1"
    out = Path(settings.storage_dir) / "results" / series
    record_result(settings, ResultRecord(
        patient_id=pid, issuer_of_patient_id="", patient_sex=sex, patient_size_m=None,
        study_instance_uid=study, study_date=date, study_time="100000", series_instance_uid=series,
        volumes_json=_volumes(out, series, factor), seg_sop_instance_uid=f"{series}.seg",
        sr_sop_instance_uid=f"{series}.sr", result_dir=out, patient_birth_date=born))


def _hints(settings: Settings, series: str) -> list[str]:
    status = pairing.status_of(settings, series)
    assert status is not None
    return [r.text for r in status.reasons if r.code is ReasonCode.POSSIBLY_SAME_PATIENT]


def _comparisons(settings: Settings) -> list[tuple[str, str, str]]:
    with opened(settings.db_path) as db:
        return [tuple(r) for r in db.query(
            "SELECT baseline_series_uid, followup_series_uid, patient_id FROM pairing_changes")]


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["patients", *args], env={"COLUMNS": "80"})
    return res.exit_code, res.output


def test_id_key_is_what_the_migration_computes_in_sqlite() -> None:
    """Migration 7 keys the rows it finds with SQLite's trim/ltrim/lower; new rows get id_key()."""
    con = sqlite3.connect(":memory:")
    for pid in ("12345", "012345", " 0012345 ", "ab12", "AB12", "000", "", "Ünï0"):
        (sql,) = con.execute("SELECT lower(ltrim(trim(?), '0'))", (pid,)).fetchone()
        assert aliases.id_key(pid) == sql, pid
    assert aliases.id_key("012345") == aliases.id_key("12345") != aliases.id_key("12346")
    assert aliases.differences("12345", "012345") == "leading zeros"
    assert aliases.differences(" ab1", "AB1") == "surrounding spaces and letter case"


def test_an_older_index_is_keyed_and_gains_the_links_table(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    con = sqlite3.connect(path)
    for script in MIGRATIONS[:6]:
        con.executescript(script)
    con.execute("PRAGMA user_version=6")
    con.execute("INSERT INTO pairing_results (series_instance_uid, patient_id, study_instance_uid,"
                " volumes_json, recorded_at) VALUES ('1.1', ' 012345', '1', 'v.json', 'now')")
    con.commit()
    con.close()
    with opened(path) as db:
        assert db.one("PRAGMA user_version")[0] == len(MIGRATIONS)
        row = db.one("SELECT id_key, patient_birth_date FROM pairing_results")
        assert tuple(row) == ("12345", None)  # a birth date the older release did not keep: unknown
        assert aliases.links(db.con) == []


def test_look_alike_ids_are_hinted_on_both_sides_and_never_paired(settings: Settings) -> None:
    _record(settings, "12345", "1.1", "20230101")
    assert _hints(settings, "1.1.1") == []  # no other ID yet
    _record(settings, "012345", "1.2", "20230401", factor=0.9)
    assert _comparisons(settings) == []  # not paired by itself
    (hint,) = _hints(settings, "1.2.1")
    assert hint.startswith("possibly the same patient as PatientID 12345 (leading zeros differ;")
    assert hint.endswith("`dicomnode patients link 012345 12345`")
    # the ID recorded first is told as well: its studies were paired again with the new one's
    assert _hints(settings, "1.1.1") == [hint.replace("012345", "§").replace("12345", "012345")
                                         .replace("§", "12345")]


@pytest.mark.parametrize(("pid", "born", "sex"), [
    ("012345", "19400313", "F"),  # another birth date
    ("012345", BORN, "M"),  # another sex
    ("012345", "", "F"),  # birth date unknown
    ("123450", BORN, "F"),  # not the same ID after all
])
def test_a_different_person_is_not_hinted(settings: Settings, pid: str, born: str, sex: str) -> None:
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, pid, "1.2", "20230401", born=born, sex=sex)
    assert _hints(settings, "1.1.1") == _hints(settings, "1.2.1") == []


def test_a_patient_with_a_pre_operative_pair_is_not_hinted(settings: Settings, tmp_path: Path) -> None:
    """The hint is for studies without a pre-operative baseline or comparison; one without a
    pre-operative baseline is hinted although its post-operative studies are compared."""
    csv = tmp_path / "reg.csv"
    csv.write_text("patient_id,surgery_date\n12345,20230115\n012345,20230115\n")
    registry.import_csv(settings, csv)
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, "12345", "1.2", "20230401", factor=0.9)
    _record(settings, "012345", "2.1", "20230301")
    _record(settings, "012345", "2.2", "20230601", factor=0.8)
    assert len(_comparisons(settings)) == 2  # each ID's own: a pre vs post and a post vs post
    assert _hints(settings, "1.1.1") == _hints(settings, "1.2.1") == []
    assert len(_hints(settings, "2.1.1")) == len(_hints(settings, "2.2.1")) == 1


def test_link_pairs_both_ids_as_one_patient_and_unlink_undoes_it(settings: Settings,
                                                                  tmp_path: Path) -> None:
    csv = tmp_path / "reg.csv"  # the registry knows the patient by the other ID
    csv.write_text("patient_id,surgery_date,fractured_side\n012345,20230115,left\n")
    registry.import_csv(settings, csv)
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, "012345", "1.2", "20230401", factor=0.9)
    code, out = _cli("link", "12345", "012345")
    assert code == 0, out
    assert "linked '012345' to '12345': paired as one patient (birth date and sex compared)" in out
    assert "re-paired 1 measured patient(s)\ncomparisons: 1 added" in out
    assert _comparisons(settings) == [("1.1.1", "1.2.1", "12345")]
    assert _hints(settings, "1.1.1") == _hints(settings, "1.2.1") == []
    (row,) = pairing.timeline(settings, "012345")[1:]  # either ID shows the patient's timeline
    assert row.study.patient_id == "012345" and row.changes[0].baseline_preoperative is True
    assert row.changes[0].surgery_date == "20230115"  # the linked ID's registry row
    listed = json.loads(_cli("list", "--json")[1])
    assert [(r["patient_id"], r["linked_ids"], r["studies"], r["comparisons"]) for r in listed] == [
        ("12345", ["012345"], 2, 1)]
    code, out = _cli("timeline", "12345")
    assert code == 0 and "linked PatientIDs '012345', '12345': paired as one patient" in out, out

    code, out = _cli("unlink", "012345")
    assert code == 0 and "unlinked '012345' from '12345': paired on its own" in out, out
    assert "comparisons: 0 added, 1 removed" in out
    assert _comparisons(settings) == []
    assert len(_hints(settings, "1.1.1")) == len(_hints(settings, "1.2.1")) == 1
    assert [r["patient_id"] for r in json.loads(_cli("list", "--json")[1])] == ["012345", "12345"]


def test_link_refuses_other_birth_dates_unless_forced(settings: Settings) -> None:
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, "012345", "1.2", "20230401", born="19410101")
    code, out = _cli("link", "12345", "012345")
    assert code == 2 and "birth dates differ; not linked (--force" in out, out
    assert "19410101" not in out and _comparisons(settings) == []
    code, out = _cli("link", "12345", "012345", "--force")
    assert code == 0 and "linked although birth dates differ" in out, out
    with opened(settings.db_path) as db:
        assert aliases.links(db.con) == [aliases.Link("012345", "", "12345", True)]
    assert len(_comparisons(settings)) == 1


def test_link_and_unlink_refusals_name_the_way_out(settings: Settings) -> None:
    for pid, study in (("12345", "1.1"), ("012345", "1.2"), ("0012345", "1.3")):
        _record(settings, pid, study, f"2023010{study[-1]}")
    assert "no measured study under PatientID '99'" in _cli("link", "12345", "99")[1]
    assert "are one ID" in _cli("link", "12345", "12345")[1]
    assert _cli("link", "12345", "012345")[0] == 0
    assert "are linked already (paired as '12345')" in _cli("link", "012345", "12345")[1]
    code, out = _cli("link", "0012345", "012345")
    assert code == 2 and "'012345' is linked to '12345': link '0012345' with '12345'" in out, out
    code, out = _cli("unlink", "12345")
    assert code == 2 and "linked to it: '012345' (unlink those)" in out, out
    # linking through a linked ID pairs under its primary
    assert _cli("link", "012345", "0012345")[0] == 0
    assert [r.study.patient_id for r in pairing.timeline(settings, "0012345")] == [
        "12345", "012345", "0012345"]


def test_list_marks_a_look_alike_with_a_footnote_within_80_columns(settings: Settings) -> None:
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, "012345", "1.2", "20230401")
    _record(settings, "555", "1.3", "20230401")
    code, out = _cli("list")
    assert code == 0, out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, out
    marked = {line.split()[0] for line in lines if line.split()[1:2] == ["*≈"]}
    assert marked == {"12345", "012345"}, out
    assert "≈ 12345: possibly the same patient as '012345' (same birth date); to pair them:" in lines
    assert "    dicomnode patients link 12345 012345" in lines
    code, out = _cli("timeline", "12345")
    assert "        dicomnode patients link 12345 012345" in out.splitlines(), out
    assert max(map(len, out.splitlines())) <= 80, out


def test_ids_stay_out_of_the_log_above_debug(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _record(settings, "12345", "1.1", "20230101")
    _record(settings, "012345", "1.2", "20230401")
    assert _cli("link", "12345", "012345")[0] == 0
    assert _cli("unlink", "012345")[0] == 0
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("ID(s) linked" in m for m in logged) and any("ID unlinked" in m for m in logged)
    assert not [m for m in logged if "12345" in m or BORN in m]


def _sr_with_birth_date(path: Path, born: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientBirthDate = born
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_refresh_reads_the_birth_date_of_older_results_from_their_sr(settings: Settings) -> None:
    """Results recorded before birth dates were kept (NULL) get theirs from the measurement SR the
    node wrote, once; a missing SR leaves it unknown ("")."""
    _record(settings, "12345", "1.1", "20230101", born="")
    _record(settings, "012345", "1.2", "20230401", born="")
    _record(settings, "0012345", "1.3", "20230501", born="")
    with opened(settings.db_path) as db, db.tx() as con:
        con.execute("UPDATE pairing_results SET patient_birth_date=NULL")
    results = Path(settings.storage_dir) / "results"
    for series in ("1.1.1", "1.2.1"):
        _sr_with_birth_date(results / series / "outputs" / f"{series}.sr.dcm", BORN)
    assert _hints(settings, "1.1.1") == []
    code, out = _cli("refresh")
    assert code == 0, out
    with opened(settings.db_path) as db:
        assert dict(db.query("SELECT series_instance_uid, patient_birth_date FROM pairing_results")) == {
            "1.1.1": BORN, "1.2.1": BORN, "1.3.1": ""}
    assert len(_hints(settings, "1.1.1")) == len(_hints(settings, "1.2.1")) == 1
    assert _hints(settings, "1.3.1") == []
