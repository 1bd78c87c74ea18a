"""What must survive: kill -9 mid-series, a PACS that is down, a PACS that never comes up."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pydicom
from peers import NodeProcess, StoreSCP, free_port, pynetdicom_send, requires_dcmtk, storescu, wait_for
from series_factory import write_ct_series

pytestmark = requires_dcmtk


def test_kill_9_mid_series_then_resend_completes_once(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    # a longer quiet period so the resend after restart joins the same, still-receiving job
    node = NodeProcess(tmp_path / "node", stable_seconds=3.0,
                       pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}).start()
    try:
        s = write_ct_series(tmp_path / "s", name="crash", n=24, size=64, random_pixels=True)
        acked: list[str] = []

        def after(i: int, status: int | None) -> bool:
            if status == 0:
                acked.append(s.sop_uids[i])
            if len(acked) == 10:
                node.kill()  # kill -9 in the middle of the series, association still open
                return False
            return True

        try:
            pynetdicom_send(node.port, s.files, on_status=after)
        except Exception:  # the association dies with the node
            pass
        assert len(acked) == 10 and node.proc is not None and node.proc.returncode == -9

        # every acknowledged instance is on disk and indexed, nothing partial is left
        node.start()
        rows = node.sql("SELECT sop_uid, path FROM instances WHERE series_uid=?", (s.series_uid,))
        indexed = {r["sop_uid"]: Path(r["path"]) for r in rows}
        assert set(acked) <= set(indexed)
        for uid in acked:
            assert pydicom.dcmread(indexed[uid]).SOPInstanceUID == uid
        assert not list(node.storage_dir.rglob("*.tmp"))

        # the sender resends the whole series; a PACS retries a failed association once more. In the
        # CI run of 3bf0837 (5 Dec) the first resend's association was aborted at its first C-STORE
        # (not reproduced here in 45 runs, under load too): that is shown, with the node's log, as a
        # warning, and the test still fails if the retry does too
        resent = storescu(node.port, s.files)
        if resent.returncode != 0:
            warnings.warn(f"resend after kill -9 failed once (rc {resent.returncode}): "
                          f"{resent.stderr[-800:]}\nnode log:\n{node.log()[-3000:]}", stacklevel=1)
            resent = storescu(node.port, s.files)
        assert resent.returncode == 0, resent.stderr[-1500:]
        job = node.wait_job(s.series_uid, ("done", "failed", "rejected"), timeout=40)
        assert job["state"] == "done" and job["n_instances"] == 24
        assert [j["state"] for j in node.jobs(s.series_uid)] == ["done"]
        runs = [r for r in node.pipeline_runs() if s.series_uid in r]
        assert runs == [f"{job['id']} {s.series_uid} 24 run"]
        assert len(pacs.files()) == 1
    finally:
        node.stop()
        pacs.stop()


def test_pacs_down_then_up_and_never_up_then_retry(tmp_path: Path) -> None:
    pacs_port = free_port()
    send = {"attempts": 5, "initial_backoff_seconds": 0.4, "max_backoff_seconds": 1.0}
    pacs_cfg = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    node = NodeProcess(tmp_path / "node", pacs=pacs_cfg, send=send).start()
    pacs = StoreSCP(tmp_path / "pacs", port=pacs_port)
    try:
        never = write_ct_series(tmp_path / "a", name="never", n=8, size=16)
        assert storescu(node.port, never.files).returncode == 0
        failed = node.wait_job(never.series_uid, ("failed", "done", "rejected"), timeout=30)
        assert failed["state"] == "failed"
        assert failed["reason"] == (f"send to PACS@127.0.0.1:{pacs_port} failed after 5 attempts: "
                                    f"no association with PACS@127.0.0.1:{pacs_port}: no connection "
                                    "(host or port wrong, the PACS down, or a firewall)")

        later = write_ct_series(tmp_path / "b", name="later", n=8, size=16)
        assert storescu(node.port, later.files).returncode == 0
        wait_for(lambda: any(re.match(r"send attempt \d+ failed", j["reason"] or "")
                             for j in node.jobs(later.series_uid)), 20, what="a failed send attempt")
        pacs.start()  # the PACS comes back: the pending send is retried and delivered
        done = node.wait_job(later.series_uid, ("done", "failed"), timeout=30)
        assert done["state"] == "done"
        assert len(pacs.files()) == 1

        retried = node.cli("retry", str(failed["id"]))
        assert retried.returncode == 0 and "queued for sending again" in retried.stdout, retried.stderr
        assert "(if none runs: at its next start)" in retried.stdout  # the CLI sends nothing itself
        assert node.wait_job(never.series_uid, ("done", "failed"), timeout=30)["state"] == "done"
        assert len(pacs.files()) == 2
        assert node.cli("retry", "999").returncode == 1
    finally:
        node.stop()
        pacs.stop()
