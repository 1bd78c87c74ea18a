"""The series header record: one field per DICOM keyword the loader reads, read once by seg.io."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seg.header import FIELD_OF_KEYWORD, SeriesHeader
from seg.io import load_dicom_series, load_nifti, save_nifti
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.volume import Volume


def test_values_by_dicom_keyword() -> None:
    header = SeriesHeader(patient_id="P1", size_m=1.7, series_number=3)
    assert header.value("PatientID") == "P1" and header.value("PatientSize") == 1.7
    assert header.value("SeriesNumber") == 3 and header.value("StudyDate") is None
    assert header.value("StudyDescription") is None  # not a keyword the header keeps
    assert len(FIELD_OF_KEYWORD) == len(set(FIELD_OF_KEYWORD.values()))


def test_a_ct_header_over_its_label_maps() -> None:
    ct = SeriesHeader(patient_id="CT", study_date="20240101")
    labels = SeriesHeader(patient_id="LAB", size_m=1.6)
    assert ct.filled_from(labels) == SeriesHeader(patient_id="CT", study_date="20240101", size_m=1.6)


def test_nifti_volumes_have_an_empty_header(tmp_path: Path) -> None:
    vol = Volume(np.zeros((2, 3, 4), np.uint8), np.eye(4), SeriesHeader(patient_id="P1"))
    assert load_nifti(save_nifti(vol, tmp_path / "v.nii.gz")).header == SeriesHeader()


def test_the_loader_reads_back_what_a_phantom_wrote(tmp_path: Path) -> None:
    ph = make_phantom(PhantomOptions(seed=3, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-12, 12)))
    write_phantom(ph, tmp_path)
    read = load_dicom_series(sorted((tmp_path / "dicom").glob("*.dcm"))).header
    for name in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "patient_id",
                 "patient_name", "issuer_of_patient_id", "sex", "size_m", "birth_date", "patient_age",
                 "study_date", "study_time", "accession_number", "modality", "patient_position", "study_id"):
        assert getattr(read, name) == getattr(ph.header, name), name
