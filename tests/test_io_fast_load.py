"""seg.io reads native little-endian pixels itself: the result must be pydicom's, bit for bit.

The peer is pydicom's own ``pixel_array`` on the same files, with the HU rule the loader documents
(int16 when the rescale is exact and fits, float32 otherwise). Small generated series cover the pixel
types a CT can carry, both native syntaxes, a compressed syntax (pydicom decodes it), head- and
feet-first slices in shuffled file order, and the loader's geometry errors.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from seg.io import SeriesGeometryError, _series_header, load_dicom_series
from seg.native_dicom import native_frame, read_header

ROWS, COLS = 7, 5  # odd: an 8-bit slice has an odd length and a pad byte


def _slice(k: int, raw: np.ndarray, *, series: str, allocated: int, stored: int, signed: int,
           slope: str, intercept: str, position: str, ts: str) -> Dataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.PatientID = "FAST1"
    ds.PatientName = "Fast^Load"
    ds.PatientPosition = position
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 3
    ds.InstanceNumber = k + 1
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    z = -2.5 * k if position.startswith("H") else 2.5 * k  # head first: instances run towards the feet
    ds.ImagePositionPatient = ["-10", "-20.5", f"{z:g}"]
    ds.PixelSpacing = ["0.75", "0.8"]
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if ts == RLELossless:
        ds.compress(RLELossless, raw, encoding_plugin="pydicom")
    else:
        ds.PixelData = raw.astype(raw.dtype.newbyteorder(">" if ts == ExplicitVRBigEndian else "<")).tobytes()
    return ds


def _series(folder: Path, raws: list[np.ndarray], *, allocated: int = 16, stored: int = 16, signed: int = 1,
            slopes: list[str] | None = None, intercepts: list[str] | None = None, position: str = "HFS",
            ts: str = ExplicitVRLittleEndian, seed: int = 0) -> list[Path]:
    """Write one slice per raw array (stored values as they go on disk); the files in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    files = []
    for k, raw in enumerate(raws):
        ds = _slice(k, raw, series=series, allocated=allocated, stored=stored, signed=signed,
                    slope=(slopes or ["1"] * len(raws))[k], intercept=(intercepts or ["0"] * len(raws))[k],
                    position=position, ts=ts)
        f = folder / f"IM{k:03d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    random.Random(seed).shuffle(files)
    return files


def _reference(files: list[Path]) -> tuple[np.ndarray, list[Path]]:
    """pydicom's pixel_array per slice, ordered along the slice normal, in HU by the loader's rule."""
    dss = sorted(((pydicom.dcmread(f), f) for f in files),
                 key=lambda p: float(p[0].ImagePositionPatient[2]))  # the normal is +z here
    px = [ds.pixel_array for ds, _ in dss]
    slopes = [float(ds.RescaleSlope) for ds, _ in dss]
    inters = [float(ds.RescaleIntercept) for ds, _ in dss]
    exact = all(s == 1.0 for s in slopes) and all(i.is_integer() for i in inters)
    hu = [p.astype(np.int64) + int(i) for p, i in zip(px, inters, strict=True)] if exact else None
    if hu is not None and all(h.min() >= -32768 and h.max() <= 32767 for h in hu):
        vol = np.stack([h.T for h in hu], axis=2).astype(np.int16)
    else:
        vol = np.stack([p.T.astype(np.float32) * np.float32(s) + np.float32(i)
                        for p, s, i in zip(px, slopes, inters, strict=True)], axis=2)
    return vol, [f for _, f in dss]


def native_pixels(ds: Dataset) -> np.ndarray | None:
    frame = native_frame(ds)
    return None if frame is None else frame.pixels()


def _assert_same_as_pydicom(files: list[Path], dtype: type, fast: bool = True, walk: bool = True) -> None:
    """The loader equals the pydicom reference; with ``fast`` every slice's pixels are read natively,
    from pydicom's header and from the walked one (every file walked unless ``walk`` is False)."""
    vol = load_dicom_series(files)
    want, order = _reference(files)
    assert vol.array.dtype == want.dtype == dtype
    assert vol.array.flags.c_contiguous
    assert np.array_equal(vol.array, want)
    assert vol.source_files == order
    assert vol.source_sop_uids == [str(pydicom.dcmread(f).SOPInstanceUID) for f in order]
    for f in files:  # the fast reader took (or left to pydicom) every slice, and agrees with it
        ds = pydicom.dcmread(f)
        walked = read_header(f.read_bytes(), _wanted())
        assert walked is not None or not walk
        for header in (ds, walked) if walked is not None else (ds,):
            px = native_pixels(header)
            if fast:
                assert px is not None and px.dtype == ds.pixel_array.dtype
                assert np.array_equal(px, ds.pixel_array)
            else:
                assert px is None


