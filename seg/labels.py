"""The paper's 30 classes in one fixed order (label value = row), read from ``structures.csv``.

The CSV is the single table of structures: name, anatomical group, display colour and the coded
concept (with the source that vouches for the code) used by the DICOM outputs.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Structure:
    label: int
    name: str
    display_name: str
    group: str
    analysed: bool  # one of the 21 muscles the paper analyses
    rgb: tuple[int, int, int]
    scheme: str  # coding scheme designator, e.g. "SCT"; empty until coded
    value: str
    meaning: str
    code_source: str

    @property
    def is_muscle(self) -> bool:
        return self.name not in ("background", "femur", "iliac_bone")


@cache
def structures() -> tuple[Structure, ...]:
    text = resources.files("seg").joinpath("structures.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    out = tuple(
        Structure(
            label=int(r["label"]),
            name=r["name"],
            display_name=r["display_name"],
            group=r["group"],
            analysed=r["analysed"] == "1",
            rgb=tuple(int(v) for v in r["rgb"].split()),  # type: ignore[arg-type]
            scheme=r["scheme"],
            value=r["value"],
            meaning=r["meaning"],
            code_source=r["code_source"],
        )
        for r in rows
    )
    if [s.label for s in out] != list(range(len(out))) or len(out) != 30:
        raise RuntimeError("structures.csv must list labels 0..29 in order")
    return out


NUM_CLASSES = 30
CLASS_NAMES: tuple[str, ...] = tuple(s.name for s in structures())
ANALYSED_MUSCLES: tuple[str, ...] = tuple(s.name for s in structures() if s.analysed)
LABEL_OF: dict[str, int] = {s.name: s.label for s in structures()}
# The analysed muscles in the paper's Table 1 row order (anterior, medial, gluteal, posterior): the
# order every table and chart a reader sees follows (summary page, cohort report). Not the label order
# (which lists the posterior muscles before the gluteal ones); label values never change.
PAPER_ORDER: tuple[str, ...] = (
    "sartorius", "rectus_femoris", "vastus_lateralis", "vastus_intermedius", "vastus_medialis",
    "adductor_longus", "adductor_brevis", "adductor_magnus", "gracilis", "pectineus",
    "gluteus_maximus", "gluteus_medius", "gluteus_minimus", "tensor_fasciae_latae", "piriformis",
    "obturator_internus", "obturator_externus", "quadratus_femoris",
    "semitendinosus", "semimembranosus", "biceps_femoris",
)
if sorted(PAPER_ORDER) != sorted(ANALYSED_MUSCLES):  # a renamed or re-flagged label must be seen here
    raise RuntimeError("PAPER_ORDER must list exactly the analysed muscles of seg/structures.csv")


def reading_order(name: str) -> int:
    """Sort key for any structure in a table a person reads: the analysed muscles in
    :data:`PAPER_ORDER`, then the other structures by label."""
    return PAPER_ORDER.index(name) if name in PAPER_ORDER else len(PAPER_ORDER) + LABEL_OF[name]


def by_name(name: str) -> Structure:
    return structures()[LABEL_OF[name]]


def closest_name(name: str) -> str | None:
    """The class name a misspelt ``name`` most likely meant (None when nothing is close), for the
    "did you mean" of an error message; each caller words its own message."""
    near = difflib.get_close_matches(name, CLASS_NAMES, n=1)
    return near[0] if near else None
