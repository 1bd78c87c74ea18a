"""Clinical registry: CSV import, trust order registry > DICOM, height provenance and plausibility."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.clinical import registry
from dicomnode.config import Settings
from dicomnode.db import MIGRATIONS, opened
from seg.header import SeriesHeader
from seg.records import ReasonCode

CSV = """patient_id,height_m,sex,fracture_type,fractured_side,surgery_date,koval_grade
P1,1.62,F,FNF,left,2023-01-06,2
P2,171,M,intertrochanteric,R,20230107,1
P3,2.60,F,ITF,left,20230108,3
P4,,M,,right,,
P5,1.55,F,subcapital-ish,left,notadate,9
"""


def _import(settings: Settings, tmp_path: Path, text: str = CSV) -> registry.ImportResult:
    path = tmp_path / "registry.csv"
    path.write_text(text)
    return registry.import_csv(settings, path)


def test_import_parses_and_flags(settings: Settings, tmp_path: Path) -> None:
    result = _import(settings, tmp_path)
    assert result.imported == 5
    p1 = registry.get_patient(settings, "P1")
    assert (p1.height_m, p1.sex, p1.fracture_type, p1.fractured_side, p1.surgery_date, p1.koval_grade) == (
        1.62,
        "F",
        "FNF",
        "left",
        "20230106",
        2,
    )
    p2 = registry.get_patient(settings, "P2")
    assert p2.height_m == 1.71 and p2.fracture_type == "ITF" and p2.fractured_side == "right"
    p3 = registry.get_patient(settings, "P3")
    assert p3.height_m == 2.60 and p3.height_flag and "implausible" in p3.height_flag
    p5 = registry.get_patient(settings, "P5")
    assert p5.fracture_type is None and p5.surgery_date is None and p5.koval_grade is None
    text = "\n".join(result.problems)
    assert "line 4: implausible height 2.60 m" in text
    assert "unknown fracture type 'subcapital-ish'" in text
    assert "surgery date not a date" in text and "Koval grade 9 outside" in text


def test_trust_order_and_height_provenance(settings: Settings, tmp_path: Path) -> None:
    _import(settings, tmp_path)
    # Registry beats DICOM for height and sex.
    r = registry.resolve(settings, "P1", dicom_sex="M", dicom_size=1.80)
    assert (r.height_m, r.height_source, r.sex, r.sex_source) == (1.62, "registry", "F", "registry")
    # Implausible registry height is never used; a plausible PatientSize is, and the flag is stated.
    r = registry.resolve(settings, "P3", dicom_size=1.58)
    assert (r.height_m, r.height_source) == (1.58, "PatientSize")
    assert [n.code for n in r.notes].count(ReasonCode.HEIGHT_NOT_USED) == 1
    assert any("implausible" in n.text for n in r.notes)
    r = registry.resolve(settings, "P3")
    assert r.height_m is None and "implausible" in r.height_source
    assert ReasonCode.NO_HEIGHT in {n.code for n in r.notes}
    # No registry height, no DICOM height: no index, never a guess.
    r = registry.resolve(settings, "P4", dicom_sex="M")
    assert r.height_m is None and r.height_source == "missing"
    assert ReasonCode.FRACTURE_TYPE_UNKNOWN in {n.code for n in r.notes}
    # Not in the registry: DICOM only; an implausible PatientSize is refused.
    assert registry.resolve(settings, "NOBODY", dicom_size="1.7").height_source == "PatientSize"
    r = registry.resolve(settings, "NOBODY", dicom_size=17.0, dicom_sex="F")
    assert r.height_m is None and r.height_source.startswith("implausible PatientSize")
    assert (r.sex, r.sex_source) == ("F", "PatientSex")
    # The pipeline's hook.
    facts = registry.facts_for(settings, SeriesHeader(patient_id="P2", size_m=1.9))
    assert (facts.height_m, facts.height_source) == (1.71, "registry")
    assert registry.facts_for(settings, SeriesHeader(patient_id="X", size_m=0.5)).height_m is None


def test_issuer_scoping(settings: Settings, tmp_path: Path) -> None:
    _import(settings, tmp_path, "patient_id,issuer_of_patient_id,height_m\nP1,HOSP_A,1.60\nP1,,1.70\n")
    assert registry.get_patient(settings, "P1", "HOSP_A").height_m == 1.60
    assert registry.get_patient(settings, "P1", "HOSP_B").height_m == 1.70  # row without issuer
    assert registry.get_patient(settings, "P1").height_m == 1.70


def test_reimport_updates_what_the_file_gives_and_keeps_the_rest(settings: Settings, tmp_path: Path) -> None:
    """A file that corrects heights must not erase the sex, fracture and surgery date stored before:
    an absent column, an empty cell and an unreadable value all keep the stored value."""
    _import(settings, tmp_path)
    result = _import(settings, tmp_path, "patient_id;height_m;fracture_type;sex\nP1;1,64;ITF;\nP2;1.70;;\n")
    assert (result.imported, result.updated) == (2, 2)
    p1 = registry.get_patient(settings, "P1")
    assert (p1.height_m, p1.fracture_type, p1.sex, p1.surgery_date, p1.koval_grade) == (
        1.62, "ITF", "F", "20230106", 2)
    assert "line 2: height not a number: '1,64'" in result.problems
    p2 = registry.get_patient(settings, "P2")
    assert (p2.height_m, p2.fracture_type, p2.fractured_side) == (1.70, "ITF", "right")
    # a plausible height replaces an implausible one and its flag
    _import(settings, tmp_path, "patient_id,height_cm\nP3,160\n")
    p3 = registry.get_patient(settings, "P3")
    assert (p3.height_m, p3.height_flag, p3.fracture_type) == (1.60, None, "ITF")
    assert len(registry.all_patients(settings)) == 5


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("patient_id,height_m,fracture_typ", "unknown column(s) 'fracture_typ'; accepted: patient_id,"),
        ("patient_id,height,height_m", "columns 'height' and 'height_m' both give height_m"),
        ("patient_id,height_m,height_cm", "both give the height"),
        ("height,sex", "no patient_id column"),
    ],
)
def test_a_header_we_cannot_read_refuses_the_whole_file(settings: Settings, tmp_path: Path,
                                                         header: str, message: str) -> None:
    _import(settings, tmp_path)
    before = registry.all_patients(settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        _import(settings, tmp_path, f"{header}\nP1,1.70,ITF\n")
    assert registry.all_patients(settings) == before


def test_lines_that_do_not_fit_the_header_or_repeat_a_patient_are_skipped(settings: Settings,
                                                                          tmp_path: Path) -> None:
    """A decimal comma in a comma-separated file shifts every later field: the line is skipped with
    its field count, not imported as height 1 m, sex '53'. A patient's second line is skipped too."""
    _import(settings, tmp_path)
    result = _import(settings, tmp_path, "patient_id,height_m,sex,fracture_type\n"
                                         "P1,1,53,F,FNF\nP2,1.72\nP4,1.80,M,ITF\nP4,1.81,M,FNF\n,1.7,F,FNF\n")
    assert (result.imported, result.skipped) == (1, 4)
    assert result.problems == [
        "line 2: 5 fields, the header has 4: line skipped",
        "line 3: 2 fields, the header has 4: line skipped",
        "line 5: patient P4 is on line 4 already: line skipped",
        "line 6: no patient_id: line skipped",
    ]
    assert registry.get_patient(settings, "P1").height_m == 1.62
    assert registry.get_patient(settings, "P2").height_m == 1.71
    p4 = registry.get_patient(settings, "P4")
    assert (p4.height_m, p4.fracture_type) == (1.80, "ITF")


