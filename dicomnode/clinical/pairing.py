"""Pre/post pairing: every finished measurement joins its patient's timeline and is compared.

Why: the product's point is change over time. Results are grouped by PatientID (+ IssuerOfPatientID),
ordered by StudyDate/StudyTime; with a registry surgery date, studies before it are pre-operative
(the latest one is the baseline: closest to surgery, the admission CT of the paper; one older than
the admission period, :mod:`dicomnode.clinical.admission`, is used but flagged) and later ones
post-operative, and a study on the surgery day is placed by the metal its QA found
(:mod:`dicomnode.clinical.surgery_day`); without one, the earliest study is the baseline. Each
follow-up is compared with the baseline and with the previous study (a trajectory). Every study
that yields no comparison gets a stated reason (single study, same day as baseline,
pre-operative, ...). Re-recording a series replaces its row.

One patient under two PatientIDs (``12345`` and ``012345``) is paired as one only once an operator
linked the IDs (:mod:`dicomnode.clinical.aliases`): the linked IDs' results join the primary ID's
timeline, stored under it. Until then, an ID without a pre-operative baseline or a comparison whose
look-alike ID (same birth date and sex) is measured says so in its studies' reasons.

Tables live in the node's index (``settings.db_path``), opened through :mod:`dicomnode.db`, whose
versioned migrations define them (with the registry's).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from shlex import quote
from typing import Any

from dicomnode.clinical import admission, aliases, registry, surgery_day
from dicomnode.clinical.prior_requests import PriorRequest, RequestState, RetrievalStatus, ask_in_background
from dicomnode.clinical.surgery_day import Placement
from dicomnode.config import Settings
from dicomnode.db import opened
from seg.dates import display_date, tm_time
from seg.records import (
    NOT_COMPARED,
    ChangeRecord,
    CohortEntry,
    Comparison,
    Followup,
    FractureType,
    LeftRight,
    Reason,
    ReasonCode,
    Sex,
    StudyRef,
    VolumeQA,
    VolumeRecord,
    reasons_from_json,
    reasons_to_json,
)

log = logging.getLogger(__name__)

class Role(StrEnum):
    """The role a recorded series takes in its patient's timeline (stored as its value)."""

    BASELINE = "baseline"
    FOLLOWUP = "followup"
    PREOPERATIVE = "pre-operative"  # an earlier pre-operative study than the baseline
    SUPERSEDED = "superseded"  # a later series of the same study represents it
    UNPLACED = "unplaced"  # no StudyDate, or on the surgery day without metal QA: never compared


@dataclass
class ResultRecord:
    """One finished measurement, as the pipeline hands it over."""

    patient_id: str
    issuer_of_patient_id: str
    patient_sex: str
    patient_size_m: float | None
    study_instance_uid: str
    study_date: str
    study_time: str
    series_instance_uid: str
    volumes_json: Path
    seg_sop_instance_uid: str
    sr_sop_instance_uid: str
    result_dir: Path
    patient_birth_date: str = ""  # YYYYMMDD; "" unknown (then never a look-alike of another ID)


@contextmanager
def reading(settings: Settings) -> Iterator[sqlite3.Connection]:
    """The node's index for reads (tables from :data:`dicomnode.db.MIGRATIONS`), closed afterwards."""
    with opened(settings.db_path) as db, db.lock:
        yield db.con


@contextmanager
def writing(settings: Settings) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE): concurrent workers never interleave a patient's refresh."""
    with opened(settings.db_path) as db, db.tx() as con:
        yield con


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ---------------------------------------------------------------- timeline


@dataclass
class Study:
    """A study as the timeline sees it: the latest recorded series of that study."""

    series_instance_uid: str
    study_instance_uid: str
    study_date: str
    study_time: str
    volumes_json: str
    seg_sop_instance_uid: str
    sr_sop_instance_uid: str
    patient_sex: str | None
    patient_size_m: float | None
    recorded_at: str
    patient_id: str = ""  # the study's own PatientID: a linked ID's, in a linked patient's timeline

    @property
    def order_key(self) -> tuple[str, str, str]:
        """Date, then time as prior retrieval compares them (:func:`seg.dates.tm_time`; unread:
        first on its day), then the UID; undated last."""
        return (
            self.study_date or "99999999",
            tm_time(self.study_time) or "",
            self.study_instance_uid,
        )

    def ref(self) -> StudyRef:
        return StudyRef(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            study_date=self.study_date,
            seg_sop_instance_uid=self.seg_sop_instance_uid,
            sr_sop_instance_uid=self.sr_sop_instance_uid,
        )


@dataclass
class Plan:
    """The outcome of ordering a patient's studies: roles, reasons and the comparisons to make."""

    studies: list[Study]
    roles: dict[str, Role]  # series uid → role
    reasons: dict[str, list[Reason]]  # series uid → stated reasons
    comparisons: list[tuple[Study, Study, Comparison]]  # (earlier, later, what the earlier one is)
    baseline: Study | None
    baseline_preoperative: bool | None  # None when no surgery date is known
    surgery_day: dict[str, Placement]  # series uid → placement, for the studies on the surgery day
    surgery_date: str | None  # the registry's, as planned with (a prior is asked for by it too)
    # the pre-operative baseline is older than the admission period: every comparison with it says so
    old_baseline: Reason | None = None


