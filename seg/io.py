"""Images in and out: a DICOM series or NIfTI file becomes a :class:`Volume` (LPS mm), and back.

Geometry is derived here once: slices are sorted along the slice normal (row × column direction)
whatever their instance numbers or arrival order, so head-first and feet-first series and any
slice order give a volume whose affine places every voxel where the scanner put it.

A series is read at about three times pydicom's own pace with pydicom's results: plain native
files have only the elements used here picked out (:mod:`seg.native_dicom`) and their pixels read
straight from the bytes, the whole volume rescaled at once; every other file, and every case the
fast path does not reproduce exactly, goes through ``pydicom.dcmread`` and ``pixel_array`` slice
by slice as before (``tests/test_io_fast_load.py`` holds the two side by side).
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seg.dates import da_date
from seg.geometry import Stack, check_stack, missing_geometry, single_plane
from seg.header import FIELD_OF_KEYWORD, HeaderValue, SeriesHeader
from seg.volume import LPS_TO_RAS, Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


class SeriesGeometryError(ValueError):
    """The files do not form one regular 3-D volume (mixed series, gaps, tilt changes, ...)."""


class PixelDecodeError(SeriesGeometryError):
    """A slice whose pixel data no installed decoder reads. Its text names the file; ``syntax`` says
    what failed without it, for a log above DEBUG where the file's name may not go (an archive's
    file names can carry the patient's name)."""

    def __init__(self, file: Path, syntax: str, reason: str) -> None:
        super().__init__(f"cannot decode the pixel data of {file.name} ({syntax}): {reason}")
        self.syntax = syntax


