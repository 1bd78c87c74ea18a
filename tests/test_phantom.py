"""The phantom itself: every class present, plausible HU, randomised but deterministic patients,
post-operative changes where asked, and a CT IOD that dciodvfy accepts."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from seg import labels as L
from seg.measure import measure_volumes
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import VolumeRecord

COARSE = (4.0, 4.0, 6.0)


@pytest.fixture(scope="module")
def whole() -> object:
    return make_phantom(PhantomOptions(seed=0, spacing_mm=COARSE))


def test_all_classes_present_on_both_sides(whole) -> None:
    lab = whole.labels.array
    assert lab.dtype == np.uint8 and lab.max() <= 29
    for label in range(1, L.NUM_CLASSES):
        nl, nr = whole.side_voxels[label]
        assert nl > 0 and nr > 0, L.CLASS_NAMES[label]
        # Bilateral structures are about symmetric (no side lost or doubled).
        assert 0.6 < nl / nr < 1.6, (L.CLASS_NAMES[label], nl, nr)


def test_whole_phantom_extent_and_anatomy_order(whole) -> None:
    ct = whole.ct
    z = ct.affine[2, 3] + ct.affine[2, 2] * np.arange(ct.shape[2])
    assert 430 <= z.max() - z.min() <= 620  # L4/iliac crest to below the knee

    def z_centre(name: str) -> float:
        k = np.nonzero(whole.labels.array == L.LABEL_OF[name])[2]
        return float(z[k].mean())

    # Cranio-caudal order: psoas above gluteus medius above quadratus femoris above semimembranosus.
    order = ["psoas", "gluteus_medius", "quadratus_femoris", "semimembranosus"]
    zc = [z_centre(n) for n in order]
    assert zc == sorted(zc, reverse=True), dict(zip(order, zc, strict=True))
    # Anterior/posterior: rectus femoris in front of the femur, biceps femoris behind (LPS y grows posterior).
    y = ct.affine[1, 3] + ct.affine[1, 1] * np.arange(ct.shape[1])

    def y_centre(name: str) -> float:
        j = np.nonzero(whole.labels.array == L.LABEL_OF[name])[1]
        return float(y[j].mean())

    assert y_centre("rectus_femoris") < y_centre("femur") < y_centre("biceps_femoris")
    assert y_centre("rectus_abdominis") < y_centre("multifidus")


def test_hu_ranges(whole) -> None:
    hu, lab = whole.ct.array.astype(float), whole.labels.array
    muscle = np.isin(lab, [s.label for s in L.structures() if s.is_muscle and s.label])
    assert 35 <= np.median(hu[muscle]) <= 65
    fat = (lab == 0) & (hu > -200) & (hu < -30)
    assert -120 <= np.median(hu[fat]) <= -80
    femur = lab == L.LABEL_OF["femur"]
    assert np.percentile(hu[femur], 95) > 700
    assert hu.min() >= -1024 and hu.max() <= 3071
    # Noise: air around the patient is not a flat -1000.
    assert np.std(hu[:4, :4, :]) > 3


def test_deterministic_and_seed_dependent() -> None:
    kw = dict(spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-40, 20))
    a, b = make_phantom(PhantomOptions(seed=5, **kw)), make_phantom(PhantomOptions(seed=5, **kw))
    assert np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.labels.array, b.labels.array)
    assert a.header == b.header
    c = make_phantom(PhantomOptions(seed=6, **kw))
    assert c.header.series_instance_uid != a.header.series_instance_uid
    assert c.ct.shape != a.ct.shape or not np.array_equal(c.labels.array, a.labels.array)


def test_height_and_sex_randomised_in_plausible_ranges() -> None:
    from seg.phantom.patient import draw_patient

    seen = set()
    for seed in range(40):
        p, _ = draw_patient(PhantomOptions(seed=seed))
        seen.add(p.sex)
        lo, hi = (1.50, 1.70) if p.sex == "F" else (1.62, 1.85)
        assert lo <= p.height_m <= hi
        assert round(p.height_m, 2) == p.height_m  # exactly representable in PatientSize
    assert seen == {"F", "M"}
    p, _ = draw_patient(PhantomOptions(seed=1, sex="M", height_m=1.9))
    assert (p.sex, p.height_m) == ("M", 1.9)


def test_a_pre_operative_phantom_is_voxel_for_voxel_phantom_1_0s() -> None:
    """Phantom 1.1 changed the implant's streaks alone: a phantom without an implant is 1.0's (the
    figures were taken from the 1.0 renderer), its random draws unshifted. The labels are compared to
    the bit; the CT by its mean, spread and a few voxels, so floating-point summation order on another
    CPU cannot fail it while a shifted texture or noise draw (tens of HU per voxel) does."""
    ph = make_phantom(PhantomOptions(seed=5, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-40, 20)))
    assert hashlib.sha256(ph.labels.array.tobytes()).hexdigest()[:16] == "22b7fbd1cceb809e"
    ct = ph.ct.array.astype(np.float64)
    assert ct.shape == (111, 88, 16)
    assert abs(ct.mean() - -492.6794) < 1e-3 and abs(ct.std() - 519.5199) < 1e-3
    voxels = [(15, 12, 2), (31, 25, 4), (47, 37, 6), (63, 50, 9), (79, 62, 11), (95, 75, 13)]
    assert [float(ct[v]) for v in voxels] == [-998.0, -1000.0, 1203.0, 34.0, 54.0, -1004.0]


def test_taller_patient_is_longer_and_has_more_muscle() -> None:
    kw = dict(seed=9, spacing_mm=(5.0, 5.0, 6.0), sex="M")
    short = make_phantom(PhantomOptions(height_m=1.62, **kw))
    tall = make_phantom(PhantomOptions(height_m=1.85, **kw))
    assert tall.ct.shape[2] > short.ct.shape[2]
    vs = measure_volumes(short.labels).qa.segmented_muscle_cm3
    vt = measure_volumes(tall.labels).qa.segmented_muscle_cm3
    assert vt > 1.2 * vs


def test_hfs_and_ffs_are_the_same_patient() -> None:
    kw = dict(seed=4, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-30, 30))
    h = make_phantom(PhantomOptions(position="HFS", **kw))
    f = make_phantom(PhantomOptions(position="FFS", **kw))
    assert np.array_equal(h.labels.array, f.labels.array[::-1, :, ::-1])
    assert np.array_equal(h.ct.array, f.ct.array[::-1, :, ::-1])
    assert np.allclose(f.ct.affine[:3, 0], [-4, 0, 0]) and np.allclose(f.ct.affine[:3, 2], [0, 0, -4])


def test_postop_implant_atrophy_and_fat_infiltration() -> None:
    kw = dict(seed=12, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-120, 10))
    pre = make_phantom(PhantomOptions(**kw))
    post = make_phantom(PhantomOptions(**kw, postop=True, implant_side="right", fat_infiltration=0.3,
                                       atrophy={"gluteus_maximus": 0.7, "adductor_longus": 0.8}))
    # Same patient, same grid.
    assert pre.ct.shape == post.ct.shape and pre.height_m == post.height_m
    metal = post.ct.array > 2500
    assert metal.any() and not (pre.ct.array > 2500).any()
    x = post.ct.affine[0, 3] + post.ct.affine[0, 0] * np.arange(post.ct.shape[0])
    assert (x[np.nonzero(metal)[0]] < 0).all()  # patient's right = -x
    for name, f in (("gluteus_maximus", 0.7), ("adductor_longus", 0.8)):
        lab = L.LABEL_OF[name]
        (pl, pr), (ql, qr) = pre.side_voxels[lab], post.side_voxels[lab]
        assert ql == pl  # left untouched
        assert qr == pytest.approx(f * pr, rel=0.03)
    # Fat infiltration lowers muscle HU on the operated side only.
    mus = post.labels.array == L.LABEL_OF["vastus_lateralis"]
    right, left = mus & (x < 0)[:, None, None], mus & (x > 0)[:, None, None]
    d_right = np.mean(pre.ct.array[right]) - np.mean(post.ct.array[right])
    d_left = np.mean(pre.ct.array[left]) - np.mean(post.ct.array[left])
    assert d_right > 20 and abs(d_left) < 5
    # Labels do not move with the metal: the femur is still the femur, and every label is phantom
    # 1.0's (digest from the 1.0 renderer; 1.1 changed the streaks alone).
    assert pre.side_voxels[L.LABEL_OF["femur"]] == post.side_voxels[L.LABEL_OF["femur"]]
    assert hashlib.sha256(post.labels.array.tobytes()).hexdigest()[:16] == "7a25dcc0d5cd933f"


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        PhantomOptions(position="HFP")
    with pytest.raises(ValueError):
        PhantomOptions(implant_side="both")
    with pytest.raises(ValueError):
        make_phantom(PhantomOptions(atrophy={"femur": 0.5}))
    with pytest.raises(ValueError):
        make_phantom(PhantomOptions(atrophy={"not_a_muscle": 0.5}))


def test_the_cli_names_its_option_for_a_bad_implant_side(tmp_path: Path) -> None:
    """`phantom --implant middle` says --implant, not the options' field name (implant_side), and
    writes nothing."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    r = CliRunner().invoke(app, ["phantom", "--implant", "middle", "--out", str(tmp_path / "ph")],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "--implant must be left or right" in r.output, r.output
    assert "implant_side" not in r.output and not (tmp_path / "ph").exists()