def _studies(con: sqlite3.Connection, patient_id: str, issuer: str) -> tuple[list[Study], list[str]]:
    """The patient's studies in order, with the IDs linked to ``patient_id`` (its primary), and the
    series that a later one of the same study superseded."""
    ids = aliases.group(con, patient_id, issuer)
    rows = con.execute(
        "SELECT * FROM pairing_results WHERE issuer_of_patient_id=?"
        f" AND patient_id IN ({','.join('?' * len(ids))}) ORDER BY recorded_at",
        (issuer, *ids),
    ).fetchall()
    latest: dict[str, sqlite3.Row] = {}
    superseded: list[str] = []
    for row in rows:  # the last recorded series of a study represents it
        if row["study_instance_uid"] in latest:
            superseded.append(latest[row["study_instance_uid"]]["series_instance_uid"])
        latest[row["study_instance_uid"]] = row
    studies = [
        Study(
            r["series_instance_uid"],
            r["study_instance_uid"],
            r["study_date"] or "",
            r["study_time"] or "",
            r["volumes_json"],
            r["seg_sop_instance_uid"] or "",
            r["sr_sop_instance_uid"] or "",
            r["patient_sex"],
            r["patient_size_m"],
            r["recorded_at"],
            r["patient_id"],
        )
        for r in latest.values()
    ]
    return sorted(studies, key=lambda s: s.order_key), superseded


def _name_twins(studies: list[Study], reasons: dict[str, list[Reason]]) -> None:
    """Studies with one StudyDate and StudyTime (to the second): one scan sent twice under new UIDs,
    most likely (a re-import, a re-anonymisation). Both are kept and ordered by StudyInstanceUID, which
    means nothing clinically: the reader is told, to remove the copy the PACS should not hold."""
    moments: dict[tuple[str, str], list[Study]] = {}
    for s in studies:
        if s.study_date and len(s.study_time) >= 6:
            moments.setdefault((s.study_date, s.study_time[:6]), []).append(s)
    for (day, time), twins in moments.items():
        if len(twins) < 2:
            continue
        for s in twins:
            reasons[s.series_instance_uid].append(Reason(
                ReasonCode.SAME_DATE_AND_TIME,
                f"{len(twins)} studies share StudyDate {display_date(day)} and StudyTime {time}: "
                "probably one scan sent under new UIDs; they are ordered by StudyInstanceUID, not by time"))


def _before_admission(baseline: Study, surgery_date: str, window_days: int) -> Reason | None:
    """The flag of a pre-operative baseline older than the admission period of ``window_days``
    (None: it is the admission CT, or its age cannot be told): used, as the latest pre-operative
    CT held, but a change against it includes the time before the fracture, unlike the paper's."""
    if not admission.before_admission(baseline.study_date, surgery_date, window_days):
        return None
    days = admission.days_before(baseline.study_date, surgery_date)
    return Reason(
        ReasonCode.BASELINE_BEFORE_ADMISSION,
        f"baseline {days} days before surgery ({display_date(surgery_date)}), more than "
        f"{window_days}: not the admission CT; the change includes the time "
        "before the fracture")


