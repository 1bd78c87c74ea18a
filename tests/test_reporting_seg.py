"""DICOM-SEG: validated by dciodvfy, read back by highdicom and dcmqi voxel for voxel, stable UIDs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from reporting import codes, rle_encoder
from reporting.rules import RULES, ReportingRules
from reporting.seg import build_seg_frames, plan_segments
from reporting.uids import parse_tracking_label
from seg.labels import by_name, structures
from seg.measure import measure_volumes
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import ModelInfo, VolumeQA, VolumeRecord
from seg.volume import Volume

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
MODEL = ModelInfo(name="unetr-test", version="9.9", demo=True)


def phantom_case(root: Path, seed: int = 3, **kw) -> tuple[Volume, Volume, VolumeRecord]:
    """A small phantom written as DICOM and read back: (ct, labels on the ct grid, volumes record)."""
    from seg.io import load_dicom_series

    opts = PhantomOptions(seed=seed, spacing_mm=(4.0, 4.0, 10.0), z_range_mm=(-60.0, 60.0), **kw)
    ph = make_phantom(opts)
    write_phantom(ph, root)
    ct = load_dicom_series(root / "dicom")
    from seg.io import load_nifti

    lab = load_nifti(root / "truth" / "labels.nii.gz")
    assert np.allclose(lab.affine, ct.affine)
    labels = ct.with_array(np.asarray(lab.array, dtype=np.uint8))
    return ct, labels, measure_volumes(labels, ct, model=MODEL)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([str(VENV_BIN / "dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_phantom")
    ct, labels, vols = phantom_case(root)
    return root, ct, labels, vols


@pytest.fixture(scope="module", params=[("BINARY", "RLE"), ("FRACTIONAL", "RLE"), ("LABELMAP", "RLE"),
                                       ("LABELMAP", "JPEGLS")],
                ids=["binary", "fractional", "labelmap-rle", "labelmap-jpegls"])
def seg_file(request, case):
    root, ct, labels, vols = case
    seg_type, compression = request.param
    ds = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type, compression=compression).dataset
    path = root / f"seg-{seg_type}-{compression}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_dciodvfy_reports_no_error(seg_file):
    path, _ = seg_file
    assert dciodvfy_errors(path) == []


def test_highdicom_round_trip_equals_label_map(seg_file, case):
    path, _ = seg_file
    _, ct, labels, vols = case
    seg = hd.seg.segread(path)
    numbers = [int(n) for n in seg.segment_numbers if int(n) > 0]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=ct.source_sop_uids,
                                           segment_numbers=numbers, combine_segments=True, relabel=False)
    got = np.transpose(np.asarray(px), (2, 1, 0))  # (frames, rows, cols) -> (i, j, k)
    _, seg_map = plan_segments(labels, vols, ct)
    expected = np.where(seg_map.transpose(2, 1, 0) > 0, labels.array, 0)  # specks below the minimum: none
    lut = np.zeros(max(numbers) + 1, dtype=np.uint8)
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        code = item.SegmentedPropertyTypeCodeSequence[0]
        match = [s.label for s in structures()
                 if s.value == code.CodeValue and s.scheme == code.CodingSchemeDesignator]
        assert len(match) == 1
        lut[int(item.SegmentNumber)] = match[0]
    assert np.array_equal(lut[got], expected)


def test_sides_match_volumes_json(case):
    _, ct, labels, vols = case
    segments, seg_map = plan_segments(labels, vols, ct)
    counts = np.bincount(seg_map.ravel(), minlength=len(segments) + 1)
    by_label = vols.by_label()
    vox = labels.voxel_volume_cm3
    assert {s.side for s in segments} == {"left", "right"}
    for s in segments:
        expected = by_label[s.label].side_volume(s.side)
        assert round(counts[s.number] * vox, 4) == pytest.approx(expected, abs=1e-3)


def test_segment_attributes_and_geometry(seg_file, case):
    _, ds = seg_file
    _, ct, labels, _ = case
    assert ds.StudyInstanceUID == ct.header.study_instance_uid
    assert ds.FrameOfReferenceUID == ct.header.frame_of_reference_uid
    assert ds.SeriesInstanceUID != ct.header.series_instance_uid
    assert ds.PatientID == ct.header.patient_id
    schemes = {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME in schemes
    for item in ds.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        mod = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        assert mod.CodeValue == ("7771000" if item.SegmentLabel.endswith("left") else "24028007")
        assert "DEMO" in item.SegmentAlgorithmName
        assert len(item.RecommendedDisplayCIELabValue) == 3
    # a viewer's series list shows about 20 characters: DEMO must come first to be seen
    assert ds.SeriesDescription.startswith("DEMO ") and "DEMO" in ds.ContentDescription
    # every frame references its source slice; empty frames are omitted
    if ds.SegmentationType == "BINARY":
        n_expected = sum(int(np.count_nonzero(np.any(labels.array == s.label, axis=(0, 1))))
                         for s in structures()[1:]) * 2
        assert ds.NumberOfFrames <= n_expected
    for fg in ds.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in ct.source_sop_uids


def test_dcmqi_reads_identical_voxel_counts(seg_file, case, tmp_path):
    path, ds = seg_file
    if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80":
        pytest.skip("dcmqi 1.5.7 (dcmtk dcmseg) refuses JPEG-LS Lossless as 'lossy'; "
                    "RLE and uncompressed are checked")
    _, ct, labels, vols = case
    _, seg_map = plan_segments(labels, vols, ct)
    expected = np.bincount(seg_map.ravel())
    cmd = [str(VENV_BIN / "segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory", str(tmp_path),
           "--outputType", "nifti"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    got = np.zeros_like(expected)
    if ds.SegmentationType == "LABELMAP":
        arr = np.asarray(nib.load(tmp_path / "1.nii.gz").dataobj)
        got = np.bincount(arr.astype(np.int64).ravel(), minlength=len(expected))[: len(expected)]
    else:
        assert len(meta["segmentAttributes"]) == len(expected) - 1
        for f in tmp_path.glob("*.nii.gz"):
            n = int(f.name.split(".")[0])
            got[n] = int(np.count_nonzero(np.asarray(nib.load(f).dataobj)))
    assert np.array_equal(got[1:], expected[1:])


def test_rerun_gives_identical_uids(case):
    _, ct, labels, vols = case
    a = build_seg_frames(ct, labels, vols, MODEL).dataset
    b = build_seg_frames(ct, labels, vols, MODEL).dataset
    c = build_seg_frames(ct, labels, vols, MODEL.model_copy(update={"version": "10.0"})).dataset
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [i.TrackingUID for i in a.SegmentSequence] == [i.TrackingUID for i in b.SegmentSequence]
    assert c.SOPInstanceUID != a.SOPInstanceUID
    assert len(a.SOPInstanceUID) <= 64


def test_nifti_input_without_sources_is_refused(case):
    _, ct, labels, vols = case
    bare = Volume(ct.array, ct.affine, ct.header)
    with pytest.raises(ValueError, match="source"):
        build_seg_frames(bare, labels, vols, MODEL)


def _fixed_time(ds: pydicom.Dataset) -> None:
    """The build time highdicom stamps (top level and contributing equipment) set to one value."""
    fixed = {"DA": "20260101", "TM": "000000", "DT": "20260101000000"}
    for item in (ds, *ds.get("ContributingEquipmentSequence", [])):
        for elem in item:
            if elem.VR in fixed:
                elem.value = fixed[elem.VR]


@pytest.mark.parametrize(("seg_type", "fov", "frame_bytes", "row_bytes"),
                         [("BINARY", None, False, False), ("BINARY", (452.0, 288.0), True, False),
                          ("BINARY", (448.0, 288.0), True, True), ("FRACTIONAL", None, False, False)],
                         ids=["binary-unaligned-frames", "binary-byte-aligned-frames",
                              "binary-byte-aligned-rows", "fractional"])
def test_fast_encoder_equals_highdicom(seg_type, fov, frame_bytes, row_bytes, tmp_path, caplog):
    """The byte splice must write exactly highdicom's file: every element, frames and pixel data."""
    ct, labels, vols = phantom_case(tmp_path, seed=4, **({"fov_mm": fov} if fov else {}))
    columns = ct.shape[0]  # frames are (rows, columns) = (j, i)
    assert ((columns * ct.shape[1]) % 8 == 0, columns % 8 == 0) == (frame_bytes, row_bytes)
    with caplog.at_level("WARNING", logger="reporting.seg"):
        fast = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type).dataset
    assert "not applicable" not in caplog.text
    assert isinstance(fast.get_item(0x52009230), pydicom.dataelem.RawDataElement)  # the splice ran
    slow = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type, fast=False).dataset
    for name, ds in (("slow", slow), ("fast", fast)):
        _fixed_time(ds)
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "slow.dcm").read_bytes()
    assert dciodvfy_errors(tmp_path / "fast.dcm") == []


