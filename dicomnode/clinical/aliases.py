"""One patient under two PatientIDs: the links an operator made, and the look-alikes pairing hints at.

Why not automatic: IDs that differ only by leading zeros, surrounding spaces or letter case, with one
birth date and sex, are probably one patient (``12345`` from the PACS, ``012345`` from the hospital
system), but pairing two patients' CTs would report one patient's muscle loss from another's scans.
So pairing only hints (:func:`look_alikes`) and pairs two IDs as one patient once an operator has
linked them (:func:`link`, ``dicomnode patients link A B``): the second ID's results are then paired
under the first (its *primary*). A link is a row of ``patient_links`` (migration 7 of
:mod:`dicomnode.db`); :func:`unlink` removes it. Links stay within one IssuerOfPatientID: two
issuers' IDs are two namespaces. Every function works in the caller's connection (transaction).

IDs are PHI: the log says how many, never which.
"""

from __future__ import annotations

import logging
import sqlite3
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicomnode.clinical.registry import parse_sex
from seg.dates import da_date

log = logging.getLogger(__name__)

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def id_key(patient_id: str) -> str:
    """An ID's comparison key: surrounding spaces and leading zeros removed, ASCII letters in lower
    case, as SQLite's trim, ltrim and lower give it (migration 7 keyed the rows it found with them)."""
    return patient_id.strip(" ").lstrip("0").translate(_ASCII_LOWER)


def differences(a: str, b: str) -> str:
    """How two IDs with one :func:`id_key` differ, in words ("leading zeros", ...)."""
    kinds = []
    if a.strip(" ") != a or b.strip(" ") != b:
        kinds.append("surrounding spaces")
    a, b = a.strip(" "), b.strip(" ")
    if len(a) - len(a.lstrip("0")) != len(b) - len(b.lstrip("0")):
        kinds.append("leading zeros")
    if a.lstrip("0") != b.lstrip("0"):
        kinds.append("letter case")
    return " and ".join(kinds) or "nothing"


@dataclass(frozen=True)
class Identity:
    """What the measured results of a set of IDs say of the person: every birth date and sex given."""

    birth_dates: frozenset[str]
    sexes: frozenset[str]

    def conflicts(self, other: Identity) -> list[str]:
        """What tells the two apart, where both are known (empty: nothing does)."""
        out = []
        if self.birth_dates and other.birth_dates and self.birth_dates != other.birth_dates:
            out.append("birth dates differ")
        if self.sexes and other.sexes and self.sexes != other.sexes:
            out.append("sexes differ")
        return out


def identity(con: sqlite3.Connection, ids: list[str], issuer: str) -> Identity:
    """The birth dates and sexes (F/M) the measured results of ``ids`` carry."""
    marks = ",".join("?" * len(ids))
    rows = con.execute(
        "SELECT DISTINCT patient_birth_date, patient_sex FROM pairing_results"
        f" WHERE issuer_of_patient_id=? AND patient_id IN ({marks})", (issuer, *ids)).fetchall()
    return Identity(frozenset(r[0] for r in rows if r[0]),
                    frozenset(s for r in rows if (s := parse_sex(r[1]))))


def primary_of(con: sqlite3.Connection, patient_id: str, issuer: str) -> str:
    """The ID the patient's results are paired under: the one ``patient_id`` is linked to, or itself."""
    row = con.execute("SELECT linked_to FROM patient_links WHERE patient_id=? AND issuer_of_patient_id=?",
                      (patient_id, issuer)).fetchone()
    return row[0] if row else patient_id


def group(con: sqlite3.Connection, primary: str, issuer: str) -> list[str]:
    """The primary ID, then the IDs linked to it (in order)."""
    return [primary] + [r[0] for r in con.execute(
        "SELECT patient_id FROM patient_links WHERE linked_to=? AND issuer_of_patient_id=?"
        " ORDER BY patient_id", (primary, issuer))]


def primaries(con: sqlite3.Connection) -> list[tuple[str, str]]:
    """(primary ID, issuer) of every measured patient, ordered: what pairing iterates over."""
    return [(r[0], r[1]) for r in con.execute(
        "SELECT DISTINCT COALESCE(l.linked_to, r.patient_id), r.issuer_of_patient_id"
        " FROM pairing_results r LEFT JOIN patient_links l"
        " ON l.patient_id = r.patient_id AND l.issuer_of_patient_id = r.issuer_of_patient_id"
        " ORDER BY 1, 2")]


@dataclass(frozen=True)
class LookAlike:
    """A measured ID, not linked with the patient, that is probably the same patient."""

    patient_id: str
    paired_as: str  # the primary it is paired under (itself unless linked)
    differs: str  # how the IDs differ: "leading zeros", "letter case", ...


def look_alikes(con: sqlite3.Connection, primary: str, issuer: str) -> list[LookAlike]:
    """Measured IDs of other patients with an ID equal to one of this patient's after
    :func:`id_key`, and the same birth date (known on both sides) and sex (where both known).

    None when this patient's results carry no birth date, or more than one."""
    ids = group(con, primary, issuer)
    mine = identity(con, ids, issuer)
    keys = sorted({id_key(i) for i in ids} - {""})
    if len(mine.birth_dates) != 1 or not keys:
        return []
    marks = ",".join("?" * len(keys))
    found = [r[0] for r in con.execute(
        "SELECT DISTINCT patient_id FROM pairing_results"
        f" WHERE issuer_of_patient_id=? AND id_key IN ({marks}) ORDER BY patient_id", (issuer, *keys))]
    out = []
    for other in found:
        paired_as = primary_of(con, other, issuer)
        theirs = identity(con, [other], issuer)
        if paired_as == primary or not theirs.birth_dates or mine.conflicts(theirs):
            continue
        twin = next(i for i in ids if id_key(i) == id_key(other))
        out.append(LookAlike(other, paired_as, differences(twin, other)))
    return out


