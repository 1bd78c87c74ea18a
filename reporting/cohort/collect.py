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
from typing import Any

import numpy as np
import pandas as pd

from seg.labels import ANALYSED_MUSCLES, by_name
from seg.records import ChangeRecord, CohortEntry

GROUPS = ("Female FNF", "Female ITF", "Male FNF", "Male ITF")  # the paper's Table 2/3 column order
TABLE1_GROUPS = ("Male FNF", "Male ITF", "Female FNF", "Female ITF")  # the paper's Table 1 column order
FRACTURES = ("FNF", "ITF")
SEX_NAME = {"F": "Female", "M": "Male"}


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


# What a filter may name: the change record's and the entry's single-valued facts, and the registry's
# short names for two of them.
FILTER_KEYS = tuple(dict.fromkeys(
    name for model in (ChangeRecord, CohortEntry) for name, f in model.model_fields.items()
    if name != "schema_version"
    and f.annotation in (str, int, bool, float, str | None, int | None, bool | None, float | None)
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


def collect(
    entries: list[CohortEntry], filters: dict[str, list[str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long per-muscle table, per-patient totals, excluded with reasons) from pairing entries."""
    rows, totals, excluded = [], [], []
    for entry in entries:
        pid = entry.patient_id
        if filters and not _matches(entry, filters):
            continue
        change = entry.change
        if change is None:
            excluded.append({"patient_id": pid, "reason": entry.reason_text or "no pre/post pair"})
            continue
        if entry.reasons:
            excluded.append({"patient_id": pid, "reason": entry.reason_text})
            continue
        sex, fracture = change.sex, change.fracture_type
        if fracture not in FRACTURES:
            excluded.append(
                {"patient_id": pid, "reason": f"fracture type {fracture or 'unknown'}: not FNF/ITF"}
            )
            continue
        if sex not in SEX_NAME:
            excluded.append(
                {"patient_id": pid, "reason": "sex unknown: cannot be placed in a sex × fracture group"}
            )
            continue
        height = change.height_m
        both = {s.name: s for s in change.structures if s.side == "both"}
        missing = [m for m in ANALYSED_MUSCLES if m not in both]
        if missing:
            excluded.append({"patient_id": pid, "reason": f"{len(missing)} analysed muscle(s) not measured"})
            continue
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
        }
        ovc = {o.name: o for o in change.operated_vs_contralateral}
        for m in ANALYSED_MUSCLES:
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
        pre = sum(both[m].pre_cm3 for m in ANALYSED_MUSCLES)
        post = sum(both[m].post_cm3 for m in ANALYSED_MUSCLES)
        side_loss = {"operated_loss_pct": np.nan, "contralateral_loss_pct": np.nan}
        if all(m in ovc for m in ANALYSED_MUSCLES):
            for which, pre_of, post_of in (
                ("operated", lambda o: o.operated_pre_cm3, lambda o: o.operated_post_cm3),
                ("contralateral", lambda o: o.contralateral_pre_cm3, lambda o: o.contralateral_post_cm3),
            ):
                sp = sum(pre_of(ovc[m]) or 0.0 for m in ANALYSED_MUSCLES)
                so = sum(post_of(ovc[m]) or 0.0 for m in ANALYSED_MUSCLES)
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
    return long, patients, pd.DataFrame(excluded, columns=["patient_id", "reason"])


def _num(value: Any) -> float:
    return float(value) if value is not None else np.nan
