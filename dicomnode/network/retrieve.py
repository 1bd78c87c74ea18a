"""Prior retrieval: fetch a patient's earlier whole-thigh CT from the PACS when the node has no baseline.

Why: a follow-up is worthless without its baseline, and the baseline was often acquired before the
node existed. C-FIND (study level, by PatientID; a patient linked under several IDs,
``patients link``, by each of them) lists the patient's studies; the earlier studies
(by StudyDate, and on the asking study's own day by StudyTime) are ordered by preference
(:func:`prior_candidates`: with a surgery date those of the admission period before the surgery
day, latest first, then those on it, earliest first, then the older ones, latest first; without
one the most recent day first, then the asking study's own day, earliest first); a series-level
C-FIND picks a study's CT series with the most instances (a whole-thigh scan has many slices), and
a study without one (scouts, dose reports) gives way to the next, at most
:data:`MAX_STUDIES_QUERIED` of them; C-MOVE sends that one series to this node's AE, where it is
processed like any other arrival. Off with ``pairing.retrieve_priors = false``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from dicomnode.clinical import admission
from dicomnode.config import Settings
from dicomnode.network.pacs_association import associate
from dicomnode.network.reactor_handshake import application_entity
from seg.dates import da_date, tm_time

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_TIMEOUT_S = 30.0
# studies whose series are queried per retrieval: a patient's history may hold many CT studies, and
# one without a usable series (scouts only) should not end the search, nor make it unbounded
MAX_STUDIES_QUERIED = 3


@dataclass
class StudyHit:
    study_instance_uid: str
    study_date: str
    study_time: str = ""
    modalities: list[str] = field(default_factory=list)
    issuer: str = ""


@dataclass
class SeriesHit:
    series_instance_uid: str
    modality: str
    instances: int | None


class PacsRefusal(RuntimeError):
    """The PACS answered a C-FIND or C-MOVE with a failure status (the attempt counts as failed and is
    made again, as an unreachable PACS's): the code, its meaning in PS3.4 and what to check."""


_MEANINGS = {"C-FIND": QR_FIND_SERVICE_CLASS_STATUS, "C-MOVE": QR_MOVE_SERVICE_CLASS_STATUS}
_MOVE_DESTINATION_UNKNOWN = 0xA801


def _move_hint(settings: Settings, destination: str, code: int) -> str:
    """What a PACS administrator checks when a C-MOVE to this node failed with ``code``."""
    entry = f"AE title {destination}, this node's host, port {settings.port}"
    if code == _MOVE_DESTINATION_UNKNOWN:
        return f"the PACS has no destination of that name: add the node to its DICOM nodes ({entry})"
    return (f"check the PACS's entry for the node ({entry}), that the PACS can reach the node (firewall) "
            "and the node's log for instances it refused (disk low); Orthanc answers 0xC000 for each")


def _refusal(what: str, status: Dataset, hint: str = "") -> PacsRefusal:
    """The error of a failure ``status`` of ``what`` ("C-FIND" or "C-MOVE"). A PACS's ErrorComment is
    left out: it is free text that may name the patient, and the error is logged above DEBUG."""
    code = int(status.Status)
    meaning = _MEANINGS[what].get(code, ("", ""))[1] or "not a status PS3.4 defines for it"
    return PacsRefusal(f"{what} failed with status 0x{code:04X} ({meaning})" + (f": {hint}" if hint else ""))


@dataclass
class RetrieveOutcome:
    moved: bool
    reason: str
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    completed: int = 0
    failed: int = 0


def _ae(settings: Settings) -> AE:
    ae = application_entity(settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = _TIMEOUT_S
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    return ae


def _responses(settings: Settings, what: str, request: Callable[[Association], Iterator[tuple[Dataset, Any]]],
               done: tuple[int, ...] = (0x0000,),
               hint: Callable[[int], str] = lambda code: "") -> Iterator[tuple[Dataset, Any]]:
    """Each (status, identifier) the PACS answers to one C-FIND or C-MOVE ``request``, over its own
    association; raises on a lost association, or :class:`PacsRefusal` on a status that is neither
    pending nor in ``done`` (``hint``: what to check, by the status code)."""
    assoc = associate(_ae(settings), settings)  # NoAssociation (a ConnectionError) says why not
    try:
        for status, ident in request(assoc):
            if not status:
                raise ConnectionError(f"{what}: connection lost or timed out")
            if status.Status not in _PENDING and status.Status not in done:
                raise _refusal(what, status, hint(int(status.Status)))
            yield status, ident
    finally:
        assoc.release()


def _find(settings: Settings, level: str, **keys: str) -> list[Dataset]:
    """The identifiers a C-FIND at ``level`` answers (``keys``: matching values, "" to ask for one)."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)

    def request(assoc: Association) -> Iterator[tuple[Dataset, Any]]:
        return assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)

    return [ident for status, ident in _responses(settings, "C-FIND", request)
            if status.Status in _PENDING and ident is not None]


def find_studies(settings: Settings, patient_id: str) -> list[StudyHit]:
    """The patient's studies at the PACS (study-level C-FIND by PatientID)."""
    out = []
    for ds in _find(settings, "STUDY", PatientID=patient_id, StudyInstanceUID="", StudyDate="",
                    StudyTime="", ModalitiesInStudy="", IssuerOfPatientID=""):
        mods = ds.get("ModalitiesInStudy", None)
        if mods is None or mods == "":
            mods_list: list[str] = []
        elif isinstance(mods, str):
            mods_list = [m for m in mods.split("\\") if m]
        else:
            mods_list = [str(m) for m in mods]
        study_date = da_date(_text(ds, "StudyDate")) or ""  # compared with our dates as text
        out.append(StudyHit(_text(ds, "StudyInstanceUID"), study_date, _text(ds, "StudyTime"),
                            mods_list, _text(ds, "IssuerOfPatientID")))
    return [s for s in out if s.study_instance_uid]


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "")


def find_series(settings: Settings, study_uid: str) -> list[SeriesHit]:
    """The study's series (series-level C-FIND)."""
    out = []
    for ds in _find(settings, "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="",
                    NumberOfSeriesRelatedInstances=""):
        n = ds.get("NumberOfSeriesRelatedInstances", None)
        try:
            count = int(n) if n not in (None, "") else None
        except (TypeError, ValueError):
            count = None
        out.append(SeriesHit(_text(ds, "SeriesInstanceUID"), _text(ds, "Modality"), count))
    return [s for s in out if s.series_instance_uid]


@dataclass(frozen=True)
class Candidates:
    """The earlier CT studies to try as baseline, best first, and the CT studies of the asking study's
    own day that were left out because a StudyTime could not be read (stated, never guessed)."""

    studies: list[StudyHit]
    untimed: int = 0  # studies of the asking study's day left out: no StudyTime to order them by
    own_time_read: bool = True  # False: the asking study's own StudyTime is missing or unreadable

    def untimed_note(self) -> str:
        """"" when nothing was left out, else what and why, for the outcome's reason (no dates: PHI)."""
        if not self.untimed:
            return ""
        what = "study" if self.untimed == 1 else "studies"
        whose = ("this study's" if not self.own_time_read
                 else "its" if self.untimed == 1 else "their")
        return (f"; {self.untimed} CT {what} of the same day not considered: {whose} StudyTime is "
                "missing or unreadable")


def prior_candidates(
    studies: list[StudyHit],
    before_date: str,
    known_study_uids: set[str],
    surgery_date: str | None = None,
    issuer: str = "",
    before_time: str = "",
    not_before: str = "",
    *,
    admission_window_days: int,
) -> Candidates:
    """The earlier CT studies to try as baseline, best first (none already held). A study may hold
    no usable series, so the caller goes down the list.

    Earlier is by StudyDate, and on the asking study's own day (``before_date``) by StudyTime: the
    admission CT of the morning is a prior of the check CT of the afternoon. Where either StudyTime
    cannot be read (:func:`seg.dates.tm_time`), a study of that day is left out, as by its date
    alone, and counted in :attr:`Candidates.untimed`.

    With a surgery date the admission CT is wanted, the baseline pairing takes when it holds it
    (the latest pre-operative CT): first the studies of the admission period before the surgery day
    (its ``admission_window_days``, ``pairing.admission_window_days``:
    :mod:`dicomnode.clinical.admission`), latest first, pre-operative by their date alone; then
    those on the surgery day, earliest first (the admission CT of the morning precedes the check CT
    of the afternoon), whose metal QA then places them (a CT placed post-operative asks again,
    :func:`dicomnode.clinical.pairing.needs_prior`); last the older studies, latest first, which
    pairing uses but flags; never a later one. A CT of a year before, fetched ahead of the surgery
    morning's, stood as the baseline instead of the admission CT. The latest on the surgery day is
    the check CT, most likely: taken first, it cost a second retrieval and sent the follow-up's
    comparison with it before the right one. ``not_before``: the earliest StudyDate to consider
    (pairing holds an older pre-operative CT and asks only for the admission period's). Without a
    surgery date: the most recent
    earlier day first (the usual "relevant prior"), then the earlier studies of the asking study's
    own day, earliest first: never compared with it (no interval), but the baseline of the
    follow-ups to come (pairing's baseline is then the earliest study).
    """
    if not before_date:
        return Candidates([])
    at = tm_time(before_time)
    pool = [
        s
        for s in studies
        if s.study_instance_uid not in known_study_uids
        and s.study_date
        and not_before <= s.study_date <= before_date
        and (not surgery_date or s.study_date <= surgery_date)
        and (not s.modalities or "CT" in s.modalities)
        and (not issuer or not s.issuer or s.issuer == issuer)
    ]
    own_day = [(s, tm_time(s.study_time)) for s in pool if s.study_date == before_date]
    untimed = sum(at is None or t is None for _, t in own_day)
    same_day = [s for s, t in own_day if at is not None and t is not None and t < at]
    earlier = [s for s in pool if s.study_date < before_date]

    def moment(s: StudyHit) -> tuple[str, str]:
        return s.study_date, tm_time(s.study_time) or ""  # no StudyTime: first on its day

    if surgery_date:
        ordered = sorted(earlier + same_day, key=moment)
        admitted: list[StudyHit] = []  # before the surgery day, in the admission period
        older: list[StudyHit] = []  # ... before it: pre-operative, but not the admission CT
        for s in ordered:
            if s.study_date < surgery_date:
                old = admission.before_admission(s.study_date, surgery_date, admission_window_days)
                (older if old else admitted).append(s)
        on_the_day = [s for s in ordered if s.study_date == surgery_date]
        return Candidates(admitted[::-1] + on_the_day + older[::-1], untimed, at is not None)
    return Candidates(sorted(earlier, key=moment, reverse=True) + sorted(same_day, key=moment),
                      untimed, at is not None)


def choose_series(series: list[SeriesHit], min_slices: int) -> SeriesHit | None:
    """The CT series with the most instances, if it looks like a volume (≥ min_slices when counted)."""
    ct = [s for s in series if s.modality in ("CT", "")]
    if not ct:
        return None
    ct.sort(key=lambda s: s.instances or 0, reverse=True)
    best = ct[0]
    if best.instances is not None and best.instances < min_slices:
        return None
    return best


def move_series(
    settings: Settings, study_uid: str, series_uid: str, destination: str | None = None
) -> tuple[int, int]:
    """C-MOVE one series to ``destination`` (default: this node's AE). Returns (completed, failed);
    :class:`PacsRefusal` when the PACS answers with a failure status (Orthanc, dcmqrscp and
    pynetdicom all do when not one instance could be stored at the destination)."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid

    to = destination or settings.ae_title

    def request(assoc: Association) -> Iterator[tuple[Dataset, Any]]:
        return assoc.send_c_move(q, to, StudyRootQueryRetrieveInformationModelMove)

    completed = failed = 0
    # 0xB000: some sub-operations failed; the counts say how many
    for status, _ in _responses(settings, "C-MOVE", request, done=(0x0000, 0xB000),
                                hint=lambda code: _move_hint(settings, to, code)):
        completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
        failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
    return completed, failed


def linked_studies(settings: Settings, patient_ids: tuple[str, ...]) -> list[StudyHit]:
    """The studies of every ID of one patient (:mod:`dicomnode.clinical.aliases`), one C-FIND per
    ID, each study once (by its UID, under the first ID that lists it)."""
    out: dict[str, StudyHit] = {}
    for pid in patient_ids:
        for study in find_studies(settings, pid):
            out.setdefault(study.study_instance_uid, study)
    return list(out.values())


def retrieve_prior(
    settings: Settings,
    patient_id: str,
    before_date: str,
    known_study_uids: set[str],
    surgery_date: str | None = None,
    issuer: str = "",
    before_time: str = "",
    not_before: str = "",
    linked_ids: tuple[str, ...] = (),
) -> RetrieveOutcome:
    """Find and move the patient's CT from before ``before_date`` (or earlier that day than
    ``before_time``; none before ``not_before``) to this node; the outcome says why when not.

    ``linked_ids``: the patient's other IDs of the same issuer (``patients link``); the PACS is
    asked under each, and the candidates of all of them share one order and one bound."""
    if not settings.pairing.retrieve_priors:
        return RetrieveOutcome(False, "prior retrieval is switched off (pairing.retrieve_priors)")
    ids = (patient_id, *(i for i in dict.fromkeys(linked_ids) if i != patient_id))
    found = prior_candidates(linked_studies(settings, ids), before_date, known_study_uids,
                             surgery_date, issuer, before_time, not_before,
                             admission_window_days=settings.pairing.admission_window_days)
    # the IDs are PHI (the reason is logged at INFO): it counts them
    asked = f"; asked under {len(ids)} linked PatientIDs" if len(ids) > 1 else ""
    candidates, note = found.studies, found.untimed_note() + asked
    if not candidates:
        return RetrieveOutcome(False, "the PACS holds no earlier CT study for this patient" + note)
    looked = 0
    chosen: tuple[StudyHit, SeriesHit] | None = None
    for study in candidates[:MAX_STUDIES_QUERIED]:
        looked += 1
        series = choose_series(find_series(settings, study.study_instance_uid),
                               settings.selection.min_slices)
        if series is not None:
            chosen = study, series
            break
    if chosen is None:
        return RetrieveOutcome(False, "no CT series with enough slices in the "
                                      + _studies_looked_at(looked, len(candidates)) + note)
    study, series = chosen
    completed, failed = move_series(settings, study.study_instance_uid, series.series_instance_uid)
    # the study by its UID: its date is the patient's (PHI), for DEBUG only
    log.info("prior retrieval: moved %d instances (%d failed) of study %s", completed, failed,
             study.study_instance_uid)
    log.debug("prior retrieval: study %s dated %s", study.study_instance_uid, study.study_date)
    return RetrieveOutcome(
        completed > 0,
        f"moved {completed} instance(s), {failed} failed; "
        + _studies_looked_at(looked, len(candidates)) + note,
        study.study_instance_uid,
        series.series_instance_uid,
        completed,
        failed,
    )


def _studies_looked_at(looked: int, candidates: int) -> str:
    """How far down the candidates a retrieval went, for its reason: "2 earlier studies looked at
    (of 5)" (a study left unqueried by the bound is counted, so a site sees that it was there)."""
    of = f" (of {candidates})" if candidates > looked else ""
    return f"{looked} earlier {'study' if looked == 1 else 'studies'} looked at{of}"
