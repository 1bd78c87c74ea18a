"""The operations page and /metrics of ``dicomnode serve`` (dicomnode/ops/page.py), against a real node.

A node with the page on receives a series it processes and one it rejects (dcmtk storescu, dcmtk
storescp as the PACS); /metrics is read with an HTTP client before and after, and the page is opened in
the system Chromium through Playwright. Access rules are checked on a real server: a page reachable
from other machines needs a token, a set token is required on every request, the page is off by default.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import launched, requires_chromium
from peers import HAVE_DCMTK, NodeProcess, StoreSCP, free_port, port_open, storescu, write_toml
from prometheus_client.parser import text_string_to_metric_families
from series_factory import write_ct_series

from dicomnode.config import ConfigError, Settings, load_settings
from dicomnode.db import MIGRATIONS, Database, _statements, opened
from dicomnode.ops import page
from dicomnode.ops.page import OpsPageError, OpsServer
from dicomnode.processing.jobs import counters

requires_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="dcmtk (storescu/storescp) not installed")

TOKEN = "ops-test-token-5f0c2a9e41b7"
VIEWER = "http://viewer.example/viewer?StudyInstanceUIDs={study_uid}"
PATIENT_ID, PATIENT_NAME = "OPS-PATIENT-77", "Opspage^Maria"


def scrape(url: str, **kwargs: Any) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="v"}`` → value."""
    response = httpx.get(url + "metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


@dataclass
class Processed:
    node: NodeProcess
    url: str
    before: dict[str, float]
    after: dict[str, float]
    done: dict[str, Any]  # the job row of the processed series
    rejected: dict[str, Any]
    study_uid: str
    instances: int


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processed]:
    if not HAVE_DCMTK:
        pytest.skip("dcmtk not installed")
    root = tmp_path_factory.mktemp("ops")
    pacs = StoreSCP(root / "pacs").start()
    ops_port = free_port()
    node = NodeProcess(root / "node", ops={"enabled": True, "port": ops_port, "viewer_url": VIEWER},
                       pacs={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port})
    node.start()
    url = f"http://127.0.0.1:{ops_port}/"
    try:
        before = scrape(url)
        patient = {"patient_id": PATIENT_ID, "patient_name": PATIENT_NAME}
        ok = write_ct_series(root / "ok", name="ops-ok", n=10, **patient)
        short = write_ct_series(root / "short", name="ops-short", n=3, **patient)
        for series in (ok, short):
            sent = storescu(node.port, series.files)
            assert sent.returncode == 0, sent.stderr
        done = node.wait_job(ok.series_uid, ("done", "failed", "rejected"))
        rejected = node.wait_job(short.series_uid, ("rejected", "done", "failed"))
        yield Processed(node, url, before, scrape(url), done, rejected, ok.study_uid, 13)
    finally:
        node.stop()
        pacs.stop()


def delta(p: Processed, name: str) -> float:
    return p.after.get(name, 0.0) - p.before.get(name, 0.0)


@requires_dcmtk
def test_metrics_count_what_the_node_did(processed: Processed) -> None:
    p = processed
    assert (p.done["state"], p.rejected["state"]) == ("done", "rejected")
    assert delta(p, "dicomnode_instances_received_total") == p.instances
    stored = p.node.sql("SELECT SUM(size) FROM instances")[0][0]
    assert delta(p, "dicomnode_received_bytes_total") == stored > p.instances * 16 * 16 * 2
    assert delta(p, "dicomnode_outputs_sent_total") == 1  # the test pipeline's one result object
    assert delta(p, 'dicomnode_jobs{state="done"}') == 1
    assert delta(p, 'dicomnode_jobs{state="rejected"}') == 1
    assert p.after["dicomnode_queue_depth"] == 0 and p.after["dicomnode_outbox_pending"] == 0
    assert p.after['dicomnode_prior_requests{standing="given up"}'] == 0  # every standing is a series
    assert p.after['dicomnode_prior_requests{standing="waiting to ask again"}'] == 0
    assert p.after["dicomnode_send_failures_total"] == 0 and p.after["dicomnode_jobs_failed_total"] == 0
    assert p.after["dicomnode_disk_free_bytes"] > 0 and 0 < p.after["dicomnode_disk_used_ratio"] < 1


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched() as chromium:
        yield chromium


