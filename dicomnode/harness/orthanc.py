"""A real Orthanc on free loopback ports with the shipped configuration (``dicomnode.deploy``).

Why: Orthanc is the PACS the node lives next to; tests, the demo and the benchmarks that route through it
exercise the same ``orthanc.json`` and ``route.lua`` an administrator installs, only with temporary
folders, free ports and a short StableAge, plus Debian's DICOMweb plugin when installed (the viewer
reads the PACS through it). Every Orthanc gets ``TCP_NODELAY=1`` (Debian's build otherwise
stalls ~45 ms per C-STORE on delayed ACKs). REST helpers use only the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dicomnode.deploy import orthanc as render
from dicomnode.deploy.orthanc import ROUTE_LUA, dicomweb_plugin
from dicomnode.external import ORTHANC_FALLBACK, orthanc_binary
from dicomnode.harness.net import dcmtk_env, free_port, wait_for


def orthanc_bin() -> str:
    """Debian's Orthanc (outside an ordinary user's PATH), or its usual path when absent."""
    return orthanc_binary() or ORTHANC_FALLBACK


def have_orthanc() -> bool:
    path = orthanc_bin()
    return Path(path).is_file() and os.access(path, os.X_OK)


class OrthancServer:
    """One Orthanc process with a temporary configuration; start/stop/restart keep its storage and ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        node_aet: str = "THIGHNODE",
        node_port: int | None = None,
        node_host: str = "127.0.0.1",
        stable_age: int = 2,
        lua_scripts: Iterable[Path] | None = (ROUTE_LUA,),
        extra: dict[str, Any] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        dicomweb: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.node_aet = node_aet
        self.node_port = node_port if node_port is not None else free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        plugin = dicomweb_plugin() if dicomweb else None
        self.has_dicomweb = plugin is not None
        cfg = render.render(
            aet=aet, dicom_port=self.dicom_port, http_port=self.http_port,
            storage_dir=self.workdir / "db", node_aet=node_aet, node_host=node_host,
            node_port=self.node_port, stable_age=stable_age,
            lua_scripts=[Path(p) for p in (lua_scripts or [])],
            remote_access=False, authentication=False, plugins=[plugin] if plugin else [],
            extra={"Name": f"test-{self.dicom_port}", "DicomScuTimeout": 10, **(extra or {})},
        )
        render.write(cfg, self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> OrthancServer:
        env = dcmtk_env()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([orthanc_bin(), str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                     start_new_session=True)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                return self._dicom_listening()
            except OSError:
                return False

        wait_for(ready, timeout, what="Orthanc to start")
        return self

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> OrthancServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, body: bytes | str | dict | list) -> Any:
        if isinstance(body, dict | list):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        answer = self._request("POST", path, data)
        return json.loads(answer) if answer.strip() else None

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    # -- upload / query ------------------------------------------------------------------------
    def upload_file(self, path: Path) -> dict:
        """POST /instances with one DICOM file; returns Orthanc's answer (ID, ParentSeries, Status...)."""
        return self.post("/instances", Path(path).read_bytes())

    def upload_folder(self, folder: Path, pattern: str = "*.dcm") -> list[dict]:
        files = sorted(Path(folder).rglob(pattern))
        if not files:
            raise FileNotFoundError(f"no {pattern} under {folder}")
        return [self.upload_file(f) for f in files]

    def studies(self) -> list[dict]:
        return self.get("/studies?expand")

    def series(self) -> list[dict]:
        return self.get("/series?expand")

    def lookup(self, uid: str, kind: str) -> str | None:
        """Orthanc ID of a Study/Series/Instance UID, or None."""
        for hit in self.post("/tools/lookup", uid):
            if hit.get("Type") == kind:
                return hit["ID"]
        return None

    def study_id(self, study_uid: str) -> str | None:
        return self.lookup(study_uid, "Study")

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Expanded series of a study (by StudyInstanceUID); empty when the study is unknown."""
        sid = self.study_id(study_uid)
        return self.get(f"/studies/{sid}/series") if sid else []

    def instances_of_study(self, study_uid: str) -> list[dict]:
        sid = self.study_id(study_uid)
        return self.get(f"/studies/{sid}/instances") if sid else []

    def sop_classes_of_study(self, study_uid: str) -> list[str]:
        """SOP Class UID of every instance of a study (one REST call per instance)."""
        return [self.get_bytes(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
                for i in self.instances_of_study(study_uid)]

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instance_dataset(self, instance_id: str) -> Any:
        """The stored instance as a pydicom Dataset."""
        import io

        import pydicom

        return pydicom.dcmread(io.BytesIO(self.instance_file(instance_id)))

    def jobs(self) -> list[dict]:
        return self.get("/jobs?expand")

    def statistics(self) -> dict:
        return self.get("/statistics")


def is_http_error(exc: BaseException, status: int) -> bool:
    return isinstance(exc, urllib.error.HTTPError) and exc.code == status
