"""Muscles next to the implant: the near-metal share and flag per muscle side (seg.metal_proximity),
as measure_volumes writes them into volumes.json/csv and the change record carries them."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from reporting.change import compute_change
from seg.labels import LABEL_OF, NUM_CLASSES
from seg.measure import measure_volumes, write_volumes
from seg.metal_proximity import (
    METAL_HU,
    NEAR_METAL_MM,
    NEAR_METAL_SHARE,
    MetalBox,
    near_metal_counts,
    slices_with_metal,
    widen_in_plane,
)
from seg.phantom import PhantomOptions, make_phantom
from seg.records import StructureVolume, StudyRef

# a small post-operative phantom: the nail's shaft through the proximal thigh, left
POST = PhantomOptions(seed=4242, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-160.0, -40.0), postop=True,
                      implant_side="left", atrophy={"vastus_lateralis": 0.7})
NEXT_TO_NAIL = ("vastus_intermedius", "vastus_lateralis", "vastus_medialis")  # they wrap the femur
FAR = ("sartorius", "gracilis", "semitendinosus", "adductor_longus")  # across the thigh from it


@pytest.fixture(scope="module")
def post():
    return make_phantom(POST)


@pytest.fixture(scope="module")
def twin():
    """POST's patient without the operation: no implant, no atrophy."""
    return make_phantom(replace(POST, postop=False, implant_side=None, atrophy={}))


def test_muscles_next_to_the_implant_are_flagged_the_far_ones_not(post, tmp_path):
    rec = measure_volumes(post.labels, post.ct)
    assert rec.qa.metal_where is not None and rec.qa.metal_where.side == "left"
    by = rec.by_name()
    for name in NEXT_TO_NAIL:
        assert by[name].left_near_metal is True, name
        assert by[name].left_near_metal_share >= NEAR_METAL_SHARE
    for name in FAR:
        assert by[name].left_near_metal is False and by[name].left_near_metal_share < NEAR_METAL_SHARE, name
    muscles = [s for s in rec.structures if s.name not in ("femur", "iliac_bone")]
    assert not any(s.right_near_metal for s in muscles)  # the other thigh has no metal
    assert all(s.right_near_metal_share == 0.0 for s in muscles)
    assert by["femur"].left_near_metal is None  # the bone holding the nail is no muscle to flag
    # written: volumes.json reads back equal, volumes.csv has the columns
    jp, cp = write_volumes(rec, tmp_path)
    assert type(rec).load(jp) == rec
    rows = {r["name"]: r for r in csv.DictReader(cp.open())}
    assert rows["vastus_intermedius"]["left_near_metal"] == "True"
    assert rows["sartorius"]["left_near_metal"] == "False"
    assert rows["femur"]["left_near_metal"] == ""


def test_no_metal_no_flag_and_no_ct_not_measured(post, twin):
    rec = measure_volumes(twin.labels, twin.ct)
    assert rec.qa.metal is False
    muscles = [s for s in rec.structures if s.name not in ("femur", "iliac_bone")]
    assert all(s.left_near_metal is False and s.right_near_metal is False for s in muscles)
    assert all(s.near_metal("both") is False for s in muscles)
    bare = measure_volumes(post.labels)  # no CT: nothing to say
    assert all(s.left_near_metal is None and s.near_metal("both") is None for s in bare.structures)


def test_distance_is_in_plane_and_in_millimetres():
    """A muscle 20 mm from metal in its slice is within 30 mm; the same muscle in the slice above
    the metal's, 4 mm away along z, is not counted: the streaks run in the slice."""
    arr = np.zeros((40, 40, 3), np.uint8)
    metal = np.zeros(arr.shape, bool)
    metal[10, 20, 1] = True
    arr[20, 20, 1] = LABEL_OF["sartorius"]  # 10 voxels x 2 mm = 20 mm in-plane
    arr[10, 20, 2] = LABEL_OF["gracilis"]  # right above the metal, in the next slice
    arr[34, 20, 1] = LABEL_OF["semitendinosus"]  # 48 mm away in-plane
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    box = MetalBox.of(metal)
    total, left = near_metal_counts(arr, box, affine, mid_x=100.0, n=NUM_CLASSES, reach_mm=30.0)
    assert total[LABEL_OF["sartorius"]] == 1 and left[LABEL_OF["sartorius"]] == 0  # x < mid: right
    assert total[LABEL_OF["gracilis"]] == 0 and total[LABEL_OF["semitendinosus"]] == 0
    total, left = near_metal_counts(arr, box, affine, mid_x=0.0, n=NUM_CLASSES, reach_mm=NEAR_METAL_MM)
    assert left[LABEL_OF["sartorius"]] == 1  # x > mid: the patient's left
    assert MetalBox.of(np.zeros(arr.shape, bool)) is None


