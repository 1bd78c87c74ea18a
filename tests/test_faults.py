"""The fault harness in its short form (``benchmarks/faults.py``): kill -9, malformed inputs, stalls,
disk low, PACS down / refusing / hanging, an interrupted transfer, a SOP Instance UID collision.

The long form (≥ 50 kill trials, ≥ 1000 inputs) is a benchmark; these bounds keep CI near a minute and a half.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from peers import requires_dcmtk

from benchmarks import faults

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


def test_node_below_its_disk_threshold_refuses_everything_and_stays_alive(tmp_path: Path) -> None:
    report = faults.disk(tmp_path, stores=3)
    print(report)
    assert (report.refused, report.files_written, report.alive) == (3, 0, True)
    assert report.stored_after_restart == 3


def test_pacs_down_refusing_hanging_fail_with_reason_then_retry_delivers_once(tmp_path: Path) -> None:
    reports = faults.pacs_faults(tmp_path)
    for report in reports:
        print(report)
    assert [r.mode for r in reports] == ["down", "refusing", "hanging"]
    for r in reports:
        assert r.final_state == "failed" and r.attempts == 2, r
        assert r.reason.startswith("send_to_PACS@127.0.0.1:") and "failed_after_2_attempts" in r.reason, r
        assert (r.received_after_retry, r.duplicates) == (1, 0), r
    assert [r.connections for r in reports[1:]] == [2, 2]  # one association try per attempt, no more


def test_interrupted_transfer_rejected_incomplete_then_measured_once_when_whole(tmp_path: Path) -> None:
    report = faults.interrupted(tmp_path)
    print(report)
    assert report.first_state == "rejected" and report.first_reason.startswith("incomplete:")
    assert report.measured_before_completion == 0
    assert (report.measured_after_completion, report.results_sent) == (1, 1)


def test_uid_collision_refused_identical_resend_idempotent_row_stays(tmp_path: Path) -> None:
    report = faults.collision(tmp_path)
    print(report)
    assert report.colliding_refused == report.colliding_sent == 2
    assert report.identical_accepted == report.identical_resent == 4
    assert report.jobs_of_first_series == 1 and report.row_stays_after_restarts
