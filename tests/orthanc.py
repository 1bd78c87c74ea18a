"""A real Orthanc for tests: :class:`dicomnode.harness.orthanc.OrthancServer` and the tests' extras.

The server itself lives in the package (the demo and the benchmarks start the same one); here: the skip
marker, the names tests import, and the slow stand-in pipeline of the outage test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from dicomnode.deploy import orthanc as render
from dicomnode.harness.net import free_port, wait_for
from dicomnode.harness.orthanc import OrthancServer, have_orthanc, is_http_error, orthanc_bin

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "orthanc"  # orthanc.json and route.lua link to dicomnode/deploy/
ROUTE_LUA = render.ROUTE_LUA
ORTHANC_BIN = orthanc_bin()
HAVE_ORTHANC = have_orthanc()
requires_orthanc = pytest.mark.skipif(not HAVE_ORTHANC, reason=f"Orthanc not installed ({ORTHANC_BIN})")

__all__ = ["DEPLOY", "HAVE_ORTHANC", "ORTHANC_BIN", "REPO", "ROUTE_LUA", "OrthancServer", "free_port",
           "is_http_error", "render", "requires_orthanc", "slow_stand_in", "wait_for"]


def slow_stand_in(job: Any, settings: Any) -> Any:
    """Test pipeline for ``dicomnode serve --pipeline orthanc:slow_stand_in``: NODE's stand-in, 3 s slower.

    Why: the outage test must stop Orthanc while the node is still working on a job; a stand-in
    that returns at once would race the stop.
    """
    import node_pipeline

    time.sleep(float(os.environ.get("SLOW_STAND_IN_SECONDS", "3")))
    return node_pipeline.run(job, settings)