def unread_birth_dates(con: sqlite3.Connection) -> list[tuple[str, Path]]:
    """(series UID, its measurement SR) of the results recorded before birth dates were (index
    schema 7): NULL, where a result recorded since keeps "" for a CT without one."""
    return [(r[0], Path(r[1]) / "outputs" / f"{r[2]}.dcm") for r in con.execute(
        "SELECT series_instance_uid, result_dir, sr_sop_instance_uid FROM pairing_results"
        " WHERE patient_birth_date IS NULL AND result_dir IS NOT NULL")]


def sr_birth_date(path: Path) -> str:
    """The PatientBirthDate a measurement SR copied from its CT (YYYYMMDD); "" when the file is
    gone, unreadable or has none (then the result is never a look-alike)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientBirthDate"])
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return ""
    return da_date(ds.get("PatientBirthDate", "")) or ""


class LinkRefused(ValueError):
    """A link or unlink that was not made, and why (the message names the IDs: for the operator)."""


@dataclass(frozen=True)
class Linked:
    """What ``patients link A B`` did: the IDs now paired under ``primary``."""

    primary: str
    linked: tuple[str, ...]  # B, and the IDs that were linked to B
    checked: tuple[str, ...]  # what was compared: "birth date", "sex" (known on both sides)
    forced: tuple[str, ...]  # the conflicts --force linked over


def link(con: sqlite3.Connection, a: str, b: str, issuer: str = "", *, force: bool = False) -> Linked:
    """Pair ``b``'s results (and those of IDs linked to it) under ``a``'s primary.

    Refused (:class:`LinkRefused`): an ID without a measured result, two IDs already paired as one,
    ``b`` linked to a third ID, and, unless ``force``, IDs whose results give other birth dates
    or sexes."""
    if a == b:
        raise LinkRefused(f"{a!r} and {b!r} are one ID")
    measured = {r[0] for r in con.execute(
        "SELECT DISTINCT patient_id FROM pairing_results WHERE issuer_of_patient_id=?"
        " AND patient_id IN (?, ?)", (issuer, a, b))}
    for pid in (a, b):
        if pid not in measured:
            raise LinkRefused(f"no measured study under PatientID {pid!r}"
                              + (f" of issuer {issuer!r}" if issuer else ""))
    primary, other = primary_of(con, a, issuer), primary_of(con, b, issuer)
    if primary == other:
        raise LinkRefused(f"{a!r} and {b!r} are linked already (paired as {primary!r})")
    if other != b:
        raise LinkRefused(f"{b!r} is linked to {other!r}: link {a!r} with {other!r}, or unlink {b!r} "
                          "first")
    ours, moved = group(con, primary, issuer), group(con, b, issuer)
    mine, theirs = identity(con, ours, issuer), identity(con, moved, issuer)
    conflicts = mine.conflicts(theirs)
    if conflicts and not force:
        raise LinkRefused(f"{a!r} and {b!r}: {' and '.join(conflicts)}; not linked (--force links "
                          "them all the same)")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    con.execute("UPDATE patient_links SET linked_to=?, linked_at=? WHERE linked_to=?"
                " AND issuer_of_patient_id=?", (primary, now, b, issuer))
    con.execute("INSERT INTO patient_links VALUES (?,?,?,?,?)", (b, issuer, primary, bool(conflicts), now))
    checked = tuple(what for what, mine_, theirs_ in (
        ("birth date", mine.birth_dates, theirs.birth_dates), ("sex", mine.sexes, theirs.sexes))
        if mine_ and theirs_)
    log.info("patients: %d ID(s) linked to another%s", len(moved), " (forced)" if conflicts else "")
    return Linked(primary, tuple(moved), checked, tuple(conflicts))


@dataclass(frozen=True)
class Unlinked:
    """What ``patients unlink ID`` did: ``patient_id`` is paired on its own again."""

    patient_id: str
    was_linked_to: str


def unlink(con: sqlite3.Connection, patient_id: str, issuer: str = "") -> Unlinked:
    """Remove ``patient_id``'s link; refused for an ID not linked (a primary names its linked IDs)."""
    primary = primary_of(con, patient_id, issuer)
    if primary == patient_id:
        linked = group(con, patient_id, issuer)[1:]
        raise LinkRefused(f"{patient_id!r} is not linked to another ID" + (
            f"; linked to it: {', '.join(map(repr, linked))} (unlink those)" if linked else ""))
    con.execute("DELETE FROM patient_links WHERE patient_id=? AND issuer_of_patient_id=?",
                (patient_id, issuer))
    log.info("patients: 1 ID unlinked")
    return Unlinked(patient_id, primary)


@dataclass(frozen=True)
class Link:
    """A stored link: ``patient_id``'s results are paired under ``linked_to``."""

    patient_id: str
    issuer: str
    linked_to: str
    forced: bool


def links(con: sqlite3.Connection) -> list[Link]:
    """Every stored link, ordered by issuer, primary and ID."""
    return [Link(r[0], r[1], r[2], bool(r[3])) for r in con.execute(
        "SELECT patient_id, issuer_of_patient_id, linked_to, forced FROM patient_links"
        " ORDER BY issuer_of_patient_id, linked_to, patient_id")]