def _files(paths: Path | str | list[Path] | list[str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return [p]
    return [Path(p) for p in paths]


def _header_value(ds, key: str) -> HeaderValue | None:
    """``ds``'s value of one :class:`SeriesHeader` keyword: None when absent, empty or unreadable."""
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
        try:
            return int(v)
        except (TypeError, ValueError):
            return None
    if key in ("StudyDate", "PatientBirthDate"):  # pairing orders and subtracts these: one form
        return da_date(v)
    from pydicom.multival import MultiValue

    if isinstance(v, MultiValue):  # a backslash in a one-valued text (a name): as written, not a list's repr
        return "\\".join(str(x) for x in v)
    return str(v)


def _series_header(ds) -> SeriesHeader:
    """The series' header as its first instance (``ds``) gives it."""
    return SeriesHeader(**{name: _header_value(ds, kw) for kw, name in FIELD_OF_KEYWORD.items()})


# What the loader reads of each file (the pixel module as pydicom's decoder reads it): a plain native
# file is walked without building anything else (seg.native_dicom).
_HEADER_KEYWORDS = (
    *FIELD_OF_KEYWORD, "SOPInstanceUID", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "FloatPixelData", "DoubleFloatPixelData", "PixelData",
)
# The largest |slope| or |intercept| the whole-volume path takes: far from float32 overflow.
_FLOAT_LIMIT = 1e30


@cache
def _header_tags() -> frozenset[int]:
    from pydicom.datadict import tag_for_keyword

    return frozenset(tag_for_keyword(k) for k in _HEADER_KEYWORDS)


def _read(f: Path):
    """The file's header as a pydicom Dataset: walked directly when plain, else ``pydicom.dcmread``
    (whose errors the caller handles as before)."""
    import pydicom

    from seg.native_dicom import read_file_header

    ds = read_file_header(f, _header_tags())  # anything not Part 10 in a folder is dcmread's to refuse
    return ds if ds is not None else pydicom.dcmread(f)


def _raw_dataset(f: Path):
    """A file without preamble or file meta (a bare data set, as older archives keep them) when it holds
    an image, else None; its transfer syntax is the encoding pydicom found."""
    import pydicom

    try:
        with open(f, "rb") as fp:
            if fp.read(2) not in (b"\x08\x00", b"\x02\x00"):  # a data set starts at group 0008 (or 0002)
                return None
        ds = pydicom.dcmread(f, force=True)
    except Exception:  # noqa: BLE001 - anything unreadable as DICOM is not an image of the series
        return None
    return _with_transfer_syntax(ds) if "PixelData" in ds else None


def _with_transfer_syntax(ds):
    """``ds`` with a Transfer Syntax UID in its file meta: the uncompressed one its encoding was read in
    when the file has none (pixel_array needs it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _pydicom_pixels(f: Path, ds) -> np.ndarray:
    """pydicom's ``pixel_array`` of the file, from the whole file as ``dcmread`` reads it; a pixel
    encoding no installed decoder reads is the series' problem (PixelDecodeError), not a crash."""
    import pydicom
    from pydicom.dataset import FileDataset

    full = _with_transfer_syntax(ds if isinstance(ds, FileDataset) else pydicom.dcmread(f, force=True))
    try:
        return full.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        syntax = full.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", syntax)
        raise PixelDecodeError(f, str(name), str(exc)) from exc


def _hu_array(slices: list, shape0: tuple[int, int], slopes: list[float], inters: list[float],
              exact: bool) -> np.ndarray:
    """The (column, row, slice) HU array: int16 when the rescale is exact and fits, float32 otherwise."""
    from seg.native_dicom import native_frame

    frames = []
    for _, ds in slices:
        frame = native_frame(ds)
        if frame is None:
            break
        frames.append(frame)
    if len(frames) == len(slices):
        arr = _hu_volume(frames, slopes, inters, exact)
        if arr is not None:
            return arr
    return _hu_slices(slices, frames, shape0, slopes, inters, exact)


def _hu_volume(frames: list, slopes: list[float], inters: list[float], exact: bool) -> np.ndarray | None:
    """All slices at once; None where only the slice loop gives the same result.

    Element by element the results of :func:`_hu_slices`: exact integer sums when exact, else
    float32 products and sums (a Python float meets a float32 array as a float32). Declined: 32-bit
    pixels, mixed pixel types, an int16 overflow (the loop turns to float32 at that slice), intercepts
    near int32 overflow (the loop's int32 sums would wrap or raise), slopes or intercepts near float32
    overflow.
    """
    from seg.native_dicom import unused_bits_correction

    dtype = frames[0].stored.dtype
    if dtype.itemsize > 2 or any(fr.stored.dtype != dtype for fr in frames):
        return None
    n = len(frames)
    rows, cols = frames[0].stored.shape
    if exact:
        if any(abs(i) >= 2**30 for i in inters):
            return None
        offsets = np.array([int(i) for i in inters], np.int64)
    else:
        scale, shift = np.array(slopes), np.array(inters)
        if not (np.all(np.abs(scale) < _FLOAT_LIMIT) and np.all(np.abs(shift) < _FLOAT_LIMIT)):
            return None
    stored = np.empty((n, rows, cols), dtype)
    for k, fr in enumerate(frames):
        stored[k] = fr.stored
        if fr.unused_bits:
            unused_bits_correction(stored[k], fr.unused_bits)
    if exact:
        flat = stored.reshape(n, -1)
        if (flat.min(axis=1) + offsets).min() < -32768 or (flat.max(axis=1) + offsets).max() > 32767:
            return None
        # Every sum fits int16, so int16 arithmetic, which wraps modulo 2**16, gives each sum exactly,
        # whatever the (unsigned) pixel type or the intercept's own range: no int32 pass is needed.
        hu = stored.view(np.int16) if dtype.itemsize == 2 else stored.astype(np.int16)
        np.add(hu, offsets.astype(np.int16)[:, None, None], out=hu)
    else:
        hu = np.multiply(stored, scale.astype(np.float32)[:, None, None], dtype=np.float32)
        np.add(hu, shift.astype(np.float32)[:, None, None], out=hu)
    arr = np.empty((cols, rows, n), hu.dtype)
    # (slice, row, column) -> (column, row, slice) one row at a time: a 2-D transpose per row stays
    # within cache, where one 3-D transposed copy (or the slice-by-slice loop's) is 2-3x slower.
    for j in range(rows):
        arr[:, j, :] = hu[:, j, :].T
    return arr


def _hu_slices(slices: list, frames: list, shape0: tuple[int, int], slopes: list[float],
               inters: list[float], exact: bool) -> np.ndarray:
    """Slice by slice, in order: the frames already read where given, else pydicom's ``pixel_array``."""
    n = len(slices)
    # int16 HU when the rescale is exact and fits (half the memory of float32); float32 otherwise.
    arr = np.empty((shape0[1], shape0[0], n), np.int16 if exact else np.float32)
    for k, (f, ds) in enumerate(slices):
        px = frames[k].pixels() if k < len(frames) else _pydicom_pixels(f, ds)
        if arr.dtype == np.int16:
            hu = px.astype(np.int32) + int(inters[k])
            if hu.min() < -32768 or hu.max() > 32767:
                arr = arr.astype(np.float32)
                arr[:, :, k] = hu.T
            else:
                arr[:, :, k] = hu.T
        else:
            arr[:, :, k] = px.T.astype(np.float32) * slopes[k] + inters[k]
    return arr


def is_localizer(ds: Dataset) -> bool:
    """A scout (ImageType ... LOCALIZER): some scanners put it in the CT series; it is no slice of it.
    The loader and the node's series selection leave it out by this one rule."""
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def is_multi_frame(ds: Dataset) -> bool:
    """An instance of several frames (Enhanced CT): the loader reads one slice per instance, and the
    node's selection refuses such a series by this one rule."""
    try:
        return int(ds.get("NumberOfFrames") or 1) > 1
    except (TypeError, ValueError):
        return False


def multi_frame_text(n: int) -> str:
    """Why ``n`` multi-frame instances are refused, in the loader's and the node's selection's words."""
    return (f"multi-frame images (Enhanced CT) are not measured: {n} instance(s);"
            " export the series as single-frame CT images")


def load_dicom_series(paths: Path | list[Path]) -> Volume:
    """Read one DICOM image series into a Volume in HU (int16 when exact, else float32)."""
    datasets, affine, shape0 = _series_stack(paths, _read)
    slopes = [float(ds.get("RescaleSlope", 1) or 1) for _, ds in datasets]
    inters = [float(ds.get("RescaleIntercept", 0) or 0) for _, ds in datasets]
    exact = all(s == 1.0 for s in slopes) and all(float(i).is_integer() for i in inters)
    arr = _hu_array(datasets, shape0, slopes, inters, exact)

    return Volume(arr, affine, _series_header(datasets[0][1]), [f for f, _ in datasets],
                  [str(ds.SOPInstanceUID) for _, ds in datasets])


def _deferred_read(f: Path):
    """The file as ``pydicom.dcmread`` reads it, with large values (the pixels) left on disk."""
    import pydicom

    return pydicom.dcmread(f, defer_size=1024)


def image_grid(path: Path | str) -> Volume:
    """The grid :func:`load_image` would give ``path`` (shape, affine), its pixels never read: the
    array is a zero-stride placeholder. For checking that a label map fits a CT before the CT
    itself is needed (``evaluate --data`` reads each CT once)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir() or not p.name.endswith((".nii", ".nii.gz")):
        datasets, affine, shape0 = _series_stack(p if p.is_dir() else [p], _deferred_read)
        shape = (shape0[1], shape0[0], len(datasets))
    else:
        import nibabel as nib

        img = nib.load(str(p))
        shape = _nifti_volume_shape(p, img.shape)
        affine = LPS_TO_RAS @ img.affine
    return Volume(np.broadcast_to(np.int16(0), shape), affine)


def _series_stack(paths: Path | list[Path], read) -> tuple[list, np.ndarray, tuple[int, int]]:
    """The series' image files as (path, dataset) in slice order, its affine and its (rows, columns),
    each file read by ``read``; what does not form one regular stack is a SeriesGeometryError."""
    import pydicom

    datasets = []
    multi_frame, no_geometry = [], []  # multi-frame images, images without a position: their series UIDs
    for f in _files(paths):
        try:
            ds = read(f)
        except (pydicom.errors.InvalidDicomError, OSError) as exc:
            ds = _raw_dataset(f)  # no preamble or file meta, as older archives keep them
            if ds is None:
                log.debug("skipping %s: %s", f, exc)
                continue
        if "PixelData" not in ds or is_localizer(ds):
            log.debug("skipping %s: no image, or a localizer", f)
            continue
        if is_multi_frame(ds):
            multi_frame.append(str(ds.get("SeriesInstanceUID", "")))
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            no_geometry.append(str(ds.get("SeriesInstanceUID", "")))
            continue
        datasets.append((f, ds))
    if not datasets and multi_frame:
        raise SeriesGeometryError(multi_frame_text(len(multi_frame)))
    if not datasets:
        raise SeriesGeometryError("no DICOM images with position and orientation found")
    series = {str(ds.SeriesInstanceUID) for _, ds in datasets}
    if len(series) > 1:
        raise SeriesGeometryError(f"files belong to {len(series)} series; give one series")
    if multi := sum(uid in series for uid in multi_frame):  # (another series' multi-frame: not ours)
        raise SeriesGeometryError(multi_frame_text(multi))
    if missing := sum(uid in series for uid in no_geometry):  # (another series' screenshot: not ours)
        raise SeriesGeometryError(missing_geometry(missing).text)

    # one geometry rule with the node's series selection (seg.geometry): a series it accepts loads here
    planes = [single_plane(ds) for _, ds in datasets]
    stack = check_stack(planes)
    if not isinstance(stack, Stack):
        raise SeriesGeometryError(stack.text)
    row_dir, col_dir = stack.row_dir, stack.col_dir
    ps0 = planes[0].spacing
    datasets = [datasets[i] for i in stack.order]
    shape0 = (planes[0].rows, planes[0].cols)
    pos = np.array([planes[i].position for i in stack.order])
    n = len(datasets)
    if n > 1:
        step = (pos[-1] - pos[0]) / (n - 1)
    else:
        step = stack.normal * float(datasets[0][1].get("SliceThickness", 1.0) or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]  # i runs along a row: column spacing
    affine[:3, 1] = col_dir * ps0[0]  # j runs down a column: row spacing
    affine[:3, 2] = step
    affine[:3, 3] = pos[0]
    return datasets, affine, shape0


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


def _nifti_volume_shape(path: Path | str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A NIfTI image's volume shape: 3-D, or 4-D with one volume (its last axis dropped)."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def load_nifti(path: Path | str) -> Volume:
    """Read a NIfTI image into a Volume (LPS affine); integer data keeps its integer type."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj).reshape(_nifti_volume_shape(path, img.shape))
    affine = LPS_TO_RAS @ img.affine
    return Volume(np.asarray(arr), affine)


def load_image(path: Path | str) -> Volume:
    """A DICOM folder (or file list member) or a .nii/.nii.gz file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        return load_dicom_series(p)
    if p.name.endswith((".nii", ".nii.gz")):
        return load_nifti(p)
    return load_dicom_series([p])
