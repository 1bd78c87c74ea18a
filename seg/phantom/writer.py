"""Write a phantom as a CT Image Storage series plus its ground truth (labels, volumes).

One single-frame CT instance per slice, full CT Image IOD (patient, study, series, frame of
reference, equipment, image plane, image pixel, CT image, SOP common), so that PACS, dcmtk and
dciodvfy accept it like a scanner's output.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from seg.header import SeriesHeader
from seg.phantom.options import PHANTOM_VERSION, Phantom
from seg.phantom.uids import derived_uid

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}


def _ds_str(v: float) -> str:
    """Decimal string (max 16 chars) without float noise."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _instance_order(ph: Phantom) -> list[int]:
    """Volume slice indices k in instance-number order (ascending = feet first in numbering)."""
    ct = ph.ct
    nk = ct.shape[2]
    zs = [float((ct.affine @ np.array([0, 0, k, 1.0]))[2]) for k in range(nk)]
    order = sorted(range(nk), key=lambda k: zs[k])
    if ph.options.slice_order == "descending":
        order.reverse()
    return order


def build_slice(ph: Phantom, k: int, instance: int) -> Dataset:
    """The CT instance for slice k of the phantom's volume: the CT Image IOD, module by module."""
    pos = ph.ct.affine @ np.array([0, 0, k, 1.0])
    sop_uid = derived_uid("phantom-instance", ph.header.series_instance_uid, str(int(round(pos[2] * 1000))))
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    _sop_common(ds, sop_uid)
    _patient(ds, ph.header)
    _study(ds, ph.header)
    _series_and_equipment(ds, ph, instance)
    _ct_acquisition(ds, ph)
    _image_plane(ds, ph, pos)
    _image_pixel(ds, ph, k)
    return ds


def _file_meta(sop_uid: str) -> FileMetaDataset:
    """Part 10 header; written uncompressed (write_phantom compresses afterwards if asked)."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "DICOMNODE_PH1"
    return fm


def _sop_common(ds: Dataset, sop_uid: str) -> None:
    """SOP Common: class, instance (derived from the slice position, so rewrites keep it) and charset."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid


def _patient(ds: Dataset, header: SeriesHeader) -> None:
    """Patient module (and the study's patient data: age, size, weight)."""
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.IssuerOfPatientID = header.issuer_of_patient_id
    ds.PatientBirthDate = header.birth_date
    ds.PatientSex = header.sex
    ds.PatientAge = header.patient_age
    if header.size_m is not None:
        ds.PatientSize = _ds_str(header.size_m)
    ds.PatientWeight = _ds_str(header.weight_kg)


def _study(ds: Dataset, header: SeriesHeader) -> None:
    """General Study, with one date and time for the study, series, acquisition and content."""
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = header.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = header.study_time
    ds.AccessionNumber = header.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT hip and thigh (synthetic phantom)"
    ds.StudyInstanceUID = header.study_instance_uid
    ds.StudyID = header.study_id


def _series_and_equipment(ds: Dataset, ph: Phantom, instance: int) -> None:
    """General Series, General Equipment and General Image (numbers, descriptions, who made it)."""
    opts, dz = ph.options, ph.ct.spacing_mm[2]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = ph.header.series_instance_uid
    ds.SeriesNumber = opts.series_number
    ds.SeriesDescription = f"Phantom seed {opts.seed} {'post-op' if opts.postop else 'pre-op'} {dz:g}mm"
    ds.BodyPartExamined = "HIP"
    ds.PatientPosition = ph.header.patient_position
    ds.Manufacturer = "dicomnode synthetic phantom"
    ds.InstitutionName = "Synthetic"
    ds.StationName = "PHANTOM"
    ds.ManufacturerModelName = "seg.phantom"
    ds.SoftwareVersions = PHANTOM_VERSION
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImageLaterality = "B"


def _ct_acquisition(ds: Dataset, ph: Phantom) -> None:
    """CT Image acquisition parameters: plausible fixed scanner settings, the reconstruction size."""
    ct = ph.ct
    dx, dy, _ = ct.spacing_mm
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_str(max(ct.shape[0] * dx, ct.shape[1] * dy))
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.ConvolutionKernel = "STANDARD"


def _image_plane(ds: Dataset, ph: Phantom, pos: np.ndarray) -> None:
    """Frame of Reference and Image Plane: where slice k lies, from the volume's affine."""
    aff = ph.ct.affine
    dx, dy, dz = ph.ct.spacing_mm
    row_dir = aff[:3, 0] / dx
    col_dir = aff[:3, 1] / dy
    ds.FrameOfReferenceUID = ph.header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [_ds_str(v) for v in pos[:3]]
    ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_dir, *col_dir)]
    ds.SliceLocation = _ds_str(pos[2])
    ds.SliceThickness = _ds_str(ph.options.slice_thickness_mm or dz)
    ds.PixelSpacing = [_ds_str(dy), _ds_str(dx)]  # row spacing (between rows), column spacing


def _image_pixel(ds: Dataset, ph: Phantom, k: int) -> None:
    """Image Pixel and CT Image: 12-bit unsigned stored values, HU = stored - 1024, a soft-tissue window."""
    ct = ph.ct
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ct.shape[1]
    ds.Columns = ct.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (ct.array[:, :, k].T.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def write_phantom(ph: Phantom, out_dir: Path | str,
                  transfer_syntax: UID | str = ExplicitVRLittleEndian) -> Path:
    """Write ``out_dir/dicom/*.dcm`` and ``out_dir/truth/{labels.nii.gz,volumes.json,phantom.json}``."""
    from seg.io import save_nifti
    from seg.measure import measure_volumes, write_volumes
    from seg.records import ModelInfo

    out = Path(out_dir)
    ts = UID(TRANSFER_SYNTAXES.get(str(transfer_syntax), transfer_syntax))
    dicom_dir = out / "dicom"
    truth = out / "truth"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    for old in dicom_dir.glob("CT*.dcm"):  # a rewrite must not leave slices of an earlier phantom
        old.unlink()
    for n, k in enumerate(_instance_order(ph), start=1):
        ds = build_slice(ph, k, n)
        if ts != ExplicitVRLittleEndian:
            arr = ds.PixelData
            # lossless: the instance keeps its UID (pydicom gives a new random one by default, so every
            # write of a compressed phantom named its slices anew, against the options' promise)
            ds.compress(ts, np.frombuffer(arr, np.uint16).reshape(ds.Rows, ds.Columns),
                        generate_instance_uid=False)
        ds.save_as(dicom_dir / f"CT{n:04d}.dcm", enforce_file_format=True)
    save_nifti(ph.labels, truth / "labels.nii.gz")
    record = measure_volumes(
        ph.labels, ph.ct,
        height_m=ph.height_m if ph.options.write_height else None,
        height_source="PatientSize" if ph.options.write_height else None,
        model=ModelInfo(name="phantom-truth", version=PHANTOM_VERSION, demo=False),
    )
    write_volumes(record, truth)
    info = {
        "options": asdict(ph.options),
        "sex": ph.sex,
        "height_m": ph.height_m,
        "series_instance_uid": ph.header.series_instance_uid,
        "study_instance_uid": ph.header.study_instance_uid,
        "patient_id": ph.header.patient_id,
        "side_voxels": {str(k): v for k, v in ph.side_voxels.items()},
        "transfer_syntax": str(ts),
    }
    (truth / "phantom.json").write_text(json.dumps(info, indent=1, default=str))
    return out