def _raws(dtype: str, lo: int, hi: int, n: int = 5, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, (ROWS, COLS), endpoint=True).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_int16_signed(tmp_path: Path, ts: str) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000), intercepts=["0", "-3", "7", "0", "12"], ts=ts)
    _assert_same_as_pydicom(files, np.int16)


def test_uint16_unsigned_with_intercept(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("<u2", 0, 4095), signed=0, intercepts=["-1024"] * 5)
    _assert_same_as_pydicom(files, np.int16)


def test_uint16_beyond_int16_turns_float32_at_that_slice(tmp_path: Path) -> None:
    raws = _raws("<u2", 0, 4095)
    raws[2][0, 0] = 65535  # 65535 - 1024 does not fit int16: from this slice on the loader is float32
    files = _series(tmp_path, raws, signed=0, intercepts=["-1024"] * 5)
    _assert_same_as_pydicom(files, np.float32)


@pytest.mark.parametrize("signed", [0, 1])
def test_bits_stored_12_of_16_drops_the_unused_bits(tmp_path: Path, signed: int) -> None:
    # Garbage in the top 4 bits: pydicom masks it off (unsigned) or sign-extends bit 11 (signed).
    files = _series(tmp_path, _raws("<u2", 0, 65535), stored=12, signed=signed, intercepts=["-1024"] * 5)
    _assert_same_as_pydicom(files, np.int16)
    low = int(load_dicom_series(files).array.min())
    assert (low < -1024) if signed else (low >= -1024)  # sign-extended values go below the intercept


@pytest.mark.parametrize(("signed", "dtype"), [(0, "u1"), (1, "i1")])
def test_8_bit(tmp_path: Path, signed: int, dtype: str) -> None:
    files = _series(tmp_path, _raws(dtype, -128 * signed, 255 - 128 * signed), allocated=8, stored=8,
                    signed=signed, intercepts=["-100"] * 5, ts=ImplicitVRLittleEndian)
    _assert_same_as_pydicom(files, np.int16)


def test_8_bit_stored_6_sign_extended(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("u1", 0, 255), allocated=8, stored=6, signed=1)
    _assert_same_as_pydicom(files, np.int16)


def test_slope_not_one_gives_float32(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000), slopes=["0.5", "0.5", "2.5", "0.5", "1"],
                    intercepts=["-1000.25", "-1000.25", "3", "-1000.25", "0"])
    _assert_same_as_pydicom(files, np.float32)


def test_inexact_slopes_and_intercepts_round_as_float32(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("<i2", -32768, 32767), slopes=["0.1234567", "0.3333333", "2.718281828",
                                                                   "1E-7", "1"],
                    intercepts=["-1000.1", "-1024.7", "0.3", "12345.678", "-0.5"])
    _assert_same_as_pydicom(files, np.float32)


def test_huge_integer_intercept_takes_the_slice_loop(tmp_path: Path) -> None:
    # 1e9 fits int32 but not int16: the loop's float32 switch, with the loop's int32 sums.
    files = _series(tmp_path, _raws("<i2", -100, 100), intercepts=["1000000000"] * 5)
    _assert_same_as_pydicom(files, np.float32)


def test_fractional_intercept_gives_float32(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("<u2", 0, 4095), signed=0, intercepts=["-1024.5"] * 5,
                    ts=ImplicitVRLittleEndian)
    _assert_same_as_pydicom(files, np.float32)


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_compressed_series_is_left_to_pydicom(tmp_path: Path, position: str) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000), intercepts=["-1024"] * 5, position=position,
                    ts=RLELossless)
    _assert_same_as_pydicom(files, np.int16, fast=False, walk=False)


def test_one_compressed_slice_among_native_ones(tmp_path: Path) -> None:
    raws = _raws("<i2", -2000, 3000)
    files = _series(tmp_path / "a", raws, intercepts=["-1024"] * 5, position="FFS")
    rle = _series(tmp_path / "b", raws, intercepts=["-1024"] * 5, position="FFS", ts=RLELossless)
    # IM004 (the last slice along the normal) compressed; its series UID made the others'.
    mixed = sorted(files)[:4] + sorted(rle)[4:]
    for f in mixed[4:]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = pydicom.dcmread(mixed[0]).SeriesInstanceUID
        ds.save_as(f, enforce_file_format=True)
    vol = load_dicom_series(mixed)
    want, order = _reference(mixed)
    assert vol.array.dtype == want.dtype == np.int16 and np.array_equal(vol.array, want)
    assert vol.source_files == order


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_positions_order_affine_and_meta(tmp_path: Path, position: str) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000), position=position, seed=5)
    _assert_same_as_pydicom(files, np.int16)
    vol = load_dicom_series(files)
    assert np.allclose(np.diag(vol.affine)[:3], [0.8, 0.75, 2.5])
    z0 = -10.0 if position == "HFS" else 0.0
    assert np.allclose(vol.affine[:3, 3], [-10, -20.5, z0])
    assert vol.header.patient_position == position
    assert vol.header.series_number == 3 and vol.header.patient_name == "Fast^Load"


