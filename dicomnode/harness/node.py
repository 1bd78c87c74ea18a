"""``dicomnode serve`` as a subprocess: the node as tests, benchmarks and the demo meet it.

Why a subprocess: the node must survive kill -9 and restarts, and talk to real DICOM peers; an
in-process server could not show either.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dicomnode.harness.net import free_port, port_open, stop_process, wait_for
from dicomnode.harness.tomlfile import write_toml


def own_config_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``DICOMNODE_*``: a node started here with its own config
    file (a test's, the demo's) must run on that file, not on settings the caller's shell exports,
    which override the file (an administrator's ``DICOMNODE_PORT`` would move the demo's node)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}, **extra}


# every node made in this process, for a failed test's report (tests/conftest.py)
STARTED: list[NodeProcess] = []


class NodeProcess:
    """``dicomnode serve`` on a free port with its own storage folder and config file.

    Test-friendly defaults (1 s stability, quick retries, disk back-pressure off); keyword overrides
    replace top-level keys or merge into tables. ``pipeline`` is ``module:function`` for ``--pipeline``,
    found on ``pythonpath``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        pipeline: str | None = None,
        ae_title: str = "THIGHNODE",
        pythonpath: Iterable[Path | str] = (),
        **overrides: Any,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        STARTED.append(self)
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
        self.pythonpath = [str(p) for p in pythonpath]
        self.log_path = self.workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def db_path(self) -> Path:
        return self.storage_dir / "index.sqlite"

    def env(self) -> dict[str, str]:
        env = own_config_env()
        if self.pythonpath:  # where a test pipeline (``--pipeline module:function``) is found
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")])
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
        stop_process(self.proc, timeout=15)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