def test_change_is_flagged_when_either_study_was(post, twin):
    """A change record's side is next to metal when the baseline or the follow-up was."""
    pre = measure_volumes(twin.labels, twin.ct)
    after = measure_volumes(post.labels, post.ct)
    change = compute_change(pre, after, 1.7, StudyRef(), StudyRef(), fractured_side="left")
    by = {(s.name, s.side): s for s in change.structures}
    assert by[("vastus_intermedius", "left")].near_metal is True
    assert by[("vastus_intermedius", "both")].near_metal is True
    assert by[("vastus_intermedius", "right")].near_metal is False
    assert by[("sartorius", "left")].near_metal is False
    assert by[("femur", "left")].near_metal is None
    backwards = compute_change(after, pre, 1.7, StudyRef(), StudyRef())  # flagged in the baseline only
    assert {(s.name, s.side): s.near_metal for s in backwards.structures}[("vastus_intermedius", "left")]


def test_the_crop_widens_by_whole_voxels_per_axis_and_stays_in_the_volume():
    # 10 mm at 3 mm voxels is 4 voxels (rounded up: nothing within reach is cut); at 0.8 mm, 13;
    # the low side is clipped at 0, the high side at the volume's size.
    box = widen_in_plane((slice(2, 5), slice(20, 30)), 10.0, (3.0, 0.8), (50, 40))
    assert box == (slice(0, 9), slice(7, 40))


def test_near_metal_of_a_record():
    s = StructureVolume(label=1, name="sartorius", volume_cm3=2.0, left_cm3=1.0, right_cm3=1.0,
                        left_near_metal=True, right_near_metal=False)
    assert (s.near_metal("left"), s.near_metal("right"), s.near_metal("both")) == (True, False, True)
    old = StructureVolume(label=1, name="sartorius", volume_cm3=2.0)  # written before: not measured
    assert old.near_metal("both") is None


def test_the_measure_visits_only_the_metals_slices_cropped(post, monkeypatch):
    """Why it costs little on a whole thigh (0.06-0.11 s at 1.5 mm, measured with the phantom of
    seed 4242): one distance transform per slice that holds metal, each on the metal's box widened
    by the reach, not on the whole slice."""
    from scipy import ndimage

    # the phantom's slices twice over, the copies without metal: the nail runs through every slice
    one = np.asarray(post.labels.array).astype(np.uint8)
    labels = np.concatenate([one, one], axis=2)
    metal = np.concatenate([np.asarray(post.ct.array) > METAL_HU, np.zeros(one.shape, bool)], axis=2)
    shapes: list[tuple[int, ...]] = []
    transform = ndimage.distance_transform_edt

    def recorded(a, **kw):
        shapes.append(a.shape)
        return transform(a, **kw)

    monkeypatch.setattr(ndimage, "distance_transform_edt", recorded)
    total, _ = near_metal_counts(labels, MetalBox.of(metal), post.ct.affine, 0.0, NUM_CLASSES)
    assert len(shapes) == int(np.count_nonzero(metal.any(axis=(0, 1)))) == one.shape[2]
    assert len(set(shapes)) == 1 and shapes[0][0] * shapes[0][1] < 0.5 * labels.shape[0] * labels.shape[1]
    alone, _ = near_metal_counts(one, MetalBox.of(metal[:, :, : one.shape[2]]), post.ct.affine, 0.0,
                                 NUM_CLASSES)
    assert total[LABEL_OF["vastus_intermedius"]] > 0 and np.array_equal(total, alone)


def test_terminal_table_marks_the_sides_next_to_the_implant(post, twin):
    """`dicomnode volumes`/`segment` print † after a flagged side's volume, decimals still aligned,
    with a line saying what it means, within 80 columns; a study without metal prints neither."""
    from dicomnode.commands.common import volumes_table

    text = volumes_table(measure_volumes(post.labels, post.ct, height_m=1.7))
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("Vastus intermedius"))
    far = next(ln for ln in lines if ln.startswith("Sartorius"))
    assert row.count("†") == 1 and "†" not in far
    assert len(row) == len(far) == len(lines[0])  # the mark takes its room in every row
    assert row.index("†") == lines[0].index("left cm³") + len("left cm³") + 1  # after the number
    assert "† next to the metal implant: the least reliable volumes" in lines
    assert max(len(ln) for ln in lines) <= 80
    assert "†" not in volumes_table(measure_volumes(twin.labels, twin.ct, height_m=1.7))


def test_slices_with_metal_marks_exactly_the_slices_above_the_metal_threshold():
    hu = np.zeros((4, 5, 6), np.int16)
    hu[1, 2, 1] = METAL_HU + 1  # metal
    hu[3, 0, 4] = METAL_HU  # at the threshold: not metal
    hu[0, 4, 5] = 3000
    assert slices_with_metal(hu).tolist() == [False, True, False, False, False, True]
