"""Ground-truth path: phantom → DICOM → load → measure reproduces truth/volumes.json.

Covers head-first and feet-first supine, reversed slice order, anisotropic voxels, compressed
transfer syntaxes, and that a structure on the patient's left is reported as left.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.harness.series import rewrite
from seg.header import SeriesHeader
from seg.io import SeriesGeometryError, load_dicom_series, load_image, load_nifti, save_nifti
from seg.measure import measure_volumes
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import SIDES, VolumeRecord
from seg.volume import Volume

# Hip region: pelvis, both femoral heads and most of the 30 classes, in few slices.
HIP = (-75.0, 45.0)


def _roundtrip(tmp: Path, opts: PhantomOptions, ts: str = "explicit"):
    ph = make_phantom(opts)
    write_phantom(ph, tmp, ts)
    ct = load_dicom_series(tmp / "dicom")
    lab = load_nifti(tmp / "truth" / "labels.nii.gz")
    truth = VolumeRecord.load(tmp / "truth" / "volumes.json")
    return ph, ct, lab, truth


def _assert_matches_truth(rec: VolumeRecord, truth: VolumeRecord) -> None:
    assert [s.name for s in rec.structures] == [s.name for s in truth.structures]
    for got, want in zip(rec.structures, truth.structures, strict=True):
        tol = 1e-3 * max(want.volume_cm3, 1e-9)
        for side in SIDES:
            g, w = got.side_volume(side), want.side_volume(side)
            assert abs(g - w) <= tol, (got.name, side, g, w)
        if want.index_cm3_m2 is not None:
            assert abs(got.index_cm3_m2 - want.index_cm3_m2) <= 1e-3 * max(want.index_cm3_m2, 1e-9)
    assert rec.qa.z_coverage_mm == pytest.approx(truth.qa.z_coverage_mm, abs=1e-3)
    assert rec.qa.hu_muscle_cm3 == pytest.approx(truth.qa.hu_muscle_cm3, rel=1e-3)
    assert rec.qa.metal == truth.qa.metal


CASES = [
    pytest.param(dict(position="HFS", slice_order="ascending"), "explicit", id="HFS-asc-explicit"),
    pytest.param(dict(position="FFS", slice_order="ascending"), "explicit", id="FFS-asc-explicit"),
    pytest.param(dict(position="HFS", slice_order="descending"), "rle", id="HFS-desc-rle"),
    pytest.param(dict(position="FFS", slice_order="descending"), "jpegls", id="FFS-desc-jpegls"),
    pytest.param(dict(position="HFS", slice_order="ascending"), "j2k", id="HFS-asc-j2k"),
    pytest.param(dict(position="FFS", slice_order="ascending", spacing_mm=(0.8, 0.8, 3.0),
                      z_range_mm=(-15, 15), fov_mm=(400, 300)), "explicit", id="FFS-aniso-0.8x0.8x3"),
    pytest.param(dict(position="HFS", slice_order="descending", spacing_mm=(0.8, 0.8, 3.0),
                      z_range_mm=(-15, 15), fov_mm=(400, 300)), "rle", id="HFS-aniso-rle"),
]


@pytest.mark.parametrize(("kw", "ts"), CASES)
def test_ground_truth_volumes_reproduced(tmp_path: Path, kw: dict, ts: str) -> None:
    base = dict(seed=7, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=HIP)
    base.update(kw)
    opts = PhantomOptions(**base)
    ph, ct, lab, truth = _roundtrip(tmp_path, opts, ts)
    # Pixels survive the encoding unchanged and land on the same grid.
    assert np.array_equal(ct.array, ph.ct.array)
    assert np.allclose(ct.affine, ph.ct.affine, atol=1e-4)
    assert np.allclose(lab.affine, ct.affine, atol=1e-3)
    assert ct.header.patient_position == opts.position
    assert str(pydicom.dcmread(ct.source_files[0]).file_meta.TransferSyntaxUID) == truth_ts(ts)
    rec = measure_volumes(lab, ct)
    assert rec.height_source == "PatientSize" and rec.height_m == pytest.approx(ph.height_m)
    assert rec.series_instance_uid == ph.header.series_instance_uid
    _assert_matches_truth(rec, truth)
    # And the truth split equals the side each voxel was built on.
    vox = ph.labels.voxel_volume_cm3
    for s in rec.structures:
        nl, nr = ph.side_voxels[s.label]
        assert s.left_cm3 == pytest.approx(nl * vox, abs=1e-3)
        assert s.right_cm3 == pytest.approx(nr * vox, abs=1e-3)


def truth_ts(ts: str) -> str:
    from seg.phantom import TRANSFER_SYNTAXES

    return str(TRANSFER_SYNTAXES[ts])


def test_all_positions_and_orders_measure_the_same_patient(tmp_path: Path) -> None:
    recs = []
    for pos in ("HFS", "FFS"):
        for order in ("ascending", "descending"):
            opts = PhantomOptions(seed=3, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=HIP, position=pos,
                                  slice_order=order)
            _, ct, lab, _ = _roundtrip(tmp_path / f"{pos}-{order}", opts)
            recs.append(measure_volumes(lab, ct))
    ref = recs[0]
    for rec in recs[1:]:
        for a, b in zip(ref.structures, rec.structures, strict=True):
            assert (a.voxels, a.left_cm3, a.right_cm3) == (b.voxels, b.left_cm3, b.right_cm3)


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_left_structure_is_reported_left(tmp_path: Path, position: str) -> None:
    """Atrophy on the patient's left vastus lateralis must show up on the left, whatever the position."""
    kw = dict(seed=11, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-150, -60), position=position)
    pre = make_phantom(PhantomOptions(**kw))
    opts = PhantomOptions(**kw, postop=True, implant_side="left", atrophy={"vastus_lateralis": 0.6})
    ph, ct, lab, truth = _roundtrip(tmp_path, opts)
    rec = measure_volumes(lab, ct)
    vl = rec.by_name()["vastus_lateralis"]
    pre_vl = measure_volumes(pre.labels, pre.ct).by_name()["vastus_lateralis"]
    assert vl.left_cm3 == pytest.approx(0.6 * pre_vl.left_cm3, rel=0.03)
    assert vl.right_cm3 == pytest.approx(pre_vl.right_cm3, rel=1e-9)
    # The nail is in the left femur: metal found, on the left, in LPS +x.
    assert rec.qa.metal is True
    assert rec.qa.metal_where.side == "left"
    assert rec.qa.metal_where.centroid_mm[0] > 0
    # Without the DICOM header's help: the label map alone (NIfTI) gives the same split.
    lab_only = measure_volumes(lab)
    vl2 = lab_only.by_name()["vastus_lateralis"]
    assert (vl2.left_cm3, vl2.right_cm3) == (vl.left_cm3, vl.right_cm3)