def plan_timeline(studies: list[Study], surgery_date: str | None, fractured_side: LeftRight | None = None,
                  qa: Mapping[str, VolumeQA | None] | None = None, *,
                  admission_window_days: int) -> Plan:
    """Roles, reasons and comparisons for one patient's ordered studies (pure; no database).

    ``qa``: series uid → the QA of its volumes.json, for the studies dated on the surgery day (the
    metal in it places them); one not given is a study whose QA is not known.
    ``admission_window_days``: ``pairing.admission_window_days``, the admission period before the
    surgery day; a pre-operative baseline older than it is flagged.
    """
    roles: dict[str, Role] = {}
    reasons: dict[str, list[Reason]] = {s.series_instance_uid: [] for s in studies}
    R = Reason
    comparisons: list[tuple[Study, Study, Comparison]] = []
    baseline: Study | None = None
    baseline_pre: bool | None = None
    old_baseline: Reason | None = None
    later: list[Study] = list(studies)
    undated = sum(not s.study_date for s in studies)  # sorted last, never placed or compared
    _name_twins(studies, reasons)

    def unplaced(could_be: str) -> str:
        return (f"; {undated} study without StudyDate could not be placed and may be {could_be}"
                if undated else "")

    placed: dict[str, Placement] = {}  # the studies on the surgery day
    undecided: list[Study] = []  # ... that cannot be placed: no metal QA
    if surgery_date:
        on_the_day = {s.series_instance_uid: surgery_day.place((qa or {}).get(s.series_instance_uid),
                                                              surgery_date, fractured_side)
                      for s in studies if s.study_date == surgery_date}
        placed = {uid: day.placement for uid, day in on_the_day.items()}
        undecided = [s for s in studies if placed.get(s.series_instance_uid) is Placement.UNKNOWN]
        pre = [s for s in studies if s.study_date and (
            s.study_date < surgery_date or placed.get(s.series_instance_uid) is Placement.PREOPERATIVE)]
        later = [s for s in studies if s not in pre and s not in undecided]
        if pre:
            baseline, baseline_pre = pre[-1], True
            for s in pre[:-1]:
                roles[s.series_instance_uid] = Role.PREOPERATIVE
                reasons[s.series_instance_uid].append(R(
                    ReasonCode.EARLIER_PREOPERATIVE,
                    "earlier pre-operative study; the baseline is the latest pre-operative one (surgery "
                    f"{display_date(surgery_date)})"
                ))
            reasons[baseline.series_instance_uid].append(R(
                ReasonCode.BASELINE_PREOPERATIVE,
                f"baseline: latest pre-operative study (surgery {display_date(surgery_date)})",
            ))
            old_baseline = _before_admission(baseline, surgery_date, admission_window_days)
            if old_baseline is not None:
                reasons[baseline.series_instance_uid].append(old_baseline)
        elif any(s.study_date for s in later):
            baseline, baseline_pre = later[0], False  # dated studies sort first
            later = later[1:]
            reasons[baseline.series_instance_uid].append(R(
                ReasonCode.BASELINE_POSTOPERATIVE,
                f"no pre-operative study (surgery {display_date(surgery_date)}): the earliest "
                "post-operative study is the baseline, so changes are post-operative only"
                + unplaced("the pre-operative one")
                + (f"; {len(undecided)} study on the surgery day without metal QA may be the "
                   "pre-operative one" if undecided else "")
            ))
        for uid, day in on_the_day.items():
            reasons[uid].append(day.reason)
    elif any(s.study_date for s in studies):
        baseline, later = studies[0], studies[1:]
        reasons[baseline.series_instance_uid].append(R(
            ReasonCode.BASELINE_EARLIEST,
            "baseline: earliest study (no surgery date in the registry)" + unplaced("earlier"),
        ))
    for s in studies:
        if not s.study_date:
            roles[s.series_instance_uid] = Role.UNPLACED
            reasons[s.series_instance_uid].append(R(
                ReasonCode.NO_STUDY_DATE, "no StudyDate: cannot be placed in time, not compared"))
        elif s in undecided:
            roles[s.series_instance_uid] = Role.UNPLACED  # its reason says why: no metal QA
    if baseline is None:
        return Plan(studies, roles, reasons, comparisons, None, baseline_pre, placed, surgery_date)
    roles[baseline.series_instance_uid] = Role.BASELINE
    if not any(s.study_date for s in later):
        reasons[baseline.series_instance_uid].append(
            R(ReasonCode.SINGLE_STUDY, "single study for this patient: nothing to compare with")
            if len(studies) == 1
            else R(ReasonCode.NO_LATER_STUDY, "no later study yet: nothing to compare with")
        )
    compared: list[Study] = [baseline]
    for s in later:
        uid = s.series_instance_uid
        if not s.study_date:
            continue
        roles[uid] = Role.FOLLOWUP
        if s.study_date == baseline.study_date:
            reasons[uid].append(R(
                ReasonCode.SAME_DAY_AS_BASELINE,
                f"same day as the baseline ({display_date(s.study_date)}): no interval, not compared"))
            continue
        comparisons.append((baseline, s, "baseline"))
        previous = next((p for p in reversed(compared) if p.study_date != s.study_date), None)
        same_day_prev = [p for p in compared if p.study_date == s.study_date]
        if same_day_prev:
            reasons[uid].append(R(
                ReasonCode.SAME_DAY_FOLLOWUP,
                f"another follow-up on the same day ({display_date(s.study_date)}): compared with the "
                "baseline and the last study of an earlier day only"
            ))
        if previous is not None and previous is not baseline:
            comparisons.append((previous, s, "previous"))
        compared.append(s)
    return Plan(studies, roles, reasons, comparisons, baseline, baseline_pre, placed, surgery_date,
                old_baseline)


# ---------------------------------------------------------------- recording


def _change(
    earlier: Study,
    later: Study,
    kind: Comparison,
    patient_id: str,
    res: registry.Resolved,
    baseline_pre: bool | None,
    reasons: list[Reason],
) -> ChangeRecord:
    from reporting.change import compute_change

    change = compute_change(
        VolumeRecord.load(earlier.volumes_json),
        VolumeRecord.load(later.volumes_json),
        res.height_m,
        earlier.ref(),
        later.ref(),
        patient_id=patient_id,
        height_source=res.height_source,
        fractured_side=res.fractured_side,
        notes=[*reasons, *res.notes],
    )
    return change.with_facts(
        comparison=kind,
        baseline_preoperative=baseline_pre,
        sex=res.sex,
        sex_source=res.sex_source,
        fracture_type=res.fracture_type,
        surgery_date=res.surgery_date,
        koval_grade=res.koval_grade,
    )


