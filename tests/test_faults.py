"""The fault harness in its short form (``benchmarks/faults.py``): kill -9, malformed inputs, stalls.

The long form (≥ 50 kill trials, ≥ 1000 inputs) is a benchmark; these bounds keep CI under a minute.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from peers import requires_dcmtk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # noqa: E402

pytestmark = [requires_dcmtk, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")]


def test_kill_9_during_receive_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    report = faults.kill_trials(tmp_path, trials=3, rng=random.Random(1))
    print(report)
    assert (report.lost, report.temp_files_left, report.duplicate_instances) == (0, 0, 0)


def test_malformed_inputs_neither_crash_nor_grow_the_node(tmp_path: Path) -> None:
    report = faults.fuzz(tmp_path, inputs=100, rng=random.Random(2))
    print(report)
    assert report.crashes == 0 and report.echo_after
    assert report.rss_end_mb - report.rss_start_mb < 100


def test_real_echoes_are_served_throughout_a_stalled_socket_attack(tmp_path: Path) -> None:
    """4 × max_associations half-sent association requests from the callers' own address, re-opened as
    the node closes them: pending connections take no association slot, so real C-ECHOs get through."""
    report = faults.stall(tmp_path, seconds=5)
    print(report)
    assert report.stalled_sockets > faults.MAX_ASSOCIATIONS
    assert report.echoes_served >= 0.9 * report.echoes
    assert report.longest_gap_s < 3.0