def test_loader_sorts_shuffled_files_and_fills_meta(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=2, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20), slice_order="descending")
    ph = make_phantom(opts)
    write_phantom(ph, tmp_path)
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    random.Random(0).shuffle(files)
    vol = load_dicom_series(files)
    assert np.array_equal(vol.array, ph.ct.array)
    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
          for f in vol.source_files]
    assert zs == sorted(zs)  # HFS: k runs along +z
    assert len(vol.source_sop_uids) == vol.shape[2]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientSex",
                "PatientSize", "StudyDate", "Modality", "PatientPosition"):
        assert vol.header.value(key) is not None
    assert load_image(tmp_path / "dicom").shape == vol.shape
    assert load_image(tmp_path / "truth" / "labels.nii.gz").array.dtype == np.uint8


def test_loader_rejects_broken_series(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=2, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))
    write_phantom(make_phantom(opts), tmp_path / "a")
    files = sorted((tmp_path / "a" / "dicom").glob("*.dcm"))
    gap = [f for i, f in enumerate(files) if i != len(files) // 2]
    with pytest.raises(SeriesGeometryError, match=r"missing slices: gap of 8 mm .* \(slice spacing 4 mm\)"):
        load_dicom_series(gap)
    dup = tmp_path / "dup.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.save_as(dup)
    with pytest.raises(SeriesGeometryError, match="duplicate slice position"):
        load_dicom_series([*files, dup])
    write_phantom(make_phantom(PhantomOptions(seed=3, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))),
                  tmp_path / "b")
    with pytest.raises(SeriesGeometryError, match="series"):
        load_dicom_series([*files, *sorted((tmp_path / "b" / "dicom").glob("*.dcm"))])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SeriesGeometryError):
        load_dicom_series(empty)


