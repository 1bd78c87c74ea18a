"""Run one pipeline call in a child process, with a time limit, and say how it ended.

Why a child: the model and its native libraries (torch, BLAS, CUDA, codecs) can segfault, call
``os._exit``, exhaust memory or hang in C code where no Python exception or thread can reach them.
In the node's own process any of these would take the DICOM listener down or wedge the only
worker for good. In a child, the worst case is one job failed with its reason: a crash is seen as
the child's exit without an answer, a hang as the deadline passing, after which the child is
killed. Why ``spawn``: the node's threads hold locks and sockets that ``fork`` would copy in an
undefined state; a spawned child starts clean and imports only what the pipeline needs. The price
is an interpreter start and one model load per job (seconds, against minutes of inference).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.pipeline import JobInput, SeriesRejected

_CONTEXT = multiprocessing.get_context("spawn")
_PARENT_CHECK_SECONDS = 1.0
_POLL_SECONDS = 0.2


class Ending(StrEnum):
    """How a pipeline call ended, as the worker needs to tell the cases apart."""

    OK = "ok"  # returned outputs
    REJECTED = "rejected"  # raised SeriesRejected (terminal, with its message)
    ERROR = "error"  # raised any other exception (MemoryError included)
    CRASHED = "crashed"  # the child died without an answer (signal, os._exit, OOM killer)
    TIMEOUT = "timeout"  # still running at the deadline: killed
    STOPPED = "stopped"  # the node is stopping: killed, the job is resumed at the next start


@dataclass(frozen=True)
class Outcome:
    """One call's ending, with what the worker records: outputs and message, or the failure text."""

    ending: Ending
    outputs: list[Path] = field(default_factory=list)
    message: str = ""
    detail: str = ""  # the failure in one line (exception type and text, exit signal, time limit)
    traceback: str = ""  # the child's traceback for ERROR (logged at DEBUG)


@dataclass(frozen=True)
class IndexedSeriesFiles:
    """``JobInput.series_files`` for the child: the stored instances of a series, read from the index.

    The parent's :meth:`Store.series_files <dicomnode.store.Store.series_files>` is bound to an open
    connection, which cannot cross a process boundary; the child opens the file read-only instead.
    """

    db_path: Path

    def __call__(self, series_uid: str) -> list[Path]:
        import sqlite3

        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(
                "SELECT path FROM instances WHERE series_uid=? ORDER BY path", (series_uid,)
            ).fetchall()
        finally:
            con.close()
        return [Path(r[0]) for r in rows]


def _exit_when_orphaned(parent: int) -> None:
    """A kill -9 of the node must not leave a model running: the child ends when its parent is gone."""
    while True:
        time.sleep(_PARENT_CHECK_SECONDS)
        if os.getppid() != parent:
            os._exit(3)


def _child(pipeline: Any, settings_data: dict[str, Any], job: JobInput, conn: Connection,
           parent: int) -> None:
    """Child entry point: load the pipeline, run it once, send back one picklable answer."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the node's terminal is the node's to handle
    from dicomnode.logs import load_pseudonym_key, setup_logging
    from dicomnode.worker import load_pipeline

    settings = Settings.model_validate(settings_data)
    setup_logging(settings.log_level, settings.log_json)
    load_pseudonym_key(settings.storage_dir)
    try:
        fn = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        output = fn(job, settings)
        answer = Outcome(Ending.OK, [Path(p) for p in getattr(output, "outputs", []) or []],
                         str(getattr(output, "message", "") or ""))
    except SeriesRejected as exc:
        answer = Outcome(Ending.REJECTED, detail=str(exc) or type(exc).__name__)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer, MemoryError included
        answer = Outcome(Ending.ERROR, detail=f"{type(exc).__name__}: {exc}".strip().rstrip(":"),
                         traceback=traceback.format_exc())
    conn.send(answer)
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def run_isolated(pipeline: Any, job: JobInput, settings: Settings, timeout: float,
                 stop: threading.Event | None = None) -> Outcome:
    """Run ``pipeline(job, settings)`` in a spawned child; kill it at ``timeout`` s or when ``stop`` is set.

    ``pipeline`` is a ``module:function`` spec or a picklable (module-level) function; ``job`` must be
    picklable too (its ``series_files`` an :class:`IndexedSeriesFiles`, not a bound method of the store).
    """
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    proc = _CONTEXT.Process(
        target=_child, args=(pipeline, settings.model_dump(), job, sender, os.getpid()),
        name=f"dicomnode-job-{job.job_id}", daemon=True,
    )
    proc.start()
    sender.close()  # the child holds the only writer: its death reads as EOF here
    deadline = time.monotonic() + timeout
    try:
        while True:
            if receiver.poll(_POLL_SECONDS):
                try:
                    answer: Outcome = receiver.recv()
                except (EOFError, OSError):
                    proc.join(5)
                    return Outcome(Ending.CRASHED, detail=f"pipeline process died ({_death(proc.exitcode)})")
                proc.join(10)
                return answer
            if stop is not None and stop.is_set():
                return Outcome(Ending.STOPPED, detail="node stopping")
            if time.monotonic() > deadline:
                return Outcome(Ending.TIMEOUT, detail=f"pipeline still running after {timeout:g} s: killed")
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
            proc.join(10)