def test_written_series_headers_and_truth(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=8, spacing_mm=(4.0, 4.0, 5.0), z_range_mm=(-30, 30), position="FFS",
                          patient_id="PX-1", study_date="20230615", write_height=False)
    ph = make_phantom(opts)
    write_phantom(ph, tmp_path)
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    assert len(files) == ph.ct.shape[2]
    ds = pydicom.dcmread(files[0])
    assert ds.PatientID == "PX-1" and ds.StudyDate == "20230615" and ds.PatientPosition == "FFS"
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert "PatientSize" not in ds
    assert ds.InstanceNumber == 1 and float(ds.ImagePositionPatient[2]) == min(
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    truth = VolumeRecord.load(tmp_path / "truth" / "volumes.json")
    assert truth.height_m is None and all(s.index_cm3_m2 is None for s in truth.structures)
    assert truth.series_instance_uid == ds.SeriesInstanceUID
    info = json.loads((tmp_path / "truth" / "phantom.json").read_text())
    assert info["options"]["seed"] == 8
    # Rewriting the folder with fewer slices leaves no stale instances behind.
    small = make_phantom(PhantomOptions(seed=8, spacing_mm=(4.0, 4.0, 5.0), z_range_mm=(-10, 10)))
    write_phantom(small, tmp_path)
    assert len(list((tmp_path / "dicom").glob("*.dcm"))) == small.ct.shape[2] < len(files)


@pytest.mark.skipif(shutil.which("dciodvfy") is None and not Path(".venv/bin/dciodvfy").exists(),
                    reason="dciodvfy not installed")
@pytest.mark.parametrize("ts", ["explicit", "rle", "jpegls", "j2k"])
def test_dciodvfy_accepts_instances(tmp_path: Path, ts: str) -> None:
    tool = shutil.which("dciodvfy") or str(Path(".venv/bin/dciodvfy").resolve())
    ph = make_phantom(PhantomOptions(seed=1, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-10, 10), postop=True,
                                     implant_side="left"))
    write_phantom(ph, tmp_path, ts)
    f = sorted((tmp_path / "dicom").glob("*.dcm"))[2]
    res = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert "CTImage" in out
    assert "Error" not in out, out


@pytest.mark.parametrize("ts", ["rle", "jpegls", "j2k"])
def test_compressed_series_keep_the_phantoms_uids(tmp_path: Path, ts: str) -> None:
    """The same options give the same UIDs in every transfer syntax: the compressed slices are the
    uncompressed ones' instances (lossless), not new random UIDs on every write."""
    ph = make_phantom(PhantomOptions(seed=2, spacing_mm=(6.0, 6.0, 10.0), z_range_mm=(-20, 20)))

    def uids(folder: Path) -> list[str]:
        return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in sorted((folder / "dicom").glob("*.dcm"))]

    write_phantom(ph, tmp_path / "plain")
    write_phantom(ph, tmp_path / "a", ts)
    write_phantom(ph, tmp_path / "b", ts)
    assert uids(tmp_path / "a") == uids(tmp_path / "b") == uids(tmp_path / "plain")
    first = pydicom.dcmread(sorted((tmp_path / "a" / "dicom").glob("*.dcm"))[0])
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID

