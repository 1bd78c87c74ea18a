"""Cohort data: one row per patient × analysed muscle and one per patient, from pairing's entries.

Why its own module: everything downstream (tables, statistics, figures) reads these two frames, so
inclusion rules (pre/post pair, FNF/ITF, known sex, every analysed muscle measured) live in one place,
each exclusion with its reason. Conventions: loss = pre − post (positive = muscle lost), cm³;
adjusted loss = loss / height² (cm³/m²); loss ratio = (pre − post) / pre × 100. Volumes are both
sides together; the operated vs contralateral columns come from the change record's side comparison.

Input: :class:`~seg.records.CohortEntry` records as :func:`dicomnode.clinical.pairing.cohort_entries` returns
them (each with a change record carrying sex and fracture type, or the reasons there is none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from seg.labels import PAPER_ORDER, by_name
from seg.records import (
    COMPARABILITY_CODES,
    ChangeRecord,
    CohortEntry,
    FractureType,
    LeftRight,
    ReasonCode,
    Sex,
)

GROUPS = ("Female FNF", "Female ITF", "Male FNF", "Male ITF")  # the paper's Table 2/3 column order
TABLE1_GROUPS = ("Male FNF", "Male ITF", "Female FNF", "Female ITF")  # the paper's Table 1 column order
FRACTURES = ("FNF", "ITF")
SEX_NAME = {"F": "Female", "M": "Male"}
MUSCLE_ORDER = PAPER_ORDER  # every table and figure of the report: the paper's Table 1 rows

# Why a patient is not in the tables, in the order the rules are applied (the participant flow's steps).
STEP_FILTER = "filter"
STEP_NO_PAIR = "no-pair"
STEP_FRACTURE = "fracture-type"
STEP_SEX = "sex-unknown"
STEP_MUSCLES = "muscles-not-measured"
STEPS = (STEP_FILTER, STEP_NO_PAIR, STEP_FRACTURE, STEP_SEX, STEP_MUSCLES)
# pairing's reasons for no pre vs post pair, as the flow's sub-boxes name them (no patient data)
_NO_PAIR_LABEL = {
    ReasonCode.SINGLE_STUDY: "single study",
    ReasonCode.NO_LATER_STUDY: "no later study yet",
    ReasonCode.NO_STUDY_DATE: "no StudyDate",
    ReasonCode.SAME_DAY_AS_BASELINE: "follow-up on the baseline's day",
    ReasonCode.SURGERY_DAY_QA_UNKNOWN: "surgery-day CT without metal QA",
    ReasonCode.NO_PREOPERATIVE_BASELINE: "no pre-operative baseline",
    ReasonCode.NO_COMPARISON: "no comparison",
}


@dataclass(frozen=True)
class Exclusion:
    """Why one patient is not in the tables: ``step`` (one of :data:`STEPS`), ``detail`` (the flow's
    grouped reason, free of patient data) and ``reason`` (the text ``excluded.csv`` lists)."""

    step: str
    detail: str
    reason: str


def display(name: str) -> str:
    return by_name(name).display_name


def _matches(entry: CohortEntry, filters: dict[str, list[str]]) -> bool:
    """A filter names a fact of the change record (else of the entry, e.g. ``patient_id``)."""
    for key, wanted in filters.items():
        if entry.change is not None and key in ChangeRecord.model_fields:
            value = entry.change.fact(key)
        else:
            value = getattr(entry, key, None) if key in CohortEntry.model_fields else None
        if str(value).lower() not in {w.lower() for w in wanted}:
            return False
    return True


# What a filter may name: the change record's and the entry's single-valued facts (the registry's
# clinical facts among them), and the registry's short names for two of them.
_FILTER_TYPES = (str, int, bool, float, str | None, int | None, bool | None, float | None,
                 Sex | None, FractureType | None, LeftRight | None)
FILTER_KEYS = tuple(dict.fromkeys(
    name for model in (ChangeRecord, CohortEntry) for name, f in model.model_fields.items()
    if name != "schema_version" and f.annotation in _FILTER_TYPES
))
FILTER_ALIASES = {"fracture": "fracture_type", "side": "fractured_side"}

Normalizer = Callable[[str], "str | None"]


def parse_filters(items: list[str] | None,
                  normalize: dict[str, Normalizer] | None = None) -> dict[str, list[str]]:
    """``["fracture_type=FNF", "sex=F,M"]`` → {"fracture_type": ["FNF"], "sex": ["F", "M"]}.

    A key that names no fact, or a value ``normalize[key]`` cannot read (e.g. the registry's
    vocabulary: ``sex=Female`` → F, ``sex=X`` refused), is a ValueError: a typo must not give an
    empty report that looks like a finding."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = FILTER_ALIASES.get(key.strip(), key.strip())
        if not sep or not key:
            raise ValueError(f"filter {item!r} is not KEY=VALUE")
        if key not in FILTER_KEYS:
            raise ValueError(f"filter {item!r}: no fact {key!r}; one of {', '.join(FILTER_KEYS)}")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise ValueError(f"filter {item!r} has no value")
        read = (normalize or {}).get(key)
        if read is not None:
            bad = [v for v in values if read(v) is None]
            if bad:
                raise ValueError(f"filter {item!r}: {', '.join(map(repr, bad))} is not a {key} value")
            values = [read(v) for v in values]  # type: ignore[misc]
        out.setdefault(key, []).extend(values)
    return out


def exclusion(entry: CohortEntry, filters: dict[str, list[str]] | None = None) -> Exclusion | None:
    """The first inclusion rule ``entry`` fails (in :data:`STEPS` order), or None when it is included.

    Why one function: the tables (:func:`collect`) and the participant flow
    (:mod:`reporting.cohort.flow`) both ask it, so their counts cannot disagree."""
    if filters and not _matches(entry, filters):
        return Exclusion(STEP_FILTER, "not matching the filters", "not matching the filters")
    change = entry.change
    if change is None or entry.reasons:
        codes = sorted(dict.fromkeys(r.code for r in entry.reasons))
        detail = "; ".join(_NO_PAIR_LABEL.get(c, c.value) for c in codes) or "no pre/post pair"
        return Exclusion(STEP_NO_PAIR, detail, entry.reason_text or "no pre/post pair")
    fracture = change.fracture_type
    if fracture not in FRACTURES:
        detail = f"fracture type {fracture or 'unknown'}"
        return Exclusion(STEP_FRACTURE, detail, f"{detail}: not FNF/ITF")
    if change.sex not in SEX_NAME:
        return Exclusion(STEP_SEX, "sex unknown", "sex unknown: cannot be placed in a sex × fracture group")
    both = {s.name for s in change.structures if s.side == "both"}
    missing = [m for m in MUSCLE_ORDER if m not in both]
    if missing:
        return Exclusion(STEP_MUSCLES, "analysed muscle(s) not measured",
                         f"{len(missing)} analysed muscle(s) not measured")
    return None


def collect(
    entries: list[CohortEntry], filters: dict[str, list[str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long per-muscle table, per-patient totals, excluded with reasons) from pairing entries.

    Patients the filters leave out are in neither (the participant flow counts them)."""
    rows, totals, excluded = [], [], []
    for entry in entries:
        pid = entry.patient_id
        why = exclusion(entry, filters)
        if why is not None:
            if why.step != STEP_FILTER:
                # the issuer too: one PatientID at two hospitals is two patients, two rows alike without it
                excluded.append({"patient_id": pid, "issuer_of_patient_id": entry.issuer_of_patient_id,
                                 "reason": why.reason})
            continue
        change = entry.change
        assert change is not None  # exclusion() refused every entry without one
        sex, fracture = change.sex, change.fracture_type
        both = {s.name: s for s in change.structures if s.side == "both"}
        height = change.height_m
        all_muscle_pre = sum(s.pre_cm3 or 0.0 for n, s in both.items() if by_name(n).is_muscle)
        group = f"{SEX_NAME[sex]} {fracture}"
        base = {
            "patient_id": pid,
            "issuer_of_patient_id": entry.issuer_of_patient_id,
            "baseline_study_date": change.baseline.study_date,
            "followup_study_date": change.followup.study_date,
            "sex": sex,
            "fracture_type": fracture,
            "group": group,
            "height_m": height,
            "days_between": change.days_between,
            "koval_grade": change.koval_grade,
            "age_years": change.baseline_age_years,
            # what makes this pair less comparable (the CTs' coverage, the operated side): kept, named
            "comparability": ",".join(sorted({n.code.value for n in change.notes
                                              if n.code in COMPARABILITY_CODES})),
        }
        ovc = {o.name: o for o in change.operated_vs_contralateral}
        for m in MUSCLE_ORDER:
            s = both[m]
            loss = s.pre_cm3 - s.post_cm3
            side = ovc.get(m)
            rows.append(
                base
                | {
                    "muscle": m,
                    "pre_cm3": s.pre_cm3,
                    "post_cm3": s.post_cm3,
                    "loss_cm3": loss,
                    "loss_index_cm3_m2": loss / height**2 if height else np.nan,
                    "loss_pct": loss / s.pre_cm3 * 100.0 if s.pre_cm3 else np.nan,
                    "pre_share_pct": s.pre_cm3 / all_muscle_pre * 100.0 if all_muscle_pre else np.nan,
                    "operated_loss_pct": _num(side.operated_loss_pct if side else None),
                    "contralateral_loss_pct": _num(side.contralateral_loss_pct if side else None),
                }
            )
        pre = sum(both[m].pre_cm3 for m in MUSCLE_ORDER)
        post = sum(both[m].post_cm3 for m in MUSCLE_ORDER)
        side_loss = {"operated_loss_pct": np.nan, "contralateral_loss_pct": np.nan}
        if all(m in ovc for m in MUSCLE_ORDER):
            for which, pre_of, post_of in (
                ("operated", lambda o: o.operated_pre_cm3, lambda o: o.operated_post_cm3),
                ("contralateral", lambda o: o.contralateral_pre_cm3, lambda o: o.contralateral_post_cm3),
            ):
                sp = sum(pre_of(ovc[m]) or 0.0 for m in MUSCLE_ORDER)
                so = sum(post_of(ovc[m]) or 0.0 for m in MUSCLE_ORDER)
                side_loss[f"{which}_loss_pct"] = (sp - so) / sp * 100.0 if sp else np.nan
        totals.append(
            base
            | {
                "height_source": change.height_source,
                "pre_cm3": pre,
                "post_cm3": post,
                "loss_cm3": pre - post,
                "loss_index_cm3_m2": (pre - post) / height**2 if height else np.nan,
                "loss_pct": (pre - post) / pre * 100.0 if pre else np.nan,
                "all_muscle_pre_cm3": all_muscle_pre,
                "fractured_side": change.fractured_side,
                "baseline_series_uid": change.baseline.series_instance_uid,
                "followup_series_uid": change.followup.series_instance_uid,
            }
            | side_loss
        )
    long = pd.DataFrame(rows)
    patients = pd.DataFrame(totals)
    return long, patients, pd.DataFrame(excluded, columns=["patient_id", "issuer_of_patient_id", "reason"])


def _num(value: Any) -> float:
    return float(value) if value is not None else np.nan
