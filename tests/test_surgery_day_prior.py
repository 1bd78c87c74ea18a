"""Prior retrieval when the PACS holds a surgery-day check CT, through a running node and a real Orthanc.

Why end to end: which earlier CT the node asks for, whether the metal its own QA finds places a
surgery-day CT after the operation, and whether that study then asks again, are decided in three
places (``retrieve.prior_candidates``, ``surgery_day.place``, ``pairing.needs_prior``); only the whole
chain (C-FIND, C-MOVE, store, job, pairing, the next C-FIND) shows that the follow-up ends up
compared with the pre-operative CT. The pipeline is the real one from the label map on
(``node_pipeline:measure``: no model), so the metal QA is measured in the CT as the node does it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from orthanc import OrthancServer, requires_orthanc
from peers import NodeProcess

from dicomnode.clinical.pairing import RetrievalStatus, Role
from dicomnode.harness.net import free_port, wait_for
from dicomnode.harness.scu import send_series
from seg.records import ChangeRecord, ReasonCode, reasons_from_json

pytestmark = [pytest.mark.e2e, requires_orthanc]

FINISHED = ("done", "failed", "rejected")
SURGERY = "20240301"


@dataclass(frozen=True)
class Ct:
    """One phantom CT study as the PACS holds it."""

    study_uid: str
    series_uid: str
    dicom: Path


@dataclass
class Site:
    """The PACS and the node the tests share (each test has a patient of its own), and what a test
    reads back from the node's index, by its patient or its series."""

    orthanc: OrthancServer
    node: NodeProcess
    tmp: Path

    def ct(self, pid: str, name: str, date: str, time: str, **options: Any) -> Ct:
        """A small whole-thigh phantom of patient ``pid`` (coarse voxels, hip to mid-thigh), in the PACS."""
        from seg.phantom import PhantomOptions, make_phantom, write_phantom

        ph = make_phantom(PhantomOptions(seed=5, spacing_mm=(4.0, 4.0, 5.0), z_range_mm=(-60.0, 30.0),
                                         patient_id=pid, study_date=date, study_time=time, **options))
        folder = Path(write_phantom(ph, self.tmp / "phantoms" / pid / name)) / "dicom"
        self.orthanc.upload_folder(folder)
        return Ct(str(ph.header.study_instance_uid), str(ph.header.series_instance_uid), folder)

    def send(self, ct: Ct) -> None:
        """The PACS routes ``ct`` to the node (as its routing rule does with a new whole-thigh CT)."""
        send_series(ct.dicom, self.node.port, self.node.ae_title, calling_aet="ORTHANC")

    def done(self, ct: Ct, timeout: float = 60.0) -> None:
        job = self.node.wait_job(ct.series_uid, FINISHED, timeout=timeout)
        assert job["state"] == "done", (job, self.node.log()[-3000:])

    def role(self, ct: Ct) -> Role:
        (row,) = self.node.sql("SELECT role FROM pairing_status WHERE series_instance_uid=?",
                               (ct.series_uid,))
        return Role(row["role"])

    def codes(self, ct: Ct) -> set[ReasonCode]:
        (row,) = self.node.sql("SELECT reasons FROM pairing_status WHERE series_instance_uid=?",
                               (ct.series_uid,))
        return {r.code for r in reasons_from_json(row["reasons"])}

    def compared(self, pid: str) -> dict[tuple[str, str], ChangeRecord]:
        """(earlier series, later series) → the change pairing stored for the patient."""
        rows = self.node.sql("SELECT baseline_series_uid, followup_series_uid, change_json"
                             " FROM pairing_changes WHERE patient_id=?", (pid,))
        return {(r[0], r[1]): ChangeRecord.from_json(r[2]) for r in rows}

    def retrievals(self, pid: str) -> dict[str, RetrievalStatus]:
        """Study asked for → the last status recorded for it (requested until the PACS has answered)."""
        rows = self.node.sql("SELECT study_instance_uid, status FROM pairing_retrievals WHERE patient_id=?"
                             " ORDER BY rowid", (pid,))
        return {r[0]: RetrievalStatus(r[1]) for r in rows}

    def detail(self, pid: str, ct: Ct) -> str:
        """What the last answer to ``ct``'s prior retrieval said."""
        rows = self.node.sql("SELECT detail FROM pairing_retrievals WHERE patient_id=?"
                             " AND study_instance_uid=? ORDER BY rowid", (pid, ct.study_uid))
        return str(rows[-1][0])

    def settled(self, pid: str) -> dict[str, RetrievalStatus]:
        """The retrievals once every one has its answer (none left at ``requested``)."""
        def answered() -> dict[str, RetrievalStatus] | None:
            found = self.retrievals(pid)
            return found if found and RetrievalStatus.REQUESTED not in found.values() else None

        return wait_for(answered, 30, what="the PACS's answer to every prior retrieval")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Orthanc (no routing script: the test routes) and ``dicomnode serve`` pointed at each other, with
    the registry's surgery date and fractured side (left) for the patients of these tests (CHAIN-5
    is not in the registry: no surgery date). One pair for the module: every test waits until its
    own jobs are done and its retrievals answered, so none leaves work for the next."""
    tmp_path = tmp_path_factory.mktemp("surgery_day")
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "node", pipeline="node_pipeline:measure", output={"summary": False},
                       pacs={"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
                       pairing={"retrieve_priors": True})
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node.port, dicom_port=pacs_port,
                            lua_scripts=None, dicomweb=False)
    registry = tmp_path / "registry.csv"
    registry.write_text("patient_id,sex,fracture_type,fractured_side,surgery_date\n"
                        + "".join(f"CHAIN-{n},F,FNF,left,{SURGERY}\n" for n in (1, 2, 3, 4, 6, 7, 8)))
    with orthanc, node:
        imported = node.cli("patients", "import", str(registry))
        assert imported.returncode == 0, imported.stderr
        yield Site(orthanc, node, tmp_path)


def test_a_followup_first_gets_the_ct_before_the_surgery_day(site: Site) -> None:
    """PACS: the CT the day before surgery, the check CT of the surgery day (implant on the fractured
    side), the 3-month follow-up. The follow-up arrives alone: the node fetches the pre-operative CT,
    not the check CT (one retrieval). The check CT, routed later, is placed post-operative by its
    metal and compared with that baseline; it asks for nothing (a pre-operative CT is held)."""
    pid = "CHAIN-1"
    pre = site.ct(pid, "pre", "20240229", "100000")
    day = site.ct(pid, "day", SURGERY, "160000", postop=True, implant_side="left")
    follow = site.ct(pid, "follow", "20240603", "100000", postop=True, implant_side="left",
                     atrophy={"vastus_lateralis": 0.8})
    site.send(follow)
    site.done(follow)
    site.done(pre)  # arrived by C-MOVE
    assert site.settled(pid) == {follow.study_uid: RetrievalStatus.RETRIEVED}
    assert site.node.jobs(day.series_uid) == []  # the check CT was not fetched

    site.send(day)
    site.done(day)
    assert (site.role(pre), site.role(day), site.role(follow)) == (Role.BASELINE, Role.FOLLOWUP,
                                                                   Role.FOLLOWUP)
    assert ReasonCode.SURGERY_DAY_POSTOPERATIVE in site.codes(day)  # by the implant its QA found
    changes = site.compared(pid)
    assert set(changes) == {(pre.series_uid, day.series_uid), (pre.series_uid, follow.series_uid),
                            (day.series_uid, follow.series_uid)}
    assert all(c.baseline_preoperative for c in changes.values())
    assert site.retrievals(pid) == {follow.study_uid: RetrievalStatus.RETRIEVED}  # no second one


def test_a_same_morning_preoperative_ct_is_fetched_not_the_check_ct(site: Site) -> None:
    """No CT before the surgery day: the earliest of the surgery day is fetched (the admission CT
    of the morning), placed pre-operative by its QA (no metal) and made the baseline."""
    pid = "CHAIN-2"
    pre = site.ct(pid, "pre", SURGERY, "080000")
    day = site.ct(pid, "day", SURGERY, "160000", postop=True, implant_side="left")
    follow = site.ct(pid, "follow", "20240603", "100000", postop=True, implant_side="left")
    site.send(follow)
    site.done(follow)
    site.done(pre)
    assert site.settled(pid) == {follow.study_uid: RetrievalStatus.RETRIEVED}
    assert (site.role(pre), site.role(follow)) == (Role.BASELINE, Role.FOLLOWUP)
    assert ReasonCode.SURGERY_DAY_PREOPERATIVE in site.codes(pre)
    assert list(site.compared(pid)) == [(pre.series_uid, follow.series_uid)]
    assert site.node.jobs(day.series_uid) == []


def test_a_check_ct_placed_postoperative_asks_for_its_own_prior(site: Site) -> None:
    """The check CT arrives first (routed on the surgery day): its metal makes it post-operative, a
    study without a pre-operative baseline, so it asks the PACS, which gives the CT of the day before."""
    pid = "CHAIN-3"
    pre = site.ct(pid, "pre", "20240229", "100000")
    day = site.ct(pid, "day", SURGERY, "160000", postop=True, implant_side="left")
    site.send(day)
    site.done(day)
    site.done(pre)
    assert site.settled(pid) == {day.study_uid: RetrievalStatus.RETRIEVED}
    assert (site.role(pre), site.role(day)) == (Role.BASELINE, Role.FOLLOWUP)
    assert ReasonCode.SURGERY_DAY_POSTOPERATIVE in site.codes(day)
    (change,) = site.compared(pid).values()
    assert change.baseline_preoperative is True


def test_a_check_ct_arriving_first_gets_the_admission_ct_of_its_morning(site: Site) -> None:
    """No CT before the surgery day; the check CT of the afternoon arrives before the admission CT of
    the morning. By its date alone it found no prior ("no earlier CT study") and stood as a
    post-operative baseline until a later follow-up asked again; by StudyTime the morning CT is its
    prior: fetched, placed pre-operative by its QA, the baseline. The check CT is not compared with
    it (same day, no interval); the 3-month follow-up is, and asks for nothing."""
    pid = "CHAIN-4"
    admission = site.ct(pid, "admission", SURGERY, "080000")
    check = site.ct(pid, "check", SURGERY, "160000", postop=True, implant_side="left")
    follow = site.ct(pid, "follow", "20240603", "100000", postop=True, implant_side="left")
    site.send(check)
    site.done(check)
    site.done(admission)  # arrived by C-MOVE
    assert site.settled(pid) == {check.study_uid: RetrievalStatus.RETRIEVED}
    assert (site.role(admission), site.role(check)) == (Role.BASELINE, Role.FOLLOWUP)
    assert ReasonCode.SURGERY_DAY_PREOPERATIVE in site.codes(admission)
    assert {ReasonCode.SURGERY_DAY_POSTOPERATIVE, ReasonCode.SAME_DAY_AS_BASELINE} <= site.codes(check)

    site.send(follow)
    site.done(follow)
    (change,) = site.compared(pid).values()
    assert set(site.compared(pid)) == {(admission.series_uid, follow.series_uid)}
    assert change.baseline_preoperative is True
    assert site.retrievals(pid) == {check.study_uid: RetrievalStatus.RETRIEVED}  # no second one


def test_without_a_surgery_date_a_same_day_earlier_ct_is_the_prior(site: Site) -> None:
    """No registry row: the patient's only study asks for the most recent earlier CT. The PACS holds
    one from the same morning only: fetched by its StudyTime, it is the baseline (the earliest),
    the later CT not compared with it (same day); a study of the afternoon is not fetched."""
    pid = "CHAIN-5"
    morning = site.ct(pid, "morning", SURGERY, "080000")
    afternoon = site.ct(pid, "afternoon", SURGERY, "160000", postop=True, implant_side="left")
    evening = site.ct(pid, "evening", SURGERY, "200000", postop=True, implant_side="left")
    site.send(afternoon)
    site.done(afternoon)
    site.done(morning)
    assert site.settled(pid) == {afternoon.study_uid: RetrievalStatus.RETRIEVED}
    assert (site.role(morning), site.role(afternoon)) == (Role.BASELINE, Role.FOLLOWUP)
    assert ReasonCode.SAME_DAY_AS_BASELINE in site.codes(afternoon)
    assert site.node.jobs(evening.series_uid) == []


def test_a_same_day_ct_without_studytime_is_stated_not_guessed(site: Site) -> None:
    """The admission CT of the surgery day carries no StudyTime: whether it came before the check CT
    is not known, so it is not fetched (as by its date alone) and the answer says why."""
    pid = "CHAIN-6"
    admission = site.ct(pid, "admission", SURGERY, "")
    check = site.ct(pid, "check", SURGERY, "160000", postop=True, implant_side="left")
    site.send(check)
    site.done(check)
    assert site.settled(pid) == {check.study_uid: RetrievalStatus.NONE}
    assert site.detail(pid, check) == (
        "the PACS holds no earlier CT study for this patient; 1 CT study of the same day not"
        " considered: its StudyTime is missing or unreadable")
    assert site.role(check) == Role.BASELINE
    assert site.node.jobs(admission.series_uid) == []


def test_a_ct_of_the_year_before_gives_way_to_the_admission_ct_of_the_surgery_morning(
        site: Site) -> None:
    """PACS: a CT of the year before the fracture, the admission CT of the surgery morning, the check
    CT of the afternoon, the 3-month follow-up. The follow-up arrives alone: the node fetches the
    admission CT, the baseline pairing takes (the latest pre-operative); the year-old CT, first by
    its date alone before, stood as the baseline. One C-MOVE: neither the year-old nor the check CT."""
    pid = "CHAIN-7"
    year = site.ct(pid, "year", "20230305", "100000")
    admission = site.ct(pid, "admission", SURGERY, "080000")
    check = site.ct(pid, "check", SURGERY, "160000", postop=True, implant_side="left")
    follow = site.ct(pid, "follow", "20240603", "100000", postop=True, implant_side="left")
    site.send(follow)
    site.done(follow)
    site.done(admission)  # arrived by C-MOVE
    assert site.settled(pid) == {follow.study_uid: RetrievalStatus.RETRIEVED}
    assert (site.role(admission), site.role(follow)) == (Role.BASELINE, Role.FOLLOWUP)
    assert ReasonCode.SURGERY_DAY_PREOPERATIVE in site.codes(admission)
    assert ReasonCode.BASELINE_BEFORE_ADMISSION not in site.codes(admission)
    assert list(site.compared(pid)) == [(admission.series_uid, follow.series_uid)]
    assert site.node.jobs(year.series_uid) == [] and site.node.jobs(check.series_uid) == []


def test_a_held_year_old_baseline_asks_for_the_admission_period_alone(site: Site) -> None:
    """The node holds a CT of the year before (routed), the only pre-operative one: the baseline,
    flagged. A follow-up still asks the PACS, for the admission period alone: a CT two years before
    is not fetched (it would not replace the baseline). Once the PACS holds the admission CT of the
    surgery morning, the next follow-up fetches it and it becomes the baseline, unflagged."""
    pid = "CHAIN-8"
    two_years = site.ct(pid, "two-years", "20220305", "100000")
    year = site.ct(pid, "year", "20230305", "100000")
    follow = site.ct(pid, "follow", "20240603", "100000", postop=True, implant_side="left")
    site.send(year)
    site.done(year)
    site.send(follow)
    site.done(follow)
    assert site.settled(pid) == {follow.study_uid: RetrievalStatus.NONE}
    assert site.detail(pid, follow) == "the PACS holds no earlier CT study for this patient"
    assert site.node.jobs(two_years.series_uid) == []
    assert ReasonCode.BASELINE_BEFORE_ADMISSION in site.codes(year)
    (change,) = site.compared(pid).values()
    assert ReasonCode.BASELINE_BEFORE_ADMISSION in {n.code for n in change.notes}

    admission = site.ct(pid, "admission", SURGERY, "080000")
    later = site.ct(pid, "later", "20240903", "100000", postop=True, implant_side="left")
    site.send(later)
    site.done(later)
    site.done(admission)  # arrived by C-MOVE
    assert site.settled(pid) == {follow.study_uid: RetrievalStatus.NONE,
                                 later.study_uid: RetrievalStatus.RETRIEVED}
    assert [site.role(ct) for ct in (year, admission, follow, later)] == [
        Role.PREOPERATIVE, Role.BASELINE, Role.FOLLOWUP, Role.FOLLOWUP]
    assert ReasonCode.BASELINE_BEFORE_ADMISSION not in site.codes(admission)
    assert (admission.series_uid, follow.series_uid) in site.compared(pid)
    assert site.node.jobs(two_years.series_uid) == []
