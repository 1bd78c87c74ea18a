"""The records that cross module boundaries: volumes, changes, evaluations, model info, reasons.

Why here, on the ground floor: ``seg`` measures, ``reporting`` encodes and compares, ``dicomnode``
stores and pairs, the CLI prints; each reads what the one below wrote. One typed definition of each
record means no module spells a JSON key by hand and a typo is an error, not a silent ``None``.

Every record is frozen and refuses unknown keys. The documents written to disk (``volumes.json``,
a change record, a model's ``evaluation.json``) carry ``schema_version``; JSON written before these
records existed has none, is version 1, and is migrated on load (:func:`VolumeRecord.from_json`,
:func:`ChangeRecord.from_json`, :func:`Evaluation.from_json`), so results stored by an earlier
release, and the shipped model's evaluation, still load.

Reasons carry a :class:`ReasonCode` next to their human text: programs filter on the code, people
read the text.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, TypeAdapter, model_serializer
from pydantic.dataclasses import dataclass

from seg.dates import as_date, da_date
from seg.preprocess_config import MetalArtefactReduction

SCHEMA_VERSION = 2  # 1: the version-less JSON written before these records
LEGACY_VERSION = 1

Side = Literal["left", "right", "both"]
LeftRight = Literal["left", "right"]
Sex = Literal["F", "M"]  # as the registry parses it (female, male); anything else is unknown (None)
FractureType = Literal["FNF", "ITF", "other"]  # femoral neck, intertrochanteric, any other (registry)
Comparison = Literal["baseline", "previous"]  # what a follow-up is compared with in its timeline
SIDES: tuple[Side, ...] = ("both", "left", "right")  # the order change records list them in


def other_side(side: LeftRight) -> LeftRight:
    """The contralateral side: the one a fractured side's change is held against."""
    return "right" if side == "left" else "left"


