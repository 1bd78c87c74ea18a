"""The validator's quick path (struct walk, no pydicom) never says yes where the full checks say no.

Why: ``validate_instance`` answers from :func:`dicomnode.network.validate._quick_ok` when that finds a
plain data set, and only then skips pydicom's reader. Each case here is a real data set written by
pydicom, or one mutated from it (cut short, bytes changed, attributes re-encoded), and the verdict must
be exactly the full checks' one, code and text. The plain data sets must take the quick path, or the
comparison would prove nothing.
"""

from __future__ import annotations

import io
import random
import struct
from copy import deepcopy

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from series_factory import CT_IMAGE, ENHANCED_CT_IMAGE, write_ct_series, write_enhanced_ct

from dicomnode.network.validate import (
    Problem,
    Validation,
    _full_check,
    _Invalid,
    _quick_ok,
    quick_header,
    validate_instance,
)
from dicomnode.storage.store import (
    INFO_TAGS,
    LAST_HEADER_TAG,
    info_from_dataset,
    info_from_values,
    read_header,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, on mutated values


def full_verdict(data: bytes, ts: str, sop_class: str) -> Validation:
    """What validate_instance answered before the quick path existed."""
    try:
        _full_check(data, ts, sop_class)
    except _Invalid as bad:
        return bad.result
    except Exception as exc:
        return Validation(Problem.UNREADABLE, f"check failed: {type(exc).__name__}")
    return Validation()


def encode(ds: Dataset, ts: str) -> bytes:
    """The data set as it goes over the wire in ``ts`` (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, pydicom.uid.UID(ts).is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def with_raw(ds: Dataset, tag: int, vr: str, value: bytes, ts: str) -> bytes:
    """``ds`` with one element's value bytes replaced as they are (no pydicom conversion or check)."""
    copy = deepcopy(ds)
    implicit = ts == ImplicitVRLittleEndian
    copy._dict[Tag(tag)] = RawDataElement(Tag(tag), None if implicit else vr, len(value), value, 0,
                                          implicit, True)
    return encode(copy, ts)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Dataset, str, str]]:
    """(name, dataset, transfer syntax, SOP class) of plain instances the node receives."""
    root = tmp_path_factory.mktemp("validate")
    out = []
    for file_ts, ts in ((ExplicitVRLittleEndian, ExplicitVRLittleEndian),
                        (ExplicitVRLittleEndian, ImplicitVRLittleEndian), (RLELossless, RLELossless)):
        f = write_ct_series(root / ts, name=f"v-{ts}", n=1, size=16, random_pixels=True,
                            transfer_syntax=file_ts).files[0]
        ds = pydicom.dcmread(f)
        out.append((f"ct-{ts}", ds, ts, CT_IMAGE))  # encode() writes it in ``ts``
    enhanced = pydicom.dcmread(write_enhanced_ct(root / "enh.dcm", frames=3).files[0])
    out.append(("enhanced", enhanced, ExplicitVRLittleEndian, ENHANCED_CT_IMAGE))
    with_seq = deepcopy(out[0][1])
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE, "1.2.3.4"
    with_seq.ReferencedImageSequence = Sequence([item])  # written with a defined length
    out.append(("sequence", with_seq, ExplicitVRLittleEndian, CT_IMAGE))
    return out


def check(data: bytes, ts: str, sop_class: str) -> bool:
    """Same verdict both ways; returns whether the quick path answered."""
    got = validate_instance(data, ts, sop_class)
    assert got == full_verdict(data, ts, sop_class)
    return _quick_ok(data, pydicom.uid.UID(ts), sop_class) is not None


def test_plain_instances_take_the_quick_path(bases: list) -> None:
    for name, ds, ts, sop_class in bases:
        data = encode(ds, ts)
        assert validate_instance(data, ts, sop_class).ok, name
        assert check(data, ts, sop_class), name
        assert check(memoryview(bytearray(data)), ts, sop_class), name  # as the SCP passes it
        assert not check(data, ts, ""), name  # the context's SOP class unknown: the full checks