def record_result(settings: Settings, result: ResultRecord) -> list[ChangeRecord]:
    """Store a finished measurement; return the change records it creates as the follow-up.

    Changes for later studies that this result newly serves as baseline/previous for (a prior that
    arrived late) are stored too; :func:`changes_for_earlier_series` returns them.
    """
    pid, issuer = result.patient_id, result.issuer_of_patient_id or ""
    with writing(settings) as con:
        con.execute(
            "INSERT OR REPLACE INTO pairing_results (series_instance_uid, patient_id,"
            " issuer_of_patient_id, patient_sex, patient_size_m, study_instance_uid, study_date,"
            " study_time, volumes_json, seg_sop_instance_uid, sr_sop_instance_uid, result_dir,"
            " recorded_at, patient_birth_date, id_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                result.series_instance_uid,
                pid,
                issuer,
                result.patient_sex or None,
                result.patient_size_m,
                result.study_instance_uid,
                result.study_date or "",
                result.study_time or "",
                str(result.volumes_json),
                result.seg_sop_instance_uid,
                result.sr_sop_instance_uid,
                str(result.result_dir),
                _now(),
                result.patient_birth_date or "",
                aliases.id_key(pid),
            ),
        )
        primary = aliases.primary_of(con, pid, issuer)
        changes, plan = _refresh_patient(settings, con, primary, issuer)
        # a look-alike ID's studies may now be told of this one
        for other in sorted({a.paired_as for a in aliases.look_alikes(con, primary, issuer)}):
            _refresh_patient(settings, con, other, issuer)
    mine = [c for c in changes if c.followup.series_instance_uid == result.series_instance_uid]
    reasons = plan.reasons.get(result.series_instance_uid, [])
    # the reasons' texts name study and surgery dates (the patient's): at INFO only their codes
    log.info(
        "pairing: series recorded as %s; %d comparison(s)%s",
        plan.roles.get(result.series_instance_uid, "?"),
        len(mine),
        ("; " + ", ".join(r.code.value for r in reasons)) if reasons else "",
    )
    log.debug("pairing: %s", "; ".join(r.text for r in reasons))
    if settings.pairing.retrieve_priors and needs_prior(plan, result):
        _maybe_retrieve(settings, pid, issuer, result, plan)
    return mine


def needs_prior(plan: Plan, result: ResultRecord | Study) -> bool:
    """Whether this new result is a follow-up without a baseline in the node (then the PACS is asked).

    With a surgery date (the plan's): a post-operative study (after the surgery day, or on it with an implant)
    while no pre-operative one is held, or only one older than the admission period (the PACS is
    then asked for the admission CT alone, :func:`_maybe_retrieve`). Without one: the patient's
    only study (it may be a follow-up; a pre-operative CT is better marked by the registry).
    """
    surgery_date = plan.surgery_date
    if surgery_date:
        postoperative = bool(result.study_date) and (
            result.study_date > surgery_date
            or plan.surgery_day.get(result.series_instance_uid) is Placement.POSTOPERATIVE)
        return postoperative and (plan.baseline_preoperative is not True
                                  or plan.old_baseline is not None)
    return len(plan.studies) == 1


def _registry_row(settings: Settings, con: sqlite3.Connection, primary: str,
                  issuer: str) -> registry.ClinicalInfo | None:
    """The registry row of a patient, read once: the primary ID's, else that of the first linked ID
    with one (each ID's row is read once; None: none has one)."""
    for pid in aliases.group(con, primary, issuer):
        if (info := registry.get_patient(settings, pid, issuer, con=con)) is not None:
            return info
    return None


def _resolve(info: registry.ClinicalInfo | None, studies: list[Study]) -> registry.Resolved:
    """The patient's facts as pairing uses them: its registry row ``info`` (:func:`_registry_row`;
    None: it has none), else the latest study's header."""
    latest_size = next((s.patient_size_m for s in reversed(studies) if s.patient_size_m), None)
    latest_sex = next((s.patient_sex for s in reversed(studies) if s.patient_sex), None)
    return registry.resolve_row(info, latest_sex, latest_size)


def _surgery_day_qa(studies: list[Study], surgery_date: str | None) -> dict[str, VolumeQA | None]:
    """The QA of each study dated on the surgery day (None: its volumes.json cannot be read), read
    again at every refresh, so a result measured again with its CT is placed anew."""
    out: dict[str, VolumeQA | None] = {}
    for s in studies:
        if surgery_date and s.study_date == surgery_date:
            try:
                out[s.series_instance_uid] = VolumeRecord.load(s.volumes_json).qa
            except (OSError, ValueError):
                out[s.series_instance_uid] = None
    return out


def _plan(settings: Settings, studies: list[Study], res: registry.Resolved) -> Plan:
    """The timeline of a patient's ``studies`` with its resolved facts ``res``."""
    qa = _surgery_day_qa(studies, res.surgery_date)
    return plan_timeline(studies, res.surgery_date, res.fractured_side, qa,
                         admission_window_days=settings.pairing.admission_window_days)


def _plan_of(settings: Settings, con: sqlite3.Connection, pid: str, issuer: str) -> Plan:
    """The timeline of patient ``pid`` (its primary ID) as the index holds it, written nowhere."""
    studies, _ = _studies(con, pid, issuer)
    return _plan(settings, studies, _resolve(_registry_row(settings, con, pid, issuer), studies))