def test_split_without_recorded_midline_recomputes_the_same_plane(case):
    _, ct, labels, vols = case
    a_segments, a_map = plan_segments(labels, vols, ct)
    b_segments, b_map = plan_segments(labels, vols.model_copy(update={"qa": VolumeQA()}), ct)
    qa = vols.qa.model_copy(update={"midline_x_mm": vols.qa.midline_x_mm + 40.0})
    moved = vols.model_copy(update={"qa": qa})
    c_segments, c_map = plan_segments(labels, moved, ct)  # wrong recorded plane: detected, recomputed
    assert a_segments == b_segments == c_segments
    assert np.array_equal(a_map, b_map) and np.array_equal(a_map, c_map)


@pytest.mark.parametrize("order", ["C", "F"])
def test_frame_layout_of_either_memory_order(order: str) -> None:
    from reporting.seg import _frame_layout

    a = np.asarray(np.random.default_rng(1).integers(0, 30, (13, 7, 5)), dtype=np.int16, order=order)
    got = _frame_layout(a)
    assert got.dtype == np.uint8 and got.flags.c_contiguous and not np.shares_memory(got, a)
    assert np.array_equal(got, a.transpose(2, 1, 0))


def with_speck(labels: Volume, label: int) -> Volume:
    """The label map with one voxel of ``label`` put on the patient's far left (+x), inside the
    gluteus maximus: a one-voxel "structure" as a model produces it at the edge of a muscle."""
    arr = np.array(labels.array, copy=True)
    ii, jj, kk = np.nonzero(arr == by_name("gluteus_maximus").label)
    x = labels.affine[0, :3] @ np.stack([ii, jj, kk]) + labels.affine[0, 3]
    n = int(np.argmax(x))
    arr[ii[n], jj[n], kk[n]] = label
    return labels.with_array(arr)