def test_volumes_command_reproduces_truth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicomnode.cli import app

    runner = CliRunner()
    out = tmp_path / "ph"
    res = runner.invoke(app, ["phantom", "--out", str(out), "--seed", "4", "--spacing", "3",
                              "--position", "FFS", "--slice-order", "descending", "--z-range", "-60,30",
                              "--transfer-syntax", "rle"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["volumes", "--ct", str(out / "dicom"), "--labels",
                              str(out / "truth" / "labels.nii.gz"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    rec = VolumeRecord.load(tmp_path / "m" / "volumes.json")
    _assert_matches_truth(rec, VolumeRecord.load(out / "truth" / "volumes.json"))
    # and prints them: display names, each side and the total, within 80 columns
    table = [line for line in res.output.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in table) <= 80
    assert any(line.startswith("the 21 analysed") for line in table)
    sart = rec.by_name()["sartorius"]
    row = next(line for line in table if line.startswith("Sartorius "))
    assert row.split()[1:4] == [f"{sart.left_cm3:.1f}", f"{sart.right_cm3:.1f}", f"{sart.volume_cm3:.1f}"]
    assert (tmp_path / "m" / "volumes.csv").read_text().startswith("label,name,group,voxels,volume_cm3")
    # A label map on another grid is refused with a clear message.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    write_phantom(make_phantom(PhantomOptions(seed=4, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-60, 30))),
                  tmp_path / "o2")
    res = runner.invoke(app, ["volumes", "--ct", str(out / "dicom"), "--labels",
                              str(tmp_path / "o2" / "truth" / "labels.nii.gz"),
                              "--out", str(tmp_path / "m2")])
    assert res.exit_code != 0
    assert "grid" in res.output
    # The same label map as another tool may save it (slices the other way, columns and rows swapped):
    # the same volumes.
    save_nifti(_reordered(load_nifti(out / "truth" / "labels.nii.gz")), tmp_path / "reordered.nii.gz")
    res = runner.invoke(app, ["volumes", "--ct", str(out / "dicom"), "--labels",
                              str(tmp_path / "reordered.nii.gz"), "--out", str(tmp_path / "m3")])
    assert res.exit_code == 0, res.output
    assert VolumeRecord.load(tmp_path / "m3" / "volumes.json").structures == rec.structures


def _reordered(vol: Volume) -> Volume:
    """The same grid stored another way: i and j swapped, k reversed (world positions unchanged)."""
    a = vol.affine
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = a[:3, 1], a[:3, 0], -a[:3, 2]
    affine[:3, 3] = a[:3, 3] + a[:3, 2] * (vol.shape[2] - 1)
    return Volume(np.ascontiguousarray(np.transpose(vol.array, (1, 0, 2))[:, :, ::-1]), affine)


def test_label_map_in_another_voxel_order_is_aligned_and_another_grid_refused() -> None:
    """`Volume.aligned_to`: a label map's voxels in the CT's order when both are one grid; else an error
    naming both grids (a shift by one voxel, another spacing), never a silent resampling."""
    rng = np.random.default_rng(3)
    ct = Volume(rng.normal(size=(6, 5, 4)), np.array([[0.0, 0.8, 0, -90], [-0.8, 0, 0, 40], [0, 0, 2.5, 7],
                                                       [0, 0, 0, 1]]),
                SeriesHeader(series_instance_uid="1.2"))
    labels = ct.with_array(rng.integers(0, 30, size=ct.shape).astype(np.uint8))
    for stored in (labels, _reordered(labels), _reordered(_reordered(labels))):
        aligned = stored.aligned_to(ct)
        assert (aligned.array == labels.array).all() and np.allclose(aligned.affine, ct.affine)
        assert aligned.header == ct.header
    shifted = Volume(labels.array, labels.affine @ np.array([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                                             [0, 0, 0, 1]]))
    finer = Volume(labels.array, labels.affine @ np.diag([0.5, 1, 1, 1]))
    for other in (shifted, finer):
        with pytest.raises(ValueError, match="not on the CT's grid"):
            other.aligned_to(ct)


def test_loader_skips_localizer_in_the_series(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=2, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))
    ph = make_phantom(opts)
    write_phantom(ph, tmp_path)
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(tmp_path / "dicom" / "scout.dcm")
    vol = load_dicom_series(tmp_path / "dicom")
    assert vol.shape == ph.ct.shape and np.array_equal(vol.array, ph.ct.array)


def test_loader_applies_non_integer_rescale_as_float(tmp_path: Path) -> None:
    ph = make_phantom(PhantomOptions(seed=2, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-10, 10)))
    write_phantom(ph, tmp_path)
    for f in (tmp_path / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = "0.5"
        ds.save_as(f)
    vol = load_dicom_series(tmp_path / "dicom")
    assert vol.array.dtype == np.float32
    expected = (ph.ct.array.astype(np.float32) + 1024) * 0.5 - 1024
    assert np.allclose(vol.array, expected)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("flips", [(), (0,), (0, 2), (0, 1, 2)])
def test_lps_order_keeps_every_voxel_at_its_place(order: tuple[int, ...], flips: tuple[int, ...]) -> None:
    """The display order permutes and flips axes only: each voxel keeps its LPS position, and the
    axes then run along +x, +y, +z whatever order and direction the grid was stored in."""
    rng = np.random.default_rng(1)
    base = Volume(rng.integers(0, 100, (5, 6, 7)).astype(np.int16),
                  np.array([[0.8, 0, 0, -40.0], [0, 0.9, 0, 10.0], [0, 0, 2.5, 300.0], [0, 0, 0, 1]]))
    stored = np.flip(np.transpose(base.array, order), axis=flips)
    affine, first = np.eye(4), [0, 0, 0]  # the stored grid's axes, and where its voxel 0 lies in base
    for new_axis, old_axis in enumerate(order):
        flipped = new_axis in flips
        affine[:3, new_axis] = (-1.0 if flipped else 1.0) * base.affine[:3, old_axis]
        first[old_axis] = base.shape[old_axis] - 1 if flipped else 0
    affine[:3, 3] = base.world_coords(np.array([first]))[0]
    vol = Volume(np.ascontiguousarray(stored), affine)
    out = vol.in_lps_order()
    assert np.array_equal(out.array, base.array) and np.allclose(out.affine, base.affine)


def _series(tmp_path: Path, spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> tuple[Path, list[Path]]:
    ph = make_phantom(PhantomOptions(seed=2, spacing_mm=spacing, z_range_mm=(-20, 20)))
    write_phantom(ph, tmp_path)
    return tmp_path / "dicom", sorted((tmp_path / "dicom").glob("*.dcm"))


def test_loader_takes_every_series_the_node_selection_takes(tmp_path: Path) -> None:
    """One geometry rule: 1.25 mm slices with positions written to 0.1 mm (gaps 1.2-1.3 mm) were
    accepted by the node's selection and then refused by the loader ("irregular slice spacing")."""
    from dicomnode.config import SelectionSettings
    from dicomnode.storage.series import select_series

    folder, files = _series(tmp_path, (4.0, 4.0, 1.25))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v), 1) for v in ds.ImagePositionPatient]
        ds.save_as(f)
    assert select_series(files, SelectionSettings(min_z_extent_mm=30.0, min_slices=5)).accepted
    vol = load_dicom_series(folder)
    assert vol.shape[2] == len(files) and abs(vol.spacing_mm[2] - 1.25) < 0.01