def _refresh_patient(
    settings: Settings, con: sqlite3.Connection, pid: str, issuer: str
) -> tuple[list[ChangeRecord], Plan]:
    """Recompute roles, reasons and every comparison of one patient (the table mirrors the timeline)."""
    studies, superseded = _studies(con, pid, issuer)
    res = _resolve(_registry_row(settings, con, pid, issuer), studies)
    plan = _plan(settings, studies, res)
    changes = [
        _change(a, b, kind, pid, res, plan.baseline_preoperative,
                plan.reasons[b.series_instance_uid]
                + ([plan.old_baseline] if plan.old_baseline and kind == "baseline" else []))
        for a, b, kind in plan.comparisons
    ]
    hint = _look_alike_hint(con, pid, issuer, plan)
    now = _now()
    # Writes join the caller's transaction (record_result / refresh_all); the rows a linked ID had
    # when it was paired on its own go.
    ids = aliases.group(con, pid, issuer)
    of_ids = f"issuer_of_patient_id=? AND patient_id IN ({','.join('?' * len(ids))})"
    con.execute(f"DELETE FROM pairing_changes WHERE {of_ids}", (issuer, *ids))
    for (a, b, kind), change in zip(plan.comparisons, changes, strict=True):
        con.execute(
            "INSERT OR REPLACE INTO pairing_changes VALUES (?,?,?,?,?,?,?)",
            (a.series_instance_uid, b.series_instance_uid, kind, pid, issuer, change.to_json(), now),
        )
    con.execute(f"DELETE FROM pairing_status WHERE {of_ids}", (issuer, *ids))
    for s in studies:
        why = plan.reasons[s.series_instance_uid] + hint + res.notes
        con.execute(
            "INSERT OR REPLACE INTO pairing_status VALUES (?,?,?,?,?,?)",
            (
                s.series_instance_uid,
                pid,
                issuer,
                plan.roles[s.series_instance_uid],
                reasons_to_json(why),
                now,
            ),
        )
    for uid in superseded:
        con.execute(
            "INSERT OR REPLACE INTO pairing_status VALUES (?,?,?,?,?,?)",
            (
                uid,
                pid,
                issuer,
                Role.SUPERSEDED,
                reasons_to_json([Reason(ReasonCode.SUPERSEDED_SERIES,
                                        "a later series of the same study represents it")]),
                now,
            ),
        )
    return changes, plan


def _look_alike_hint(con: sqlite3.Connection, pid: str, issuer: str, plan: Plan) -> list[Reason]:
    """The reason every study of a patient states when it has no pre-operative baseline (a surgery
    date is known) or no comparison, and another measured ID is probably the same patient
    (:func:`aliases.look_alikes`). Only in the studies' stated reasons, never in a comparison's notes:
    those reach the follow-up SR, and another ID is no part of this patient's record."""
    if plan.comparisons and plan.baseline_preoperative is not False:
        return []
    return [Reason(ReasonCode.POSSIBLY_SAME_PATIENT,
                   f"possibly the same patient as PatientID {quote(a.patient_id)} ({a.differs} differ;"
                   " same birth date), not paired with it; if they are one, link them with "
                   f"`dicomnode patients link {quote(pid)} {quote(a.paired_as)}`")
            for a in aliases.look_alikes(con, pid, issuer)]


@dataclass(frozen=True)
class RefreshCounts:
    """What re-pairing every measured patient did (``patients refresh`` and ``import`` print it).

    A comparison is known by its two series and its kind (baseline / previous); ``changed`` ones are
    stored again with other content (a flag, a note, the registry's facts), compared as records, so
    an older release's wording of the same record is not counted."""

    patients: int = 0
    patients_changed: int = 0  # a role, a stated reason or a comparison is not what was stored
    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class _Stored:
    """One patient's pairing as the index holds it, for telling what a re-pairing changed."""

    statuses: dict[str, tuple[str, list[Reason]]]  # series uid → role, stated reasons
    changes: dict[tuple[str, str, str], ChangeRecord | None]  # (earlier, later, kind) → None: unreadable

    @classmethod
    def read(cls, con: sqlite3.Connection, pid: str, issuer: str) -> _Stored:
        key = (pid, issuer)
        statuses = {r[0]: (r[1], reasons_from_json(r[2])) for r in con.execute(
            "SELECT series_instance_uid, role, reasons FROM pairing_status"
            " WHERE patient_id=? AND issuer_of_patient_id=?", key)}
        changes: dict[tuple[str, str, str], ChangeRecord | None] = {}
        for r in con.execute(
                "SELECT baseline_series_uid, followup_series_uid, comparison, change_json"
                " FROM pairing_changes WHERE patient_id=? AND issuer_of_patient_id=?", key):
            try:
                changes[(r[0], r[1], r[2])] = ChangeRecord.from_json(r[3])
            except ValueError:  # an unreadable stored record: whatever replaces it is a change
                changes[(r[0], r[1], r[2])] = None
        return cls(statuses, changes)


def refresh_all(settings: Settings, progress: Callable[[int, int], None] | None = None) -> RefreshCounts:
    """Re-pair every measured patient with the current settings and registry, as a recorded study
    does for its own patient; ``progress(done, total)`` after each one. The results recorded before
    birth dates were kept get theirs from their measurement SR first (for :mod:`.aliases`).

    Only the index changes: nothing is sent and no PACS is asked for a prior. Each patient is one
    short write transaction, so a running node's worker waits at most for one patient (and a new
    result recorded meanwhile is paired by the node itself)."""
    counts = RefreshCounts()
    with opened(settings.db_path) as db:
        with db.lock:
            unread = aliases.unread_birth_dates(db.con)
        read = [(aliases.sr_birth_date(sr), uid) for uid, sr in unread]  # no transaction spans file I/O
        if read:
            with db.tx() as con:
                con.executemany("UPDATE pairing_results SET patient_birth_date=? WHERE series_instance_uid=?"
                                " AND patient_birth_date IS NULL", read)
        with db.lock:
            keys = aliases.primaries(db.con)
        for done, (pid, issuer) in enumerate(keys, start=1):
            with db.tx() as con:
                before = _Stored.read(con, pid, issuer)
                _refresh_patient(settings, con, pid, issuer)
                after = _Stored.read(con, pid, issuer)
            counts = _counted(counts, before, after)
            if progress is not None:
                progress(done, len(keys))
    return counts