@requires_dcmtk
@requires_chromium
def test_page_in_chromium_shows_jobs_without_patient_identity(processed: Processed, browser: Any,
                                                            tmp_path: Path) -> None:
    p = processed
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    response = page.goto(p.url)
    assert response is not None and response.status == 200
    row = page.locator(f'#jobs tr[data-job-id="{p.done["id"]}"]')
    assert row.locator("td.state").inner_text() == "done"
    pseudonym = row.locator("td.patient").inner_text()
    assert pseudonym.startswith("P-")
    assert row.locator("a.viewer").get_attribute("href") == VIEWER.format(study_uid=p.study_uid)
    rejected = page.locator(f'#jobs tr[data-job-id="{p.rejected["id"]}"]')
    assert rejected.locator("td.state").inner_text() == "rejected"
    assert "short-z-coverage" in rejected.locator("td.reason").inner_text()
    # the rejection is among the last errors; the counts and the last hour add up
    assert page.locator(f'#problems tr[data-job-id="{p.rejected["id"]}"]').count() == 1
    assert page.locator('#counts [data-state="done"] b').inner_text() == "1"
    assert page.locator('#throughput [data-key="instances"] b').inner_text() == str(p.instances)
    page.screenshot(path=str(tmp_path / "ops-page.png"), full_page=True)
    assert (tmp_path / "ops-page.png").stat().st_size > 10_000
    text, html = page.locator("body").inner_text(), page.content()
    for identity in (PATIENT_ID, PATIENT_NAME, "Opspage", "Maria"):
        assert identity not in text and identity not in html
    page.close()


def test_page_is_off_by_default(tmp_path: Path) -> None:
    assert Settings().ops.enabled is False and Settings().ops.host == "127.0.0.1"
    ops_port = free_port()
    node = NodeProcess(tmp_path / "node", ops={"port": ops_port}).start()  # a port, but not enabled
    try:
        assert not port_open(ops_port)
        assert "operations page" not in node.log()
    finally:
        node.stop()


def test_page_reachable_from_other_machines_needs_a_token(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", ops={"enabled": True, "host": "0.0.0.0", "port": free_port()})
    refused = node.cli("serve")
    assert refused.returncode == 2
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.stderr).split())  # typer's error box, unwrapped
    assert "ops: host = '0.0.0.0' is reachable from other machines: set ops.token" in said
    checked = config_check(node.config)  # found without starting too
    assert checked.returncode == 2 and "reachable from other machines" in checked.stderr, checked.stderr
    # with a token it validates (not bound here: tests listen on 127.0.0.1 only)
    assert load_settings(write_toml(tmp_path / "ok.toml", {"ops": {"enabled": True, "host": "0.0.0.0",
                                                                    "token": TOKEN}})).ops.token is not None
    # a short token is refused by `config check` as by `serve` (the same validation), and never echoed
    short = NodeProcess(tmp_path / "short", ops={"enabled": True, "token": "abc123", "port": free_port()})
    for run in (short.cli("serve"), config_check(short.config)):
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", run.stderr).split())
        assert run.returncode == 2 and "ops.token: must be 16 characters or more" in said, said
        assert "abc123" not in run.stderr + run.stdout


def config_check(path: Path) -> subprocess.CompletedProcess[str]:
    """`dicomnode config check FILE` (it takes the file as its argument, not --config)."""
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


def page_settings(tmp_path: Path, **ops: Any) -> Settings:
    return Settings(storage_dir=tmp_path / "var", ops={"enabled": True, "port": free_port(), **ops})


