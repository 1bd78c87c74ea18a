"""Prometheus metrics of a node, read from its index at each scrape (``/metrics`` of the operations page).

Why read the index rather than keep counters in memory: every process of the node (the receive
processes, the worker's children, the sender) writes the index, so a scrape sees all of them, and the
totals survive a restart. The totals themselves are kept by triggers in the index (``dicomnode.db``
version 5), so they are true counters: retention deleting old instance rows does not lower them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomnode.clinical.prior_requests import standing_counts
from dicomnode.db import Database
from dicomnode.processing import jobs
from dicomnode.processing.outbox import OutboxState
from dicomnode.storage.diskspace import read_space

QUEUE_HELP = "Jobs queued for the worker (due now or at a retry time)."
OUTBOX_HELP = "Result objects waiting to be sent to the PACS."
PRIOR_HELP = ("Follow-ups' requests for a missing baseline by where they stand (waiting to ask again: "
              "the PACS could not answer yet; given up: send.attempts failed).")


class NodeCollector(Collector):
    """Job counts by state, queue depth, prior requests, receive/send totals and disk space, read from
    the index at each scrape."""

    def __init__(self, db: Database, storage_dir: Path, send_attempts: int) -> None:
        self.db = db
        self.storage_dir = Path(storage_dir)
        self.send_attempts = send_attempts  # after that many failures a prior request is given up

    def collect(self) -> Iterator[Metric]:
        overview = jobs.overview(self.db)
        totals = jobs.counters(self.db)
        by_state = GaugeMetricFamily("dicomnode_jobs", "Jobs by state.", labels=["state"])
        for state in jobs.JobState:
            by_state.add_metric([state.value], overview.jobs.get(state.value, 0))
        yield by_state
        queued = overview.jobs.get(jobs.JobState.QUEUED.value, 0)
        pending = overview.outbox.get(OutboxState.PENDING, 0)
        yield GaugeMetricFamily("dicomnode_queue_depth", QUEUE_HELP, value=queued)
        yield GaugeMetricFamily("dicomnode_outbox_pending", OUTBOX_HELP, value=pending)
        with self.db.lock:
            standing = standing_counts(self.db.con, self.send_attempts)
        priors = GaugeMetricFamily("dicomnode_prior_requests", PRIOR_HELP, labels=["standing"])
        for name, count in standing.items():
            priors.add_metric([name], count)
        yield priors
        for name, help_text, value in (
            ("instances_received", "New instances written to the store.", totals.instances_received),
            ("received_bytes", "Bytes of the new instances written to the store.", totals.bytes_received),
            ("outputs_sent", "Result objects stored in the PACS.", totals.outputs_sent),
            ("send_failures", "Attempts to send a result object that failed.", totals.send_attempts_failed),
            ("jobs_failed", "Jobs that ended failed.", totals.jobs_failed),
        ):
            yield CounterMetricFamily(f"dicomnode_{name}", help_text, value=value)
        try:
            space = read_space(os.statvfs(self.storage_dir))
        except OSError:  # storage gone or unreadable: leave the disk series out rather than fail the scrape
            return
        yield GaugeMetricFamily("dicomnode_disk_free_bytes",
                                "Bytes available to the node on the storage volume.", value=space.free_bytes)
        yield GaugeMetricFamily("dicomnode_disk_used_ratio", "Used fraction of the storage volume (as df).",
                                value=space.used_pct / 100.0)


def node_registry(db: Database, storage_dir: Path, send_attempts: int) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one): the node's metrics and this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(db, storage_dir, send_attempts))
    ProcessCollector(registry=registry)
    return registry
