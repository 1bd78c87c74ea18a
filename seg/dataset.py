"""A site's labelled dataset as ``train --data``, ``train --check`` and ``evaluate --data`` read it.

Why one module: the three must find the same cases, read the same label values and refuse the same
things. A site whose label maps use its own numbering (another tool's, left and right apart,
structures we do not model) gives a label table, ``labels.csv`` in the dataset folder; it is read
once per dataset and applied here, in :func:`label_map_uint8`, for all three.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict, NonNegativeInt

from seg import labels as L
from seg.volume import Volume

CT_NAMES = ("ct.nii.gz", "image.nii.gz", "ct.nii", "dicom")
LABEL_NAMES = ("labels.nii.gz", "truth/labels.nii.gz", "labels.nii")
TABLE_NAME = "labels.csv"
TABLE_COLUMNS = ("value", "structure")


class DatasetError(ValueError):
    """A site dataset that cannot be used as given (no cases, an unreadable image, a label map off the
    CT's grid, a label table that does not say what a value is): the message names the case or file
    and what to fix, for the command line to show as it is."""


class LabelRow(BaseModel):
    """One row of a site's label table: a value of its label maps and the structure it labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: NonNegativeInt
    structure: str  # a name of seg/structures.csv, "background" included

    @pydantic.field_validator("structure")
    @classmethod
    def _ours(cls, name: str) -> str:
        if name not in L.LABEL_OF:
            near = L.closest_name(name)
            hint = f"; did you mean {near}?" if near else ""
            raise ValueError(f"unknown structure {name!r} (the name column of seg/structures.csv, or "
                             f"background){hint}")
        return name


class LabelTable(BaseModel):
    """A site's label table: which of our classes each of its label values is. Several values may
    name one structure (a left and a right class: ours are not lateralised); each value is given once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    rows: tuple[LabelRow, ...]

    @pydantic.model_validator(mode="after")
    def _each_value_once(self) -> LabelTable:
        counts = Counter(r.value for r in self.rows)
        if twice := sorted(v for v, n in counts.items() if n > 1):
            raise ValueError(f"values given more than once: {', '.join(map(str, twice))}")
        return self

    @property
    def classes(self) -> dict[int, int]:
        """Site value -> our class label."""
        return {r.value: L.LABEL_OF[r.structure] for r in self.rows}

    def unmapped(self) -> list[str]:
        """Our structures (not background) that no value of the table maps to."""
        mapped = set(self.classes.values())
        return [s.name for s in L.structures()[1:] if s.label not in mapped]


def read_label_table(root: Path) -> LabelTable | None:
    """The dataset's ``labels.csv`` (columns value,structure), or None when it has none (its label
    maps are then in our numbering). Refused, naming the file and line: another header (one
    separated by semicolons told apart), a value that is no whole number >= 0, a structure we do
    not know, a value given twice."""
    path = root / TABLE_NAME
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(n, [cell.strip() for cell in row]) for n, row in enumerate(csv.reader(f), start=1)]
    lines = [(n, row) for n, row in lines if any(row)]
    if lines and _semicolons(lines[0][1]):
        raise DatasetError(f"{path}: separated by ';' (as Excel saves CSV in some languages); "
                           f"separate by commas: the first line must be {','.join(TABLE_COLUMNS)}")
    if not lines or tuple(lines[0][1]) != TABLE_COLUMNS:
        raise DatasetError(f"{path}: the first line must be {','.join(TABLE_COLUMNS)}")
    rows, line_of = [], {}
    for n, cells in lines[1:]:
        try:
            row = LabelRow.model_validate(dict(zip(TABLE_COLUMNS, cells, strict=True)))
        except ValueError as exc:  # pydantic's ValidationError, or a row of another length
            raise DatasetError(f"{path} line {n}: {_why(exc, cells)}") from exc
        if row.value in line_of:
            raise DatasetError(f"{path} line {n}: value {row.value} is given twice (line "
                               f"{line_of[row.value]} too); each value is one structure")
        line_of[row.value] = n
        rows.append(row)
    return LabelTable(path=path, rows=tuple(rows))


def _semicolons(header: list[str]) -> bool:
    """Whether the header is ours separated by semicolons (Excel's CSV where the decimal separator
    is a comma): named apart from another header, so the fix is plain. One format is read."""
    return len(header) == 1 and tuple(c.strip() for c in header[0].split(";")) == TABLE_COLUMNS


def _why(exc: ValueError, cells: list[str]) -> str:
    """A row's refusal in a reader's words."""
    if not isinstance(exc, pydantic.ValidationError):
        return f"{len(cells)} cell(s), not 2 ({','.join(TABLE_COLUMNS)})"
    err = exc.errors()[0]
    if err["loc"] == ("value",):
        return f"value {cells[0]!r} is not a whole number >= 0"
    return str(err["ctx"]["error"]) if "ctx" in err and "error" in err["ctx"] else err["msg"]


@dataclass(frozen=True)
class DatasetCase:
    """One case folder: its CT and label map, and the dataset's label table (None: our numbering)."""

    case: str
    ct: Path
    labels: Path
    table: LabelTable | None = None

    @property
    def labels_shown(self) -> str:
        """The label map as messages name it, from the dataset folder (``case/labels.nii.gz``): the
        user gave that folder, and a full path would not fit an 80-column report."""
        return f"{self.case}/{self.labels.relative_to(self.ct.parent)}"  # both in the case folder


@dataclass(frozen=True)
class SiteDataset:
    """A dataset folder: its complete cases, the folders lacking a CT or a label map (name, what they
    lack: "CT" or "label map"), and its label table, read once."""

    root: Path
    cases: tuple[DatasetCase, ...]
    incomplete: tuple[tuple[str, str], ...]
    table: LabelTable | None


