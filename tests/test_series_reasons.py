"""Every cause for holding or refusing a series has its own reason code (headers built in memory).

Why: an operator's filter, the ops page and the metrics count by ``jobs.reason_code``; one coarse code
for fourteen causes would send everyone back to parsing the text.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.config import SelectionSettings
from dicomnode.storage.series import INCOMPLETE, check_completeness, read_headers, select_headers
from seg.records import INCOMPLETE_CODES, NOT_SELECTED_CODES, ReasonCode

SEL = SelectionSettings(min_z_extent_mm=30.0, min_slices=5)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
N = 12  # slices: 36 mm at 3 mm, enough for SEL


def ct(n: int = N, step: float = 3.0, **tags: object) -> list[Dataset]:
    """``n`` axial CT headers ``step`` mm apart, numbered 1..n; ``tags`` set on every one."""
    out = []
    for i in range(n):
        ds = Dataset()
        ds.Modality, ds.Rows, ds.Columns = "CT", 8, 8
        ds.PixelSpacing = [1.0, 1.0]
        ds.ImageOrientationPatient = list(AXIAL)
        ds.ImagePositionPatient = [0.0, 0.0, i * step]
        ds.InstanceNumber = i + 1
        for k, v in tags.items():
            setattr(ds, k, v)
        out.append(ds)
    return out


def at(z: list[float]) -> list[Dataset]:
    """CT headers at the given slice positions."""
    hs = ct(len(z))
    for ds, zi in zip(hs, z, strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, zi]
    return hs


def changed(i: int, **tags: object) -> list[Dataset]:
    """A good series whose slice ``i`` has other ``tags`` (None: the tag removed)."""
    hs = ct()
    for k, v in tags.items():
        if v is None:
            delattr(hs[i], k)
        else:
            setattr(hs[i], k, v)
    return hs


SELECTION: dict[ReasonCode, tuple[Callable[[], tuple[list[Dataset], int]], str]] = {
    ReasonCode.NO_INSTANCES: (lambda: ([], 0), "no instances"),
    ReasonCode.UNREADABLE_HEADER: (lambda: (ct(), 2), "unreadable header in 2 instance(s)"),
    ReasonCode.NOT_CT: (lambda: (ct(Modality="MR"), 0), "modality MR is not CT"),
    ReasonCode.MISSING_GEOMETRY: (lambda: (changed(3, ImagePositionPatient=None), 0),
                                  "missing ImagePositionPatient/ImageOrientationPatient in 1 slice(s)"),
    ReasonCode.INCONSISTENT_MATRIX: (lambda: (changed(3, Rows=16), 0), "inconsistent matrix: 8×8, 16×8"),
    ReasonCode.INCONSISTENT_ORIENTATION: (
        lambda: (changed(3, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.9, 0.1]), 0),
        "inconsistent image orientation within the series"),
    ReasonCode.INVALID_ORIENTATION: (lambda: (ct(ImageOrientationPatient=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), 0),
                                     "invalid ImageOrientationPatient"),
    ReasonCode.NOT_AXIAL: (lambda: (ct(ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0]), 0),
                           "not axial: slice normal 90° from the patient z axis (sagittal)"),
    ReasonCode.MISSING_PIXEL_SPACING: (lambda: (changed(3, PixelSpacing=None), 0), "missing PixelSpacing"),
    ReasonCode.INVALID_PIXEL_SPACING: (lambda: (ct(PixelSpacing=[0.0, 0.0]), 0),
                                       "invalid PixelSpacing: 0×0 mm"),
    ReasonCode.MULTI_FRAME: (lambda: (ct(NumberOfFrames=2), 0),
                             "multi-frame images (Enhanced CT) are not measured: 12 instance(s);"
                             " export the series as single-frame CT images"),
    ReasonCode.INCONSISTENT_PIXEL_SPACING: (lambda: (changed(3, PixelSpacing=[0.5, 0.5]), 0),
                                            "inconsistent pixel spacing: 0.5×0.5 mm, 1×1 mm"),
    ReasonCode.DUPLICATE_SLICE_POSITION: (lambda: (at([0, 3, 3, 6, 9, 12, 15, 18, 21, 24, 27]), 0),
                                          "duplicate slice position at 3 mm (2 slices share positions)"),
    ReasonCode.IRREGULAR_SLICE_SPACING: (lambda: (at([0, 3, 6, 10, 13, 16, 19, 22, 25, 28, 31]), 0),
                                         "irregular slice spacing (3–4 mm)"),
    ReasonCode.SHORT_Z_COVERAGE: (lambda: (ct(8, 2.5), 0), "z-coverage 20 mm < 30 mm"),
    ReasonCode.TOO_FEW_SLICES: (lambda: (ct(4, 10.0), 0), "4 slices < 5"),
}


@pytest.mark.parametrize("code", list(SELECTION), ids=str)
def test_each_selection_cause_has_its_code(code: ReasonCode) -> None:
    make, text = SELECTION[code]
    sel = select_headers(*make(), SEL)
    assert (sel.accepted, sel.code, sel.reason) == (False, code, text)


def test_a_good_series_is_accepted_without_a_code() -> None:
    sel = select_headers(ct(), 0, SEL)
    assert (sel.accepted, sel.code, sel.reason) == (True, None, "")


def test_short_and_too_few_says_both_and_codes_the_first() -> None:
    sel = select_headers(ct(3, 2.0), 0, SEL)
    assert (sel.code, sel.reason) == (ReasonCode.SHORT_Z_COVERAGE, "z-coverage 6 mm < 30 mm; 3 slices < 5")


def with_instance_numbers(numbers: list[int]) -> list[Dataset]:
    hs = ct(len(numbers))
    for ds, n in zip(hs, numbers, strict=True):
        ds.InstanceNumber = n
    return hs


COMPLETENESS: dict[ReasonCode, tuple[Callable[[], list[Dataset]], str]] = {
    ReasonCode.SLICE_GAP: (lambda: at([0, 3, 6, 9, 15, 18, 21]),
                           "gap of 6 mm after 9 mm (slice spacing 3 mm)"),
    ReasonCode.ACQUISITION_SHORT: (lambda: ct(AcquisitionNumber=1, ImagesInAcquisition=20),
                                   "12 of 20 images of acquisition 1 received (ImagesInAcquisition)"),
    ReasonCode.SERIES_SHORT: (lambda: ct(NumberOfSeriesRelatedInstances=15),
                              "12 of 15 instances received (NumberOfSeriesRelatedInstances)"),
    ReasonCode.INSTANCE_NUMBERS_MISSING: (lambda: with_instance_numbers([*range(1, 6), *range(8, 15)]),
                                          "2 instance number(s) missing between 1 and 14"),
}


@pytest.mark.parametrize("code", list(COMPLETENESS), ids=str)
def test_each_incompleteness_cause_has_its_code_when_held_and_when_rejected(code: ReasonCode) -> None:
    make, detail = COMPLETENESS[code]
    whole = check_completeness(make())
    assert (whole.complete, whole.code, whole.detail) == (False, code, detail)
    held, rejected = whole.reason(held=True), whole.reason(held=False)
    assert (held.code, held.text) == (code, f"held: {INCOMPLETE}: {detail}")
    assert (rejected.code, rejected.text) == (code, f"{INCOMPLETE}: {detail}")


def test_a_whole_series_is_complete_without_a_code() -> None:
    whole = check_completeness(ct(NumberOfSeriesRelatedInstances=N))
    assert (whole.complete, whole.code) == (True, None)


GAPPED = {  # positions (mm) with a gap, alone or beside another problem
    "one gap": [0, 3, 6, 9, 15, 18, 21, 24, 27, 30],
    "gap and a duplicate": [0, 3, 3, 6, 9, 15, 18, 21, 24, 27, 30],
    "two gaps": [0, 3, 9, 12, 15, 21, 24, 27, 30, 33],
    "gap at the end": [0, 3, 6, 9, 12, 15, 18, 21, 24, 33],
    "gap and irregular": [0, 3, 6, 10, 16, 19, 22, 25, 28, 31],
}


@pytest.mark.parametrize("z", list(GAPPED.values()), ids=list(GAPPED))
def test_every_gap_selection_sees_is_found_first_by_the_completeness_check(z: list[float]) -> None:
    """Selection named a gap ``missing-slices`` while the watcher, which checks completeness first, had
    held and rejected every such series as ``slice-gap``: one rule (seg.geometry) and one code now."""
    whole = check_completeness(at(z))
    assert (whole.complete, whole.code) == (False, ReasonCode.SLICE_GAP)
    sel = select_headers(at(z), 0, SEL)
    assert sel.code in (ReasonCode.SLICE_GAP, ReasonCode.DUPLICATE_SLICE_POSITION)
    assert sel.code is not ReasonCode.MISSING_SLICES


def test_selection_on_its_own_names_a_gap_as_the_completeness_check_does() -> None:
    sel = select_headers(at([0, 3, 6, 9, 15, 18, 21, 24, 27, 30]), 0, SEL)
    assert (sel.accepted, sel.code, sel.reason) == (
        False, ReasonCode.SLICE_GAP, "missing slices: gap of 6 mm after 9 mm (slice spacing 3 mm)")


def test_the_codes_are_distinct_and_grouped() -> None:
    """One cause, one code; each belongs to the group a filter for "not selected" or "incomplete" uses."""
    assert len(set(SELECTION) | set(COMPLETENESS)) == len(SELECTION) + len(COMPLETENESS)
    assert set(SELECTION) <= NOT_SELECTED_CODES and set(COMPLETENESS) <= INCOMPLETE_CODES
    assert not NOT_SELECTED_CODES & INCOMPLETE_CODES


def test_a_localizer_in_the_series_is_left_out_as_the_loader_leaves_it_out(tmp_path) -> None:
    """A coronal 512×512 scout with the CT's series UID was refused as "inconsistent matrix" by the
    node while `dicomnode segment` (the loader) skipped it and measured; it still counts towards the
    announced number of instances."""
    scout = Dataset()
    scout.Modality, scout.Rows, scout.Columns = "CT", 512, 512
    scout.PixelSpacing = [1.0, 1.0]
    scout.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    scout.ImagePositionPatient = [0.0, 0.0, 500.0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.InstanceNumber = 999  # numbered apart from the slices: no "instance numbers missing"
    series = [*ct(NumberOfSeriesRelatedInstances=N + 1), scout]
    scout.NumberOfSeriesRelatedInstances = N + 1
    # through files, as the node reads them (its header reader first missed ImageType)
    files = []
    for i, ds in enumerate(series):
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    headers, unreadable = read_headers(files)
    sel = select_headers(headers, unreadable, SEL)
    assert (sel.accepted, sel.code, sel.n_slices) == (True, None, N)
    whole = check_completeness(headers)
    assert (whole.complete, whole.code) == (True, None)
    only = select_headers([scout], 0, SEL)
    assert (only.accepted, only.code, only.reason) == (False, ReasonCode.NO_INSTANCES,
                                                       "no image slices: only localizer images")


def test_verdict_of_a_closed_series():
    """Incomplete beats duplicate beats selection: a series still missing slices is rejected even if
    its content matches an earlier job's; the same content is done without a second run; else the
    selection decides, with its own reason code."""
    from dicomnode.processing.jobs import JobState
    from dicomnode.storage.series import Completeness, Selection, verdict

    gap = Completeness(False, "gap of 9.0 mm at z=10.0", ReasonCode.SLICE_GAP)
    taken, refused = Selection(True), Selection(False).refuse(ReasonCode.TOO_FEW_SLICES, "12 slices")
    state, why = verdict(gap, taken, duplicate_of=3)
    assert (state, why.code) == (JobState.REJECTED, ReasonCode.SLICE_GAP)
    assert why.text == f"{INCOMPLETE}: gap of 9.0 mm at z=10.0"
    state, why = verdict(Completeness(True), refused, duplicate_of=3)
    assert (state, why.code) == (JobState.DONE, ReasonCode.DUPLICATE_CONTENT) and "job 3" in why.text
    assert verdict(Completeness(True), taken, None) == (JobState.QUEUED, None)
    state, why = verdict(Completeness(True), refused, None)
    assert (state, why.code, why.text) == (JobState.REJECTED, ReasonCode.TOO_FEW_SLICES, "12 slices")
