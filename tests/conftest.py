"""Shared fixtures: free ports, a settings object on a temporary storage folder, an empty index."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.harness import node as harness_node
from dicomnode.harness.net import free_port
from dicomnode.network.reactor_handshake import guard_reactor_handshake

# The tests' own pynetdicom senders (AE() made here, not through application_entity) keep their
# answers too: without it a busy machine sometimes failed a test at its DIMSE timeout
# (dicomnode/network/reactor_handshake.py).
guard_reactor_handshake()


class _HungWrites(logging.Handler):
    """The warnings of background writes that ran past their deadline (dicomnode.processing.forkwrite:
    where the forked child hung), which a passing test's captured log would otherwise drop: the
    suite's summary lists them. Twice a clean-clone run had one test take 120 s longer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "still running" in (message := record.getMessage()):  # not a child that failed (tests do)
            self.messages.append(message)


HUNG_WRITES = _HungWrites()
logging.getLogger("dicomnode.processing.forkwrite").addHandler(HUNG_WRITES)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report shows the end of each node log it made: a node runs in its own process,
    so what it logged (a dropped connection, a refused instance) is otherwise gone with tmp_path.
    Every report carries the hung background writes of its phase (to the summary, also from xdist
    workers)."""
    report = yield
    if HUNG_WRITES.messages and not item.get_closest_marker("hung_write_expected"):
        report.user_properties.append(("hung background writes", list(HUNG_WRITES.messages)))
    HUNG_WRITES.messages.clear()
    if call.when == "setup":
        harness_node.STARTED.clear()
    elif report.failed:
        for n, node in enumerate(harness_node.STARTED, 1):
            report.sections.append((f"node {n} log (last 4000 characters)", node.log()[-4000:]))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where a background write hung, for each test that waited for one (passing tests too)."""
    lines = [f"{report.nodeid}: {message}"
             for reports in terminalreporter.stats.values() for report in reports
             for name, messages in getattr(report, "user_properties", ())
             if name == "hung background writes" for message in messages]
    if lines:
        terminalreporter.write_sep("=", "background writes that ran past their deadline")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_dir=tmp_path / "var", port=free_port(), stable_seconds=1.0, host="127.0.0.1",
                    # disk back-pressure off here; tests/test_disk_pressure.py turns it on
                    min_free_disk_mb=0, max_disk_used_pct=100)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """An empty index (schema made, no rows) of this test's own."""
    database = Database(tmp_path / "index.sqlite")
    yield database
    database.close()
