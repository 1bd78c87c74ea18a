"""Per-job phase timings: one JSON line per phase in ``<job folder>/phases.jsonl``.

Why a file in the job folder: the pipeline runs in another process than the worker
(:mod:`dicomnode.processing.isolation`), so a job's time cannot be collected by wrapping functions
in the node.
Each process appends the phases it ran (name, wall-clock start and end, its pid) to the job's own
file; an operator, or ``benchmarks/e2e.py``, reads where a job's time went. Appends of one short
line are atomic on a local file system, so the worker and its pipeline process can share the file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

PHASES_FILE = "phases.jsonl"


@dataclass(frozen=True)
class Span:
    """One phase of one job: wall-clock (epoch) start and end, and the process that ran it."""

    phase: str
    start: float
    end: float
    pid: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


class PhaseLog:
    """Appends a job's phases to its folder; without a folder (offline use) it records nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.path = Path(folder) / PHASES_FILE if folder is not None else None

    def add(self, phase: str, start: float, end: float) -> None:
        if self.path is None:
            return
        line = json.dumps(asdict(Span(phase, start, end, os.getpid()))) + "\n"
        try:
            with self.path.open("a") as fh:
                fh.write(line)
        except OSError:  # timings must never fail a job
            pass

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.add(name, t0, time.time())


def read_spans(folder: Path) -> list[Span]:
    """The recorded phases of a job, in the order they were written."""
    path = Path(folder) / PHASES_FILE
    if not path.is_file():
        return []
    return [Span(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
