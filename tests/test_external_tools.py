"""dcmtk's tools are found even when a virtual environment with pynetdicom's same-named scripts
(storescu, storescp, echoscu …) comes first on PATH, as it does once the venv is activated."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dicomnode.external import dcmtk_tool, require_dcmtk_tool

VENV_BIN = Path(sys.executable).parent


def _program(folder: Path, name: str, head: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(head + b"\n")
    path.chmod(0o755)
    return path


def test_a_venv_script_first_on_path_is_skipped(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "pyvenv.cfg").parent.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    _program(venv / "bin", "storescp", b"#!/venv/bin/python")
    user_script = _program(tmp_path / "local-bin", "storescp", b"#!/usr/bin/python3")  # pip --user
    dcmtk = _program(tmp_path / "dcmtk-bin", "storescp", b"\x7fELF")
    search = os.pathsep.join([str(venv / "bin"), str(user_script.parent), str(dcmtk.parent)])
    assert dcmtk_tool("storescp", search, preferred=()) == str(dcmtk)
    assert dcmtk_tool("storescp", os.pathsep.join([str(venv / "bin"), str(user_script.parent)]),
                      preferred=()) is None


@pytest.mark.skipif(not (VENV_BIN / "storescp").exists(), reason="pynetdicom's storescp script not installed")
def test_the_projects_venv_first_on_path_does_not_shadow_dcmtk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    for name in ("storescp", "storescu", "echoscu"):
        found = dcmtk_tool(name)
        assert found is None or Path(found).parent != VENV_BIN
    if Path("/usr/bin/storescp").is_file():  # Debian's dcmtk: preferred over any other PATH entry
        assert require_dcmtk_tool("storescp") == "/usr/bin/storescp"


def test_a_missing_tool_says_how_to_install_it(tmp_path: Path) -> None:
    assert dcmtk_tool("no-such-dcmtk-tool", str(tmp_path), preferred=()) is None
    with pytest.raises(FileNotFoundError, match="apt-get install dcmtk"):
        require_dcmtk_tool("no-such-dcmtk-tool")
