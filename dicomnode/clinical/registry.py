"""Clinical metadata per patient (height, sex, fracture type/side, surgery date, Koval grade).

Why a registry: DICOM rarely carries a trustworthy height and never the fracture type, yet the
paper's analysis needs both. Sources in order of trust: this registry (imported from a CSV with
``dicomnode patients import``), then the DICOM header (PatientSize / PatientSex). An implausible
height (outside 1.2–2.2 m, the one rule in :mod:`seg.height`) is stored and flagged but never used;
a missing height means no height index, never a guess.
"""

from __future__ import annotations

import csv
import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.clinical import surgery_day
from dicomnode.config import Settings
from dicomnode.db import opened
from seg.dates import da_date
from seg.header import SeriesHeader
from seg.height import PLAUSIBLE_RANGE_TEXT, height_from_patient_size, plausible_height
from seg.records import ClinicalTimePoint, FractureType, LeftRight, Reason, ReasonCode, Sex, VolumeQA

log = logging.getLogger(__name__)

# Header aliases accepted in the CSV (lower-case, spaces/dashes as underscores).
_ALIASES = {
    "patient_id": ("patient_id", "patientid", "pid", "id"),
    "issuer_of_patient_id": ("issuer_of_patient_id", "issuerofpatientid", "issuer"),
    "height_m": ("height_m", "height"),
    "height_cm": ("height_cm",),
    "sex": ("sex", "patient_sex", "gender"),
    "fracture_type": ("fracture_type", "fracture", "type"),
    "fractured_side": ("fractured_side", "side", "fracture_side", "operated_side"),
    "surgery_date": ("surgery_date", "operation_date", "op_date", "surgery"),
    "koval_grade": ("koval_grade", "koval"),
}


@dataclass
class ClinicalInfo:
    """One registry row (values as imported; flags say what will not be used and why)."""

    patient_id: str
    issuer_of_patient_id: str = ""
    height_m: float | None = None
    height_flag: str | None = None  # e.g. "implausible 2.60 m": stored, never used
    sex: Sex | None = None
    fracture_type: FractureType | None = None
    fractured_side: LeftRight | None = None
    surgery_date: str | None = None  # YYYYMMDD
    koval_grade: int | None = None
    source: str | None = None


@dataclass
class Resolved:
    """What the analysis uses for one patient, with where each value came from."""

    height_m: float | None
    height_source: str  # "registry" | "PatientSize" | "missing" | "implausible ..." (reason)
    sex: Sex | None
    sex_source: str
    fracture_type: FractureType | None
    fractured_side: LeftRight | None
    surgery_date: str | None
    koval_grade: int | None
    notes: list[Reason] = field(default_factory=list)

    def time_point(self, study_date: str | None, qa: VolumeQA | None) -> ClinicalTimePoint:
        """The facts a page or measurement SR of a study dated ``study_date`` shows (fracture side and
        type, surgery date and, with both dates, pre- or post-operative; on the surgery day as its QA's
        metal places it, the rule pairing follows): built once per job."""
        on_the_day = None
        if self.surgery_date and study_date == self.surgery_date:
            on_the_day = surgery_day.place(qa, self.surgery_date, self.fractured_side).time_point
        return ClinicalTimePoint(fractured_side=self.fractured_side, fracture_type=self.fracture_type,
                                 surgery_date=self.surgery_date, study_date=study_date or None,
                                 surgery_day=on_the_day)


@dataclass
class ImportResult:
    """What an import did: rows written (of which ``updated`` were stored before), lines skipped."""

    imported: int
    problems: list[str]
    updated: int = 0
    skipped: int = 0


# ---------------------------------------------------------------- parsing


def parse_sex(value: Any) -> Sex | None:
    text = str(value or "").strip().upper()
    if text in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    if text in ("M", "MALE", "MAN"):
        return "M"
    return None


def parse_fracture_type(value: Any) -> FractureType | None:
    """FNF / ITF / other; empty or unrecognised text → None (unknown)."""
    text = str(value or "").strip().lower().replace("-", " ").replace("_", " ")
    if not text:
        return None
    if text in ("fnf", "femoral neck", "femoral neck fracture", "neck"):
        return "FNF"
    if text in ("itf", "intertrochanteric", "intertrochanteric fracture", "trochanteric", "pertrochanteric"):
        return "ITF"
    if text in ("other", "others", "subtrochanteric"):
        return "other"
    return None


