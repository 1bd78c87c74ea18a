"""``dicomnode demo``'s ports: free ones by default, the ones an administrator chooses with
``--node-port``, ``--pacs-port``, ``--orthanc-http-port`` and ``--viewer-port``, and a taken one refused
before anything is replaced or started, by the option that moves it.

The runs that use chosen ports stop after the first study is sent (``--timeout 1``): the ports are in
use by then, and the demo's volumes are test_demo_run.py's business.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc import requires_orthanc

from dicomnode.commands.demo_ports import PortError, claim_ports
from dicomnode.harness.net import free_port, port_problem


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port something listens on (127.0.0.1), as 8042 is on a host that runs Orthanc."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _demo(cwd: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``dicomnode demo`` in ``cwd`` on a coarse phantom, in an 80-column terminal."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb", **env_extra}
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "demo", "--no-view", "--spacing", "6,6,10",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_taken_port_is_named_with_the_option_that_moves_it(busy_port: int) -> None:
    assert port_problem(busy_port) == "in use"
    with pytest.raises(PortError, match=rf"^port {busy_port} is in use: choose another with --pacs-port$"):
        claim_ports(pacs=busy_port)


def test_a_port_chosen_twice_is_refused() -> None:
    port = free_port()
    with pytest.raises(PortError, match=rf"^--node-port and --viewer-port are both {port}: "):
        claim_ports(node=port, viewer=port)


def test_chosen_ports_are_kept_and_the_others_are_free_and_distinct() -> None:
    node, http = free_port(), free_port()
    ports = claim_ports(node=node, orthanc_http=http)
    assert (ports.node, ports.orthanc_http) == (node, http)
    every = [ports.node, ports.pacs, ports.orthanc_http, ports.viewer]
    assert len(set(every)) == 4 and all(port_problem(p) is None for p in every)


def test_the_demo_refuses_a_taken_port_before_it_replaces_anything(tmp_path: Path, busy_port: int) -> None:
    """Exit 2 and one line naming the option, and the last demo's folder is left as it was."""
    kept = tmp_path / "demo-output" / "node.toml"
    kept.parent.mkdir()
    kept.write_text("the last demo's\n")
    run = _demo(tmp_path, "--node-port", str(busy_port))
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr == f"port {busy_port} is in use: choose another with --node-port\n"
    assert kept.read_text() == "the last demo's\n"


def test_the_demo_refuses_an_orthanc_port_without_orthanc(tmp_path: Path) -> None:
    run = _demo(tmp_path, "--pacs", "local", "--orthanc-http-port", str(free_port()))
    assert run.returncode == 2
    assert run.stderr.startswith("--orthanc-http-port: the PACS is the local store SCP, which has no "
                                 "web port")


def test_the_demo_listens_on_the_chosen_ports_local_pacs(tmp_path: Path) -> None:
    node, pacs = free_port(), free_port()
    run = _demo(tmp_path, "--pacs", "local", "--node-port", str(node), "--pacs-port", str(pacs),
                "--timeout", "1")
    text = run.stdout
    assert f"node THIGHNODE is up on port {node}," in text, text + run.stderr
    assert "pre-op: " in text and " instances sent to the node" in text
    config = tomllib.loads((tmp_path / "demo-output" / "node.toml").read_text())
    assert (config["port"], config["pacs"]["port"]) == (node, pacs)


@requires_orthanc
def test_the_demo_listens_on_the_chosen_ports_orthanc(tmp_path: Path) -> None:
    """Orthanc on the chosen DICOM and HTTP ports (the demo waits for both before it goes on), routing
    to the node on its chosen port; the scanner's study reaches Orthanc on the DICOM one."""
    node, pacs, http = free_port(), free_port(), free_port()
    run = _demo(tmp_path, "--pacs", "orthanc", "--node-port", str(node), "--pacs-port", str(pacs),
                "--orthanc-http-port", str(http), "--timeout", "1")
    text = run.stdout
    assert f"node THIGHNODE is up on port {node}," in text, text + run.stderr
    assert re.search(r"pre-op: \d+ instances sent to Orthanc", text), text
    orthanc = json.loads((tmp_path / "demo-output" / "orthanc" / "orthanc.json").read_text())
    assert (orthanc["DicomPort"], orthanc["HttpPort"]) == (pacs, http)
    assert orthanc["DicomModalities"]["thighnode"]["Port"] == node


def test_the_demos_node_keeps_its_own_settings_whatever_the_shell_exports(tmp_path: Path) -> None:
    """An administrator's ``DICOMNODE_PORT`` (it overrides a node's config file) must not move the
    demo's node off the port the demo wrote and waits on."""
    node, elsewhere = free_port(), free_port()
    run = _demo(tmp_path, "--pacs", "local", "--node-port", str(node), "--timeout", "1",
                DICOMNODE_PORT=str(elsewhere), DICOMNODE_AE_TITLE="ELSEWHERE")
    assert f"node THIGHNODE is up on port {node}," in run.stdout, run.stdout + run.stderr
    assert port_problem(elsewhere) is None
