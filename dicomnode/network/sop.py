"""The SOP classes the node takes in and sends out, as exact sets of pynetdicom's UID constants.

Why exact sets: UIDs are opaque strings, not paths. CT Image Storage (``…5.1.4.1.1.2``) is a text
prefix of NM Image Storage (``…5.1.4.1.1.20``), and Secondary Capture (``…1.1.7``) of the VL classes
(``…1.1.77.…``), so a ``startswith`` test silently treats one modality as another. Every SOP Class UID
check in the node, its demo, tests and benchmarks is membership in one of these sets.
"""

from __future__ import annotations

from pynetdicom.sop_class import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    ExtensibleSRStorage,
    LabelMapSegmentationStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

# What the node's C-STORE SCP accepts, in the order it offers them.
CT_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
SEG_CLASSES = frozenset({SegmentationStorage, LabelMapSegmentationStorage})
SR_CLASSES = frozenset({
    BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage,
    ExtensibleSRStorage,
})
SUMMARY_CLASSES = frozenset({
    SecondaryCaptureImageStorage, MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
})


def is_ct(sop_class: str) -> bool:
    """True only for the CT storage classes themselves (not NM, whose UID merely starts the same)."""
    return str(sop_class) in CT_CLASSES


def output_kind(sop_class: str) -> str:
    """What a result object in the PACS is: "SEG", "SR", "summary" (secondary capture) or "other"."""
    uid = str(sop_class)
    if uid in SEG_CLASSES:
        return "SEG"
    if uid in SR_CLASSES:
        return "SR"
    if uid in SUMMARY_CLASSES:
        return "summary"
    return "other"