def test_token_is_required_on_every_request_when_set(tmp_path: Path) -> None:
    server = OpsServer(page_settings(tmp_path, token=TOKEN))
    server.start()
    try:
        for path in ("", "metrics"):
            bare = httpx.get(server.url + path)
            assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic ")
            for token, status in (("wrong-token-0000000000", 401), (TOKEN, 200)):
                bearer = httpx.get(server.url + path, headers={"Authorization": f"Bearer {token}"})
                assert bearer.status_code == status
            assert httpx.get(server.url + path, auth=("anyone", TOKEN)).status_code == 200  # HTTP Basic
        assert scrape(server.url, auth=("ops", TOKEN))["dicomnode_instances_received_total"] == 0
    finally:
        server.stop()


@requires_chromium
def test_browser_gets_the_page_with_the_token_as_basic_password(tmp_path: Path, browser: Any) -> None:
    server = OpsServer(page_settings(tmp_path, token=TOKEN))
    server.start()
    try:
        context = browser.new_context(http_credentials={"username": "ops", "password": TOKEN})
        response = context.new_page().goto(server.url)
        assert response is not None and response.status == 200
        context.close()
        context = browser.new_context(http_credentials={"username": "ops", "password": "not-the-token-00000"})
        response = context.new_page().goto(server.url)
        assert response is not None and response.status == 401
        context.close()
    finally:
        server.stop()


def test_page_lists_the_baselines_not_got_with_their_reason(tmp_path: Path, browser: Any) -> None:
    """A follow-up's baseline the PACS could not give (given up after the attempts) and one still
    being asked for stand in the page's table by pseudonym, with the reason; an answered one does not."""
    from dicomnode.clinical.prior_requests import PriorRequest, RetrievalStatus, record

    settings = page_settings(tmp_path, port=free_port())
    settings.send.attempts = 2
    with opened(settings.db_path) as db, db.tx() as con:
        con.execute("INSERT INTO patients (patient_id, issuer, pseudonym) VALUES (?, '', 'P-0a1b2c3d')",
                    (PATIENT_ID,))

    def request(study: str) -> PriorRequest:
        return PriorRequest(PATIENT_ID, "", study, "20230610", "", None, "", frozenset(), ())

    refused = "C-MOVE failed with status 0xA801 (Move destination unknown): the PACS has no destination"
    asked, failed = RetrievalStatus.REQUESTED, RetrievalStatus.FAILED
    given_up = [(asked, None), *((failed, f"attempt {n} of 2: PacsRefusal: {refused}") for n in (1, 2))]
    answered = [(asked, None), (RetrievalStatus.NONE, "the PACS holds no earlier CT study")]
    for study, rows in (("1.2.826.0.9.1", given_up), ("1.2.826.0.9.2", [(asked, None)]),
                        ("1.2.826.0.9.3", answered)):
        for status, detail in rows:
            record(settings, request(study), status, detail)
    server = OpsServer(settings)
    server.start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        response = page.goto(server.url)
        assert response is not None and response.status == 200
        rows = page.locator("#priors tbody tr")
        assert rows.count() == 2  # newest first; the answered one left out
        asking, gave_up = rows.nth(0), rows.nth(1)
        assert asking.get_attribute("data-standing") == "asking"
        assert gave_up.locator("td.standing").inner_text() == "given up"
        assert gave_up.locator("td.num").inner_text() == "2/2"
        assert gave_up.locator("td.patient").inner_text() == "P-0a1b2c3d"
        assert refused in gave_up.locator("td.reason").inner_text()
        assert PATIENT_ID not in page.content()
        page.close()
    finally:
        server.stop()


