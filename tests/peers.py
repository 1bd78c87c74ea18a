"""Real peers for node tests: ``dicomnode serve`` as a subprocess, dcmtk senders, dcmtk storescp as PACS.

Why subprocesses: the node must survive kill -9 and restarts, and talk to real DICOM peers; an
in-process server could not show either. Every dcmtk process gets ``TCP_NODELAY=1`` (Debian's build
stalls ~45 ms per instance on delayed ACKs otherwise).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dicomnode.external import have_dcmtk, require_dcmtk_tool

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HAVE_DCMTK = have_dcmtk("storescu", "echoscu", "storescp")  # dcmtk's, never pynetdicom's same-named scripts
requires_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="dcmtk (storescu/echoscu/storescp) not installed")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NodeProcess:
    """``dicomnode serve`` on a free port with its own storage folder and config file."""

    def __init__(
        self,
        workdir: Path,
        *,
        pipeline: str | None = "node_pipeline:run",
        ae_title: str = "THIGHNODE",
        **overrides: Any,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        self.storage_dir = self.workdir / "var"
        config: dict[str, Any] = {
            "ae_title": ae_title,
            "host": "127.0.0.1",
            "port": self.port,
            "storage_dir": str(self.storage_dir),
            "stable_seconds": 1.0,
            "log_level": "INFO",
            # disk back-pressure off: a CI machine's disk may be fuller than the product default allows
            # (tests/test_disk_pressure.py turns it on)
            "min_free_disk_mb": 0,
            "max_disk_used_pct": 100,
            "selection": {"min_z_extent_mm": 20.0, "min_slices": 5},
            "worker": {"poll_seconds": 0.2, "max_attempts": 2},
            "send": {
                "attempts": 3,
                "initial_backoff_seconds": 0.3,
                "max_backoff_seconds": 1.0,
                "timeout_seconds": 5.0,
            },
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.config = write_toml(self.workdir / "node.toml", config)
        self.pipeline = pipeline
        self.log_path = self.workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def db_path(self) -> Path:
        return self.storage_dir / "index.sqlite"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
        return env

    def start(self, timeout: float = 30.0) -> NodeProcess:
        cmd = [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config)]
        if self.pipeline:
            cmd += ["--pipeline", self.pipeline]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return port_open(self.port)

        wait_for(ready, timeout, what="the node to listen")
        return self

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- reading the index directly (read-only; WAL lets us read while the node writes) ------------
    def sql(self, query: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(query, tuple(params)).fetchall()
        finally:
            con.close()

    def jobs(self, series_uid: str | None = None) -> list[dict[str, Any]]:
        if not self.db_path.exists():
            return []
        if series_uid:
            rows = self.sql("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))
        else:
            rows = self.sql("SELECT * FROM jobs ORDER BY id")
        return [dict(r) for r in rows]

    def wait_job(self, series_uid: str, states: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            jobs = [
                j for j in self.jobs(series_uid) if j["superseded_by"] is None or j["state"] != "superseded"
            ]
            return jobs[-1] if jobs and jobs[-1]["state"] in states else None

        try:
            return wait_for(check, timeout, what=f"job of {series_uid} in {states}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; jobs: {self.jobs(series_uid)}\n{self.log()[-3000:]}") from exc

    def pipeline_runs(self) -> list[str]:
        path = self.storage_dir / "pipeline-runs.log"
        return path.read_text().splitlines() if path.exists() else []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.workdir,
            timeout=60,
        )


def storescu(
    port: int,
    files: list[Path],
    *,
    aet: str = "STORESCU",
    called: str = "THIGHNODE",
    extra: Iterable[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu over one association (``-xs`` proposes the files' own transfer syntaxes too)."""
    cmd = [require_dcmtk_tool("storescu"), "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def echoscu(
    port: int, *, aet: str = "ECHOSCU", called: str = "THIGHNODE"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_dcmtk_tool("echoscu"), "-aet", aet, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=30,
    )


class StoreSCP:
    """dcmtk storescp as the stand-in PACS: accepts any storage class, writes to ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        log = (self.folder.parent / f"storescp-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [require_dcmtk_tool("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+xa", "+uf",
             str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
            start_new_session=True,
        )
        log.close()
        wait_for(lambda: port_open(self.port), 15, what="storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def pynetdicom_send(port: int, items: list[Any], *, aet: str = "PYSCU", called: str = "THIGHNODE",
                    on_status: Callable[[int, int | None], bool] | None = None) -> list[int | None]:
    """C-STORE files (sent as they are, no re-encoding) or datasets with a pynetdicom SCU.

    Returns each item's status (None: no response). ``on_status(index, status)`` may return False to stop.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    pairs: set[tuple[str, str]] = set()
    for item in items:
        if isinstance(item, str | Path):
            meta = pydicom.dcmread(item, stop_before_pixels=True).file_meta
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        else:
            pairs.add((str(item.SOPClassUID), str(ExplicitVRLittleEndian)))
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called}@{port} failed")
    statuses: list[int | None] = []
    try:
        for i, item in enumerate(items):
            if not assoc.is_established:
                statuses.append(None)
                continue
            status = assoc.send_c_store(item)
            code = int(status.Status) if status and "Status" in status else None
            statuses.append(code)
            if on_status is not None and on_status(i, code) is False:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


# -- pytest fixtures (import them into a test module: ``from peers import pacs, node_factory``) ----------
@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    """A running dcmtk storescp ("PACS") on a free port, writing to ``tmp_path/pacs``."""
    if not HAVE_DCMTK:
        pytest.skip("dcmtk not installed")
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


@pytest.fixture
def node_factory(tmp_path: Path) -> Any:
    """``make(**settings)`` starts a node (test pipeline by default) in ``tmp_path/node-N``; all are
    stopped at the end. Pass ``pacs=StoreSCP`` to point the node's [pacs] at it."""
    nodes: list[NodeProcess] = []

    def make(pacs: StoreSCP | None = None, **overrides: Any) -> NodeProcess:
        if pacs is not None:
            overrides["pacs"] = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        node = NodeProcess(tmp_path / f"node-{len(nodes)}", **overrides)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.stop()
