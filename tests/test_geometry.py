"""The one slice-geometry rule (seg.geometry) that the node's selection and the loader both apply."""

from __future__ import annotations

import numpy as np
import pytest

from seg.geometry import (
    DUPLICATE_TOL_MM,
    Plane,
    Problem,
    Stack,
    check_stack,
    first_gap,
    sorted_positions,
)
from seg.records import ReasonCode

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def planes(z: list[float], orientation: tuple[float, ...] = AXIAL, spacing=(0.8, 0.8)) -> list[Plane]:
    return [Plane((0.0, 0.0, zi), orientation, spacing, 8, 8) for zi in z]


def test_a_regular_stack_is_sorted_along_its_normal() -> None:
    stack = check_stack(planes([6.0, 0.0, 3.0, 9.0]))
    assert isinstance(stack, Stack)
    assert stack.order.tolist() == [1, 2, 0, 3]
    assert stack.z.tolist() == [0.0, 3.0, 6.0, 9.0] and stack.step == 3.0
    assert stack.normal.tolist() == [0.0, 0.0, 1.0]


def test_one_plane_is_a_stack_without_a_step() -> None:
    stack = check_stack(planes([5.0]))
    assert isinstance(stack, Stack) and stack.step == 0.0


def test_direction_cosines_are_taken_as_unit_vectors() -> None:
    """A column cosine written 0\\0.97\\0 means the unit y axis; distances along the normal are mm."""
    stack = check_stack(planes([0.0, 2.0, 4.0], orientation=(1.0, 0.0, 0.0, 0.0, 0.97, 0.0)))
    assert isinstance(stack, Stack)
    assert np.allclose(stack.col_dir, [0.0, 1.0, 0.0]) and stack.step == pytest.approx(2.0)


@pytest.mark.parametrize(("made", "code"), [
    (lambda: [*planes([0, 3]), Plane(None, AXIAL, (0.8, 0.8), 8, 8)], ReasonCode.MISSING_GEOMETRY),
    (lambda: [*planes([0, 3]), Plane((0, 0, 6), AXIAL, (0.8, 0.8), 8, 16)], ReasonCode.INCONSISTENT_MATRIX),
    (lambda: [*planes([0, 3]), *planes([6], orientation=(1, 0, 0, 0, 0.9, 0.1))],
     ReasonCode.INCONSISTENT_ORIENTATION),
    (lambda: planes([0, 3], orientation=(1, 0, 0, 1, 0, 0)), ReasonCode.INVALID_ORIENTATION),
    (lambda: planes([0, 3], orientation=(0, 0, 0, 0, 1, 0)), ReasonCode.INVALID_ORIENTATION),
    (lambda: planes([0, 3], spacing=None), ReasonCode.MISSING_PIXEL_SPACING),
    (lambda: planes([0, 3], spacing=(0.0, 0.0)), ReasonCode.INVALID_PIXEL_SPACING),
    (lambda: [*planes([0, 3]), *planes([6], spacing=(0.8, 0.802))], ReasonCode.INCONSISTENT_PIXEL_SPACING),
    (lambda: planes([0, 3, 3.005, 6]), ReasonCode.DUPLICATE_SLICE_POSITION),
    (lambda: planes([0, 3, 6, 12, 15]), ReasonCode.SLICE_GAP),
    (lambda: planes([0, 3, 6, 10, 13]), ReasonCode.IRREGULAR_SLICE_SPACING),
])
def test_each_problem_has_its_code(made, code: ReasonCode) -> None:
    problem = check_stack(made())
    assert isinstance(problem, Problem) and problem.code is code


def test_a_gap_says_where_and_against_which_spacing() -> None:
    problem = check_stack(planes([0, 3, 6, 12, 15]))
    assert problem == Problem(ReasonCode.SLICE_GAP,
                              "missing slices: gap of 6 mm after 6 mm (slice spacing 3 mm)", step=3.0, z=6.0)


def test_the_tolerances_hold() -> None:
    """Cosines and pixel spacing within 1e-3 are equal; positions rounded to 0.01 mm are regular."""
    near = [*planes([0, 3]), *planes([6], orientation=(1, 0, 0, 0, 0.9995, 0.0), spacing=(0.8009, 0.8))]
    assert isinstance(check_stack(near), Stack)
    rounded = [round(k * 0.625, 2) for k in range(20)]
    assert isinstance(check_stack(planes(rounded)), Stack)


def test_only_the_selection_asks_for_axial() -> None:
    sagittal = [Plane((x, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (0.8, 0.8), 8, 8) for x in (0, 3, 6)]
    assert isinstance(check_stack(sagittal), Stack)
    problem = check_stack(sagittal, max_tilt_deg=15.0)
    assert problem == Problem(ReasonCode.NOT_AXIAL,
                              "not axial: slice normal 90° from the patient z axis (sagittal)")


def test_first_gap_steps_over_duplicates_and_needs_two_steps() -> None:
    gap = first_gap(np.array([0.0, 3.0, 3.0 + DUPLICATE_TOL_MM / 2, 6.0, 12.0]))
    assert gap is not None and (gap.size_mm, gap.after_mm, gap.step_mm) == (6.0, 6.0, 3.0)
    assert first_gap(np.array([0.0, 9.0])) is None
    assert first_gap(np.array([0.0, 3.0, 6.0])) is None


def test_sorted_positions_only_where_planes_can_be_compared() -> None:
    assert sorted_positions(planes([6.0, 0.0, 3.0])).tolist() == [0.0, 3.0, 6.0]
    assert sorted_positions([*planes([0, 3]), Plane(None, AXIAL, None, 8, 8)]) is None
    assert sorted_positions([*planes([0, 3]), *planes([6], orientation=(1, 0, 0, 0, 0.9, 0.1))]) is None
    assert sorted_positions(planes([0, 3], orientation=(1, 0, 0, 1, 0, 0))) is None
    assert sorted_positions([]) is None