def test_loader_reads_bare_data_sets_and_files_without_a_transfer_syntax(tmp_path: Path) -> None:
    """Files without preamble and file meta (older archives) were skipped without a word, and the
    volume measured short; a file with no Transfer Syntax UID in its meta crashed the decoder."""
    from pydicom.dataset import FileMetaDataset

    folder, files = _series(tmp_path)
    whole = load_dicom_series(folder)
    for f in files[:2]:  # the first slices: bare data sets
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(f, enforce_file_format=False, implicit_vr=True, little_endian=True)
    ds = pydicom.dcmread(files[-1])
    ds.file_meta = FileMetaDataset()  # Part 10 header without its transfer syntax
    ds.save_as(files[-1], enforce_file_format=False, implicit_vr=False, little_endian=True)
    vol = load_dicom_series(folder)
    assert vol.shape == whole.shape and np.array_equal(vol.array, whole.array)


def test_loader_uses_unit_direction_cosines(tmp_path: Path) -> None:
    """A column cosine written 0\\0.97\\0 scaled every voxel volume by 0.97 (-3 %)."""
    folder, files = _series(tmp_path)
    whole = load_dicom_series(folder)
    for f in files:
        rewrite(f, f, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.97, 0.0])
    assert load_dicom_series(folder).voxel_volume_cm3 == pytest.approx(whole.voxel_volume_cm3)


