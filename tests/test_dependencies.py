"""Every runtime dependency has a tested upper bound, and the installed environment satisfies it.

Why: the node patches pynetdicom internals and splices highdicom's output, so a silent major or minor
upgrade can break it at a hospital; a bound is widened only after the tests pass with the new version.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
RUNTIME = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]


@pytest.mark.parametrize("req", RUNTIME, ids=lambda r: r.name)
def test_runtime_dependency_has_an_upper_bound_the_venv_satisfies(req: Requirement) -> None:
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier), f"{req}: no upper bound"
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.skip(f"{req.name} not installed")
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed}: {req.specifier}"


def test_pynetdicom_is_pinned_to_the_version_scp_patches() -> None:
    from dicomnode.network.scp import PATCHED_PYNETDICOM

    (pynetdicom,) = [r for r in RUNTIME if r.name == "pynetdicom"]
    for candidate in ("2.1.0", "2.9.9", "3.0.0", "3.0.9", "3.1.0", "4.0.0"):
        assert pynetdicom.specifier.contains(candidate) == candidate.startswith(PATCHED_PYNETDICOM), candidate


def test_container_image_installs_what_make_node_installs() -> None:
    """deploy/compose/Dockerfile and ``make node`` (scripts/setup.sh --node): the same extras (OpenVINO,
    the CPU runtime) and the same torch. Why: the image was once built without OpenVINO, so a node in
    a container ran the network several times slower than one set up with ``make node``."""
    root = PYPROJECT.parent
    setup = (root / "scripts" / "setup.sh").read_text()
    dockerfile = (root / "deploy" / "compose" / "Dockerfile").read_text()
    (node_extras,) = re.findall(r"^\s*--node\) virtual_environment (\S+) ;;", setup, re.M)
    (setup_torch,) = re.findall(r"pip\" install -q torch==(\S+)", setup)
    assert re.findall(r"pip install -q \"\.\[([^]]*)\]\"", dockerfile) == [node_extras]
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M) == [setup_torch]