def parse_side(value: Any) -> LeftRight | None:
    text = str(value or "").strip().lower()
    if text in ("l", "left", "lt"):
        return "left"
    if text in ("r", "right", "rt"):
        return "right"
    return None


def parse_date(value: Any) -> str | None:
    """YYYYMMDD from YYYYMMDD / YYYY-MM-DD / YYYY.MM.DD / YYYY/MM/DD (:func:`seg.dates.da_date`); None
    when empty; ValueError when garbled ("2024-1-5" was read as the 6-character "202415")."""
    text = str(value or "").strip()
    if not text:
        return None
    digits = da_date(text)
    if digits is None:
        raise ValueError(f"not a date (YYYYMMDD or YYYY-MM-DD): {text!r}")
    return digits


def _normal(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def accepted_columns() -> str:
    """The accepted column names, for error messages and ``--help``."""
    return ", ".join(names[0] for names in _ALIASES.values())


def header_columns(header: list[str]) -> dict[str, str]:
    """Registry field → the CSV column that holds it. A column we do not know, or two columns for one
    field, is refused: a misspelt header (``fracture_typ``) would otherwise drop that fact for every
    patient in the file without a word."""
    of_alias = {alias: key for key, aliases in _ALIASES.items() for alias in aliases}
    found: dict[str, str] = {}
    unknown = []
    for column in header:
        if not column.strip():
            continue  # an unnamed column (a trailing delimiter) holds nothing we could use
        key = of_alias.get(_normal(column))
        if key is None:
            unknown.append(column)
        elif key in found:
            raise ValueError(f"columns {found[key]!r} and {column!r} both give {key}")
        else:
            found[key] = column
    if "height_m" in found and "height_cm" in found:
        raise ValueError(f"columns {found['height_m']!r} and {found['height_cm']!r} both give the height")
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))}; accepted: {accepted_columns()}")
    if "patient_id" not in found:
        raise ValueError(f"no patient_id column (found {header})")
    return found


# Fields a row can set; a field the file does not give (no column, an empty or unreadable cell) keeps
# the value stored for that patient.
_FIELDS = ("height_m", "sex", "fracture_type", "fractured_side", "surgery_date", "koval_grade")


def parse_row(
    row: dict[str, str], columns: dict[str, str]
) -> tuple[ClinicalInfo | None, set[str], list[str]]:
    """One CSV row → (ClinicalInfo, the fields it gives, problems); (None, …) when it has no PatientID.

    ``columns``: :func:`header_columns` of the file's header."""
    problems: list[str] = []
    given: set[str] = set()

    def get(key: str) -> str:
        col = columns.get(key)
        return (row.get(col) or "").strip() if col else ""

    pid = get("patient_id")
    if not pid:
        return None, given, ["no patient_id: line skipped"]
    info = ClinicalInfo(patient_id=pid, issuer_of_patient_id=get("issuer_of_patient_id"))
    height_text, height_cm_text = get("height_m"), get("height_cm")
    try:
        if height_text:
            height = float(height_text)
            info.height_m = height / 100.0 if height > 3.0 else height  # a height in cm in the m column
        elif height_cm_text:
            info.height_m = float(height_cm_text) / 100.0
    except ValueError:
        problems.append(f"height not a number: {height_text or height_cm_text!r}")
    if info.height_m is not None:
        given.add("height_m")
        if not plausible_height(info.height_m):
            info.height_flag = f"implausible height {info.height_m:.2f} m (outside {PLAUSIBLE_RANGE_TEXT})"
            problems.append(info.height_flag)
    if get("sex"):
        info.sex = parse_sex(get("sex"))
        if info.sex is None:
            problems.append(f"sex not F/M: {get('sex')!r}")
    if get("fracture_type"):
        info.fracture_type = parse_fracture_type(get("fracture_type"))
        if info.fracture_type is None:
            problems.append(f"unknown fracture type {get('fracture_type')!r} (FNF/ITF/other)")
    if get("fractured_side"):
        info.fractured_side = parse_side(get("fractured_side"))
        if info.fractured_side is None:
            problems.append(f"fractured side not left/right: {get('fractured_side')!r}")
    try:
        info.surgery_date = parse_date(get("surgery_date"))
    except ValueError:
        problems.append(f"surgery date not a date: {get('surgery_date')!r}")
    if get("koval_grade"):
        try:
            info.koval_grade = int(float(get("koval_grade")))
            if not 1 <= info.koval_grade <= 7:
                problems.append(f"Koval grade {info.koval_grade} outside 1–7")
                info.koval_grade = None
        except ValueError:
            problems.append(f"Koval grade not a number: {get('koval_grade')!r}")
    given |= {f for f in _FIELDS if f != "height_m" and getattr(info, f) is not None}
    return info, given, problems


