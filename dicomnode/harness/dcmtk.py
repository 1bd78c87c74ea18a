"""dcmtk peers: ``storescp`` as the stand-in PACS, ``storescu`` and ``echoscu`` as senders.

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
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True,
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
