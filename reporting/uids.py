"""Identity of the outputs: deterministic UIDs and the patient/study attributes they inherit.

Why deterministic: a re-run on the same content with the same model must replace the earlier objects
in the PACS rather than add duplicates, so every UID is a pure function of (source *content*, model
name, model version, object kind). Why content and not the series UID: a series measured while
partial and measured again once complete gives different objects, and a SOP Instance UID must never
name two contents (many PACS keep the first copy of a UID and silently drop the second). The content
is the set of source SOP Instance UIDs (:func:`source_content`), which the node keeps unique per
content (a different dataset under a known UID is refused on receipt). Why copied identity: every
output lives in the source study, so the patient and study attributes must equal the CT's byte for
byte (dcentvfy checks).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable
from copy import deepcopy
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset

from reporting.source_header import TYPE2_IDENTITY, read_source_header
from seg.header import SeriesHeader
from seg.labels import by_name, structures
from seg.records import LeftRight, ModelInfo

# Fixed namespace for this project; changing it would change every output UID.
_NAMESPACE = uuid.UUID("6f1c2a4e-3b5d-5e8f-9a0b-1c2d3e4f5a6b")

# Patient and General Study module attributes (plus Patient Study size/weight/age) copied verbatim.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)




def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root from a name-based (uuid5) hash of ``parts``."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def source_content(series_uid: str, sop_uids: Iterable[str]) -> str:
    """The key of what was measured: the series and the set of its source SOP Instance UIDs.

    Order and repeats (one UID per frame of a multi-frame instance) do not matter; without source
    instances (NIfTI input) the series UID alone is the key.
    """
    unique = sorted({str(u) for u in sop_uids if u})
    if not unique:
        return series_uid
    digest = hashlib.sha256("\n".join(unique).encode("ascii", "replace")).hexdigest()
    return f"{series_uid}/content-{digest}"


# Revision of what the output objects contain for the same source and model. Bump it with every change
# to an object's content (a new SR item, a new summary layout), so that a UID never names two contents
# across releases either. 2: SR companion groups with outlines and areas, FRACTIONAL SEG by default.
# 3: summary key images in the patient's orientation (feet-first scans were mirrored) with R and L
# marked, a follow-up's table with each side's change; the follow-up SR names its model (DEMO) and
# its both-sides groups, and carries the revision. 4: summary page with the patient ID, dates as
# YYYY-MM-DD and the fractured side (the registry's on a page without a comparison), a new layout,
# Image Laterality B instead of an empty Laterality; the measurement SR's metal flag with its side;
# the height used (SR, page, follow-up SR) and the fractured side (page, follow-up SR) in the keys.
# 5: every SR group a viewer draws names itself in a Comment row (OHIF showed outlines with numbers
# but no muscle, side or "not found"); the follow-up SR has no Time Point Order (read as a measurement)
# and shorter meanings for VDELTA and VCHGPCT; SEG and SR series descriptions begin with "DEMO ".
# 6: the follow-up SR's volume change is the difference of the two volumes as written.
# 7: the SR's height status and the page's height warning follow the record's height source (an
# implausible registry height was coded "missing"); tracking UIDs are keyed by the node's secret
# (tracking_subject), not a plain hash of the PatientID; the page warns of metal on the side the
# registry does not call fractured, and of a follow-up covering another length of thigh; a follow-up
# page gives the total change and marks the operated side's column; the change SR the 21 muscles only.
# 8: the measurement SR names each segment's source series, not each CT image; one Tracking Identifier
# text per structure side in the SEG and both SRs; body height coded LN 8302-2; the change SR's index
# change follows the volume change as written; both SRs state the 21 analysed muscles' total, the change
# SR the fracture type and the days since surgery; the page's header names the patient (name, sex,
# age, accession), the fracture type and the post-operative day, and its PatientOrientation is empty;
# the change SR and the page give each side's total, and every change figure of the volumes as written;
# the change SR states the follow-up's metal and the baseline's coverage; the page is RLE Lossless.
# 9: the measurement SR's groups carry a TID 1502 time point context when the registry's surgery date
# places the study (pre-operative, or post-operative with the days since surgery) and its QA group the
# registry's fractured side and fracture type; a page without a comparison shows the fracture type and
# the surgery date with the time point; the SR's and page's keys hold every registry fact they show;
# a CT dated on the surgery day is placed by its metal QA, as pairing places it (in the keys too).
# 10: muscle sides next to the implant flagged (QANEARMTL in both SRs' groups, † on the page).
# 11: a flagged side's drawn group says so in its Comment row ("Vastus lateralis left, next to metal
# implant"), which OHIF shows; on the page the † sits beside its column's aligned decimals, the
# chart names the operated side and marks the flagged muscles; the page warns of a baseline older
# than the admission CT (pairing's baseline-before-admission, its surgery date as YYYY-MM-DD, as
# every date a pairing reason names) and wraps a warning to its width.
# 12: the page's negative numbers (header and table) have the minus sign "−", as its chart's ticks,
# not a hyphen (revision 11 was released with the hyphen).
# 13: the change SR's comparison context codes each note that makes the two studies less comparable
# (QACMP: coverage, baseline before admission, two models, metal on the other side than the registry's).
OUTPUT_REVISION = 13


def output_uid(source: str, model_info: ModelInfo, kind: str) -> str:
    """UID of one output object (``kind`` e.g. "SEG-BINARY/series") for a :func:`source_content` key:
    the same for a re-run on the same content, model and :data:`OUTPUT_REVISION`; new otherwise."""
    return derived_uid(source, model_info.name, model_info.version, kind, f"revision-{OUTPUT_REVISION}")


def registry_facts(height_m: float | None, height_source: str | None,
                   fractured_side: LeftRight | None = None) -> str:
    """The part of an output's key that the patient's facts decide, for the objects that show them
    (measurement SR and summary: the height used and its source; the follow-up SR: the fractured
    side; the SR's and page's fracture facts and time point:
    :meth:`seg.records.ClinicalTimePoint.key`). A height imported after a series was measured changes
    the index the re-run reports: that content must not take the first report's UID. "" when no fact
    is shown."""
    key = f"/height-{height_m:.4f}-{height_source or 'unknown'}" if height_m is not None else ""
    return key + (f"/fractured-{fractured_side}" if fractured_side else "")


_tracking_key: bytes | None = None  # the node's secret: set by the node's output build


def use_tracking_key(key: bytes) -> None:
    """Derive tracking UIDs under this secret from now on (the node's ``.pseudonym-key``, which also
    keys the pseudonyms of its logs): the node's output build sets it before it builds anything."""
    global _tracking_key
    _tracking_key = key


