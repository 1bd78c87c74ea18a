"""Small synthetic CT series for node tests and the receive benchmark (pydicom only, fast).

Why not the phantom: the node's tests exercise networking, storage and selection, which need
headers and a few pixels, not anatomy. Every UID is derived from ``name`` so a test can re-create
the exact same series (same SOP UIDs) to test re-sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

CT_IMAGE, MR_IMAGE, ENHANCED_CT_IMAGE = CTImageStorage, MRImageStorage, EnhancedCTImageStorage


@dataclass
class SeriesFiles:
    study_uid: str
    series_uid: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)


def uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_ct_series(
    folder: Path,
    *,
    name: str = "s1",
    n: int = 10,
    slice_mm: float = 3.0,
    pixel_mm: float = 1.0,
    size: int = 16,
    modality: str = "CT",
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    skip: set[int] | None = None,
    duplicate: set[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "NODE-TEST-1",
    patient_name: str = "Node^Test",
    study_date: str = "20240101",
    z0: float = 0.0,
    random_pixels: bool = False,
    study_uid: str | None = None,
) -> SeriesFiles:
    """``n`` single-frame CT slices at ``slice_mm`` (descending z from ``z0``), ``size``×``size`` pixels.

    ``skip`` leaves slice indices out (a gap), ``duplicate`` writes an extra instance at the same position.
    ``study_uid``: put the series in that study (several series of one study), else one of its own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study = study_uid or uid("study", name)
    series = uid("series", name)
    frame = uid("for", name)
    sop_class = MR_IMAGE if modality == "MR" else CT_IMAGE
    out = SeriesFiles(study, series)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    row = np.array(orientation[:3])
    col = np.array(orientation[3:])
    normal = np.cross(row, col)
    plan = [(k, 0) for k in range(n) if k not in (skip or set())]
    plan += [(k, 1) for k in sorted(duplicate or set())]
    for k, copy in plan:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = uid("sop", name, k, copy)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientSize = patient_name, patient_id, "F", 1.65
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = study_date, "120000", "1", "ACC1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1 + 1000 * copy
        ds.SeriesDescription = f"synthetic {name}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        pos = np.array([-size * pixel_mm / 2, -size * pixel_mm / 2, 0.0]) + normal * (z0 - k * slice_mm)
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing, ds.SliceThickness = [pixel_mm, pixel_mm], slice_mm
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        if random_pixels:
            pixels = rng.integers(0, 2000, (size, size), dtype=np.int16)
        else:
            pixels = np.full((size, size), 1000 + k, dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels)
        path = folder / f"{name}-{k:04d}-{copy}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.files.append(path)
        out.sop_uids.append(str(ds.SOPInstanceUID))
    return out


def write_big_series(folder: Path, n: int = 300, size: int = 512, name: str = "bench") -> SeriesFiles:
    """The benchmark series: ``n`` slices of ``size``² int16 noise (uncompressed, ~0.5 MB each)."""
    return write_ct_series(folder, name=name, n=n, size=size, slice_mm=1.0, pixel_mm=0.8, random_pixels=True)


def write_enhanced_ct(path: Path, *, name: str = "enh", frames: int = 12, slice_mm: float = 3.0,
                      size: int = 8) -> SeriesFiles:
    """One multi-frame Enhanced CT instance: geometry in shared/per-frame functional groups."""
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE
    ds.SOPInstanceUID = uid("sop", name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT_IMAGE
    ds.PatientName, ds.PatientID = "Node^Enhanced", "NODE-TEST-2"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study", name), uid("series", name)
    ds.FrameOfReferenceUID = uid("for", name)
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def item(**kw: object) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([item(PixelSpacing=[1.0, 1.0], SliceThickness=slice_mm)])
    shared.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=[1.0, 0, 0, 0, 1.0, 0])])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0.0, 0.0, -k * slice_mm])]))
        for k in range(frames)])
    ds.PixelData = np.zeros((frames, size, size), dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return SeriesFiles(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), [path], [str(ds.SOPInstanceUID)])


def rewrite(src: Path, dst: Path, **attrs: Any) -> Path:
    """A copy of ``src`` with attributes changed (``file_meta__X`` for file meta ones)."""
    import pydicom

    ds = pydicom.dcmread(src)
    for key, value in attrs.items():
        if key.startswith("file_meta__"):
            setattr(ds.file_meta, key.removeprefix("file_meta__"), value)
        else:
            setattr(ds, key, value)
    # enforce_file_format would copy SOPClassUID over a deliberately different MediaStorageSOPClassUID
    ds.save_as(dst, enforce_file_format=not any(k.startswith("file_meta__") for k in attrs))
    return dst


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set, after its file meta group (what goes over the wire)."""
    raw = Path(path).read_bytes()
    return raw[132 + 12 + int.from_bytes(raw[140:144], "little"):]


def part10(path: Path, dataset: bytes, *, sop_uid: str, sop_class: str = CT_IMAGE) -> Path:
    """A Part 10 file whose data set is exactly ``dataset`` (possibly malformed), for byte-exact sending."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes() + dataset)
    return path
