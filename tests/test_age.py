"""Age at the baseline CT: read from the header once (seg.age), carried by volumes.json and the change
record to the cohort's Table 0, and absent (None) from records stored before it was recorded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reporting.change import compute_change
from seg import labels as L
from seg.age import age_at_study, age_from_birth_date, age_from_patient_age
from seg.header import SeriesHeader
from seg.measure import measure_volumes
from seg.records import SCHEMA_VERSION, ChangeRecord, StudyRef, VolumeRecord
from seg.volume import Volume

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.mark.parametrize(("value", "years"), [
    ("081Y", 81), ("81Y", 81), ("006M", 0), ("018M", 1), ("052W", 0), ("400D", 1), ("081y", 81),
    ("", None), (None, None), ("81", None), ("0X1Y", None), ("999Y", None), ("081Y ", 81),
])
def test_patient_age_is_read_in_its_units(value, years) -> None:
    assert age_from_patient_age(value) == years


def test_birth_date_counts_completed_years_to_the_study() -> None:
    assert age_from_birth_date("19400615", "20230614") == 82  # the day before the birthday
    assert age_from_birth_date("19400615", "20230615") == 83
    assert age_from_birth_date("1940-06-15", "2023-06-15") == 83
    assert age_from_birth_date("20240101", "20230101") is None  # born after the study
    assert age_from_birth_date("19401301", "20230101") is None  # no 13th month
    assert age_from_birth_date("", "20230101") is None and age_from_birth_date("19400101", None) is None


def test_patient_age_first_then_birth_date_else_missing() -> None:
    both = SeriesHeader(patient_age="079Y", birth_date="19400101", study_date="20230601")
    assert age_at_study(both) == (79, "PatientAge")
    assert age_at_study(replace(both, patient_age="garbled")) == (83, "PatientBirthDate")
    assert age_at_study(SeriesHeader(study_date="20230601")) == (None, None)


def _labels(header: SeriesHeader) -> Volume:
    lab = np.zeros((20, 10, 4), np.uint8)
    lab[2:8, 2:8] = L.LABEL_OF["vastus_lateralis"]
    lab[12:18, 2:8] = L.LABEL_OF["vastus_lateralis"]
    aff = np.diag([2.0, 2.0, 5.0, 1.0])
    aff[:3, 3] = (-19.0, 0.0, 0.0)
    return Volume(lab, aff, replace(header, series_instance_uid="1.2.3"))


def test_volumes_json_records_the_age_and_the_change_its_baseline_age() -> None:
    pre = measure_volumes(_labels(SeriesHeader(patient_age="080Y", study_date="20230101")))
    post = measure_volumes(_labels(SeriesHeader(birth_date="19421201", study_date="20230601")))
    assert (pre.age_years, pre.age_source) == (80, "PatientAge")
    assert (post.age_years, post.age_source) == (80, "PatientBirthDate")
    assert VolumeRecord.from_json(pre.to_json()) == pre
    change = compute_change(pre, post, 1.6, StudyRef(study_date="20230101"), StudyRef(study_date="20230601"))
    assert change.baseline_age_years == 80
    unknown = measure_volumes(_labels(SeriesHeader()))
    assert unknown.age_years is None and unknown.age_source is None
    later = compute_change(unknown, post, 1.6, StudyRef(study_date="20230101"),
                           StudyRef(study_date="20230601"))
    assert later.baseline_age_years is None  # the baseline's age only: no guess from the follow-up


def test_records_stored_without_an_age_still_load(tmp_path: Path) -> None:
    """volumes.json and change records of earlier releases, version-less (1) or version 2 without the
    age fields, load with the age unknown, and a loaded record saves and loads unchanged."""
    legacy = json.loads((LEGACY / "volumes.json").read_text())
    assert "age_years" not in legacy
    rec = VolumeRecord.from_json(legacy)
    assert rec.age_years is None and rec.age_source is None
    v2 = json.loads(rec.to_json())
    del v2["age_years"], v2["age_source"]
    assert v2["schema_version"] == SCHEMA_VERSION and VolumeRecord.from_json(v2) == rec
    tables = json.loads((LEGACY / "pairing_tables.json").read_text())
    raw = json.loads(tables["pairing_changes"][0]["change_json"])
    assert "baseline_age_years" not in raw
    change = ChangeRecord.from_json(raw)
    assert change.baseline_age_years is None
    again = ChangeRecord.load(change.save(tmp_path / "change.json"))
    assert again == change