def test_registry_lives_in_the_versioned_index(settings: Settings, tmp_path: Path) -> None:
    """One access path: the registry writes into the node's index, whose schema ``db.MIGRATIONS``
    defines, and a file the registry creates first is already the node's full index."""
    _import(settings, tmp_path)
    with opened(settings.db_path) as db:
        assert db.one("PRAGMA user_version")[0] == len(MIGRATIONS)
        tables = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"registry_patients", "pairing_results", "pairing_changes", "jobs", "instances"} <= tables
    assert registry.get_patient(settings, "P1").height_m == 1.62


def test_cli_import_and_list(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", str(settings.storage_dir))
    path = tmp_path / "registry.csv"
    path.write_text(CSV)
    runner = CliRunner()
    res = runner.invoke(app, ["patients", "import", str(path)])
    assert res.exit_code == 1, res.output  # the file has problem lines: imported, and a script notices
    assert "imported 5 patient(s) (5 new, 0 updated); 0 line(s) skipped" in res.output
    res = runner.invoke(app, ["patients", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "[implausible height" in res.output, res.output  # not eaten as markup
    res = runner.invoke(app, ["patients", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["patient_id"]: r for r in json.loads(res.output)}
    assert rows["P1"]["height_source"] == "registry"
    assert rows["P3"]["height_m"] is None and "implausible" in rows["P3"]["height_flag"]
    assert rows["P4"]["fracture_type"] is None
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,fracture_typ\nP1,ITF\n")
    res = runner.invoke(app, ["patients", "import", str(bad)])
    assert res.exit_code == 2 and "unknown column(s) 'fracture_typ'" in res.output


def test_a_refused_value_keeps_the_stored_one_and_is_not_an_update(settings: Settings,
                                                                   tmp_path: Path) -> None:
    """A metre value in height_cm (1.75 -> 0.0175 m) replaced a good stored height, and a line whose
    only value was refused counted as "updated"."""
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("patient_id,height_m,surgery_date\nP1,1.75,20240115\n")
    registry.import_csv(settings, good)
    bad.write_text("patient_id,height_cm\nP1,1.75\n")
    result = registry.import_csv(settings, bad)
    assert registry.get_patient(settings, "P1").height_m == 1.75
    assert "line 2: the stored height 1.75 m is kept" in result.problems
    assert (result.imported, result.updated, result.skipped) == (0, 0, 1)
    bad.write_text("patient_id,surgery_date\nP1,05.01.2024\n")
    result = registry.import_csv(settings, bad)
    assert (result.imported, result.updated, result.skipped) == (0, 0, 1)
    assert registry.get_patient(settings, "P1").surgery_date == "20240115"


def test_a_registry_sex_other_than_the_cts_is_noted(settings: Settings, tmp_path: Path) -> None:
    """The registry's sex is used (the documented trust order) but no longer silently: a conflict
    moves a patient between the paper's sex groups and usually means a wrong row or ID."""
    path = tmp_path / "sex.csv"
    path.write_text("patient_id,sex\nP1,F\n")
    registry.import_csv(settings, path)
    res = registry.resolve(settings, "P1", dicom_sex="M")
    assert res.sex == "F" and [n.code for n in res.notes if n.code == ReasonCode.SEX_CONFLICT]
    assert "registry sex F differs from the CT's PatientSex M" in " ".join(n.text for n in res.notes)
    assert not [n for n in registry.resolve(settings, "P1", dicom_sex="F").notes
                if n.code == ReasonCode.SEX_CONFLICT]
