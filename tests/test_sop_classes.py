"""SOP classes are compared exactly: NM Image Storage (…1.1.20) starts with CT Image Storage's UID
(…1.1.2) and VL classes (…1.1.77.…) with Secondary Capture's (…1.1.7), so a prefix test mistakes them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    LabelMapSegmentationStorage,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
    VLPhotographicImageStorage,
)

from dicomnode.commands.demo import Received, _kind
from dicomnode.network.scp import STORAGE_CLASSES
from dicomnode.network.sop import is_ct, output_kind
from dicomnode.network.validate import MODALITY_OF_CLASS

REPO = Path(__file__).resolve().parents[1]
PREFIX_MATCH = re.compile(r"""startswith\(\s*(["']1\.2\.840\.10008|[A-Z_]*_PREFIX\b)""")


def test_nm_image_storage_is_not_ct() -> None:
    assert NuclearMedicineImageStorage.startswith(CTImageStorage)  # the trap this module is about
    assert not is_ct(NuclearMedicineImageStorage)
    assert NuclearMedicineImageStorage not in STORAGE_CLASSES  # the SCP does not negotiate it
    assert NuclearMedicineImageStorage not in MODALITY_OF_CLASS
    assert output_kind(NuclearMedicineImageStorage) == "other"
    assert is_ct(CTImageStorage) and is_ct(EnhancedCTImageStorage)


@pytest.mark.parametrize(("sop_class", "kind"), [
    (LabelMapSegmentationStorage, "SEG"),
    (Comprehensive3DSRStorage, "SR"),
    (SecondaryCaptureImageStorage, "summary"),
    (VLPhotographicImageStorage, "other"),  # …1.1.77.1.4 starts with Secondary Capture's …1.1.7
    (NuclearMedicineImageStorage, "other"),
])
def test_demo_sorts_pacs_objects_by_exact_class(sop_class: str, kind: str) -> None:
    assert _kind(Received("1.2.3", sop_class, "1.2.3.4", "")) == kind


def test_no_uid_is_matched_by_prefix_anywhere() -> None:
    offenders = [f"{path.relative_to(REPO)}:{n}"
                 for folder in ("dicomnode", "reporting", "seg", "benchmarks", "tests")
                 for path in sorted((REPO / folder).rglob("*.py")) if path != Path(__file__).resolve()
                 for n, line in enumerate(path.read_text().splitlines(), 1) if PREFIX_MATCH.search(line)]
    assert offenders == []


def test_jpeg_extended_is_offered_only_with_a_decoder_for_12_bit_ct(monkeypatch) -> None:
    """Pillow alone decodes JPEG Extended at 8 bits: 12-bit CT in it was stored, then failed in every
    attempt; the PACS must be made to send another syntax instead."""
    from pydicom.pixels.decoders.base import get_decoder

    from dicomnode.network import scp

    extended = "1.2.840.10008.1.2.4.51"
    plugins = set(get_decoder(extended).available_plugins)
    assert (extended in scp.transfer_syntaxes()) == bool(plugins - {"pillow"})
    monkeypatch.setattr(scp, "EIGHT_BIT_ONLY", {})
    assert (extended in scp.transfer_syntaxes()) == bool(plugins)