def test_one_voxel_structure_gets_no_segment(case):
    """Below the minimum segment size a structure side is "not found": no segment, its voxel is
    background in the SEG; with the minimum set to 0 the same voxel is a segment."""
    _, ct, labels, _ = case
    speck = by_name("semimembranosus")
    lab = with_speck(labels, speck.label)
    vols = measure_volumes(lab, ct, model=MODEL)
    entry = vols.by_label()[speck.label]
    assert entry.voxels == 1 and 0 < entry.left_cm3 < RULES.min_segment_cm3
    ds = build_seg_frames(ct, lab, vols, MODEL).dataset
    assert not [i for i in ds.SegmentSequence if str(i.TrackingID).startswith(speck.display_name)]
    segments, seg_map = plan_segments(lab, vols, ct)
    assert speck.label not in {s.label for s in segments}
    assert np.count_nonzero(seg_map) == np.count_nonzero(lab.array) - 1  # only the speck is dropped
    kept = build_seg_frames(ct, lab, vols, MODEL, rules=ReportingRules(min_segment_cm3=0.0)).dataset
    assert [str(i.TrackingID) for i in kept.SegmentSequence
            if str(i.TrackingID).startswith(speck.display_name)] == [f"{speck.display_name} left"]


def test_display_colours_come_from_structures_csv(seg_file):
    """Each segment's RecommendedDisplayCIELabValue is its structure's colour in structures.csv."""
    _, ds = seg_file
    for item in ds.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        s = by_name(parse_tracking_label(str(item.TrackingID))[0])
        assert list(item.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*s.rgb).value)


def test_fast_encoder_is_checked_against_the_installed_highdicom():
    """Fails loudly on a highdicom the byte splice was not checked against (the node would silently take
    the slow path): run test_fast_encoder_equals_highdicom with it, then widen the pin."""
    from reporting.seg_splice import SPLICE_HIGHDICOM, splice_supported

    assert splice_supported(), f"highdicom {hd.__version__} not in {SPLICE_HIGHDICOM}"
    assert not splice_supported("0.29.0") and not splice_supported("1.0.0")


