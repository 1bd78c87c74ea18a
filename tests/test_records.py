"""Typed records: round trips, schema versions, results stored before the records (version 1) still
load, unknown keys refused, and reasons that carry codes so that nothing filters by prose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomnode.clinical import pairing
from dicomnode.config import Settings
from dicomnode.db import opened
from seg.records import (
    NOT_COMPARED,
    SCHEMA_VERSION,
    ChangeRecord,
    ModelInfo,
    Reason,
    ReasonCode,
    StructureVolume,
    VolumeRecord,
    other_side,
    reasons_from_json,
    reasons_to_json,
)

LEGACY = Path(__file__).parent / "data" / "legacy"


def _legacy_tables() -> dict[str, list[dict]]:
    return json.loads((LEGACY / "pairing_tables.json").read_text())


def _legacy_change() -> dict:
    row = next(r for r in _legacy_tables()["pairing_changes"] if r["followup_series_uid"] == "1.2.1")
    return json.loads(row["change_json"])


def test_volume_record_round_trip_with_schema_version(tmp_path: Path) -> None:
    rec = VolumeRecord.load(LEGACY / "volumes.json")
    path = rec.save(tmp_path / "volumes.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert VolumeRecord.load(path) == rec
    assert VolumeRecord.from_json(rec.to_json()) == rec


def test_legacy_volumes_json_loads_unchanged() -> None:
    """A volumes.json written before the records: every number as it was stored, now typed."""
    raw = json.loads((LEGACY / "volumes.json").read_text())
    assert "schema_version" not in raw
    rec = VolumeRecord.load(LEGACY / "volumes.json")
    assert rec.schema_version == SCHEMA_VERSION
    assert [s.model_dump(exclude_none=True) for s in rec.structures] == [
        {k: v for k, v in s.items() if v is not None} for s in raw["structures"]]
    assert rec.model == ModelInfo.model_validate(raw["model"]) and rec.model.spacing_mm == (4.0, 4.0, 4.0)
    assert rec.qa.model_dump(mode="json", exclude_none=True) == raw["qa"]
    assert rec.qa.metal_where is not None and rec.qa.metal_where.side == "left"
    vl = rec.by_name()["vastus_lateralis"]
    assert vl.sides() == ["left", "right"] and vl.side_volume("both") == vl.volume_cm3


def test_legacy_change_record_notes_get_codes(tmp_path: Path) -> None:
    raw = _legacy_change()
    assert "schema_version" not in raw and all(isinstance(n, str) for n in raw["notes"])
    change = ChangeRecord.from_json(raw)
    assert [n.code for n in change.notes] == [ReasonCode.HEIGHT_NOT_USED, ReasonCode.NO_HEIGHT,
                                              ReasonCode.FRACTURE_TYPE_UNKNOWN]
    assert [n.text for n in change.notes] == raw["notes"]
    assert change.comparison == "baseline" and change.baseline.series_instance_uid == "1.1.1"
    assert len(change.structures) == len(raw["structures"])
    assert change.total_analysed_muscles.delta_cm3 == raw["total_analysed_muscles"]["delta_cm3"]
    # a change-*.json file of an earlier release loads the same way, and saves as version 2
    (tmp_path / "change.json").write_text(json.dumps(raw))
    again = ChangeRecord.load(tmp_path / "change.json").save(tmp_path / "change2.json")
    assert json.loads(again.read_text())["schema_version"] == SCHEMA_VERSION
    assert ChangeRecord.load(again) == change


def test_change_entries_keep_their_json_layout() -> None:
    """Structure and total entries share their figures (one base) yet write the keys of the change
    records stored before, in the same order: identity first, then the figures; a structure's
    near-metal flag, added since, after them (unknown for a record stored before)."""
    raw = _legacy_change()
    written = json.loads(ChangeRecord.from_json(raw).to_json())
    assert [list(s) for s in written["structures"]] == [[*s, "near_metal"] for s in raw["structures"]]
    assert written["structures"] == [s | {"near_metal": None} for s in raw["structures"]]
    assert list(written["total_analysed_muscles"]) == list(raw["total_analysed_muscles"])
    assert written["total_analysed_muscles"] == raw["total_analysed_muscles"]


def test_every_legacy_reason_is_classified() -> None:
    texts = [t for row in _legacy_tables()["pairing_status"] for t in json.loads(row["reasons"])]
    codes = {Reason.load(t).code for t in texts}
    assert ReasonCode.UNCLASSIFIED not in codes
    assert {ReasonCode.EARLIER_PREOPERATIVE, ReasonCode.BASELINE_PREOPERATIVE, ReasonCode.BASELINE_EARLIEST,
            ReasonCode.SINGLE_STUDY, ReasonCode.SAME_DAY_AS_BASELINE, ReasonCode.SAME_DAY_FOLLOWUP} <= codes
    assert Reason.load("something a later release wrote").code is ReasonCode.UNCLASSIFIED


def test_pairing_reads_an_index_written_before_the_records(tmp_path: Path) -> None:
    """Pairing rows stored by the earlier release: the cohort, timelines and late changes still read."""
    settings = Settings(storage_dir=tmp_path / "var")
    with opened(settings.db_path) as db, db.tx() as con:
        for table, rows in _legacy_tables().items():
            for row in rows:
                con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                            tuple(row.values()))
    entries = {e.patient_id: e for e in pairing.cohort_entries(settings)}
    assert entries["P1"].change is not None and entries["P1"].reasons == ()
    assert entries["P1"].change.followup.series_instance_uid == "1.3.1"  # the last follow-up
    assert [r.code for r in entries["P2"].reasons] == [ReasonCode.SINGLE_STUDY]
    assert [r.code for r in entries["P3"].reasons] == [ReasonCode.SAME_DAY_AS_BASELINE]
    assert entries["P3"].reason_text.startswith("same day as the baseline (20230101)")
    rows = pairing.timeline(settings, "P1")
    assert [r.role for r in rows] == ["pre-operative", "baseline", "followup", "followup"]
    assert rows[1].reasons[0].code is ReasonCode.BASELINE_PREOPERATIVE
    assert [len(r.changes) for r in rows] == [0, 0, 1, 1]
    late = pairing.changes_for_earlier_series(settings, "1.1.1")
    assert sorted(c.followup.series_instance_uid for c in late) == ["1.2.1", "1.3.1"]
    assert pairing.status_of(settings, "2.1.1").reasons[1] == Reason(
        ReasonCode.SINGLE_STUDY, "single study for this patient: nothing to compare with")


def test_unknown_keys_and_newer_versions_are_refused() -> None:
    good = json.loads((LEGACY / "volumes.json").read_text())
    with pytest.raises(ValidationError, match="volumes_cm3"):
        VolumeRecord.from_json(good | {"volumes_cm3": 1.0})
    bad_structure = dict(good["structures"][0]) | {"left_cm": 1.0}  # a misspelt side
    with pytest.raises(ValidationError, match="left_cm"):
        VolumeRecord.from_json(good | {"structures": [bad_structure]})
    with pytest.raises(ValidationError):
        VolumeRecord.from_json(good | {"qa": good["qa"] | {"metall": True}})
    with pytest.raises(ValidationError):
        ChangeRecord.from_json(_legacy_change() | {"schema_version": SCHEMA_VERSION, "notes": ["bare text"]})
    with pytest.raises(ValueError, match="newer"):
        VolumeRecord.from_json(good | {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ValidationError):
        ModelInfo.model_validate({"name": "m", "versoin": "1"})


def test_clinical_facts_take_the_registrys_words_only() -> None:
    """A change record's side, sex and fracture type are the values the registry parser gives (the
    types say so, and no reader re-checks them): anything else is refused, not stored."""
    change = ChangeRecord.from_json(_legacy_change())
    assert change.with_facts(sex="M", fracture_type="other", fractured_side="right").fractured_side == "right"
    for fact, word in (("fractured_side", "L"), ("sex", "O"), ("fracture_type", "unknown")):
        with pytest.raises(ValidationError, match=fact):
            change.with_facts(**{fact: word})


def test_other_side() -> None:
    assert (other_side("left"), other_side("right")) == ("right", "left")


def test_records_are_frozen() -> None:
    s = StructureVolume(label=1, name="sartorius", volume_cm3=2.0, left_cm3=1.0, right_cm3=1.0)
    with pytest.raises(ValidationError):
        s.left_cm3 = 5.0  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen|cannot assign"):
        Reason(ReasonCode.NO_HEIGHT, "x").text = "y"  # type: ignore[misc]
    assert s.sides() == ["left", "right"]
    both = StructureVolume(label=1, name="sartorius", volume_cm3=2.0)
    assert both.sides() == ["both"] and both.side_volume("left") is None


def test_reasons_carry_codes() -> None:
    reasons = [Reason(ReasonCode.SINGLE_STUDY, "single study for this patient: nothing to compare with"),
               Reason(ReasonCode.NO_HEIGHT, "no plausible height")]
    stored = reasons_to_json(reasons)
    assert json.loads(stored)[0] == {"code": "single-study",
                                     "text": "single study for this patient: nothing to compare with"}
    assert reasons_from_json(stored) == reasons
    assert [r for r in reasons if r.code in NOT_COMPARED] == reasons[:1]
    with pytest.raises(ValidationError):
        Reason.load({"code": "not-a-code", "text": "x"})
    with pytest.raises(ValidationError):
        Reason.load({"code": "no-height", "text": "x", "detail": "y"})
    # the job lifecycle uses the same vocabulary: its codes are what the index already stores
    from dicomnode.processing.jobs import Reason as JobReason
    from dicomnode.processing.jobs import ReasonCode as JobReasonCode

    assert JobReason is Reason and JobReasonCode is ReasonCode
    assert ReasonCode("send-failed") is ReasonCode.SEND_FAILED