def scan_dataset(root: Path) -> SiteDataset:
    """The case folders under ``root`` and its label table.

    A case folder holds the CT as ``ct.nii.gz`` / ``image.nii.gz`` or a ``dicom/`` folder, and the
    label map as ``labels.nii.gz`` or ``truth/labels.nii.gz``: our 30-class order, or the site's
    numbering with ``labels.csv`` in ``root``.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    table = read_label_table(root)
    cases, incomplete = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        ct = next((c for c in (d / name for name in CT_NAMES) if c.exists()), None)
        lab = next((c for c in (d / name for name in LABEL_NAMES) if c.exists()), None)
        if ct is None or lab is None:
            incomplete.append((d.name, "CT" if ct is None else "label map"))
            continue
        cases.append(DatasetCase(d.name, ct, lab, table))
    return SiteDataset(root, tuple(cases), tuple(incomplete), table)


def dataset_cases(root: Path) -> SiteDataset:
    """:func:`scan_dataset`, refused when a folder lacks a CT or a label map (a case left out unseen
    would change what was trained or evaluated on) or when there is no case."""
    found = scan_dataset(root)
    if found.incomplete:
        raise DatasetError(f"case folders without a CT or a label map under {root}: "
                           f"{', '.join(f'{name} (no {what})' for name, what in found.incomplete)}; "
                           f"each holds one of {', '.join(CT_NAMES)} and one of {', '.join(LABEL_NAMES)}")
    if not found.cases:
        raise DatasetError(f"no cases under {root} (each case folder: ct.nii.gz or dicom/ + labels.nii.gz)")
    return found


def _shown(values: np.ndarray) -> str:
    return ", ".join(f"{v:g}" for v in values[:5].tolist()) + (" ..." if values.size > 5 else "")


def label_map_uint8(case: DatasetCase, array: np.ndarray) -> np.ndarray:
    """A case's label values as our class labels (uint8), through its dataset's label table when it
    has one. Refused, naming the case, the values and the file: a value that is no whole number,
    and one that is no class 0..29 or (with a table) not in the table; a cast or a default would
    wrap 256 to background, cut 3.4 to 3 or drop a structure without a word."""
    array = np.asarray(array)
    values = np.unique(array)
    bad = values[values != np.round(values)]
    if bad.size:
        raise DatasetError(f"case {case.case}: label values {_shown(bad)} in {case.labels_shown} are "
                           "not whole numbers")
    if case.table is None:
        bad = values[(values < 0) | (values >= L.NUM_CLASSES)]
        if bad.size:
            raise DatasetError(f"case {case.case}: label values {_shown(bad)} are not classes "
                               f"0..{L.NUM_CLASSES - 1} (seg/structures.csv) in {case.labels_shown}; "
                               f"a dataset in its own numbering needs a {TABLE_NAME} (docs/models.md)")
        return array.astype(np.uint8)
    classes = case.table.classes
    bad = np.array([v for v in values.tolist() if v not in classes])
    if bad.size:
        raise DatasetError(f"case {case.case}: label values {_shown(bad)} in {case.labels_shown} are not "
                           f"in {TABLE_NAME}: add a row for each (our structure, or background)")
    ours = np.array([classes[int(v)] for v in values.tolist()], np.uint8)
    out = np.empty(array.shape, np.uint8)
    for k in range(array.shape[-1]):  # one slice at a time: the indices of a whole volume are int64
        out[..., k] = ours[np.searchsorted(values, array[..., k])]
    return out


def read_labels(case: DatasetCase, grid: Volume) -> Volume:
    """The case's label map on ``grid`` (its CT, or :func:`seg.io.image_grid` of it) in our classes."""
    from nibabel.filebasedimages import ImageFileError

    from seg.io import load_image

    try:
        labels = load_image(case.labels).aligned_to(grid)  # saved by any tool, on the CT's grid
    except (OSError, ValueError, ImageFileError) as exc:
        raise DatasetError(f"case {case.case}: {exc}") from exc
    return labels.with_array(label_map_uint8(case, labels.array))


def load_case(case: DatasetCase) -> tuple[Volume, Volume]:
    """A dataset case's CT and its label map in the CT's voxel order (uint8, our classes), as training
    and evaluation both read it; any failure is a :class:`DatasetError` naming the case."""
    from nibabel.filebasedimages import ImageFileError

    from seg.io import load_image

    try:
        ct = load_image(case.ct)
    except (OSError, ValueError, ImageFileError) as exc:
        raise DatasetError(f"case {case.case}: {exc}") from exc
    return ct, read_labels(case, ct)


def check_labels(case: DatasetCase) -> None:
    """What :func:`load_case` would refuse in the label map (its file, its grid against the CT's,
    its values), the CT's pixels unread: ``evaluate --data`` checks every case before the first
    inference and then reads each CT once."""
    from nibabel.filebasedimages import ImageFileError

    from seg.io import image_grid

    try:
        grid = image_grid(case.ct)
    except (OSError, ValueError, ImageFileError) as exc:
        raise DatasetError(f"case {case.case}: {exc}") from exc
    read_labels(case, grid)


def case_source(case: DatasetCase) -> str:
    """What a site case's cache entry is made from: each file's path, size and modification time, the
    label table's included. A corrected label map or table (or a dataset with the same case names)
    then gets a new entry."""
    ct = case.ct
    files = sorted(p for p in ct.rglob("*") if p.is_file()) if ct.is_dir() else [ct]
    files += [case.labels] + ([case.table.path] if case.table else [])
    return "\n".join(f"{p.resolve()} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
