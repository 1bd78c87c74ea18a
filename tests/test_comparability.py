"""What makes a pre/post comparison less comparable, told where it is read: two CTs covering other
lengths of thigh (measured from the femoral head, as scanner z differs between scans), metal on
the side the registry does not call operated, and two models (reporting.change)."""

from __future__ import annotations

import pytest

from reporting.change import compute_change, laterality_conflict, model_note
from reporting.summary import qa_warnings, warning_lines
from seg.header import SeriesHeader
from seg.measure import measure_volumes
from seg.phantom import PhantomOptions, make_phantom
from seg.records import MetalLocation, ModelInfo, ReasonCode, StudyRef, VolumeQA


@pytest.fixture(scope="module")
def records():
    """One patient's thigh scanned whole and 96 mm short at the knee, feet first the second time (its
    z runs the other way): the same muscles, no atrophy."""
    whole = make_phantom(PhantomOptions(seed=11, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-330.0, 130.0)))
    short = make_phantom(PhantomOptions(seed=11, spacing_mm=(4.0, 4.0, 4.0), position="FFS",
                                        z_range_mm=(-330.0 + 96.0, 130.0)))
    return measure_volumes(whole.labels, whole.ct), measure_volumes(short.labels, short.ct), whole, short


def test_the_extent_from_the_femoral_head_is_measured(records) -> None:
    pre, post, whole, short = records
    below = pre.qa.coverage_below_femoral_head_mm, post.qa.coverage_below_femoral_head_mm
    assert all(b is not None for b in below) and below[0] - below[1] == pytest.approx(96.0, abs=8.0)
    assert pre.qa.coverage_above_femoral_head_mm == pytest.approx(post.qa.coverage_above_femoral_head_mm,
                                                                  abs=8.0)


def test_a_shorter_follow_up_is_named_on_the_change_and_the_page(records) -> None:
    pre, post, *_ = records
    change = compute_change(pre, post, 1.6, StudyRef(study_date="20240101"), StudyRef(study_date="20240501"))
    (note,) = [n for n in change.notes if n.code is ReasonCode.COVERAGE_DIFFERS]
    assert note.text.startswith("Follow-up covers 9") and "less below the femoral head" in note.text
    assert "changes at the knee end not comparable" in note.text
    page = qa_warnings(post, SeriesHeader(), ModelInfo(), change)
    assert note.text in page and all(len(w) <= 110 for w in page)  # a line of the page each
    same = compute_change(pre, pre, 1.6, StudyRef(study_date="20240101"), StudyRef(study_date="20240501"))
    assert not [n for n in same.notes if n.code is ReasonCode.COVERAGE_DIFFERS]


def test_metal_on_the_side_the_registry_does_not_call_operated_is_named() -> None:
    where = MetalLocation(side="right", left_voxels=0, right_voxels=9, z_range_mm=(0, 0),
                          centroid_mm=(-100, 0, 0))
    qa = VolumeQA(metal=True, metal_where=where)
    conflict = laterality_conflict(qa, "left")
    assert conflict is not None and conflict.code is ReasonCode.LATERALITY_CONFLICT
    assert laterality_conflict(qa, "right") is None and laterality_conflict(qa, None) is None
    both = VolumeQA(metal=True, metal_where=where.model_copy(update={"side": "both"}))
    assert laterality_conflict(both, "left") is None  # metal on both sides: no side to contradict
    from seg.records import VolumeRecord

    page = qa_warnings(VolumeRecord(qa=qa), SeriesHeader(), ModelInfo(), fractured_side="left")
    assert "Metal on the right side, but the registry's fractured side is left: check the registry" in page


def test_a_baseline_measured_by_another_model_is_named_on_the_change_and_the_page(records) -> None:
    """A site upgraded its model between the two studies: the change holds the models' difference too
    (each model's volume errors are its own), so the change record and the page say so and what
    removes it; one model, or a record of a release that wrote no model, says nothing."""
    pre, post, *_ = records
    old, new = ModelInfo(name="thigh-unetr", version="0.9.1"), ModelInfo(name="thigh-unetr", version="0.9.2")

    def notes(a: ModelInfo, b: ModelInfo) -> list:
        change = compute_change(pre.model_copy(update={"model": a}), pre.model_copy(update={"model": b}), 1.6,
                                StudyRef(study_date="20240101"), StudyRef(study_date="20240501"))
        return [n for n in change.notes if n.code is ReasonCode.MODELS_DIFFER]

    (note,) = notes(old, new)
    assert note.text.startswith("Baseline measured by model thigh-unetr 0.9.1, follow-up by 0.9.2: ")
    assert note.text.endswith("re-measure the baseline with the follow-up's")
    (other,) = notes(old, ModelInfo(name="site-model", version="1"))
    assert "follow-up by site-model 1:" in other.text
    assert notes(new, new) == [] and notes(ModelInfo(), new) == [] and model_note(new, ModelInfo()) is None
    change = compute_change(pre.model_copy(update={"model": old}), post.model_copy(update={"model": new}),
                            1.6, StudyRef(study_date="20240101"), StudyRef(study_date="20240501"))
    page = " ".join(line.strip() for line in warning_lines(qa_warnings(post, SeriesHeader(), new, change)))
    assert note.text in page
