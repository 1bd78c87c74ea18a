"""Where the external DICOM programs are: dcmtk's command-line tools and Orthanc.

Why a resolver instead of a bare ``"storescp"``: pynetdicom installs console scripts with dcmtk's
names (``storescu``, ``storescp``, ``echoscu``, ``findscu``, ``movescu``, ``getscu``) into the
virtual environment's ``bin/``. With that venv on PATH (activated, as many users work), a bare name
runs pynetdicom's script, which takes other options ("storescp exited with 2"). dcmtk's tools are
compiled programs outside any virtual environment; this module returns those, preferring the
distribution's ``/usr/bin``. The tests, benchmarks and demo ask here and nowhere else.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

PREFERRED_DIRS = ("/usr/bin",)
ORTHANC_FALLBACK = "/usr/sbin/Orthanc"  # Debian installs it outside an ordinary user's PATH


def _in_virtualenv(folder: Path) -> bool:
    """A venv's bin/ (this interpreter's, or any other with a pyvenv.cfg beside it)."""
    try:
        own = folder.resolve() == (Path(sys.prefix) / "bin").resolve()
        return own or (folder.parent / "pyvenv.cfg").is_file()
    except OSError:
        return False


def _is_script(path: Path) -> bool:
    """A ``#!`` script, which is what pip installs (pynetdicom's storescp, even via ``pip --user``)."""
    try:
        with path.open("rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return True


def dcmtk_tool(name: str, search_path: str | None = None,
               preferred: Iterable[str] = PREFERRED_DIRS) -> str | None:
    """Absolute path of dcmtk's ``name`` (``storescp``, ``storescu``, ``echoscu`` …), or None.

    Searches ``preferred`` then ``search_path`` (default ``$PATH``), skipping virtual-environment
    folders and scripts, so pynetdicom's same-named console scripts are never returned.
    """
    path_dirs = (os.environ.get("PATH", "") if search_path is None else search_path).split(os.pathsep)
    for entry in dict.fromkeys([*preferred, *path_dirs]):
        if not entry or _in_virtualenv(Path(entry)):
            continue
        candidate = Path(entry) / name
        if candidate.is_file() and os.access(candidate, os.X_OK) and not _is_script(candidate):
            return str(candidate)
    return None


def have_dcmtk(*names: str) -> bool:
    """True when every named dcmtk tool is installed (tests skip, the benchmark reports, otherwise)."""
    return all(dcmtk_tool(name) for name in names)


def require_dcmtk_tool(name: str) -> str:
    """dcmtk's ``name``, or FileNotFoundError that says how to install it."""
    path = dcmtk_tool(name)
    if path is None:
        raise FileNotFoundError(f"dcmtk's {name} not found outside a virtual environment "
                                "(Debian: apt-get install dcmtk)")
    return path


def orthanc_binary() -> str | None:
    """Orthanc's executable: on PATH, else Debian's /usr/sbin/Orthanc; None when not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return ORTHANC_FALLBACK if os.access(ORTHANC_FALLBACK, os.X_OK) else None
