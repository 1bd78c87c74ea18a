"""One reader for calendar dates and one for times of day (seg.dates): pairing and prior retrieval
order studies by comparing these strings, so a date or time in another form or a garbled one must
never reach them as text."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest

from dicomnode.clinical.registry import parse_date
from seg.dates import da_date, tm_time
from seg.io import load_dicom_series
from seg.phantom import PhantomOptions, make_phantom, write_phantom


@pytest.mark.parametrize(("text", "expected"), [
    ("20240105", "20240105"), ("2024-01-05", "20240105"), ("2024.01.05", "20240105"),
    ("2024/01/05", "20240105"), (" 20240105 ", "20240105"),
    ("2024-1-5", None), ("202415", None), ("2024-01.05", None), ("00000000", None), ("20240230", None),
    ("05.01.2024", None), ("", None), (None, None),
])
def test_one_form_or_none(text, expected) -> None:
    assert da_date(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("080000", "080000.000000"), ("0800", "080000.000000"), ("08", "080000.000000"),
    ("083015.5", "083015.500000"), ("083015.123456", "083015.123456"), ("08:30:15", "083015.000000"),
    (" 160000 ", "160000.000000"), ("235960", "235960.000000"),
    ("", None), (None, None), ("24", None), ("0860", None), ("083061", None), ("8", None),
    ("08:3015", None), ("0830.5", None), ("083015.1234567", None), ("08h30", None),
])
def test_one_time_form_or_none(text, expected) -> None:
    assert tm_time(text) == expected


def test_times_compare_as_text_whatever_their_form() -> None:
    """As written, "08:05" sorts after "0810" and "0800" before "080000" (one moment): read, they
    compare as the times they are."""
    assert "08:05" > "0810" and tm_time("08:05") < tm_time("0810")
    assert "0800" < "080000" and tm_time("0800") == tm_time("080000")


def test_the_registry_refuses_a_date_it_would_have_kept_short() -> None:
    """"2024-1-5" became "202415", which sorts before every real date."""
    assert parse_date("2024/01/05") == "20240105"
    assert parse_date("") is None
    with pytest.raises(ValueError, match="not a date"):
        parse_date("2024-1-5")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA:UserWarning")  # the values it is about
@pytest.mark.parametrize(("study_date", "expected"), [("2024.03.01", "20240301"), ("00000000", None)])
def test_the_loader_reads_a_study_date_as_pairing_compares_it(tmp_path: Path, study_date: str,
                                                               expected: str | None) -> None:
    """An archive's ACR-NEMA "2024.03.01" compared as text with a surgery date "20240210" was before
    it (pre-operative); an impossible date is no date, not one that sorts first."""
    ph = make_phantom(PhantomOptions(seed=2, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-12, 12)))
    write_phantom(ph, tmp_path)
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds["StudyDate"].value = study_date  # as the archive holds it, not as pydicom would write it
        ds.save_as(f)
    random.Random(0).shuffle(files)
    assert load_dicom_series(files).header.study_date == expected