def merged(stored: ClinicalInfo | None, new: ClinicalInfo, given: set[str]) -> ClinicalInfo:
    """``new``'s given fields over ``stored``'s: what a file does not say is not erased."""
    if stored is None:
        return new
    out = ClinicalInfo(**{**stored.__dict__, "source": new.source})
    for f in given:
        setattr(out, f, getattr(new, f))
    if "height_m" in given:
        out.height_flag = new.height_flag
    return out


# ---------------------------------------------------------------- storage


def _upsert(con: sqlite3.Connection, info: ClinicalInfo) -> None:
    con.execute(
        "INSERT OR REPLACE INTO registry_patients (patient_id, issuer_of_patient_id, height_m, height_flag,"
        " sex, fracture_type, fractured_side, surgery_date, koval_grade, source, imported_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            info.patient_id,
            info.issuer_of_patient_id or "",
            info.height_m,
            info.height_flag,
            info.sex,
            info.fracture_type,
            info.fractured_side,
            info.surgery_date,
            info.koval_grade,
            info.source,
            datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )


def import_csv(settings: Settings, path: Path) -> ImportResult:
    """Insert or update one registry row per CSV row, in one transaction.

    A header we cannot read is refused whole (ValueError: nothing imported). Problems in a row are
    reported with its line: a line whose field count is not the header's (a decimal comma in a
    comma-separated file) or that repeats an earlier line's patient is skipped; an unreadable value
    is not imported. A value the file does not give keeps the one stored before."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        try:
            dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(fh, dialect=dialect)
        header = list(reader.fieldnames or [])
        try:
            columns = header_columns(header)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        result = ImportResult(imported=0, problems=[])
        seen: dict[tuple[str, str], int] = {}
        with opened(settings.db_path) as db, db.tx() as con:
            for lineno, row in enumerate(reader, start=2):
                if None in row or None in row.values():
                    fields = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
                    result.problems.append(f"line {lineno}: {fields} fields, the header has {len(header)}: "
                                           "line skipped")
                    result.skipped += 1
                    continue
                info, given, row_problems = parse_row(row, columns)
                result.problems += [f"line {lineno}: {p}" for p in row_problems]
                if info is None:
                    result.skipped += 1
                    continue
                key = (info.patient_id, info.issuer_of_patient_id)
                if key in seen:
                    result.problems.append(f"line {lineno}: patient {info.patient_id} is on line {seen[key]} "
                                           "already: line skipped")
                    result.skipped += 1
                    continue
                seen[key] = lineno
                info.source = path.name
                stored = _exact_row(con, *key)
                if ("height_m" in given and info.height_flag and stored is not None and stored.height_m
                        and not stored.height_flag):  # a metre value in height_cm: 1.75 -> 0.0175 m
                    given.discard("height_m")
                    result.problems.append(f"line {lineno}: the stored height {stored.height_m:.2f} m"
                                           " is kept")
                if stored is not None and not given:  # every value refused: nothing to update
                    result.problems.append(f"line {lineno}: no usable value for patient {info.patient_id}:"
                                           " line skipped")
                    result.skipped += 1
                    continue
                _upsert(con, merged(stored, info, given))
                result.imported += 1
                result.updated += stored is not None
    log.info("registry: imported %d rows from %s (%d problems)", result.imported, path.name,
             len(result.problems))
    return result


def _exact_row(con: sqlite3.Connection, patient_id: str, issuer: str) -> ClinicalInfo | None:
    row = con.execute("SELECT * FROM registry_patients WHERE patient_id=? AND issuer_of_patient_id=?",
                      (patient_id, issuer)).fetchone()
    return _from_row(row) if row is not None else None


def _from_row(row: sqlite3.Row) -> ClinicalInfo:
    return ClinicalInfo(
        patient_id=row["patient_id"],
        issuer_of_patient_id=row["issuer_of_patient_id"] or "",
        height_m=row["height_m"],
        height_flag=row["height_flag"],
        sex=row["sex"],
        fracture_type=row["fracture_type"],
        fractured_side=row["fractured_side"],
        surgery_date=row["surgery_date"],
        koval_grade=row["koval_grade"],
        source=row["source"],
    )


def get_patient(
    settings: Settings, patient_id: str, issuer: str = "", con: sqlite3.Connection | None = None
) -> ClinicalInfo | None:
    """The registry row for this patient: exact issuer first, then a row imported without issuer.

    ``con``: an open connection to reuse (e.g. inside the caller's write transaction).
    """
    if con is None:
        with opened(settings.db_path) as db, db.lock:
            return get_patient(settings, patient_id, issuer, db.con)
    for iss in dict.fromkeys([issuer or "", ""]):
        if (info := _exact_row(con, patient_id, iss)) is not None:
            return info
    return None


def all_patients(settings: Settings) -> list[ClinicalInfo]:
    with opened(settings.db_path) as db:
        rows = db.query("SELECT * FROM registry_patients ORDER BY patient_id, issuer_of_patient_id")
    return [_from_row(r) for r in rows]


# ---------------------------------------------------------------- resolution


def resolve(
    settings: Settings,
    patient_id: str,
    issuer: str = "",
    dicom_sex: Any = None,
    dicom_size: Any = None,
    con: sqlite3.Connection | None = None,
) -> Resolved:
    """Registry first, DICOM header second (:func:`resolve_row` of the patient's row, read here)."""
    return resolve_row(get_patient(settings, patient_id, issuer, con=con), dicom_sex, dicom_size)


def resolve_row(info: ClinicalInfo | None, dicom_sex: Any = None, dicom_size: Any = None) -> Resolved:
    """:func:`resolve` of a registry row the caller has read already (None: the patient has none).

    Why apart: a caller listing many patients reads each row once; "no row" must not read as "not
    read yet", or every patient outside the registry is looked up a second time.
    Every value carries its provenance or the reason it is absent."""
    notes: list[Reason] = []
    height, height_source = None, "missing"
    if info is not None and info.height_m is not None and info.height_flag is None:
        height, height_source = info.height_m, "registry"
    else:
        if info is not None and info.height_flag:
            notes.append(Reason(ReasonCode.HEIGHT_NOT_USED, f"registry {info.height_flag}: not used"))
        height, height_source = height_from_patient_size(dicom_size)
        if height_source.startswith("implausible"):
            notes.append(Reason(ReasonCode.HEIGHT_NOT_USED, f"{height_source}: not used"))
    if height is None:
        notes.append(Reason(ReasonCode.NO_HEIGHT, "no plausible height: height index (cm³/m²) not computed"))
        if info is not None and info.height_flag and height_source == "missing":
            height_source = "implausible registry height"
    sex: Sex | None = None
    sex_source = "missing"
    if info is not None and info.sex:
        sex, sex_source = info.sex, "registry"
        if parse_sex(dicom_sex) not in (None, info.sex):  # a wrong row or a wrong ID, most likely
            notes.append(Reason(ReasonCode.SEX_CONFLICT, f"registry sex {info.sex} differs from the CT's"
                                f" PatientSex {parse_sex(dicom_sex)}: the registry's is used; check the row"))
    elif parse_sex(dicom_sex):
        sex, sex_source = parse_sex(dicom_sex), "PatientSex"
    fracture_type = info.fracture_type if info is not None else None
    if fracture_type is None:
        notes.append(Reason(ReasonCode.FRACTURE_TYPE_UNKNOWN,
                            "fracture type unknown: not in the FNF/ITF group comparisons"))
    return Resolved(
        height_m=height,
        height_source=height_source,
        sex=sex,
        sex_source=sex_source,
        fracture_type=fracture_type,
        fractured_side=info.fractured_side if info else None,
        surgery_date=info.surgery_date if info else None,
        koval_grade=info.koval_grade if info else None,
        notes=notes,
    )


def facts_for(settings: Settings, header: SeriesHeader) -> Resolved:
    """What the registry and the header say of a series' patient (height with its provenance, never a
    guess; sex; fracture side and type), read once per job: the height, the page's fractured side and
    every output then come from one reading, not from two that an import may fall between."""
    res = resolve(
        settings,
        header.patient_id or "",
        header.issuer_of_patient_id or "",
        header.sex,
        header.size_m,
    )
    if res.height_m is None and res.height_source.startswith("implausible"):
        log.warning("patient height implausible (%s); no height index", res.height_source)
    return res