@pytest.mark.parametrize("seg_type", ["BINARY", "FRACTIONAL"])
def test_unchecked_highdicom_falls_back_to_plain_highdicom(seg_type, case, monkeypatch, caplog):
    """On a highdicom outside SPLICE_HIGHDICOM the splice is never entered and the SEG is plain
    highdicom's, byte for byte."""
    from reporting import seg_splice

    _, ct, labels, vols = case
    plain = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type, fast=False).dataset
    monkeypatch.setattr(hd, "__version__", "0.99.0")

    def splice(*args, **kwargs):
        raise AssertionError("fast path used on an unchecked highdicom")

    monkeypatch.setattr(seg_splice, "splice", splice)
    with caplog.at_level("INFO", logger="reporting.seg"):
        fallback = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type).dataset
    assert "not checked against highdicom 0.99.0" in caplog.text
    assert fallback.PixelData == plain.PixelData and fallback.NumberOfFrames == plain.NumberOfFrames
    assert fallback.PerFrameFunctionalGroupsSequence == plain.PerFrameFunctionalGroupsSequence


def _rle_frames(shape: tuple[int, int], seed: int) -> list[np.ndarray]:
    """8-bit frames covering the encoder's cases: empty rows, sparse 0/255 blobs, constant nonzero
    rows, runs longer than 128, literal runs, labelmap-like values."""
    rng = np.random.default_rng(seed)
    empty = np.zeros(shape, dtype=np.uint8)
    blob = empty.copy()
    blob[shape[0] // 3:shape[0] // 2, 2:shape[1] - 3] = 255
    constant = np.full(shape, 7, dtype=np.uint8)
    noisy = rng.integers(0, 256, shape, dtype=np.uint8)
    sparse = np.where(rng.random(shape) < 0.02, rng.integers(1, 60, shape), 0).astype(np.uint8)
    return [empty, blob, constant, noisy, sparse]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 315), (40, 300), (5, 513)])
def test_rle_encoder_writes_pylibjpeg_rle_bytes(shape):
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import RLELossless

    encoder = get_encoder(RLELossless)
    kw = dict(rows=shape[0], columns=shape[1], samples_per_pixel=1, number_of_frames=1, bits_allocated=8,
              bits_stored=8, photometric_interpretation="MONOCHROME2", pixel_representation=0)
    for frame in _rle_frames(shape, seed=sum(shape)):
        ours = encoder.encode(frame, encoding_plugin=rle_encoder.PLUGIN, **kw)
        assert ours == encoder.encode(frame, encoding_plugin="pylibjpeg", **kw)
    wide = np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape)  # not 8-bit: handed on
    kw16 = {**kw, "bits_allocated": 16, "bits_stored": 16}
    assert (encoder.encode(wide, encoding_plugin=rle_encoder.PLUGIN, **kw16)
            == encoder.encode(wide, encoding_plugin="pylibjpeg", **kw16))


def test_fractional_seg_uses_the_rle_encoder_and_decodes_to_its_frames(case):
    from pydicom.encaps import generate_frames
    from rle.utils import encode_pixel_data

    _, ct, labels, vols = case
    assert rle_encoder.first_plugin() == rle_encoder.PLUGIN  # what highdicom's encoder call gets
    ds = build_seg_frames(ct, labels, vols, MODEL, seg_type="FRACTIONAL").dataset
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)  # pydicom's decoder
    assert set(np.unique(pixels)) == {0, 255}
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    for frame, encoded in zip(pixels, frames, strict=True):
        assert encoded == encode_pixel_data(frame.tobytes(), rows=ds.Rows, columns=ds.Columns,
                                             samples_per_pixel=1, bits_allocated=8)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 315), (40, 300), (5, 513)])
def test_rle_box_encoder_equals_whole_frame_encoder(shape):
    """encode_masks (box rows only) writes the bytes encode_8bit writes for the whole 0/255 frame."""
    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    top, left = rows // 3, cols // 4
    height, width = max(1, rows - top - rows // 5), max(1, cols - left - cols // 6)
    masks = rng.random((4, height, width)) < 0.3
    masks[1] = False  # an empty frame
    masks[2, :, :] = True  # full box: runs over 128 on wide rows
    frames = rle_encoder.encode_masks(masks, (top, left), shape, 255)
    for mask, encoded in zip(masks, frames, strict=True):
        whole = np.zeros(shape, dtype=np.uint8)
        whole[top:top + height, left:left + width] = mask * np.uint8(255)
        assert encoded == rle_encoder.encode_8bit(whole)
    with pytest.raises(ValueError, match="outside"):
        rle_encoder.encode_masks(masks, (rows, left), shape, 255)
