"""Real peers for node tests: thin wrappers over :mod:`dicomnode.harness` plus the pytest fixtures.

The peers themselves (``dicomnode serve`` as a subprocess, dcmtk senders, dcmtk storescp as PACS) live in
the package so the demo and the benchmarks start the same ones; here they get the tests' defaults: the
stand-in pipeline ``node_pipeline:run`` from this folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicomnode.harness import node as _node
from dicomnode.harness.dcmtk import StoreSCP, echoscu, have_dcmtk_peers, storescu
from dicomnode.harness.net import dcmtk_env, free_port, port_open, wait_for
from dicomnode.harness.scu import pynetdicom_send
from dicomnode.harness.tomlfile import write_toml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HAVE_DCMTK = have_dcmtk_peers()  # dcmtk's, never pynetdicom's same-named scripts
requires_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="dcmtk (storescu/echoscu/storescp) not installed")

__all__ = ["HAVE_DCMTK", "REPO", "TESTS", "NodeProcess", "StoreSCP", "dcmtk_env", "echoscu", "free_port",
           "node_factory", "pacs", "port_open", "pynetdicom_send", "rejection", "requires_dcmtk", "storescu",
           "wait_for", "write_toml"]


class NodeProcess(_node.NodeProcess):
    """The harness node with the tests' stand-in pipeline, found on PYTHONPATH (this folder)."""

    def __init__(self, workdir: Path, *, pipeline: str | None = "node_pipeline:run",
                 **overrides: Any) -> None:
        overrides.setdefault("pythonpath", (TESTS, REPO))
        super().__init__(workdir, pipeline=pipeline, **overrides)


def rejection(assoc: Any) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ a pynetdicom ``Association`` received."""
    rj = assoc.acceptor.primitive
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


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