@pytest.mark.parametrize(("tags", "message"), [
    ({"NumberOfFrames": 2}, "multi-frame images \\(Enhanced CT\\) are not measured"),
    ({"PixelSpacing": [0.0, 0.0]}, "invalid PixelSpacing: 0×0 mm"),
])
def test_loader_names_what_it_cannot_measure(tmp_path: Path, tags: dict, message: str) -> None:
    folder, files = _series(tmp_path)
    for f in files:
        rewrite(f, f, **tags)
    with pytest.raises(SeriesGeometryError, match=message):
        load_dicom_series(folder)


def test_loader_refuses_slices_without_a_position(tmp_path: Path) -> None:
    """They were left out without a word (the node refuses the series for them)."""
    folder, files = _series(tmp_path)
    for f in files[:2]:
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.raises(SeriesGeometryError, match="missing ImagePosition.* in 2 slice"):
        load_dicom_series(folder)


def test_image_grid_is_the_grid_load_image_gives_without_the_pixels(tmp_path: Path) -> None:
    """`evaluate --data` checks label maps against `image_grid` and reads each CT once: the grid must be
    the loaded CT's, for a DICOM series (feet-first, descending), a NIfTI file and a lone file."""
    from seg.io import image_grid

    ph = make_phantom(PhantomOptions(seed=4, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20),
                                     position="FFS", slice_order="descending"))
    write_phantom(ph, tmp_path / "ph")
    for p in (tmp_path / "ph" / "dicom", tmp_path / "ph" / "truth" / "labels.nii.gz",
              sorted((tmp_path / "ph" / "dicom").iterdir())[0]):
        grid, loaded = image_grid(p), load_image(p)
        assert grid.shape == loaded.shape and np.allclose(grid.affine, loaded.affine), p
        assert grid.array.strides == (0, 0, 0)  # nothing of the pixels held
    with pytest.raises(FileNotFoundError):
        image_grid(tmp_path / "nowhere")
