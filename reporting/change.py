"""Per-patient change between two measurements (volumes.json records): the change record.

Why here: the follow-up SR, the summary and the cohort report all read the same numbers, so they
are computed once. Changes are signed, follow-up minus baseline (negative for a loss):
``delta_cm3 = post − pre`` and ``change_pct = (post − pre) / pre × 100``, the latter null when the
baseline is below :attr:`reporting.rules.ReportingRules.pct_baseline_floor_cm3` or the follow-up
volume is "not found" (so 1 → 6 voxels never reads +500 %). ``loss_pct = (pre − post) / pre × 100``
(positive for a loss, unfloored) is the paper's loss ratio, kept for the cohort tables. The height
index change needs a height; without one it is null, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reporting.rules import change_pct
from seg.dates import as_date
from seg.labels import ANALYSED_MUSCLES
from seg.records import (
    HEIGHT_CODES,
    SIDES,
    ChangeRecord,
    ClinicalTimePoint,
    LeftRight,
    ModelInfo,
    Reason,
    ReasonCode,
    Side,
    SideComparison,
    SideTotalChange,
    StructureChange,
    StudyRef,
    TimePoint,
    TotalChange,
    VolumeQA,
    VolumeRecord,
    other_side,
)


def _days(pre_date: str | None, post_date: str | None) -> int | None:
    a, b = as_date(pre_date), as_date(post_date)
    return None if a is None or b is None else (b - a).days


def days_since_surgery(change: ChangeRecord) -> int | None:
    """Days from the registry's surgery date to the follow-up CT, by the time-point rule every output
    follows (:class:`~seg.records.ClinicalTimePoint`; a compared study on the surgery day is
    post-operative, pairing placed it there); None when either date is unknown or the CT is dated
    before the surgery (then it is no post-operative study)."""
    return ClinicalTimePoint(surgery_date=change.surgery_date, study_date=change.followup.study_date,
                             surgery_day=TimePoint.POSTOPERATIVE).days_since_surgery


def _loss_pct(pre: float | None, post: float | None) -> float | None:
    if pre is None or post is None or pre <= 0:
        return None
    return (pre - post) / pre * 100.0


def _values(pre: float | None, post: float | None, height_m: float | None) -> dict[str, float | None]:
    delta = None if pre is None or post is None else post - pre
    return {
        "pre_cm3": pre,
        "post_cm3": post,
        "delta_cm3": delta,
        "loss_pct": _loss_pct(pre, post),
        "change_pct": change_pct(pre, post),
        "delta_index_cm3_m2": (delta / height_m**2) if (delta is not None and height_m) else None,
    }


def _total(structures: list[StructureChange], side: Side, height_m: float | None) -> dict[str, Any]:
    """The 21 analysed muscles together on ``side`` ("both": both sides): the change of their sum."""
    found = {s.name: s for s in structures if s.side == side}
    names = [n for n in ANALYSED_MUSCLES if n in found]
    pre = sum(found[n].pre_cm3 or 0.0 for n in names)
    post = sum(found[n].post_cm3 or 0.0 for n in names)
    return {"structures": len(names), **_values(pre, post, height_m)}


def _ref(ref: StudyRef, record: VolumeRecord) -> StudyRef:
    if ref.series_instance_uid:
        return ref
    return ref.model_copy(update={"series_instance_uid": record.series_instance_uid})


COVERAGE_TOLERANCE_MM = 20.0  # two CTs' extents from the femoral head that differ by more: noted


@dataclass(frozen=True)
class CoverageDifference:
    """One end (knee or pelvis) where two CTs reach different distances from the femoral head."""

    end: str  # "knee" | "pelvis"
    baseline_mm: float
    followup_mm: float

    @property
    def where(self) -> str:
        return "below" if self.end == "knee" else "above"

    @property
    def short(self) -> str:
        """The difference in a few words, short enough for a line of the summary page."""
        more = "less" if self.followup_mm < self.baseline_mm else "more"
        return (f"Follow-up covers {abs(self.followup_mm - self.baseline_mm):.0f} mm {more} {self.where} "
                f"the femoral head: changes at the {self.end} end not comparable")


def coverage_differences(pre: VolumeQA, post: VolumeQA) -> list[CoverageDifference]:
    """Where the follow-up covers another length of thigh than the baseline, measured from the top of
    the femoral heads: the muscles that reach that end change with the coverage, not only with
    atrophy (a follow-up 100 mm shorter at the knee read as -14 % biceps femoris on both sides)."""
    out = []
    ends = (("knee", "coverage_below_femoral_head_mm"), ("pelvis", "coverage_above_femoral_head_mm"))
    for end, key in ends:
        before, after = getattr(pre, key), getattr(post, key)
        if before is not None and after is not None and abs(after - before) > COVERAGE_TOLERANCE_MM:
            out.append(CoverageDifference(end, before, after))
    return out


def coverage_notes(pre: VolumeQA, post: VolumeQA) -> list[Reason]:
    """:func:`coverage_differences` as the change record's notes."""
    return [Reason(ReasonCode.COVERAGE_DIFFERS, f"{d.short} ({d.followup_mm:.0f} vs {d.baseline_mm:.0f} mm)")
            for d in coverage_differences(pre, post)]


