"""dcmtk peers: ``storescp`` as the stand-in PACS, ``dcmqrscp`` as a query/retrieve PACS other than
Orthanc, ``storescu`` and ``echoscu`` as senders.

Every tool is resolved explicitly with :func:`dicomnode.external.require_dcmtk_tool`: pynetdicom
installs its own ``storescp``/``storescu``/``echoscu`` scripts into the venv's ``bin/``, and with the venv
on PATH a bare name would run those (different options: "storescp exited with 2"). Every process gets
``TCP_NODELAY=1``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from dicomnode.external import have_dcmtk, require_dcmtk_tool
from dicomnode.harness.net import dcmtk_env, free_port, port_open, wait_for


def have_dcmtk_peers() -> bool:
    """dcmtk's storescu, echoscu and storescp are installed (never pynetdicom's same-named scripts)."""
    return have_dcmtk("storescu", "echoscu", "storescp")


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


def echoscu(port: int, extra: Iterable[str] = (), *, aet: str = "ECHOSCU",
            called: str = "THIGHNODE") -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu; ``extra``: more options (TLS: ``+tls KEY CERT +cf CA``)."""
    return subprocess.run(
        [require_dcmtk_tool("echoscu"), "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=30,
    )


def _serve(command: list[str], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    """dcmtk's ``command[0]`` started with the rest, its output appended to ``log_path``, once it
    listens on ``port``."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen([require_dcmtk_tool(command[0]), *command[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
    wait_for(lambda: port_open(port), 15, what=f"{command[0]} to listen")
    return proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


class StoreSCP:
    """dcmtk storescp as the stand-in PACS: accepts any storage class, writes to ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.proc = _serve(["storescp", "-aet", self.ae_title, "-od", str(self.folder), "+xa", "+uf",
                            str(self.port)], self.folder.parent / f"storescp-{self.port}.log", self.port)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


class QueryRetrieveSCP:
    """dcmtk dcmqrscp as a second query/retrieve PACS (C-FIND, C-MOVE): its own failure statuses
    (0xA801 for an unknown destination, 0xA702 when it cannot store at one) where Orthanc answers
    0xC000 for both. ``destinations``: AE title -> port on 127.0.0.1 that it may C-MOVE to."""

    def __init__(self, folder: Path, destinations: dict[str, int], ae_title: str = "QRSCP",
                 port: int | None = None) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.destinations = destinations
        self.proc: subprocess.Popen[bytes] | None = None

    def index(self, files: Iterable[Path]) -> None:
        """Add DICOM files to its archive (dcmqridx copies nothing: the files stay where they are)."""
        subprocess.run([require_dcmtk_tool("dcmqridx"), str(self.folder / "db"), *map(str, files)],
                       check=True, capture_output=True, env=dcmtk_env(), timeout=60)

    def start(self) -> QueryRetrieveSCP:
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"d{i} = ({aet}, 127.0.0.1, {port})"
                          for i, (aet, port) in enumerate(self.destinations.items()))
        config = self.folder / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {self.folder / 'db'} RW (200, 1024mb) ANY\nAETable END\n")
        self.proc = _serve(["dcmqrscp", "-c", str(config)], self.folder / "dcmqrscp.log", self.port)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> QueryRetrieveSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
