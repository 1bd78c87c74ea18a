"""Participant flow (the paper's Figure 1 analog): from every patient the node knows to the groups.

Why: a reader of a cohort paper asks first who was left out and why (CONSORT). The counts come from
:func:`reporting.cohort.collect.exclusion`, the rule the tables use, so the flow's last box is always
the tables' n. The flow names reasons and counts only, never a patient.

The flow is a DataFrame (``flow.csv``) with the columns of :data:`FLOW_COLUMNS`:

- ``step``: 0 for the start, 1… for each exclusion step in the order the rules apply, then the
  included patients and their groups (one step number after the last exclusion);
- ``box``: ``start`` (every patient given to the report), ``excluded`` (one rule's total),
  ``reason`` (a reason within the step above it; only for the steps with several causes: no pair,
  fracture type), ``included`` (patients in the tables),
  ``group`` (one sex × fracture group);
- ``label``: what the box says; ``n``: patients; ``remaining``: patients left after the step
  (``start``, ``excluded`` and ``included`` rows only, else empty).
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from reporting.cohort.collect import (
    GROUPS,
    SEX_NAME,
    STEP_FILTER,
    STEP_FRACTURE,
    STEP_MUSCLES,
    STEP_NO_PAIR,
    STEP_SEX,
    STEPS,
    exclusion,
)
from seg.records import CohortEntry
from seg.terminal import COLUMNS

FLOW_COLUMNS = ("step", "box", "label", "n", "remaining")
START_LABEL = "patients measured by the node"
INCLUDED_LABEL = "included in the tables"
STEP_LABEL = {
    STEP_NO_PAIR: "no pre/post pair",
    STEP_FRACTURE: "fracture type not FNF/ITF",
    STEP_SEX: "sex unknown",
    STEP_MUSCLES: "analysed muscles not all measured",
}
ONE_CAUSE = frozenset({STEP_FILTER, STEP_SEX, STEP_MUSCLES})  # steps whose label is their only reason


def filter_text(filters: dict[str, list[str]]) -> str:
    """The filters as the flow names them: ``sex=F fracture_type=FNF,ITF``."""
    return " ".join(f"{k}={','.join(v)}" for k, v in filters.items())


def _step_label(step: str, filters: dict[str, list[str]]) -> str:
    return f"not matching --filter {filter_text(filters)}" if step == STEP_FILTER else STEP_LABEL[step]


def participant_flow(entries: list[CohortEntry], filters: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """The flow of ``entries`` through the filters and inclusion rules (columns: :data:`FLOW_COLUMNS`).

    Every exclusion step is listed, with n = 0 when nobody fell out there (so a reader sees the rule
    was applied); the filter step only when there are filters."""
    filters = filters or {}
    by_step: dict[str, Counter[str]] = {step: Counter() for step in STEPS}
    groups: Counter[str] = Counter()
    for entry in entries:
        why = exclusion(entry, filters)
        if why is not None:
            by_step[why.step][why.detail] += 1
        elif entry.change is not None:
            groups[f"{SEX_NAME[entry.change.sex or '']} {entry.change.fracture_type}"] += 1
    remaining = len(entries)
    rows = [{"step": 0, "box": "start", "label": START_LABEL, "n": remaining, "remaining": remaining}]
    step_no = 0
    for step in STEPS:
        if step == STEP_FILTER and not filters:
            continue
        step_no += 1
        details = by_step[step]
        n = sum(details.values())
        remaining -= n
        rows.append({"step": step_no, "box": "excluded", "label": _step_label(step, filters), "n": n,
                     "remaining": remaining})
        if step not in ONE_CAUSE:
            rows += [{"step": step_no, "box": "reason", "label": detail, "n": count, "remaining": None}
                     for detail, count in sorted(details.items(), key=lambda kv: (-kv[1], kv[0]))]
    step_no += 1
    rows.append({"step": step_no, "box": "included", "label": INCLUDED_LABEL, "n": remaining,
                 "remaining": remaining})
    rows += [{"step": step_no, "box": "group", "label": g, "n": groups[g], "remaining": None} for g in GROUPS]
    flow = pd.DataFrame(rows, columns=list(FLOW_COLUMNS))
    flow["remaining"] = flow["remaining"].astype("Int64")
    return flow


def group_count(flow: pd.DataFrame, group: str) -> int:
    """Patients of one sex × fracture group (``"Female FNF"``) in the flow's last box."""
    rows = flow[(flow["box"] == "group") & (flow["label"] == group)]
    return int(rows["n"].sum())


def fracture_summary(flow: pd.DataFrame, fracture: str) -> str:
    """``"FNF 6 (women 2, men 4)"``: one fracture type's included patients by sex."""
    women, men = group_count(flow, f"Female {fracture}"), group_count(flow, f"Male {fracture}")
    return f"{fracture} {women + men} (women {women}, men {men})"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def flow_text(flow: pd.DataFrame) -> str:
    """The flow as plain text for the terminal, within :data:`COLUMNS` columns."""
    lines = ["Participant flow"]
    for row in flow.itertuples(index=False):
        if row.box == "start":
            line = f"{row.n:>6}  {row.label}"
        elif row.box == "excluded":
            line = f"{-row.n if row.n else 0:>6}  {row.label}"
        elif row.box == "reason":
            line = f"{'':>6}  {row.n:>6}  {row.label}"
        elif row.box == "included":
            lines.append(f"{row.n:>6}  {row.label}")
            lines += [f"{'':>6}  {fracture_summary(flow, f)}" for f in ("FNF", "ITF")]
            continue
        else:
            continue
        lines.append(_clip(line, COLUMNS))
    return "\n".join(lines)