def model_note(pre: ModelInfo, post: ModelInfo) -> Reason | None:
    """The two studies measured by different models (a site's upgrade between them): the change then
    holds the models' difference too, which no figure can take out; re-measuring the baseline with
    the follow-up's model removes it. None where both are the same or either is not recorded."""
    if "none" in (pre.name, post.name) or (pre.name, pre.version) == (post.name, post.version):
        return None
    later = post.version if post.name == pre.name else f"{post.name} {post.version}"
    return Reason(ReasonCode.MODELS_DIFFER,
                  f"Baseline measured by model {pre.name} {pre.version}, follow-up by {later}: part of "
                  "the change may be the models' difference; re-measure the baseline with the follow-up's")


def laterality_conflict(qa: VolumeQA, fractured_side: LeftRight | None) -> Reason | None:
    """Metal on one side only, and the registry's fractured side the other: a wrong row or a wrong
    side, which marks the other thigh as the operated one (the page drew "fractured" over the thigh
    without the nail)."""
    metal = qa.metal_where.side if qa.metal and qa.metal_where is not None else None
    if metal not in ("left", "right") or fractured_side is None or metal == fractured_side:
        return None
    return Reason(ReasonCode.LATERALITY_CONFLICT,
                  f"Metal on the {metal} side, but the registry's fractured side is {fractured_side}: "
                  "check the registry")


def compute_change(
    pre: VolumeRecord,
    post: VolumeRecord,
    height_m: float | None,
    baseline: StudyRef,
    followup: StudyRef,
    *,
    patient_id: str = "",
    height_source: str | None = None,
    fractured_side: LeftRight | None = None,
    notes: Sequence[Reason] = (),
) -> ChangeRecord:
    """The change record from a baseline and a follow-up volumes.json record.

    ``baseline``/``followup`` say which studies and outputs they are (a missing series UID is taken
    from the volumes record); ``notes`` are reasons stated by pairing and the registry, copied in.
    """
    notes = list(notes) + coverage_notes(pre.qa, post.qa)
    if (models := model_note(pre.model, post.model)) is not None:
        notes.append(models)
    if (conflict := laterality_conflict(post.qa, fractured_side)) is not None:
        notes.append(conflict)
    if not height_m:
        height_m = None
        if not any(n.code in HEIGHT_CODES for n in notes):
            notes.append(Reason(ReasonCode.NO_HEIGHT,
                                "no plausible height: index change (cm³/m²) not computed"))
    pre_by_label = pre.by_label()
    structures: list[StructureChange] = []
    for post_s in sorted(post.structures, key=lambda s: s.label):
        pre_s = pre_by_label.get(post_s.label)
        if pre_s is None:
            continue
        for side in SIDES:
            before, after = pre_s.side_volume(side), post_s.side_volume(side)
            if before is None and after is None:
                continue
            near = [f for f in (pre_s.near_metal(side), post_s.near_metal(side)) if f is not None]
            structures.append(StructureChange(label=post_s.label, name=post_s.name, group=post_s.group,
                                              side=side, near_metal=any(near) if near else None,
                                              **_values(before, after, height_m)))

    total = TotalChange(**_total(structures, "both", height_m))
    by_side = [SideTotalChange(side=side, **_total(structures, side, height_m)) for side in ("left", "right")]
    return ChangeRecord(
        patient_id=patient_id,
        height_m=height_m,
        height_source=height_source or post.height_source,
        baseline=_ref(baseline, pre),
        followup=_ref(followup, post),
        days_between=_days(baseline.study_date, followup.study_date),
        fractured_side=fractured_side,
        baseline_age_years=pre.age_years,
        structures=tuple(structures),
        total_analysed_muscles=total,
        total_analysed_muscles_by_side=tuple(by_side),
        baseline_qa=pre.qa,
        followup_qa=post.qa,
        operated_vs_contralateral=tuple(operated_vs_contralateral(structures, fractured_side)),
        notes=tuple(notes),
    )


def operated_vs_contralateral(structures: Sequence[StructureChange],
                              fractured_side: LeftRight | None) -> list[SideComparison]:
    """Per muscle: the operated side's change against the other side's (empty when the side is unknown)."""
    if fractured_side is None:
        return []
    other = other_side(fractured_side)
    by_key = {(s.name, s.side): s for s in structures}
    rows = []
    for s in structures:
        if s.side != fractured_side:
            continue
        c = by_key.get((s.name, other))
        if c is None:
            continue
        op_loss, co_loss = s.loss_pct, c.loss_pct
        rows.append(
            SideComparison(
                label=s.label,
                name=s.name,
                group=s.group,
                operated_side=fractured_side,
                operated_pre_cm3=s.pre_cm3,
                operated_post_cm3=s.post_cm3,
                operated_loss_pct=op_loss,
                contralateral_pre_cm3=c.pre_cm3,
                contralateral_post_cm3=c.post_cm3,
                contralateral_loss_pct=co_loss,
                loss_pct_difference=(
                    (op_loss - co_loss) if op_loss is not None and co_loss is not None else None
                ),
                post_asymmetry_pct=(
                    _loss_pct(c.post_cm3, s.post_cm3) if c.post_cm3 and s.post_cm3 is not None else None
                ),
            )
        )
    return rows
