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

from datetime import datetime
from typing import Any

from reporting.rules import change_pct
from seg.labels import ANALYSED_MUSCLES

_REF_KEYS = (
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    "seg_sop_instance_uid",
    "sr_sop_instance_uid",
)
_SIDE_KEYS = {"both": "volume_cm3", "left": "left_cm3", "right": "right_cm3"}


def _days(pre_date: str | None, post_date: str | None) -> int | None:
    try:
        a = datetime.strptime(str(pre_date)[:8], "%Y%m%d")
        b = datetime.strptime(str(post_date)[:8], "%Y%m%d")
    except (TypeError, ValueError):
        return None
    return (b - a).days


def _loss_pct(pre: float | None, post: float | None) -> float | None:
    if pre is None or post is None or pre <= 0:
        return None
    return (pre - post) / pre * 100.0


def _entry(pre: float | None, post: float | None, height_m: float | None) -> dict[str, Any]:
    delta = None if pre is None or post is None else post - pre
    return {
        "pre_cm3": pre,
        "post_cm3": post,
        "delta_cm3": delta,
        "loss_pct": _loss_pct(pre, post),
        "change_pct": change_pct(pre, post),
        "delta_index_cm3_m2": (delta / height_m**2) if (delta is not None and height_m) else None,
    }


def _ref(meta: dict, record: dict) -> dict[str, Any]:
    ref = {k: meta.get(k) for k in _REF_KEYS}
    if not ref["series_instance_uid"]:
        ref["series_instance_uid"] = record.get("series_instance_uid")
    return ref


def compute_change(pre: dict, post: dict, height_m: float | None, pre_meta: dict, post_meta: dict) -> dict:
    """The change record (schema in CONTRACTS.md) from a baseline and a follow-up volumes.json record.

    ``post_meta`` may also carry ``patient_id``, ``height_source``, ``fractured_side`` and ``notes``
    (reasons stated by pairing); they are copied into the record.
    """
    fractured_side = post_meta.get("fractured_side") or pre_meta.get("fractured_side")
    notes = list(post_meta.get("notes") or [])
    if not height_m:
        height_m = None
        if not any("height" in n for n in notes):
            notes.append("no plausible height: index change (cm³/m²) not computed")
    pre_by_label = {int(s["label"]): s for s in pre.get("structures", [])}
    structures: list[dict[str, Any]] = []
    for post_s in sorted(post.get("structures", []), key=lambda s: int(s["label"])):
        pre_s = pre_by_label.get(int(post_s["label"]))
        if pre_s is None:
            continue
        for side, key in _SIDE_KEYS.items():
            if post_s.get(key) is None and pre_s.get(key) is None:
                continue
            entry = {
                "label": int(post_s["label"]),
                "name": post_s["name"],
                "group": post_s.get("group"),
                "side": side,
            }
            entry.update(_entry(pre_s.get(key), post_s.get(key), height_m))
            structures.append(entry)

    both = {s["name"]: s for s in structures if s["side"] == "both"}
    total_pre = sum(both[n]["pre_cm3"] for n in ANALYSED_MUSCLES if n in both)
    total_post = sum(both[n]["post_cm3"] for n in ANALYSED_MUSCLES if n in both)
    total = {"structures": sum(1 for n in ANALYSED_MUSCLES if n in both)}
    total.update(_entry(total_pre, total_post, height_m))

    record: dict[str, Any] = {
        "patient_id": post_meta.get("patient_id") or pre_meta.get("patient_id") or "",
        "height_m": height_m,
        "height_source": post_meta.get("height_source") or post.get("height_source"),
        "baseline": _ref(pre_meta, pre),
        "followup": _ref(post_meta, post),
        "days_between": _days(pre_meta.get("study_date"), post_meta.get("study_date")),
        "fractured_side": fractured_side,
        "structures": structures,
        "total_analysed_muscles": total,
        "operated_vs_contralateral": operated_vs_contralateral(structures, fractured_side),
        "notes": notes,
    }
    return record


def operated_vs_contralateral(structures: list[dict], fractured_side: str | None) -> list[dict[str, Any]]:
    """Per muscle: the operated side's change against the other side's (empty when the side is unknown)."""
    if fractured_side not in ("left", "right"):
        return []
    other = "right" if fractured_side == "left" else "left"
    by_key = {(s["name"], s["side"]): s for s in structures}
    rows = []
    for s in structures:
        if s["side"] != fractured_side:
            continue
        c = by_key.get((s["name"], other))
        if c is None:
            continue
        op_loss, co_loss = s["loss_pct"], c["loss_pct"]
        rows.append(
            {
                "label": s["label"],
                "name": s["name"],
                "group": s["group"],
                "operated_side": fractured_side,
                "operated_pre_cm3": s["pre_cm3"],
                "operated_post_cm3": s["post_cm3"],
                "operated_loss_pct": op_loss,
                "contralateral_pre_cm3": c["pre_cm3"],
                "contralateral_post_cm3": c["post_cm3"],
                "contralateral_loss_pct": co_loss,
                "loss_pct_difference": (op_loss - co_loss)
                if op_loss is not None and co_loss is not None
                else None,
                "post_asymmetry_pct": (
                    _loss_pct(c["post_cm3"], s["post_cm3"])
                    if c["post_cm3"] and s["post_cm3"] is not None
                    else None
                ),
            }
        )
    return rows
