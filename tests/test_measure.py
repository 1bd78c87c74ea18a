"""measure_volumes on hand-made label maps: exact cm³, left/right by the mid-sagittal plane, index,
QA figures and the written files."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicomnode.clinical import registry
from dicomnode.commands.common import volumes_table
from dicomnode.config import Settings
from seg import labels as L
from seg.header import SeriesHeader
from seg.height import plausible_height
from seg.measure import measure_volumes, midline_x, write_volumes
from seg.records import SCHEMA_VERSION, ModelInfo, VolumeRecord
from seg.volume import Volume

FEMUR = L.LABEL_OF["femur"]
VL = L.LABEL_OF["vastus_lateralis"]
SART = L.LABEL_OF["sartorius"]


def _scene(spacing=(2.0, 2.0, 5.0), shift_x: float = 0.0, flip: bool = False) -> tuple[Volume, Volume]:
    """Two femora at x = ±90 mm (+shift), a vastus lateralis box only on the patient's left (+x)."""
    nx, ny, nz = 150, 60, 10
    dx, dy, dz = spacing
    x = (np.arange(nx) - (nx - 1) / 2) * dx + shift_x
    lab = np.zeros((nx, ny, nz), np.uint8)
    ct = np.full((nx, ny, nz), -1000, np.int16)
    ct[20:130, 5:55] = 40  # "body" of muscle HU
    for cx in (-90 + shift_x, 90 + shift_x):
        lab[np.abs(x - cx) < 10, 25:35] = FEMUR
    lab[(x - shift_x > 110) & (x - shift_x < 130), 10:20, 2:8] = VL
    lab[(x - shift_x < -20) & (x - shift_x > -40), 40:45, :] = SART
    aff = np.diag([dx, dy, dz, 1.0])
    aff[:3, 3] = (x[0], -60.0, -100.0)
    if flip:  # feet-first style: i runs to the patient's right, k from head to feet
        lab, ct = lab[::-1, :, ::-1].copy(), ct[::-1, :, ::-1].copy()
        aff[0, 0], aff[2, 2] = -dx, -dz
        aff[:3, 3] = (x[-1], -60.0, -100.0 + dz * (nz - 1))
    header = SeriesHeader(series_instance_uid="1.2.3", size_m=1.6)
    return Volume(lab, aff, header), Volume(ct, aff.copy(), header)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0.0, 37.5])
def test_volumes_left_right_exact(flip: bool, shift: float) -> None:
    lab, ct = _scene(shift_x=shift, flip=flip)
    rec = measure_volumes(lab, ct, height_m=1.6, height_source="registry",
                          model=ModelInfo(name="m", version="1", demo=True))
    assert rec.model == ModelInfo(name="m", version="1", demo=True)
    assert rec.height_m == 1.6 and rec.height_source == "registry"
    assert rec.series_instance_uid == "1.2.3"
    by = rec.by_name()
    assert len(rec.structures) == 29 and "background" not in by
    vox = 2 * 2 * 5 / 1000.0
    n_vl = int((lab.array == VL).sum())
    assert by["vastus_lateralis"].voxels == n_vl
    assert by["vastus_lateralis"].volume_cm3 == pytest.approx(n_vl * vox)
    assert by["vastus_lateralis"].left_cm3 == pytest.approx(n_vl * vox)
    assert by["vastus_lateralis"].right_cm3 == 0
    assert by["sartorius"].left_cm3 == 0 and by["sartorius"].right_cm3 > 0
    assert by["femur"].left_cm3 == pytest.approx(by["femur"].right_cm3)
    assert by["vastus_lateralis"].index_cm3_m2 == pytest.approx(n_vl * vox / 1.6**2, rel=1e-4)
    assert by["psoas"].voxels == 0 and by["psoas"].volume_cm3 == 0
    assert rec.qa.midline_method == "femora"
    assert rec.qa.midline_x_mm == pytest.approx(shift, abs=1.0)
    assert rec.qa.z_coverage_mm == pytest.approx(50.0)
    assert rec.qa.metal is False