class ReasonCode(StrEnum):
    """Machine-readable cause next to each human reason, so nothing has to filter by prose.

    The values are what the index stores (``jobs.reason_code``, pairing reasons): never rename one.
    """

    # series completeness (dicomnode.storage.series): the cause a quiet series is held for, and
    # rejected with when the hold ends (the job's state tells the two apart)
    SLICE_GAP = "slice-gap"  # a step along the slice normal over 1.5x the median spacing
    ACQUISITION_SHORT = "acquisition-short"  # fewer images than ImagesInAcquisition announces
    SERIES_SHORT = "series-short"  # fewer instances than NumberOfSeriesRelatedInstances announces
    INSTANCE_NUMBERS_MISSING = "instance-numbers-missing"  # holes in the InstanceNumber range
    # series selection: why the headers say it is not usable whole-thigh CT
    NO_INSTANCES = "no-instances"
    UNREADABLE_HEADER = "unreadable-header"
    NOT_CT = "not-ct"
    MISSING_GEOMETRY = "missing-geometry"  # ImagePositionPatient/ImageOrientationPatient absent
    INCONSISTENT_MATRIX = "inconsistent-matrix"
    INCONSISTENT_ORIENTATION = "inconsistent-orientation"
    INVALID_ORIENTATION = "invalid-orientation"
    NOT_AXIAL = "not-axial"
    MISSING_PIXEL_SPACING = "missing-pixel-spacing"
    INVALID_PIXEL_SPACING = "invalid-pixel-spacing"  # zero or negative
    MULTI_FRAME = "multi-frame"  # Enhanced CT: the loader reads one slice per instance
    INCONSISTENT_PIXEL_SPACING = "inconsistent-pixel-spacing"
    DUPLICATE_SLICE_POSITION = "duplicate-slice-position"
    # no longer written: selection names a gap SLICE_GAP, and the completeness check, which runs first
    # with the same rule (seg.geometry), always finds it; kept because older indexes may hold the value
    MISSING_SLICES = "missing-slices"
    IRREGULAR_SLICE_SPACING = "irregular-slice-spacing"
    SHORT_Z_COVERAGE = "short-z-coverage"  # also when there are too few slices besides
    TOO_FEW_SLICES = "too-few-slices"
    SELECTION_ERROR = "selection-error"  # the selection itself raised
    # written by releases before the causes above had codes (still read; selection no longer writes them)
    HELD_INCOMPLETE = "held-incomplete"
    INCOMPLETE = "incomplete"
    NOT_SELECTED = "not-selected"
    # job lifecycle (dicomnode.processing.jobs)
    DUPLICATE_CONTENT = "duplicate-content"  # this exact content was processed by another job
    LATE_INSTANCE = "late-instance"  # superseded: a late instance re-opened the series
    PIPELINE_REJECTED = "pipeline-rejected"  # the pipeline refused the series
    PIPELINE_ERROR = "pipeline-error"  # an attempt raised (retried, or failed for good)
    PIPELINE_CRASHED = "pipeline-crashed"  # the pipeline's process died (signal, exit): retried like an error
    PIPELINE_TIMEOUT = "pipeline-timeout"  # still running at worker.timeout_seconds: killed, failed for good
    RESTART_REQUEUED = "restart-requeued"  # running when the node stopped: queued again
    RESTART_GAVE_UP = "restart-gave-up"  # the node stopped during every attempt
    SEND_RETRYING = "send-retrying"
    SEND_FAILED = "send-failed"
    RESEND_REQUESTED = "resend-requested"  # operator: send the outputs again
    RETRY_REQUESTED = "retry-requested"  # operator: run the pipeline again

    # pairing: a study's role in its patient's timeline (dicomnode.clinical.pairing)
    BASELINE_PREOPERATIVE = "baseline-preoperative"  # latest pre-operative study (surgery-day rule)
    BASELINE_POSTOPERATIVE = "baseline-postoperative"  # no pre-operative study: earliest one instead
    BASELINE_EARLIEST = "baseline-earliest"  # no surgery date: the earliest study
    EARLIER_PREOPERATIVE = "earlier-preoperative"  # a pre-operative study before the baseline
    # the latest pre-operative study, older than the admission period (dicomnode.clinical.admission)
    BASELINE_BEFORE_ADMISSION = "baseline-before-admission"
    SAME_DAY_FOLLOWUP = "same-day-followup"  # compared, but not with a same-day previous study
    SUPERSEDED_SERIES = "superseded-series"  # a later series of the same study represents it
    SAME_DATE_AND_TIME = "same-date-and-time"  # another study of the patient at the very same moment
    # a study dated on the surgery day, placed by the metal its QA found (dicomnode.clinical.surgery_day)
    SURGERY_DAY_PREOPERATIVE = "surgery-day-preoperative"  # no metal on the fractured side
    SURGERY_DAY_POSTOPERATIVE = "surgery-day-postoperative"  # an implant: the post-operative check CT
    # pairing: why a study is not compared (the cohort report lists these)
    SINGLE_STUDY = "single-study"
    NO_LATER_STUDY = "no-later-study"
    NO_STUDY_DATE = "no-study-date"
    SAME_DAY_AS_BASELINE = "same-day-as-baseline"
    SURGERY_DAY_QA_UNKNOWN = "surgery-day-qa-unknown"  # on the surgery day, no metal QA: not placed
    # another measured PatientID is probably this patient (dicomnode.clinical.aliases): never paired
    # with it until an operator links the two, so the reader is told
    POSSIBLY_SAME_PATIENT = "possibly-same-patient"
    # cohort: why a patient is not a pre vs post pair
    NO_PREOPERATIVE_BASELINE = "no-preoperative-baseline"
    NO_COMPARISON = "no-comparison"

    # clinical facts missing or refused (dicomnode.clinical.registry, reporting.change)
    HEIGHT_NOT_USED = "height-not-used"  # a height was given but is implausible
    NO_HEIGHT = "no-height"  # no plausible height: no index (cm³/m²)
    FRACTURE_TYPE_UNKNOWN = "fracture-type-unknown"
    SEX_CONFLICT = "sex-conflict"  # the registry's sex is not the CT's PatientSex (the registry's is used)
    # the two CTs of a comparison (reporting.change)
    COVERAGE_DIFFERS = "coverage-differs"  # one covers more thigh (from the femoral head) than the other
    LATERALITY_CONFLICT = "laterality-conflict"  # metal on the side the registry does not say is operated
    MODELS_DIFFER = "models-differ"  # the two studies were measured by different models (or versions)

    UNCLASSIFIED = "unclassified"  # a legacy note whose cause cannot be told