def test_mutated_instances_get_the_full_checks_verdict(bases: list) -> None:
    rng = random.Random(14)
    quick = refused = 0
    for _name, ds, ts, sop_class in bases:
        data = encode(ds, ts)
        cuts = sorted({rng.randrange(len(data)) for _ in range(40)} | {0, 1, 7, 8, 12, len(data) - 1})
        cases = [data[:k] for k in cuts]
        for _ in range(150):  # one byte changed, mostly in the header where the checks look
            at = rng.randrange(min(len(data), 400))
            cases.append(data[:at] + bytes([rng.randrange(256)]) + data[at + 1:])
        cases.append(data + b"\xfc\xff\xfc\xff" + (b"OB\0\0\x02\0\0\0" if ts != ImplicitVRLittleEndian
                                                   else b"\x02\0\0\0") + b"\0\0")  # trailing padding
        cases.append(data + b"\x01")  # one stray byte
        for case in cases:
            quick += check(case, ts, sop_class)
            refused += not validate_instance(case, ts, sop_class).ok
        for wrong_context in ("1.2.840.10008.5.1.4.1.1.4", CT_IMAGE if sop_class != CT_IMAGE else
                              ENHANCED_CT_IMAGE):
            assert not check(data, ts, wrong_context)
    assert refused > 100 and quick > 50, (refused, quick)  # both kinds were really compared


@pytest.mark.parametrize(("tag", "vr", "value"), [
    (0x00080060, "CS", b"MR"), (0x00080060, "CS", b"CT\0"), (0x00080060, "CS", b" CT"),
    (0x00080060, "CS", b""), (0x00080060, "LO", b"CT"), (0x00080016, "UI", CT_IMAGE.encode() + b" "),
    (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.4\0"), (0x00280010, "US", b"\0\0"),
    (0x00280010, "US", b"\x10\0\x10\0"), (0x00280010, "SS", b"\x10\0"), (0x00280010, "US", b"\x11\0"),
    (0x00280100, "US", b"\x0c\0"), (0x00280100, "US", b"\x01\0"), (0x00280008, "IS", b"1 "),
    (0x00280008, "IS", b"0 "), (0x00280008, "IS", b"+1"), (0x00280008, "IS", b"1\\2"),
    (0x00280008, "IS", b""), (0x00280008, "IS", b"2 "), (0x00280002, "US", b"\x03\0"),
])
def test_re_encoded_attributes_get_the_full_checks_verdict(bases: list, tag: int, vr: str,
                                                           value: bytes) -> None:
    for _name, ds, ts, sop_class in bases[:2]:  # explicit and implicit VR
        check(with_raw(ds, tag, vr, value, ts), ts, sop_class)


def test_undefined_length_sequence_is_left_to_the_full_checks(bases: list) -> None:
    _name, ds, ts, sop_class = bases[-1]
    ds = deepcopy(ds)
    ds["ReferencedImageSequence"].is_undefined_length = True
    data = encode(ds, ts)
    assert struct.pack("<L", 0xFFFFFFFF) in data[:600]
    assert not check(data, ts, sop_class) and validate_instance(data, ts, sop_class).ok


def test_quick_header_identifies_as_the_header_reader_does(bases: list) -> None:
    """The identifiers from the quick walk are those of pydicom's reader stopped after SeriesInstanceUID,
    also for an element out of order after it (the reader has stopped by then), and text in Latin-1."""
    for name, ds, ts, sop_class in bases:
        variants = [encode(ds, ts)]
        late = with_raw(ds, 0x00100010, "PN", "Müller^Zoë".encode("latin-1"), ts)
        variants.append(late)
        at = late.find(b"\xe0\x7f\x10\x00")  # an out-of-order PatientID just before the pixel data
        variants.append(late[:at] + struct.pack("<HH", 0x0010, 0x0020) + (
            b"\x04\0\0\0" if ts == ImplicitVRLittleEndian else b"LO\x04\0") + b"LATE" + late[at:])
        for data in variants:
            values = quick_header(data, ts, sop_class, INFO_TAGS, LAST_HEADER_TAG)
            assert values is not None, name
            header = read_header(io.BytesIO(data), ts)
            assert header is not None
            expected = info_from_dataset(header, sop_class, ts, "AE")
            assert info_from_values(values, sop_class, ts, "AE") == expected
        assert info_from_values(values, sop_class, ts).patient_name == "Müller^Zoë"
    assert quick_header(b"\x08\x00", ExplicitVRLittleEndian, CT_IMAGE, INFO_TAGS, LAST_HEADER_TAG) is None