@pytest.mark.parametrize("order", ["C", "F", "J"])
def test_side_split_is_the_same_for_every_memory_order(order: str) -> None:
    """Counting runs along the label map's outermost axis in memory; each voxel must still land on the
    side the slice-by-slice rule puts it on, also for an oblique grid and voxels near the midline."""
    from seg.measure import _side_counts, _world_x_slice

    rng = np.random.default_rng(7)
    arr = rng.integers(0, L.NUM_CLASSES, (41, 23, 17)).astype(np.uint8)
    aff = np.eye(4)
    aff[:3, :3] = [[0.8, 0.1, 0.3], [0.05, 0.9, 0.0], [0.2, 0.0, 2.5]]
    aff[:3, 3] = (-16.3, 4.0, -20.0)
    mid = float(aff[0, 0] * 20 + aff[0, 1] * 11 + (aff[0, 2] * 8 + aff[0, 3]))  # exactly on one voxel
    n = L.NUM_CLASSES
    total, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for k in range(arr.shape[2]):  # the reference: slice by slice along k
        sl = arr[:, :, k].astype(np.intp)
        counts = np.bincount((sl * 2 + (_world_x_slice(aff, sl.shape, k) > mid)).ravel(),
                             minlength=2 * n).reshape(n, 2)
        total += counts.sum(axis=1)
        left += counts[:, 1]
    laid_out = {"C": np.ascontiguousarray(arr), "F": np.asfortranarray(arr),
                "J": np.ascontiguousarray(arr.transpose(1, 0, 2)).transpose(1, 0, 2)}[order]
    got_total, got_left = _side_counts(laid_out, aff, mid, n)
    assert np.array_equal(got_total, total) and np.array_equal(got_left, left)


def test_height_from_header_and_never_guessed() -> None:
    lab, _ = _scene()
    rec = measure_volumes(lab)
    assert rec.height_m == 1.6 and rec.height_source == "PatientSize"
    lab.header = replace(lab.header, size_m=None)
    rec = measure_volumes(lab)
    assert rec.height_m is None and rec.height_source == "missing"
    assert all(s.index_cm3_m2 is None for s in rec.structures)
    lab.header = replace(lab.header, size_m=170)  # centimetres: not used, and the record says why
    rec = measure_volumes(lab)
    assert rec.height_m is None and rec.height_source == "implausible PatientSize 170.00 m"
    assert "height not used, implausible PatientSize 170.00 m: no cm³/m²" in volumes_table(rec)
    with pytest.raises(ValueError):
        measure_volumes(lab, height_m=16.0)


def test_qa_hu_muscle_and_metal() -> None:
    lab, ct = _scene()
    arr = ct.array.copy()
    arr[100:103, 30, 5] = 3000  # metal on the patient's left (+x)
    ct = ct.with_array(arr)
    rec = measure_volumes(lab, ct)
    body_muscle = int(((ct.array >= -29) & (ct.array <= 150)).sum())
    assert rec.qa.hu_muscle_cm3 == pytest.approx(body_muscle * 0.02)
    assert rec.qa.metal is True and rec.qa.metal_voxels == 3
    assert rec.qa.metal_where.side == "left"
    assert rec.qa.metal_where.z_range_mm == (-75.0, -75.0)


def test_midline_fallbacks() -> None:
    lab, ct = _scene(shift_x=10.0)
    arr = lab.array.copy()
    arr[arr == FEMUR] = 0
    mid, how = midline_x(lab.with_array(arr), ct)
    assert how == "labels"
    mid, how = midline_x(lab.with_array(np.zeros_like(arr)), ct)
    assert how == "body" and mid == pytest.approx(10.0, abs=2.0)


def test_grid_mismatch_and_bad_labels_rejected() -> None:
    lab, ct = _scene()
    other = Volume(ct.array, ct.affine + np.diag([0, 0, 0.5, 0]), ct.header)
    with pytest.raises(ValueError, match="grid"):
        measure_volumes(lab, other)
    bad = lab.array.copy()
    bad[0, 0, 0] = 30
    with pytest.raises(ValueError, match="label values"):
        measure_volumes(lab.with_array(bad))


def test_write_volumes_json_and_csv(tmp_path: Path) -> None:
    lab, ct = _scene()
    rec = measure_volumes(lab, ct)
    jp, cp = write_volumes(rec, tmp_path / "out")
    assert VolumeRecord.load(jp) == rec
    assert json.loads(jp.read_text())["schema_version"] == SCHEMA_VERSION
    rows = list(csv.DictReader(cp.open()))
    assert len(rows) == 29 and rows[0]["name"] == "sartorius"
    assert float(rows[2]["volume_cm3"]) == rec.structures[2].volume_cm3


@pytest.mark.parametrize(("size", "usable"), [
    (1.19, False), (1.2, True), (1.75, True), (2.2, True), (2.21, False),
    (0.6, False), (2.4, False),  # inside the 0.5–2.5 m that measure once accepted on its own
])
def test_one_height_rule_for_pipeline_registry_and_measure(settings: Settings, size: float,
                                                           usable: bool) -> None:
    assert plausible_height(size) is usable
    lab, _ = _scene()
    lab.header = replace(lab.header, size_m=size)
    measured = measure_volumes(lab).height_m
    via_registry = registry.resolve(settings, "NOBODY", dicom_size=size).height_m
    via_pipeline = registry.facts_for(settings, SeriesHeader(patient_id="NOBODY", size_m=size)).height_m
    assert [measured, via_registry, via_pipeline] == ([size] * 3 if usable else [None] * 3)
    if not usable:
        with pytest.raises(ValueError, match="not plausible"):
            measure_volumes(lab, height_m=size)  # a caller's explicit height is held to the same rule