NOT_COMPARED = frozenset({ReasonCode.SINGLE_STUDY, ReasonCode.NO_LATER_STUDY, ReasonCode.NO_STUDY_DATE,
                          ReasonCode.SAME_DAY_AS_BASELINE, ReasonCode.SURGERY_DAY_QA_UNKNOWN})
HEIGHT_CODES = frozenset({ReasonCode.HEIGHT_NOT_USED, ReasonCode.NO_HEIGHT})
# notes of a comparison that its figures keep but a reader must know of (reporting.change): the page
# warns of them, the change SR codes them, the cohort report lists them
COMPARABILITY_CODES = frozenset({ReasonCode.COVERAGE_DIFFERS, ReasonCode.LATERALITY_CONFLICT,
                                 ReasonCode.BASELINE_BEFORE_ADMISSION, ReasonCode.MODELS_DIFFER})
# a series not (yet) whole, whatever the cause; and one whose headers rule it out
INCOMPLETE_CODES = frozenset({ReasonCode.SLICE_GAP, ReasonCode.ACQUISITION_SHORT, ReasonCode.SERIES_SHORT,
                              ReasonCode.INSTANCE_NUMBERS_MISSING, ReasonCode.HELD_INCOMPLETE,
                              ReasonCode.INCOMPLETE})
NOT_SELECTED_CODES = frozenset({
    ReasonCode.NO_INSTANCES, ReasonCode.UNREADABLE_HEADER, ReasonCode.NOT_CT, ReasonCode.MISSING_GEOMETRY,
    ReasonCode.INCONSISTENT_MATRIX, ReasonCode.INCONSISTENT_ORIENTATION, ReasonCode.INVALID_ORIENTATION,
    ReasonCode.NOT_AXIAL, ReasonCode.MISSING_PIXEL_SPACING, ReasonCode.INVALID_PIXEL_SPACING,
    ReasonCode.MULTI_FRAME, ReasonCode.INCONSISTENT_PIXEL_SPACING,
    ReasonCode.DUPLICATE_SLICE_POSITION, ReasonCode.MISSING_SLICES, ReasonCode.IRREGULAR_SLICE_SPACING,
    ReasonCode.SHORT_Z_COVERAGE, ReasonCode.TOO_FEW_SLICES, ReasonCode.NOT_SELECTED})


