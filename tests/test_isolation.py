"""A pipeline that crashes or hangs fails its own job; the node keeps receiving, answering and processing.

Real ``dicomnode serve`` processes with ``node_pipeline:faulty``, which segfaults, exits or hangs
according to the series; dcmtk's echoscu and storescu as the callers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, echoscu, node_factory, pacs, requires_dcmtk, storescu, wait_for  # noqa: F401
from series_factory import write_ct_series

pytestmark = requires_dcmtk

FAULTY = "node_pipeline:faulty"


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def fault_pid(node: Any, fault: str) -> int:
    line = wait_for(lambda: next((r for r in node.pipeline_runs() if f" {fault} pid=" in r), None), 30,
                    what=f"the {fault} pipeline to start")
    return int(re.search(r"pid=(\d+)", line).group(1))  # type: ignore[union-attr]


def still_serving(node: Any, scp: StoreSCP, tmp_path: Path, name: str) -> None:
    """C-ECHO and a C-STORE of another series succeed, and that series is processed and sent."""
    assert node.proc.poll() is None, node.log()[-3000:]
    assert echoscu(node.port).returncode == 0
    other = write_ct_series(tmp_path / name, name=name, n=12, size=8)
    assert storescu(node.port, other.files).returncode == 0
    assert node.wait_job(other.series_uid, ("done", "failed"), timeout=40)["state"] == "done"
    assert any(r.endswith(" run") and other.series_uid in r for r in node.pipeline_runs())
    assert len(scp.files()) == 1


@pytest.mark.parametrize(("fault", "code", "reason"), [
    ("crash", "pipeline-crashed", "pipeline process died (killed by SIGSEGV)"),
    ("exit", "pipeline-crashed", "pipeline process died (exit code 7)"),
    ("oom", "pipeline-error", "MemoryError"),
])
def test_crashing_pipeline_fails_that_job_only(node_factory, pacs: StoreSCP, tmp_path: Path,  # noqa: F811
                                               fault: str, code: str, reason: str) -> None:
    node = node_factory(pacs=pacs, pipeline=FAULTY)
    bad = write_ct_series(tmp_path / "bad", name=f"{fault}-series", n=12, size=8)
    assert storescu(node.port, bad.files).returncode == 0
    job = node.wait_job(bad.series_uid, ("failed", "done"), timeout=40)
    # a crash is a failed attempt like an exception: retried (max_attempts = 2 here), then failed
    assert (job["state"], job["reason_code"], job["attempts"]) == ("failed", code, 2)
    assert job["reason"] == f"attempt 2: {reason}"
    still_serving(node, pacs, tmp_path, "second")


def test_hung_pipeline_is_killed_at_the_timeout_while_the_node_keeps_receiving(
        node_factory, pacs: StoreSCP, tmp_path: Path) -> None:  # noqa: F811
    node = node_factory(pacs=pacs, pipeline=FAULTY, worker={"timeout_seconds": 6.0})
    bad = write_ct_series(tmp_path / "bad", name="hang-series", n=12, size=8)
    assert storescu(node.port, bad.files).returncode == 0
    pid = fault_pid(node, "hang")
    # while the model hangs, the listener answers and stores
    assert echoscu(node.port).returncode == 0
    other = write_ct_series(tmp_path / "during", name="during-fault", n=12, size=8)
    assert storescu(node.port, other.files).returncode == 0
    assert node.jobs(bad.series_uid)[-1]["state"] == "running"
    job = node.wait_job(bad.series_uid, ("failed", "done"), timeout=30)
    # killed and failed for good: a hang is not retried
    assert (job["state"], job["reason_code"], job["attempts"]) == ("failed", "pipeline-timeout", 1)
    assert job["reason"] == "attempt 1: pipeline still running after 6 s: killed"
    assert not alive(pid)
    assert node.wait_job(other.series_uid, ("done", "failed"), timeout=40)["state"] == "done"
    assert node.cli("jobs", "--json").stdout.count("pipeline-timeout") == 1
    still_serving_after = write_ct_series(tmp_path / "after", name="third", n=12, size=8)
    assert storescu(node.port, still_serving_after.files).returncode == 0
    assert node.wait_job(still_serving_after.series_uid, ("done", "failed"), timeout=40)["state"] == "done"
    assert len(pacs.files()) == 2


def test_kill_9_of_the_node_leaves_no_pipeline_process(node_factory, tmp_path: Path) -> None:  # noqa: F811
    node = node_factory(pipeline=FAULTY)
    bad = write_ct_series(tmp_path / "bad", name="hang-orphan", n=12, size=8)
    assert storescu(node.port, bad.files).returncode == 0
    pid = fault_pid(node, "hang")
    node.kill()
    wait_for(lambda: not alive(pid), 10, what="the orphaned pipeline process to exit")


def _pid_pipeline(job: Any, settings: Any) -> Any:
    """Answers with its process id; the series "crash" ends the process (module level: picklable)."""
    import os

    from dicomnode.processing.pipeline import JobOutput

    if job.series_instance_uid == "crash":
        os._exit(9)
    return JobOutput(message=str(os.getpid()))


def test_pipeline_process_stays_warm_and_is_replaced_after_a_crash(tmp_path: Path) -> None:
    """Jobs one after the other share one warm process (warmed up once); a crash costs that job only,
    and the next job gets a fresh process (warmed up again)."""
    from dicomnode.config import Settings
    from dicomnode.processing.isolation import Ending, PipelineProcess
    from dicomnode.processing.phases import read_spans
    from dicomnode.processing.pipeline import JobInput

    proc = PipelineProcess(_pid_pipeline, Settings(storage_dir=tmp_path / "var"))

    def job(uid: str) -> JobInput:
        folder = tmp_path / uid
        folder.mkdir()
        return JobInput(job_id=1, series_instance_uid=uid, files=[], work_dir=folder)

    try:
        first, second = proc.run(job("a"), 60), proc.run(job("b"), 60)
        assert (first.ending, second.ending) == (Ending.OK, Ending.OK)
        assert first.message == second.message  # the same process
        crashed = proc.run(job("crash"), 60)
        assert (crashed.ending, crashed.detail) == (Ending.CRASHED, "pipeline process died (exit code 9)")
        third = proc.run(job("c"), 60)
        assert third.ending is Ending.OK and third.message != first.message  # a fresh process
    finally:
        proc.close()
    warmed = {uid: [s.phase for s in read_spans(tmp_path / uid)].count("warm-up") for uid in "abc"}
    assert warmed == {"a": 1, "b": 0, "c": 1}