def _counted(counts: RefreshCounts, before: _Stored, after: _Stored) -> RefreshCounts:
    """``counts`` with one more patient, whose pairing was ``before`` and is ``after``."""
    old, new = before.changes, after.changes
    same = sum(1 for k in old.keys() & new.keys() if old[k] is not None and old[k] == new[k])
    kept = len(old.keys() & new.keys())
    return RefreshCounts(
        patients=counts.patients + 1,
        patients_changed=counts.patients_changed + (before != after),
        added=counts.added + len(new.keys() - old.keys()),
        removed=counts.removed + len(old.keys() - new.keys()),
        changed=counts.changed + kept - same,
        unchanged=counts.unchanged + same,
    )


# ---------------------------------------------------------------- queries


def changes_for_earlier_series(settings: Settings, series_instance_uid: str) -> list[ChangeRecord]:
    """Stored changes in which this series is the earlier study (for SRs when a prior arrives late)."""
    with reading(settings) as con:
        rows = con.execute(
            "SELECT change_json FROM pairing_changes WHERE baseline_series_uid=?", (series_instance_uid,)
        ).fetchall()
        return [ChangeRecord.from_json(r[0]) for r in rows]


@dataclass(frozen=True)
class Status:
    """A recorded series' role in its patient's timeline and the reasons stated for it."""

    role: Role
    reasons: list[Reason]


def status_of(settings: Settings, series_instance_uid: str) -> Status | None:
    """Role and stated reasons of one recorded series."""
    with reading(settings) as con:
        row = con.execute(
            "SELECT role, reasons FROM pairing_status WHERE series_instance_uid=?", (series_instance_uid,)
        ).fetchone()
        return Status(Role(row[0]), reasons_from_json(row[1])) if row else None


@dataclass(frozen=True)
class PatientRow:
    """One patient as ``patients list`` shows it: the facts pairing uses, with the height's and the
    sex's sources, and the counts of studies and comparisons (0 for a registry row no measured
    patient uses). The field order is the order of ``patients list --json``."""

    patient_id: str
    issuer: str
    in_registry: bool
    height_m: float | None
    height_source: str
    height_flag: str | None  # the registry's reason not to use its height
    sex: Sex | None
    sex_source: str
    fracture_type: FractureType | None
    fractured_side: LeftRight | None
    surgery_date: str | None
    koval_grade: int | None
    studies: int
    comparisons: int
    linked_ids: tuple[str, ...] = ()  # IDs linked to this one: their studies are counted here
    look_alikes: tuple[aliases.LookAlike, ...] = ()  # IDs its studies' reasons name as possibly it


@dataclass(frozen=True)
class _Measured:
    """A measured patient (primary ID) as ``patients list`` counts it."""

    studies: int
    comparisons: int
    linked_ids: tuple[str, ...]
    look_alikes: tuple[aliases.LookAlike, ...]
    info: registry.ClinicalInfo | None
    resolved: registry.Resolved  # what pairing knows of it: its registry row, else its latest header


def _measured(settings: Settings) -> dict[tuple[str, str], _Measured]:
    """(primary PatientID, issuer) of each measured patient → its counts, links and look-alikes
    (those its stored reasons name: the hint of the last pairing)."""
    out = {}
    with reading(settings) as con:
        for pid, iss in aliases.primaries(con):
            ids = aliases.group(con, pid, iss)
            of_ids = f"issuer_of_patient_id=? AND patient_id IN ({','.join('?' * len(ids))})"
            studies = con.execute(f"SELECT COUNT(DISTINCT study_instance_uid) FROM pairing_results"
                                  f" WHERE {of_ids}", (iss, *ids)).fetchone()[0]
            comparisons = con.execute("SELECT COUNT(*) FROM pairing_changes WHERE patient_id=?"
                                      " AND issuer_of_patient_id=?", (pid, iss)).fetchone()[0]
            hinted = any(r.code is ReasonCode.POSSIBLY_SAME_PATIENT for row in con.execute(
                f"SELECT reasons FROM pairing_status WHERE {of_ids}", (iss, *ids))
                for r in reasons_from_json(row[0]))
            alikes = tuple(aliases.look_alikes(con, pid, iss)) if hinted else ()
            info = _registry_row(settings, con, pid, iss)
            out[(pid, iss)] = _Measured(studies, comparisons, tuple(ids[1:]), alikes, info,
                                        _resolve(info, _studies(con, pid, iss)[0]))
    return out


