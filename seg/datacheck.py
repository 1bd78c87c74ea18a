"""A site dataset checked as training reads it, without training: ``dicomnode train --check``.

Why: training stops on a bad case (a label value that is no class, a label map off its CT's grid)
only when it reaches that case, after caching the ones before; a dry run reads every case through
the same functions (:func:`seg.dataset.scan_dataset`, :func:`seg.dataset.load_case`), reports every
bad case at once and shows what the good ones hold: voxels per class, classes no case labels, and
the site's label table when the dataset has one.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from seg import labels as L
from seg.dataset import TABLE_NAME, DatasetCase, DatasetError, LabelTable, load_case
from seg.terminal import COLUMNS


@dataclass(frozen=True)
class CaseCheck:
    """One case as training would read it: its CT grid and voxels per class, or why it cannot be."""

    case: str
    shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    voxels: tuple[int, ...] = ()  # per class 0..29; empty when the case cannot be read
    problem: str | None = None

    @property
    def missing(self) -> list[int]:
        """Structures (1..29) with no voxel in this case."""
        return [label for label, n in enumerate(self.voxels) if label and not n]


def check_case(case: DatasetCase) -> CaseCheck:
    """Read one case exactly as training does; a :class:`DatasetError` becomes its problem."""
    try:
        ct, labels = load_case(case)
    except DatasetError as exc:
        return CaseCheck(case.case, problem=str(exc).removeprefix(f"case {case.case}: "))
    counts = np.bincount(labels.array.ravel(), minlength=L.NUM_CLASSES)
    return CaseCheck(case.case, ct.shape, ct.spacing_mm, tuple(int(n) for n in counts))


def _name(case: str, width: int = 20) -> str:
    """A case name cut to ``width`` from the left (case names differ at their ends)."""
    return case if len(case) <= width else "…" + case[-(width - 1):]


def case_lines(checks: list[CaseCheck]) -> list[str]:
    """The case table: grid, spacing, labelled voxels and how many structures are missing; a bad
    case's problem in place of its figures, each within 80 columns."""
    lines = [f"{'case':<20}  {'CT voxels':<15}  {'spacing mm':<16}  {'labelled':>12}  {'missing':>7}"]
    for c in checks:
        if c.problem is not None or c.shape is None or c.spacing_mm is None:
            lines += textwrap.wrap(f"{_name(c.case):<20}  {c.problem}", COLUMNS, subsequent_indent=" " * 22,
                                   break_on_hyphens=False)  # a path in the problem stays whole
            continue
        shape = "x".join(str(n) for n in c.shape)
        spacing = "x".join(f"{s:.2f}" for s in c.spacing_mm)
        lines.append(f"{_name(c.case):<20}  {shape:<15}  {spacing:<16}  {sum(c.voxels[1:]):>12,}  "
                     f"{len(c.missing):>7}")
        if c.missing:
            lines += textwrap.wrap("missing: " + ", ".join(map(str, c.missing)), COLUMNS,
                                   initial_indent=" " * 22, subsequent_indent=" " * 31)
    return lines


def class_lines(checks: list[CaseCheck]) -> list[str]:
    """Voxels per class over the readable cases, and in how many of them each class is labelled."""
    good = [c for c in checks if c.voxels]
    totals = np.sum([c.voxels for c in good], axis=0) if good else np.zeros(L.NUM_CLASSES, int)
    lines = [f"{'label':>5}  {'structure':<22}  {'voxels, all cases':>18}  {'cases':>7}"]
    for s in L.structures():
        having = sum(1 for c in good if c.voxels[s.label])
        lines.append(f"{s.label:>5}  {s.display_name:<22}  {int(totals[s.label]):>18,}  "
                     f"{f'{having}/{len(good)}':>7}")
    return lines


def verdict(checks: list[CaseCheck]) -> str:
    """The last line: whether training would run through, and classes it could never learn."""
    bad = [c.case for c in checks if c.problem is not None]
    good = [c for c in checks if c.voxels]
    never = [s.display_name for s in L.structures()[1:] if good and not any(c.voxels[s.label] for c in good)]
    text = (f"{len(checks)} cases checked, {len(bad)} would stop training: {', '.join(bad)}" if bad
            else f"{len(checks)} cases checked: every case reads as training reads it")
    if never:
        text += f". Labelled in no case (a model cannot learn them): {', '.join(never)}"
    return "\n".join(textwrap.wrap(text + ". Nothing was written.", COLUMNS))


def table_lines(table: LabelTable | None) -> list[str]:
    """How the label values were read: our numbering, or the site's table, and which of our
    structures no value of it maps to (none of them can be labelled in any case)."""
    if table is None:
        return [f"Label values read as our classes 0..29 (seg/structures.csv); no {TABLE_NAME}."]
    mapped = {r.structure for r in table.rows} - {"background"}
    background = sum(r.structure == "background" for r in table.rows)
    text = (f"Label values read through the dataset's {TABLE_NAME}: {len(table.rows) - background} "
            f"values onto {len(mapped)} of our {L.NUM_CLASSES - 1} structures, {background} to background.")
    if unmapped := table.unmapped():
        text += f" No value maps to: {', '.join(L.by_name(n).display_name for n in unmapped)}."
    return textwrap.wrap(text, COLUMNS)


def report(checks: list[CaseCheck], table: LabelTable | None) -> str:
    """The whole dry-run report, every line within 80 columns."""
    return "\n".join([*table_lines(table), "", *case_lines(checks), "", *class_lines(checks), "",
                      verdict(checks)])