def tracking_subject(src0: Dataset | None, header: SeriesHeader) -> str:
    """Whom a series' tracking UIDs follow: its patient (PatientID under IssuerOfPatientID) as an HMAC
    under the node's secret, the same in each of the patient's studies on this node.

    Why not the PatientID itself: the tracking UID is a hash of it, and hashing every plausible ID (an
    MRN range) finds the one that gives a UID, so a research export that keeps UIDs would still name
    each patient. Without a secret (a library caller outside a node) the ID, as before."""
    def value(keyword: str, read: str | None) -> str:
        given = src0.get(keyword) if src0 is not None else None
        return str(given or read or "")

    patient_id = value("PatientID", header.patient_id)
    if _tracking_key is None:
        return patient_id
    token = f"{value('IssuerOfPatientID', header.issuer_of_patient_id)}|{patient_id}".encode()
    return "hmac-" + hmac.new(_tracking_key, token, hashlib.sha256).hexdigest()


def tracking_uid(subject: str, structure: str, side: str) -> str:
    """Tracking UID of one muscle on one side of one patient (:func:`tracking_subject`), the same in
    every study."""
    return derived_uid("tracking", subject, structure, side)


TOTAL = "analysed_muscles"  # the tracking key of the 21 analysed muscles together, beside the structures'


def tracking_label(structure: str, side: str) -> str:
    """Tracking Identifier of one structure side ("Sartorius left", "Multifidus both sides") or of the
    analysed muscles' total (:data:`TOTAL`): the same text beside the same tracking UID in the SEG and
    in every SR, so a reader never sees one muscle under two names."""
    name = "21 analysed thigh muscles" if structure == TOTAL else by_name(structure).display_name
    return f"{name} both sides" if side == "both" else f"{name} {side}"


def parse_tracking_label(text: str) -> tuple[str, str] | None:
    """(structure, side) of a :func:`tracking_label`; None for any other text (a LABELMAP's
    background)."""
    return _TRACKING_LABELS.get(text)


_TRACKING_LABELS = {tracking_label(s.name, side): (s.name, side)
                    for s in structures()[1:] for side in ("left", "right", "both")}


def source_header(source_files: Iterable[Path]) -> Dataset | None:
    """The first source instance's header (the reference for patient/study identity)."""
    for f in source_files:
        return read_source_header(Path(f), quiet=True)  # the SEG's read of the series says its repairs
    return None


def _put(ds: Dataset, kw: str, value: object) -> None:
    """Set ``kw`` as a fresh element: highdicom shares DataElement objects with the datasets it copied
    identity from (e.g. SR evidence), so assigning in place would silently rewrite those too."""
    if kw in ds:
        del ds[kw]
    ds.add_new(keyword_dict[kw], dictionary_VR(keyword_dict[kw]), deepcopy(value))


def date_series(ds: Dataset) -> Dataset:
    """Series Date/Time (General Series, Type 3) = when this object was built (its Content Date/Time).

    Why: without them Orthanc Explorer lists the node's series under "?" and viewers show no date
    beside them. They are build times (left out when a rebuild is compared with a file sent).
    """
    date = ds.get("ContentDate") or ds.get("InstanceCreationDate")
    time = ds.get("ContentTime") or ds.get("InstanceCreationTime")
    if date:
        _put(ds, "SeriesDate", date)
        if time:
            _put(ds, "SeriesTime", time)
    return ds


def copy_identity(ds: Dataset, src: Dataset | None, header: SeriesHeader | None = None) -> Dataset:
    """Make ``ds``'s patient/study attributes equal to the source CT's (absent there = absent here)."""
    for kw in PATIENT_STUDY_KEYWORDS:
        if src is not None:
            if kw in src:
                _put(ds, kw, src[kw].value)
            elif kw in ds and kw != "StudyInstanceUID":
                if kw in TYPE2_IDENTITY:
                    _put(ds, kw, None)  # Type 2: present but empty, never invented
                else:
                    del ds[kw]
        elif header is not None and (value := header.value(kw)) not in (None, ""):
            _put(ds, kw, value)
    return ds
