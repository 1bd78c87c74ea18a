"""Images in and out: a DICOM series or NIfTI file becomes a :class:`Volume` (LPS mm), and back.

Geometry is derived here once: slices are sorted along the slice normal (row × column direction)
whatever their instance numbers or arrival order, so head-first and feet-first series and any
slice order give a volume whose affine places every voxel where the scanner put it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from seg.volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

META_KEYS = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "PatientSex",
    "PatientSize", "PatientBirthDate", "StudyDate", "StudyTime", "Modality", "PatientPosition",
    "AccessionNumber", "StudyID", "IssuerOfPatientID", "PatientWeight", "PatientAge", "SeriesNumber",
    "SeriesDescription",
)


class SeriesGeometryError(ValueError):
    """The files do not form one regular 3-D volume (mixed series, gaps, tilt changes, ...)."""


def _files(paths: Path | str | list[Path] | list[str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return [p]
    return [Path(p) for p in paths]


def _meta_value(ds, key: str):
    v = ds.get(key)
    if v is None or v == "":
        return None
    if key in ("PatientSize", "PatientWeight"):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if f > 0 else None
    if key == "SeriesNumber":
        return int(v)
    return str(v)


def load_dicom_series(paths: Path | list[Path]) -> Volume:
    """Read one DICOM image series into a Volume in HU (int16 when exact, else float32)."""
    import pydicom

    datasets = []
    for f in _files(paths):
        try:
            ds = pydicom.dcmread(f)
        except (pydicom.errors.InvalidDicomError, OSError) as exc:
            log.debug("skipping %s: %s", f, exc)
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            log.debug("skipping localizer %s", f)
            continue
        datasets.append((f, ds))
    if not datasets:
        raise SeriesGeometryError("no DICOM images with position and orientation found")
    series = {str(ds.SeriesInstanceUID) for _, ds in datasets}
    if len(series) > 1:
        raise SeriesGeometryError(f"files belong to {len(series)} series; give one series")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in datasets):
        raise SeriesGeometryError("multi-frame images are not supported; expected one slice per instance")

    iop = np.array([float(v) for v in datasets[0][1].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape0 = (int(datasets[0][1].Rows), int(datasets[0][1].Columns))
    ps0 = [float(v) for v in datasets[0][1].PixelSpacing]
    for _, ds in datasets:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise SeriesGeometryError("image orientation differs between slices")
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise SeriesGeometryError("image size differs between slices")
        if not np.allclose([float(v) for v in ds.PixelSpacing], ps0, atol=1e-4):
            raise SeriesGeometryError("pixel spacing differs between slices")
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    datasets = [datasets[i] for i in order]
    pos, d = pos[order], d[order]
    n = len(datasets)
    if n > 1:
        gaps = np.diff(d)
        if np.any(gaps < 1e-3):
            raise SeriesGeometryError("two slices share a position (duplicates or several acquisitions)")
        med = float(np.median(gaps))
        if np.max(np.abs(gaps - med)) > max(0.01 * med, 1e-3):
            raise SeriesGeometryError(f"irregular slice spacing (gaps {gaps.min():.3f}..{gaps.max():.3f} mm)")
        step = (pos[-1] - pos[0]) / (n - 1)
    else:
        step = normal * float(datasets[0][1].get("SliceThickness", 1.0) or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]  # i runs along a row: column spacing
    affine[:3, 1] = col_dir * ps0[0]  # j runs down a column: row spacing
    affine[:3, 2] = step
    affine[:3, 3] = pos[0]

    slopes = [float(ds.get("RescaleSlope", 1) or 1) for _, ds in datasets]
    inters = [float(ds.get("RescaleIntercept", 0) or 0) for _, ds in datasets]
    exact = all(s == 1.0 for s in slopes) and all(float(i).is_integer() for i in inters)
    # int16 HU when the rescale is exact and fits (half the memory of float32); float32 otherwise.
    arr = np.empty((shape0[1], shape0[0], n), np.int16 if exact else np.float32)
    for k, (_, ds) in enumerate(datasets):
        px = ds.pixel_array
        if arr.dtype == np.int16:
            hu = px.astype(np.int32) + int(inters[k])
            if hu.min() < -32768 or hu.max() > 32767:
                arr = arr.astype(np.float32)
                arr[:, :, k] = hu.T
            else:
                arr[:, :, k] = hu.T
        else:
            arr[:, :, k] = px.T.astype(np.float32) * slopes[k] + inters[k]

    first = datasets[0][1]
    meta = {k: v for k in META_KEYS if (v := _meta_value(first, k)) is not None}
    return Volume(arr, affine, meta, [f for f, _ in datasets], [str(ds.SOPInstanceUID) for _, ds in datasets])


def save_nifti(vol: Volume, path: Path | str) -> Path:
    """Write a Volume as NIfTI (RAS affine, array unchanged, labels stay integer)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(vol.array), vol.ras_affine())
    img.header.set_data_dtype(vol.array.dtype)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    img.set_qform(vol.ras_affine(), code=1)
    img.set_sform(vol.ras_affine(), code=1)
    nib.save(img, str(path))
    return path


def load_nifti(path: Path | str) -> Volume:
    """Read a NIfTI image into a Volume (LPS affine); integer data keeps its integer type."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {arr.shape}")
    affine = LPS_TO_RAS @ img.affine
    return Volume(np.asarray(arr), affine, {})


def load_image(path: Path | str) -> Volume:
    """A DICOM folder (or file list member) or a .nii/.nii.gz file."""
    p = Path(path)
    if p.is_dir():
        return load_dicom_series(p)
    if p.name.endswith((".nii", ".nii.gz")):
        return load_nifti(p)
    return load_dicom_series([p])