def patients(settings: Settings) -> list[PatientRow]:
    """Every measured patient and every registry row, one row per patient, ordered by (PatientID, issuer).

    A measured patient's registry row is the one pairing finds (the exact issuer, else a row imported
    without one), so the two are one row; a registry row no measured patient uses is listed on its own.
    IDs linked to another are counted in its row, the row of the ID they are paired under."""
    measured = _measured(settings)
    infos = {key: m.info for key, m in measured.items()}
    listed = set(measured) | {(i.patient_id, i.issuer_of_patient_id) for i in infos.values() if i is not None}
    infos |= {key: p for p in registry.all_patients(settings)
              if (key := (p.patient_id, p.issuer_of_patient_id)) not in listed}
    rows = []
    for key in sorted(infos):
        info = infos[key]
        m = measured.get(key)
        res = m.resolved if m else registry.resolve_row(info)
        rows.append(PatientRow(
            patient_id=key[0],
            issuer=key[1],
            in_registry=info is not None,
            height_m=res.height_m,
            height_source=res.height_source,
            height_flag=info.height_flag if info else None,
            sex=res.sex,
            sex_source=res.sex_source,
            fracture_type=res.fracture_type,
            fractured_side=res.fractured_side,
            surgery_date=res.surgery_date,
            koval_grade=res.koval_grade,
            studies=m.studies if m else 0,
            comparisons=m.comparisons if m else 0,
            linked_ids=m.linked_ids if m else (),
            look_alikes=m.look_alikes if m else (),
        ))
    return rows


@dataclass(frozen=True)
class TimelineRow:
    """One study of a patient's timeline: its role, the reasons stated and the comparisons it has."""

    issuer_of_patient_id: str
    study: Study
    role: Role | None
    reasons: list[Reason]
    changes: list[ChangeRecord]

    def as_json(self) -> dict[str, Any]:
        """The row as JSON-ready data (``patients timeline --json``)."""
        return {
            "issuer_of_patient_id": self.issuer_of_patient_id,
            **asdict(self.study),
            "role": self.role,
            "reasons": [r.to_dict() for r in self.reasons],
            "changes": [c.model_dump(mode="json") for c in self.changes],
        }


def timeline(settings: Settings, patient_id: str, issuer: str | None = None) -> list[TimelineRow]:
    """The patient's studies in order with role, reasons and the comparisons each follow-up has;
    for an ID linked to another, or one others are linked to, the studies of every linked ID (each
    :class:`Study` says its own PatientID)."""
    with reading(settings) as con:
        issuers = (
            [issuer]
            if issuer is not None
            else [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT issuer_of_patient_id FROM pairing_results WHERE patient_id=?",
                    (patient_id,),
                )
            ]
        )
        out: list[TimelineRow] = []
        for iss in issuers:
            studies, _ = _studies(con, aliases.primary_of(con, patient_id, iss), iss)
            for s in studies:
                st = con.execute(
                    "SELECT role, reasons FROM pairing_status WHERE series_instance_uid=?",
                    (s.series_instance_uid,),
                ).fetchone()
                ch = con.execute(
                    "SELECT comparison, change_json FROM pairing_changes WHERE followup_series_uid=?"
                    " ORDER BY comparison",
                    (s.series_instance_uid,),
                ).fetchall()
                out.append(TimelineRow(
                    issuer_of_patient_id=iss,
                    study=s,
                    role=Role(st[0]) if st else None,
                    reasons=reasons_from_json(st[1]) if st else [],
                    changes=[ChangeRecord.from_json(c[1]) for c in ch],
                ))
        return out


def cohort_entries(settings: Settings, followup: Followup = Followup.LAST) -> list[CohortEntry]:
    """Per patient: the pre vs post change used by the cohort report, or the reasons there is none.

    ``followup``: the last (longest interval, default) or the first follow-up compared with the baseline.
    Without a comparison, the reasons are the patient's "not compared" ones (by code, :data:`NOT_COMPARED`).
    """
    with reading(settings) as con:
        keys = aliases.primaries(con)
        out = []
        for pid, iss in keys:
            rows = con.execute(
                "SELECT c.change_json FROM pairing_changes c JOIN pairing_results r"
                " ON r.series_instance_uid = c.followup_series_uid"
                " WHERE c.patient_id=? AND c.issuer_of_patient_id=? AND c.comparison='baseline'"
                " ORDER BY r.study_date, r.study_time",
                (pid, iss),
            ).fetchall()
            changes = [ChangeRecord.from_json(r[0]) for r in rows]
            studies, _ = _studies(con, pid, iss)
            change: ChangeRecord | None = None
            reasons: list[Reason] = []
            if changes:
                change = changes[-1] if followup == Followup.LAST else changes[0]
                if change.baseline_preoperative is False:
                    reasons.append(Reason(ReasonCode.NO_PREOPERATIVE_BASELINE,
                                          "no pre-operative baseline: not a pre vs post pair"))
            else:
                stated = [
                    reason
                    for r in con.execute(
                        "SELECT reasons FROM pairing_status WHERE patient_id=? AND issuer_of_patient_id=?",
                        (pid, iss),
                    )
                    for reason in reasons_from_json(r[0])
                    if reason.code in NOT_COMPARED
                ]
                reasons = sorted(set(stated), key=lambda r: r.text) or [
                    Reason(ReasonCode.NO_COMPARISON, "no comparison")]
            out.append(CohortEntry(patient_id=pid, issuer_of_patient_id=iss, studies=len(studies),
                                   change=change, reasons=tuple(reasons)))
        return out