def test_big_endian_and_excess_padding_go_through_pydicom(tmp_path: Path) -> None:
    ds = _slice(0, _raws("<i2", -2000, 3000, n=1)[0], series="1.2.9", allocated=16, stored=16, signed=1,
                slope="1", intercept="0", position="HFS", ts=ExplicitVRLittleEndian)
    assert native_pixels(ds) is not None
    padded = ds.PixelData + b"\0\0"
    ds.PixelData = padded
    assert native_pixels(ds) is None  # pydicom warns about the excess and strips it
    ds.PixelData = padded[:-2]
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert native_pixels(ds) is None
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated = ds.BitsStored = 32
    assert native_pixels(ds) is None


def _files_with(tmp_path: Path, change, n: int = 4) -> list[Path]:
    files = sorted(_series(tmp_path, _raws("<i2", -100, 100, n=n)))
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if change(i, ds) is not False:
            ds.save_as(f, enforce_file_format=True)
    return files


def _set(kw: str, value, at: int = 2):
    def change(i: int, ds: Dataset):
        if i != at:
            return False
        setattr(ds, kw, value)
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set("SeriesInstanceUID", "1.2.3.999"), "files belong to 2 series"),
    (_set("NumberOfFrames", 2), "multi-frame images \\(Enhanced CT\\) are not measured"),
    (_set("ImageOrientationPatient", ["1", "0", "0", "0", "0.99", "0.1"]), "inconsistent image orientation"),
    (_set("PixelSpacing", ["0.75", "0.9"]), "inconsistent pixel spacing"),
    (_set("ImagePositionPatient", ["-10", "-20.5", "-2.5"]), "duplicate slice position"),
    (_set("ImagePositionPatient", ["-10", "-20.5", "-6"]), "irregular slice spacing"),
])
def test_geometry_errors(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(SeriesGeometryError, match=message):
        load_dicom_series(_files_with(tmp_path, change))


def test_size_differs_and_no_images(tmp_path: Path) -> None:
    files = sorted(_series(tmp_path / "a", _raws("<i2", -100, 100, n=3)))
    other = _series(tmp_path / "b", [np.zeros((ROWS + 1, COLS), "<i2")])[0]
    ds = pydicom.dcmread(other)
    ds.SeriesInstanceUID = pydicom.dcmread(files[0]).SeriesInstanceUID
    ds.ImagePositionPatient = ["-10", "-20.5", "-7.5"]
    ds.save_as(other, enforce_file_format=True)
    with pytest.raises(SeriesGeometryError, match="inconsistent matrix"):
        load_dicom_series([*files, other])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("not DICOM")
    with pytest.raises(SeriesGeometryError, match="no DICOM images"):
        load_dicom_series(tmp_path / "c")


# The header walk: what it keeps is what pydicom reads, and what it cannot follow is left to pydicom.

def _wanted() -> frozenset[int]:
    from seg.io import _header_tags

    return _header_tags()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_walk_equals_pydicom(tmp_path: Path, ts: str) -> None:
    f = sorted(_series(tmp_path, _raws("<u2", 0, 65535, n=1), stored=12, signed=0, slopes=["1"],
                       intercepts=["-1024"], ts=ts))[0]
    ds = pydicom.dcmread(f)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"
    ds.PatientSize = "1.72"
    ds.ReferencedImageSequence = [Dataset()]  # a defined-length sequence is stepped over
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    ds.save_as(f, enforce_file_format=True)
    fast = read_header(f.read_bytes(), _wanted())
    assert fast is not None and "ReferencedImageSequence" not in fast
    ref = pydicom.dcmread(f)
    kept = [t for t in _wanted() if t in ref]
    assert sorted(int(t) for t in fast.keys()) == sorted([*kept, 0x00080005])
    for tag in kept:
        if tag != 0x7FE00010:
            assert fast[tag].value == ref[tag].value, hex(tag)
    assert str(fast.PatientName) == "Müller^Jörg"
    assert bytes(fast.get_item(0x7FE00010).value) == ref.PixelData
    px = native_pixels(fast)
    assert px is not None and px.dtype == ref.pixel_array.dtype and np.array_equal(px, ref.pixel_array)
    vol = load_dicom_series([f])
    assert vol.header == _series_header(ref)
    assert vol.header.patient_name == "Müller^Jörg" and vol.header.size_m == 1.72


def _nested_sequences(ds: Dataset, undefined_items: bool) -> None:
    """Undefined-length sequences (as many scanners write them) holding items of both kinds, one with
    a nested undefined-length sequence, and a defined-length sequence after them."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-12345", "SRT", "Thigh"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = [inner]
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = undefined_items
    empty = Dataset()
    empty.is_undefined_length_sequence_item = undefined_items
    ds.SourceImageSequence = [item, empty]
    ds["SourceImageSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = [inner]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined_items", [False, True])
def test_undefined_length_sequences_are_stepped_over(tmp_path: Path, ts: str, undefined_items: bool) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000, n=3), intercepts=["-1024"] * 3, ts=ts)
    for f in files:
        ds = pydicom.dcmread(f)
        _nested_sequences(ds, undefined_items)
        ds.save_as(f, enforce_file_format=True)
    data = files[0].read_bytes()
    assert b"\xfe\xff\xdd\xe0" in data and (b"\xfe\xff\x0d\xe0" in data) == undefined_items
    fast = read_header(data, _wanted())
    ref = pydicom.dcmread(files[0])
    assert fast is not None and fast.SOPInstanceUID == ref.SOPInstanceUID and fast.Rows == ref.Rows
    assert len(ref.SourceImageSequence) == 2  # the file holds what this test means it to
    _assert_same_as_pydicom(files, np.int16)
    # A sequence whose delimiter is missing is not followed: pydicom reads that file.
    broken = data.replace(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xfe\xff\x00\xe0\x00\x00\x00\x00", 1)
    assert read_header(broken, _wanted()) is None


@pytest.mark.parametrize("case", ["undefined-length-text", "big-endian", "rle", "no-preamble", "truncated"])
def test_files_the_walk_cannot_follow_are_read_by_pydicom(tmp_path: Path, case: str) -> None:
    ts = {"big-endian": ExplicitVRBigEndian, "rle": RLELossless}.get(case, ExplicitVRLittleEndian)
    files = _series(tmp_path, _raws("<i2", -2000, 3000, n=3), intercepts=["-1024"] * 3, ts=ts)
    f = sorted(files)[1]
    if case == "undefined-length-text":  # an undefined length pydicom scans for: not a sequence
        data = f.read_bytes()
        at = data.index(b"\x08\x00\x60\x00CS")  # Modality, "CT": becomes an undefined-length UT
        undefined_ut = b"\x08\x00\x60\x00UT\x00\x00\xff\xff\xff\xffCT\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        data = data[:at] + undefined_ut + data[at + 10:]
        f.write_bytes(data)
    elif case == "no-preamble":
        ds = pydicom.dcmread(f)
        ds.preamble = None
        ds.save_as(f)
    elif case == "truncated":
        f.write_bytes(f.read_bytes()[:-10])
    assert read_header(f.read_bytes(), _wanted()) is None
    if case == "truncated":  # pydicom reads it and its decoder refuses the short Pixel Data, as before
        with pytest.raises(ValueError, match="number of bytes of pixel data is less than expected"):
            load_dicom_series(files)
        return
    if case == "no-preamble":  # not a Part 10 file: read as the bare data set it is (it was skipped)
        assert len(load_dicom_series(files).source_files) == 3
        return
    _assert_same_as_pydicom(files, np.int16, fast=case == "undefined-length-text", walk=False)


def test_a_file_without_pixel_data_is_skipped(tmp_path: Path) -> None:
    files = _series(tmp_path, _raws("<i2", -2000, 3000, n=3))
    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    extra = tmp_path / "nopixels.dcm"
    ds.save_as(extra, enforce_file_format=True)
    assert load_dicom_series([*files, extra]).source_files == load_dicom_series(files).source_files


def test_files_as_the_node_stores_them_take_the_fast_path(tmp_path: Path) -> None:
    """Preamble + the store's hand-encoded file meta + the data set bytes as received (here Implicit
    VR Little Endian, as a PACS may negotiate)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomnode.storage.store import InstanceInfo, encode_file_meta

    files = _series(tmp_path / "src", _raws("<u2", 0, 65535), stored=12, signed=0, intercepts=["-1024"] * 5)
    stored = []
    for f in files:
        ds = pydicom.dcmread(f)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, ds)
        info = InstanceInfo(sop_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
                            transfer_syntax=ImplicitVRLittleEndian, study_uid=str(ds.StudyInstanceUID),
                            series_uid=str(ds.SeriesInstanceUID))
        out = tmp_path / "node" / f"{ds.SOPInstanceUID}.dcm"
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(info) + buf.getvalue())
        stored.append(out)
    assert all(read_header(f.read_bytes(), _wanted()) is not None for f in stored)
    _assert_same_as_pydicom(stored, np.int16)