class Record(BaseModel):
    """Frozen, refuses unknown keys: a misspelt key is an error where it is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Reason:
    """A stated reason: ``code`` for programs, ``text`` for people. ``Reason(code, text)``."""

    code: ReasonCode
    text: str

    @classmethod
    def load(cls, value: Any) -> Reason:
        """A reason as stored: ``{"code", "text"}``, or the bare text of version 1 (classified here)."""
        if isinstance(value, str):
            return cls(_legacy_code(value), value)
        return _REASON.validate_python(value)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "text": self.text}


# Version 1 stored reasons as text only. These are the texts it wrote (their stable beginnings and
# endings); reading them here, once, is the migration, and nothing after it reads prose.
_LEGACY_TEXTS: tuple[tuple[str, str, ReasonCode], ...] = (
    ("earlier pre-operative study", "", ReasonCode.EARLIER_PREOPERATIVE),
    ("baseline: latest pre-operative study", "", ReasonCode.BASELINE_PREOPERATIVE),
    ("no pre-operative study", "", ReasonCode.BASELINE_POSTOPERATIVE),
    ("baseline: earliest study", "", ReasonCode.BASELINE_EARLIEST),
    ("single study for this patient", "", ReasonCode.SINGLE_STUDY),
    ("no later study yet", "", ReasonCode.NO_LATER_STUDY),
    ("no StudyDate", "", ReasonCode.NO_STUDY_DATE),
    ("same day as the baseline", "", ReasonCode.SAME_DAY_AS_BASELINE),
    ("another follow-up on the same day", "", ReasonCode.SAME_DAY_FOLLOWUP),
    ("a later series of the same study", "", ReasonCode.SUPERSEDED_SERIES),
    ("no plausible height", "", ReasonCode.NO_HEIGHT),
    ("fracture type unknown", "", ReasonCode.FRACTURE_TYPE_UNKNOWN),
    ("registry implausible", ": not used", ReasonCode.HEIGHT_NOT_USED),
    ("implausible", ": not used", ReasonCode.HEIGHT_NOT_USED),
)


def _legacy_code(text: str) -> ReasonCode:
    for start, end, code in _LEGACY_TEXTS:
        if text.startswith(start) and text.endswith(end):
            return code
    return ReasonCode.UNCLASSIFIED


_REASON = TypeAdapter(Reason)


def reasons_to_json(reasons: list[Reason] | tuple[Reason, ...]) -> str:
    return json.dumps([r.to_dict() for r in reasons])


def reasons_from_json(text: str | None) -> list[Reason]:
    """Stored reasons (a JSON list of reasons, or of version 1's texts)."""
    return [Reason.load(v) for v in json.loads(text or "[]")]


class ModelInfo(Record):
    """What outputs record about the model that produced them (volumes.json, SEG, SR, UIDs)."""

    name: str = "none"
    version: str = ""
    demo: bool = False
    spacing_mm: tuple[float, ...] | None = None
    architecture: str = ""
    statement: str = ""
    licence: str = ""
    # the package's metal artefact reduction (seg.mar), spelt as its preprocessing does; "none" is
    # not written, so every record written before reads and compares the same
    metal_artefact_reduction: MetalArtefactReduction = "none"

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        if d.get("metal_artefact_reduction") == "none":
            d.pop("metal_artefact_reduction")
        return d


class StructureVolume(Record):
    """One structure of ``volumes.json``: voxels and cm³, per side when split by the midline."""

    label: int
    name: str
    group: str | None = None
    voxels: int | None = None
    volume_cm3: float
    left_cm3: float | None = None
    right_cm3: float | None = None
    index_cm3_m2: float | None = None
    # next to the implant (seg.metal_proximity): the share of each side's voxels within reach of metal
    # in their slice, and whether that flags its volume as the least reliable. None: not measured
    # (a bone, no CT, or a record written before); without metal, share 0 and not flagged.
    left_near_metal_share: float | None = None
    right_near_metal_share: float | None = None
    left_near_metal: bool | None = None
    right_near_metal: bool | None = None

    def side_volume(self, side: Side) -> float | None:
        """cm³ of one side ("both": the two together)."""
        return {"both": self.volume_cm3, "left": self.left_cm3, "right": self.right_cm3}[side]

    def near_metal(self, side: Side) -> bool | None:
        """Whether a side ("both": either) is flagged as lying next to the implant; None: not measured."""
        flags = {"left": (self.left_near_metal,), "right": (self.right_near_metal,),
                 "both": (self.left_near_metal, self.right_near_metal)}[side]
        known = [f for f in flags if f is not None]
        return any(known) if known else None

    @property
    def split(self) -> bool:
        """Whether left and right are reported separately."""
        return self.left_cm3 is not None or self.right_cm3 is not None

    def csv_row(self) -> dict[str, object]:
        """The structure as a ``volumes.csv`` row (empty cells for None)."""
        return {k: "" if v is None else v for k, v in self.model_dump().items()}

    def sides(self) -> list[Side]:
        """Sides this entry reports: left and right when split, else both together."""
        if self.split:
            return [side for side in ("left", "right") if self.side_volume(side) is not None]
        return ["both"]


CSV_COLUMNS: tuple[str, ...] = tuple(StructureVolume.model_fields)


class MetalLocation(Record):
    side: Side
    left_voxels: int
    right_voxels: int
    z_range_mm: tuple[float, float]
    centroid_mm: tuple[float, float, float]


class VolumeQA(Record):
    """Series-level QA figures next to the volumes (None: not measured, e.g. without the CT)."""

    z_coverage_mm: float | None = None
    hu_muscle_cm3: float | None = None
    metal: bool | None = None
    segmented_muscle_cm3: float | None = None
    midline_x_mm: float | None = None
    midline_method: str | None = None
    segmented_vs_hu_muscle: float | None = None
    metal_voxels: int | None = None
    metal_where: MetalLocation | None = None
    z_coverage_ok: bool | None = None
    # the scanned extent from the top of the femoral heads, down (to the knee) and up (to the pelvis):
    # what two CTs of one patient can be compared by (scanner z differs between scans); None: no femur
    coverage_below_femoral_head_mm: float | None = None
    coverage_above_femoral_head_mm: float | None = None


class _Document(Record):
    """A record saved as its own JSON file, with a schema version."""

    schema_version: int = SCHEMA_VERSION

    @classmethod
    def _migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Self:
        """Load from parsed or raw JSON of any known version (older ones are migrated)."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object")
        version = int(data.get("schema_version", LEGACY_VERSION))
        if version > SCHEMA_VERSION:
            raise ValueError(f"{cls.__name__} schema version {version} is newer than this node's "
                             f"({SCHEMA_VERSION}): upgrade the node to read it")
        if version < SCHEMA_VERSION:
            data = cls._migrate(dict(data)) | {"schema_version": SCHEMA_VERSION}
        return cls.model_validate(data)

    def to_json(self, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def load(cls, path: Path | str) -> Self:
        return cls.from_json(Path(path).read_text())

    def save(self, path: Path | str, indent: int = 1) -> Path:
        path = Path(path)
        path.write_text(self.to_json(indent=indent))
        return path


class VolumeRecord(_Document):
    """``volumes.json``: every structure's volume in one series, the height used and QA figures."""

    series_instance_uid: str | None = None
    model: ModelInfo = ModelInfo()
    height_m: float | None = None
    height_source: str | None = None
    structures: tuple[StructureVolume, ...] = ()
    qa: VolumeQA = VolumeQA()
    # the patient's age at this study (seg.age: PatientAge, else PatientBirthDate → StudyDate); optional,
    # so a volumes.json written before it was recorded still loads (age unknown)
    age_years: int | None = None
    age_source: str | None = None

    def by_label(self) -> dict[int, StructureVolume]:
        return {s.label: s for s in self.structures}

    def by_name(self) -> dict[str, StructureVolume]:
        return {s.name: s for s in self.structures}

    def analysed_total(self, side: Side) -> float:
        """cm³ of the paper's 21 analysed muscles together on one side ("both": the two sides), the
        total the page, both SRs and the change record report."""
        from seg.labels import ANALYSED_MUSCLES

        found = self.by_name()
        return sum(found[n].side_volume(side) or 0.0 for n in ANALYSED_MUSCLES if n in found)

    @classmethod
    def _migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        # version 1 had the same layout; a record written without a CT or model had partial parts
        data["model"] = data.get("model") or {}
        data["qa"] = data.get("qa") or {}
        return data


class StudyRef(Record):
    """One side of a comparison: the study, series and the outputs a follow-up SR cites."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_date: str | None = None
    seg_sop_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None


class TimePoint(StrEnum):
    """Where a study lies relative to the registry's surgery date (PS3.16 CID 6146 has a code for each)."""

    PREOPERATIVE = "pre-operative"
    POSTOPERATIVE = "post-operative"


class ClinicalTimePoint(Record):
    """What a summary page or a measurement SR states about its study's clinical time point: the
    registry's fracture facts and, where the registry's surgery date and the study date are both
    known, whether the study is pre- or post-operative and how many days after surgery.

    Why one record: the job reads the registry once (:func:`dicomnode.clinical.registry.facts_for`)
    and hands this to every output, so the page and the SR cannot show two readings; and what they
    show is part of their UIDs (:meth:`key`). A fact the registry lacks is None and is not shown.
    """

    fractured_side: LeftRight | None = None
    fracture_type: FractureType | None = None
    surgery_date: str | None = None  # YYYYMMDD, the registry's
    study_date: str | None = None  # the CT's StudyDate
    # a study dated on the surgery day: the side of the operation its metal QA places it on, as pairing
    # does (dicomnode.clinical.surgery_day); None there: not placed, so no time point is stated
    surgery_day: TimePoint | None = None

    @property
    def time_point(self) -> TimePoint | None:
        """Pre- or post-operative, as pairing places the study: by date, and on the surgery day by its
        implant; None without a readable surgery date and study date, or when the day cannot tell."""
        study, surgery = da_date(self.study_date), da_date(self.surgery_date)
        if study is None or surgery is None:
            return None
        if study == surgery:
            return self.surgery_day
        return TimePoint.PREOPERATIVE if study < surgery else TimePoint.POSTOPERATIVE

    @property
    def days_since_surgery(self) -> int | None:
        """Days from surgery to a post-operative study; None otherwise."""
        if self.time_point is not TimePoint.POSTOPERATIVE:
            return None
        return (as_date(self.study_date) - as_date(self.surgery_date)).days  # type: ignore[operator]

    def key(self) -> str:
        """The part of an output's UID key these facts decide ("" when none is known): an output that
        shows other facts is other content, so it must not take an earlier output's UID."""
        return "".join(f"/{name}-{value}" for name, value in (
            ("fractured", self.fractured_side), ("fracture", self.fracture_type),
            ("surgery", self.surgery_date), ("surgery-day", self.surgery_day)) if value)


class ChangeFigures(Record):
    """Baseline, follow-up and their difference: the figures every change entry reports.

    A base of :class:`StructureChange` and :class:`TotalChange`, listed last in it (pydantic lays
    out the fields of the bases from right to left), so the JSON keeps the entry's identity first.
    """

    pre_cm3: float | None = None
    post_cm3: float | None = None
    delta_cm3: float | None = None
    loss_pct: float | None = None
    change_pct: float | None = None
    delta_index_cm3_m2: float | None = None


class _StructureSide(Record):
    label: int
    name: str
    group: str | None = None
    side: Side


class _AnalysedCount(Record):
    structures: int


class StructureChange(ChangeFigures, _StructureSide):
    """One structure side: follow-up minus baseline (see :mod:`reporting.change` for each figure)."""

    # next to the implant in either study (StructureVolume.near_metal): its change is the least
    # reliable; None: neither study measured it. Last, after the keys change records had before.
    near_metal: bool | None = None


class TotalChange(ChangeFigures, _AnalysedCount):
    """The analysed muscles together (both sides)."""


class _OneSide(Record):
    side: LeftRight


class SideTotalChange(ChangeFigures, _OneSide, _AnalysedCount):
    """The analysed muscles together on one side: the operated side's loss, which the both-sides
    total halves."""


class SideComparison(Record):
    """One muscle: the operated side's change against the contralateral side's."""

    label: int
    name: str
    group: str | None = None
    operated_side: Side
    operated_pre_cm3: float | None = None
    operated_post_cm3: float | None = None
    operated_loss_pct: float | None = None
    contralateral_pre_cm3: float | None = None
    contralateral_post_cm3: float | None = None
    contralateral_loss_pct: float | None = None
    loss_pct_difference: float | None = None
    post_asymmetry_pct: float | None = None


class ChangeRecord(_Document):
    """A patient's change between two measured studies, with the clinical facts pairing adds."""

    patient_id: str = ""
    height_m: float | None = None
    height_source: str | None = None
    baseline: StudyRef = StudyRef()
    followup: StudyRef = StudyRef()
    days_between: int | None = None
    fractured_side: LeftRight | None = None
    structures: tuple[StructureChange, ...] = ()
    total_analysed_muscles: TotalChange = TotalChange(structures=0)
    total_analysed_muscles_by_side: tuple[SideTotalChange, ...] = ()  # left, right
    # both studies' QA (coverage, metal and its side): what the change report states beside its figures
    baseline_qa: VolumeQA | None = None
    followup_qa: VolumeQA | None = None
    operated_vs_contralateral: tuple[SideComparison, ...] = ()
    notes: tuple[Reason, ...] = ()
    # set by pairing (None when computed outside a timeline)
    comparison: Comparison | None = None
    baseline_preoperative: bool | None = None
    sex: Sex | None = None
    sex_source: str | None = None
    fracture_type: FractureType | None = None
    surgery_date: str | None = None
    koval_grade: int | None = None
    # age at the baseline study, from the baseline's volumes.json (None: not recorded, e.g. a record
    # stored before ages were; such a change still loads)
    baseline_age_years: int | None = None

    def with_facts(self, **facts: Any) -> ChangeRecord:
        """A copy with more facts set (pairing's), validated like any record."""
        return type(self).model_validate(self.model_dump() | facts)

    def fact(self, key: str) -> Any:
        """A top-level fact by name (cohort filters name them on the command line); None if unknown."""
        return getattr(self, key) if key in type(self).model_fields else None

    @classmethod
    def _migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        data["notes"] = [Reason.load(n).to_dict() for n in data.get("notes") or []]
        return data


class Followup(StrEnum):
    """Which follow-up's change a cohort entry carries: a closed choice (the CLI refuses a typo)."""

    LAST = "last"  # the longest interval
    FIRST = "first"


class CohortEntry(Record):
    """One patient for the cohort report: the change used, or the reasons there is none."""

    patient_id: str
    issuer_of_patient_id: str = ""
    studies: int = 0
    change: ChangeRecord | None = None
    reasons: tuple[Reason, ...] = ()  # empty: the change is a pre vs post pair

    @property
    def reason_text(self) -> str | None:
        return "; ".join(r.text for r in self.reasons) or None


# -- held-out evaluation (seg.evaluate -> evaluation.json) --------------------------------------------
class EvaluationTargets(Record):
    """The accuracy a model package is held to (the paper's figures); the defaults are those targets."""

    mean_dice_muscles: float = 0.93
    min_dice_muscle: float = 0.85
    bone_dice: float = 0.95
    total_muscle_volume_error_pct: float = 2.0
    median_abs_muscle_volume_error_pct: float = 3.0
    atrophy_loss_error_pp: float = 5.0


class CaseClassScore(Record):
    """One structure in one case: overlap, distance and volume against the truth."""

    dice: float
    volume_true_cm3: float
    volume_pred_cm3: float
    volume_error_pct: float | None = None  # None: absent from the truth
    hd95_mm: float | None = None  # None: not computed, or absent from one of the two
    side_volume_error_pct: dict[LeftRight, float] = {}


class CaseSummary(Record):
    """One case's totals, as ``evaluation.json`` lists it under ``per_case``."""

    mean_dice_muscles: float | None = None
    total_muscle_volume_true_cm3: float
    total_muscle_volume_pred_cm3: float
    total_muscle_volume_error_pct: float | None = None
    case: str = ""
    shape: tuple[int, ...] | None = None
    spacing_mm: tuple[float, ...] | None = None
    inference_s: float | None = None
    postoperative: bool = False  # a held-out phantom with implant (and atrophy, fat infiltration)


class CaseEvaluation(CaseSummary):
    """One case in full: its totals and every structure it holds (kept in memory, not written)."""

    per_class: dict[str, CaseClassScore] = {}

    def summary(self) -> CaseSummary:
        return CaseSummary.model_validate(self.model_dump(exclude={"per_class"}))


class ClassEvaluation(Record):
    """One structure averaged over the held-out cases."""

    dice: float
    # the worst held-out error of one side of one case: what a single measurement may be off by
    max_abs_side_volume_error_pct: float | None = None
    # the same over the pre-operative cases only: what one side of a study without implant may be off by
    max_abs_side_volume_error_pct_preop: float | None = None
    hd95_mm: float | None = None
    volume_error_pct: float | None = None
    abs_volume_error_pct: float | None = None
    group: str | None = None
    analysed: bool = False


class NamedDice(Record):
    name: str
    dice: float


class MuscleLoss(Record):
    """One muscle of a post-operative case on one side: its measured pre->post loss against the
    truth's (an atrophied muscle's, or a false loss where the phantom left the muscle as it was)."""

    case: str
    muscle: str
    side: LeftRight
    truth_loss_pct: float
    measured_loss_pct: float | None = None  # None: the muscle was not found before surgery
    error_pp: float


class Evaluation(_Document):
    """``evaluation.json``: a model's accuracy on held-out cases (``dicomnode evaluate``)."""

    model: ModelInfo = ModelInfo()
    cases: int = 0
    mean_dice_muscles: float | None = None
    min_dice_muscle: NamedDice | None = None
    femur_dice: float | None = None
    iliac_bone_dice: float | None = None
    total_muscle_volume_error_pct: float | None = None
    total_muscle_abs_volume_error_pct: float | None = None
    median_abs_muscle_volume_error_pct: float | None = None
    per_class: dict[str, ClassEvaluation] = {}
    per_case: tuple[CaseSummary, ...] = ()
    atrophy_loss: tuple[MuscleLoss, ...] = ()
    max_atrophy_loss_error_pp: float | None = None
    # every other analysed muscle of the same cases, both sides: a loss measured where there is none
    unshrunk_loss: tuple[MuscleLoss, ...] = ()
    targets: EvaluationTargets = EvaluationTargets()