# ---------------------------------------------------------------- prior retrieval


def _maybe_retrieve(settings: Settings, pid: str, issuer: str, result: ResultRecord, plan: Plan) -> None:
    """Ask the PACS for an earlier study in the background, once per patient and follow-up study
    (retried while the PACS cannot be asked, :mod:`dicomnode.clinical.prior_requests`); under each of
    the patient's linked IDs (``patients link``), the asking study's own first."""
    with writing(settings) as con:
        linked = tuple(aliases.group(con, aliases.primary_of(con, pid, issuer), issuer))
        seen = con.execute(
            "SELECT 1 FROM pairing_retrievals WHERE patient_id=? AND issuer_of_patient_id=?"
            " AND study_instance_uid=?",
            (pid, issuer, result.study_instance_uid),
        ).fetchone()
        if seen:
            return
        con.execute(
            "INSERT INTO pairing_retrievals VALUES (?,?,?,?,?,?)",
            (pid, issuer, result.study_instance_uid, _now(), RetrievalStatus.REQUESTED, None),
        )
    ask_in_background(settings, _prior_request(settings, pid, issuer, result, plan, linked))


def _prior_request(settings: Settings, pid: str, issuer: str, asking: ResultRecord | Study, plan: Plan,
                   linked: tuple[str, ...]) -> PriorRequest:
    """What ``asking`` (a follow-up of ``pid``) asks the PACS for, from its patient's ``plan``."""
    surgery = plan.surgery_date
    return PriorRequest(
        patient_id=pid, issuer=issuer, study_instance_uid=asking.study_instance_uid,
        before_date=asking.study_date or "", before_time=asking.study_time or "", surgery_date=surgery,
        not_before=(admission.window_start(surgery, settings.pairing.admission_window_days)
                    if surgery and plan.old_baseline else ""),
        known_study_uids=frozenset(s.study_instance_uid for s in plan.studies), linked_ids=linked,
    )


# A request still "requested" after this long is no longer being asked: one attempt is bounded by
# the retrieval's timeouts (30 s a message, a few C-FINDs and one C-MOVE), far below an hour.
UNANSWERED_AFTER_SECONDS = 3600.0


def due_prior_requests(settings: Settings, now: datetime,
                       unanswered_before: datetime | None = None) -> list[tuple[PriorRequest, int]]:
    """The prior requests to ask again now, each with its failed attempts so far: the last row
    ``failed``, attempts left and its backoff over by ``now``; also those whose last row is
    ``requested`` from before ``unanswered_before`` (the node's start: no process is asking any more)
    or older than :data:`UNANSWERED_AFTER_SECONDS` (the pipeline's process that was asking was
    replaced). A follow-up that has a baseline since, or that is no longer in the index, is left alone."""
    from dicomnode.clinical.prior_requests import backoff_seconds, request_states

    due: list[tuple[PriorRequest, int]] = []
    with reading(settings) as con:
        for state in request_states(con):
            standing = state.standing(settings.send.attempts)
            waited = (now - state.at).total_seconds()
            if standing == "waiting to ask again":
                if waited < backoff_seconds(settings, state.failed):
                    continue
            elif standing != "asking" or not (
                    (unanswered_before is not None and state.at < unanswered_before)
                    or waited > UNANSWERED_AFTER_SECONDS):
                continue
            request = _still_wanted(settings, con, state)
            if request is not None:
                due.append((request, state.failed))
    return due


def _still_wanted(settings: Settings, con: sqlite3.Connection, state: RequestState) -> PriorRequest | None:
    """The request of ``state``'s follow-up as it would be asked now (under every ID linked to it), or
    None when the follow-up has a baseline since or is no longer in the index."""
    pid, issuer = state.patient_id, state.issuer
    primary = aliases.primary_of(con, pid, issuer)
    plan = _plan_of(settings, con, primary, issuer)
    asking = next((s for s in plan.studies if s.study_instance_uid == state.study_instance_uid), None)
    if asking is None or not needs_prior(plan, asking):
        return None
    return _prior_request(settings, pid, issuer, asking, plan, tuple(aliases.group(con, primary, issuer)))


def still_wanted(settings: Settings, which: Callable[[RequestState], bool]) -> list[PriorRequest]:
    """The requests ``which`` picks whose follow-up still has no baseline, each as it would be asked
    now (under every ID linked to its patient)."""
    from dicomnode.clinical.prior_requests import request_states

    with reading(settings) as con:
        wanted = [_still_wanted(settings, con, s) for s in request_states(con) if which(s)]
    return [w for w in wanted if w is not None]


def answered_none_before_link(settings: Settings, patient_id: str, issuer: str) -> list[PriorRequest]:
    """The follow-ups of ``patient_id``'s linked group still without a baseline whose request the PACS
    answered with no earlier study: asked under fewer IDs than the group has since ``patients link``,
    the PACS may hold their baseline under another of them."""
    with reading(settings) as con:
        ids = set(aliases.group(con, aliases.primary_of(con, patient_id, issuer), issuer))
    return still_wanted(settings, lambda s: s.issuer == issuer and s.patient_id in ids
                        and s.status == RetrievalStatus.NONE)