def test_without_a_token_only_local_host_names_are_answered(tmp_path: Path) -> None:
    """No DNS rebinding: a web page whose name resolves to 127.0.0.1 gets no answer from the page."""
    settings = page_settings(tmp_path)
    server = OpsServer(settings)
    server.start()
    try:
        assert httpx.get(server.url).status_code == 200
        assert httpx.get(server.url, headers={"Host": "attacker.example"}).status_code == 400
        assert httpx.post(server.url).status_code == 405  # read-only
        taken = OpsServer(settings)  # the same port again: a clear error, not a thread dying quietly
        with pytest.raises(OpsPageError, match="cannot listen on 127.0.0.1"):
            taken.start()
    finally:
        server.stop()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the page has closed this connection (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_half_sent_connections_cannot_take_the_nodes_file_descriptors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix uvicorn held every connection whose request headers never ended, with no limit:
    300 of them used up a node's 256 file descriptors and its DICOM listener stopped accepting."""
    monkeypatch.setattr(page, "CONNECTION_SECONDS", 2.0)
    server = OpsServer(page_settings(tmp_path, token=TOKEN))  # as on a network address: token set
    server.start()
    attackers: list[socket.socket] = []
    try:
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        for _ in range(page.MAX_CONNECTIONS + 8):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
            attackers.append(sock)
        ok = httpx.get(server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert ok.status_code == 200  # a real request is answered throughout
        assert all(closed_by_server(sock, 2.0) for sock in attackers[:8]), "the oldest were kept"
        assert all(closed_by_server(sock, 4.0) for sock in attackers[8:]), "kept past CONNECTION_SECONDS"
    finally:
        for sock in attackers:
            sock.close()
        server.stop()


def test_config_refuses_bad_viewer_templates_and_masks_the_token() -> None:
    with pytest.raises(ConfigError, match=r"unknown placeholder \{study\}"):
        load_settings(ops={"viewer_url": "http://pacs:8042/ohif/viewer?StudyInstanceUIDs={study}"})
    with pytest.raises(ConfigError, match="ops.bogus: unknown key"):
        load_settings(ops={"bogus": 1})
    with pytest.raises(ConfigError) as err:
        load_settings(ops={"enabled": True, "host": "10.1.2.3", "token": 12345678901234567})
    assert "12345678901234567" not in str(err.value)
    assert "**********" in Settings(ops={"token": TOKEN}).model_dump_json() and TOKEN not in Settings(
        ops={"token": TOKEN}).model_dump_json()


def test_counters_only_go_up_and_are_seeded_from_an_older_index(tmp_path: Path) -> None:
    """Kept by triggers: a re-sent instance counts once, retention deleting rows lowers nothing."""
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:4]:  # an index from before the counters
        for statement in _statements(script):
            con.execute(statement)
    con.execute("PRAGMA user_version=4")
    con.execute("INSERT INTO instances (sop_uid, series_uid, path, size) VALUES ('1.1', '1', 'a', 100)")
    con.execute("INSERT INTO outbox (job_id, path, state, attempts) VALUES (1, 'r', 'sent', 2)")
    con.close()
    db = Database(path)
    try:
        assert counters(db).instances_received == 1 and counters(db).bytes_received == 100
        assert counters(db).outputs_sent == 1 and counters(db).send_attempts_failed == 1
        upsert = ("INSERT INTO instances (sop_uid, series_uid, path, size) VALUES (?, '1', 'b', 50)"
                  " ON CONFLICT (sop_uid) DO UPDATE SET path=excluded.path, size=excluded.size")
        with db.tx() as tx:
            tx.execute(upsert, ("1.2",))
            tx.execute(upsert, ("1.2",))  # the same instance again: stored once, counted once
            tx.execute("DELETE FROM instances")  # retention
            tx.execute("INSERT INTO outbox (job_id, path) VALUES (2, 's')")
            tx.execute("UPDATE outbox SET attempts=1, last_error='refused' WHERE path='s'")
            tx.execute("UPDATE outbox SET state='sent', last_error=NULL WHERE path='s'")
            tx.execute("INSERT INTO jobs (series_uid, state) VALUES ('1', 'running')")
            tx.execute("UPDATE jobs SET state='failed'")
        c = counters(db)
        assert (c.instances_received, c.bytes_received) == (2, 150)
        assert (c.outputs_sent, c.send_attempts_failed, c.jobs_failed) == (2, 2, 1)
    finally:
        db.close()
