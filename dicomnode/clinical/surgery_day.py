"""Which side of the operation a CT dated on the surgery day is: the node's own metal QA decides.

Why: the registry gives the day of surgery, not its hour, so a study's date cannot tell the
admission CT of the morning from the post-operative check CT of the afternoon (implant in place).
Taking every surgery-day study as pre-operative made the check CT the baseline, and every
follow-up was measured against a thigh already operated on. The implant the QA finds
(``VolumeQA.metal`` and its side) is the evidence: metal on the fractured side means
post-operative; none, or metal on the other side only (an old implant), pre-operative; no QA
(a result measured without its CT, or unreadable) is stated, never guessed. Studies before or
after the surgery day are placed by their date alone (:func:`dicomnode.clinical.pairing.plan_timeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from seg.dates import display_date
from seg.records import LeftRight, Reason, ReasonCode, TimePoint, VolumeQA, other_side


class Placement(StrEnum):
    """A surgery-day study's side of the operation."""

    PREOPERATIVE = "pre-operative"
    POSTOPERATIVE = "post-operative"
    UNKNOWN = "unknown"  # no metal QA: not placed until a result with QA replaces it


@dataclass(frozen=True)
class SurgeryDayStudy:
    """The placement of one surgery-day study and the reason the timeline states for it."""

    placement: Placement
    reason: Reason

    @property
    def time_point(self) -> TimePoint | None:
        """The time point the outputs state for it (None: not placed)."""
        return {Placement.PREOPERATIVE: TimePoint.PREOPERATIVE,
                Placement.POSTOPERATIVE: TimePoint.POSTOPERATIVE}.get(self.placement)


def place(qa: VolumeQA | None, surgery_date: str, fractured_side: LeftRight | None) -> SurgeryDayStudy:
    """Place a study dated on ``surgery_date`` by its QA's metal (``qa`` None: not readable).

    Metal whose side is not located, or with no fractured side in the registry, counts as the new
    implant: on the day of a hip operation that is by far the likelier metal.
    """
    day = f"same day as surgery ({display_date(surgery_date)})"
    if qa is None or qa.metal is None:
        return SurgeryDayStudy(Placement.UNKNOWN, Reason(
            ReasonCode.SURGERY_DAY_QA_UNKNOWN,
            f"{day}, metal QA unknown: not placed, not compared"))
    if not qa.metal:
        return SurgeryDayStudy(Placement.PREOPERATIVE, Reason(
            ReasonCode.SURGERY_DAY_PREOPERATIVE, f"{day}, no implant: pre-operative"))
    side = qa.metal_where.side if qa.metal_where is not None else None
    if fractured_side is not None and side == other_side(fractured_side):
        return SurgeryDayStudy(Placement.PREOPERATIVE, Reason(
            ReasonCode.SURGERY_DAY_PREOPERATIVE,
            f"{day}, metal on the unfractured {side}: pre-operative"))
    where = {None: ", side unknown", "both": " on both sides"}.get(side, f" on the {side}")
    return SurgeryDayStudy(Placement.POSTOPERATIVE, Reason(
        ReasonCode.SURGERY_DAY_POSTOPERATIVE, f"{day} with an implant{where}: post-operative"))
