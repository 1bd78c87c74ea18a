"""The summary page's patient name in Korean (and any script its font lacks): the group it can draw,
or a plain "not shown" — never empty boxes, never matplotlib's "Glyph ... missing" warning.

Real DICOM input: a phantom series whose PatientName is Korean under ISO_IR 192 and under
ISO 2022 IR 149, read by the loader and run through the page builder. No CJK font is assumed:
which group a machine can draw is asked of fontconfig (which matplotlib's font list comes from on
Linux), so the expected text is exact on a machine with or without one.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_reporting_seg import MODEL

from reporting.page_name import NOT_SHOWN, page_name
from reporting.summary import build_summary, header_lines, page_figure, rasterise
from seg.io import load_dicom_series, load_nifti
from seg.measure import measure_volumes
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import ClinicalTimePoint

KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"
KOREAN_ONLY = "=洪^吉洞=홍^길동"  # no alphabetic group
HANGUL_ONLY = "==홍^길동"
HANGUL_FIRST = "홍^길동"  # Hangul written in the alphabetic group, as UTF-8 sites do
IR149 = ["", "ISO 2022 IR 149"]  # the usual Korean form (value 1 empty: the default repertoire)
KS_X_1001 = b"\x1b$)C"  # the escape sequence to Korean (ISO 2022 IR 149) in the file's bytes


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("names")
    write_phantom(make_phantom(PhantomOptions(seed=4, spacing_mm=(4.0, 4.0, 10.0), z_range_mm=(-40.0, 40.0))),
                  root)
    return root


def _named_series(phantom: Path, tmp_path: Path, charset: str | list[str], name: str):
    """The phantom's CT with ``name`` written under ``charset`` in every file, as the loader reads it,
    and its volumes."""
    case = tmp_path / "dicom"
    shutil.copytree(phantom / "dicom", case)
    for f in case.glob("*"):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(f)
    raw = next(case.glob("*")).read_bytes()
    assert (KS_X_1001 in raw) == (charset == IR149)  # the file really is in ISO 2022 IR 149
    ct = load_dicom_series(case)
    labels = ct.with_array(np.asarray(load_nifti(phantom / "truth" / "labels.nii.gz").array, dtype=np.uint8))
    return ct, measure_volumes(labels, ct, model=MODEL)


def _drawable_here(group: str) -> bool:
    """Has a font fontconfig knows every character of ``group``'s names (not the separators)?"""
    chars = " ".join(f"{ord(c):x}" for c in sorted(set(group) - set("^= ")))
    out = subprocess.run(["fc-list", f":charset={chars}", "family"], capture_output=True, text=True,
                         timeout=60, check=True)
    return bool(out.stdout.strip())


def _expected(name: str) -> str:
    """The first group a font here can draw, as "Family, Given", else the plain "not shown"."""
    for group in pydicom.valuerep.PersonName(name).components:
        if group and (group.isascii() or _drawable_here(group)):
            return ", ".join(p for p in group.split("^")[:2] if p)
    return NOT_SHOWN


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 192", KOREAN), (IR149, KOREAN), ("ISO_IR 192", KOREAN_ONLY), (IR149, KOREAN_ONLY),
    ("ISO_IR 192", HANGUL_ONLY), (IR149, HANGUL_ONLY), ("ISO_IR 192", HANGUL_FIRST),
], ids=["utf8-three-groups", "ir149-three-groups", "utf8-ideographic-phonetic", "ir149-ideographic-phonetic",
        "utf8-phonetic", "ir149-phonetic", "utf8-hangul-first"])
def test_korean_name_is_drawn_or_said_not_shown(phantom, tmp_path, charset, name):
    ct, vols = _named_series(phantom, tmp_path, charset, name)
    assert ct.header.patient_name == name  # decoded from the file's character set
    expected = "Hong, Gildong" if name == KOREAN else _expected(name)
    who = header_lines(vols, MODEL, ct.header, None, ClinicalTimePoint(), 21, 1.0, None)[0][0]
    assert f"     Name: {expected}     " in who
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = build_summary(ct, vols, MODEL)
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    path = tmp_path / "page.dcm"
    page.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert str(back.PatientName) == name
    assert back.pixel_array.shape == (back.Rows, back.Columns, 3) and back.pixel_array.max() > 0


def test_a_font_matplotlib_has_draws_what_the_pages_font_lacks(phantom, tmp_path):
    """The found-font branch on a real font, as a CJK font would be used: matplotlib ships
    STIXGeneral, which has the one hiragana "の" that DejaVu Sans lacks; the name's line is drawn
    with it as the fallback, without a warning (with the page's font alone the same line warns)."""
    ct, vols = _named_series(phantom, tmp_path, "ISO_IR 192", "==の^の")
    name = page_name(ct.header.patient_name)
    assert name is not None and name.text == "の, の" and name.fallback_font == "STIXGeneral"
    fig = page_figure(vols, MODEL, ct.header)
    who = next(t for t in fig.axes[0].texts if t.get_text().startswith("Patient ID: "))
    assert "Name: の, の" in who.get_text() and who.get_fontfamily()[-1] == "STIXGeneral"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rasterise(fig)
    assert not [w for w in caught if "Glyph" in str(w.message)]
    who.set_fontfamily(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rasterise(fig)
    assert [w for w in caught if "Glyph" in str(w.message)]


def test_no_name_shows_no_name_field():
    assert page_name(None) is None and page_name("") is None and page_name("==") is None
    assert page_name("Hong").text == "Hong" and page_name("^Gildong").text == "Gildong"


def test_dollar_signs_in_a_name_are_drawn_as_written(phantom, tmp_path):
    """A header value with two "$" is text, not a matplotlib formula: "${$" would stop the page's
    build with a mathtext parse error, and "$x_2$" would be drawn as a formula."""
    ct, vols = _named_series(phantom, tmp_path, "ISO_IR 192", "Smith${$^Jo$x_2$")
    fig = page_figure(vols, MODEL, ct.header)
    who = next(t for t in fig.axes[0].texts if t.get_text().startswith("Patient ID: "))
    assert "Name: Smith${$, Jo$x_2$" in who.get_text()
    rasterise(fig)  # raised ValueError (mathtext) before the header lines were drawn as plain text


def test_a_backslash_in_a_name_is_shown_as_written(phantom, tmp_path):
    """A backslash (DICOM's value delimiter) in PatientName makes pydicom read a list: the header and
    the page keep the text as written, not the list's Python repr "['Smith', 'Jones^Jo']"."""
    ct, vols = _named_series(phantom, tmp_path, "ISO_IR 192", "Smith\\Jones^Jo")
    assert ct.header.patient_name == "Smith\\Jones^Jo"
    who = header_lines(vols, MODEL, ct.header, None, ClinicalTimePoint(), 21, 1.0, None)[0][0]
    assert "     Name: Smith\\Jones, Jo     " in who
