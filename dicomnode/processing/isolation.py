"""Run pipeline calls in a child process, with a time limit, and say how each ended.

Why a child: the model and its native libraries (torch, BLAS, CUDA, codecs) can segfault, call
``os._exit``, exhaust memory or hang in C code where no Python exception or thread can reach them.
In the node's own process any of these would take the DICOM listener down or wedge the only
worker for good. In a child, the worst case is one job failed with its reason: a crash is seen as
the child's exit without an answer, a hang as the deadline passing, after which the child is
killed. Why ``spawn``: the node's threads hold locks and sockets that ``fork`` would copy in an
undefined state; a spawned child starts clean and imports only what the pipeline needs.

Why a warm child (:class:`PipelineProcess`): an interpreter start, the imports and the model load
cost seconds per job, more than the rest of a small study's overhead. So the worker keeps one child
that starts (and calls the pipeline module's optional ``warm_up(settings)``, which loads the model)
while the node waits for its first series, and that runs the jobs one after the other. The
isolation stays: a crash, a time-out, a node stop or any exception ends that child, and the next job
gets a fresh one (an exception may leave native state behind; only a clean result or a rejection
keeps the child).

Why messages before the answer (:class:`OutputReady`): an output the pipeline has finished (the SEG,
while the SR and summary are still being built) is handed to the worker at once, which puts it in the
outbox for the sender (:meth:`SQLiteJobQueue.early_output
<dicomnode.processing.queue.SQLiteJobQueue.early_output>`). One lock orders them before the answer,
and none is sent after it.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.logs import error_text
from dicomnode.processing.phases import PhaseLog
from dicomnode.processing.pipeline import JobInput, SeriesRejected

log = logging.getLogger(__name__)

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
    logged: str = ""  # the detail as the log shows it above DEBUG (dicomnode.logs.error_text); "": detail
    traceback: str = ""  # the child's traceback for ERROR (logged at DEBUG)


@dataclass(frozen=True)
class OutputReady:
    """From the child during a call: one output of job ``job_id`` is complete on disk at ``path``."""

    job_id: int
    path: Path


class _Channel:
    """The child's end of the pipe: early outputs of the current job, then its answer, never after."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.job_id: int | None = None

    def ready(self, job_id: int, path: Path) -> None:
        """Called from any thread of the child (the SEG's write is awaited in a thread)."""
        with self.lock:
            if self.job_id == job_id:
                self.conn.send(OutputReady(job_id, Path(path)))

    def answer(self, outcome: Outcome) -> None:
        with self.lock:
            self.job_id = None
            self.conn.send(outcome)


def _exit_when_orphaned(parent: int) -> None:
    """A kill -9 of the node must not leave a model running: the child ends when its parent is gone."""
    while True:
        time.sleep(_PARENT_CHECK_SECONDS)
        if os.getppid() != parent:
            os._exit(3)


def _setup_child(settings_data: dict[str, Any], parent: int) -> Settings:
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the node's terminal is the node's to handle
    from dicomnode.logs import load_pseudonym_key, setup_logging

    settings = Settings.model_validate(settings_data)
    setup_logging(settings.log_level, settings.log_json)
    load_pseudonym_key(settings.storage_dir)
    return settings


def _call(pipeline: Any, job: JobInput, settings: Settings) -> Outcome:
    """One pipeline call as a picklable answer: every failure becomes one, MemoryError included."""
    from dicomnode.processing.worker import load_pipeline

    try:
        fn = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        output = fn(job, settings)
        return Outcome(Ending.OK, [Path(p) for p in getattr(output, "outputs", []) or []],
                       str(getattr(output, "message", "") or ""))
    except SeriesRejected as exc:
        return Outcome(Ending.REJECTED, detail=str(exc) or type(exc).__name__)
    except BaseException as exc:  # noqa: BLE001
        return Outcome(Ending.ERROR, detail=f"{type(exc).__name__}: {exc}".strip().rstrip(":"),
                       logged=error_text(exc), traceback=traceback.format_exc())


def _warm_up(pipeline: Any, settings: Settings) -> None:
    """The pipeline module's ``warm_up(settings)``, if it has one (imports, model load); never fatal."""
    name = pipeline.partition(":")[0] if isinstance(pipeline, str) else getattr(pipeline, "__module__", "")
    try:
        warm = getattr(importlib.import_module(name), "warm_up", None) if name else None
        if callable(warm):
            warm(settings)
    except Exception as exc:  # noqa: BLE001 - the job's own call then fails with the real reason
        log.warning("pipeline warm-up failed: %s: %s", type(exc).__name__, exc)


def _serve(pipeline: Any, settings_data: dict[str, Any], conn: Connection, parent: int,
           spawned_at: float) -> None:
    """Warm child entry point: warm up, then answer jobs one at a time until the pipe closes.

    The start and the warm-up are recorded as phases of the first job served (they delay it only
    when that job was already waiting).
    """
    entered = time.time()
    settings = _setup_child(settings_data, parent)
    t0 = time.time()
    import dicomnode.processing.worker  # noqa: F401 - what _call imports: not left to the first job
    _warm_up(pipeline, settings)
    startup = [("process start", spawned_at, entered), ("warm-up", t0, time.time())]
    channel = _Channel(conn)
    while True:
        try:
            job: JobInput = conn.recv()
        except (EOFError, OSError):
            return
        phases = PhaseLog(job.work_dir)
        for phase, start, end in startup:
            phases.add(phase, start, end)
        startup = []
        channel.job_id = job.job_id
        job = replace(job, output_ready=lambda path, job_id=job.job_id: channel.ready(job_id, path))
        with phases.phase("pipeline"):
            answer = _call(pipeline, job, settings)
        channel.answer(answer)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


OnOutput = Callable[[Path], None]


def _ignore_output(path: Path) -> None:
    return None


def _await(receiver: Connection, proc: Any, job_id: int, timeout: float, stop: threading.Event | None,
           on_output: OnOutput) -> Outcome:
    """The child's answer, or how it ended without one (crash, deadline passed, node stopping);
    each :class:`OutputReady` of this job before it goes to ``on_output``."""
    deadline = time.monotonic() + timeout
    while True:
        if receiver.poll(_POLL_SECONDS):
            try:
                message = receiver.recv()
            except (EOFError, OSError):
                proc.join(5)
                return Outcome(Ending.CRASHED, detail=f"pipeline process died ({_death(proc.exitcode)})")
            if not isinstance(message, OutputReady):
                return message
            if message.job_id == job_id:
                try:
                    on_output(message.path)
                except Exception:  # an early send is only a head start: the answer still lists the output
                    log.exception("job %s: early output not handed on", job_id)
        if stop is not None and stop.is_set():
            return Outcome(Ending.STOPPED, detail="node stopping")
        if time.monotonic() > deadline:
            return Outcome(Ending.TIMEOUT, detail=f"pipeline still running after {timeout:g} s: killed")


class PipelineProcess:
    """A warm child that runs the worker's pipeline calls one after the other (see the module doc).

    Used from one thread (the worker's). Every ending but OK and REJECTED discards the child.
    """

    def __init__(self, pipeline: Any, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self._proc: Any = None
        self._conn: Connection | None = None

    def start(self) -> None:
        """Start the child (and its warm-up) now, unless one is running."""
        if self._proc is not None and self._proc.is_alive():
            return
        self.close()
        parent_end, child_end = _CONTEXT.Pipe(duplex=True)
        self._proc = _CONTEXT.Process(
            target=_serve,
            args=(self.pipeline, self.settings.model_dump(), child_end, os.getpid(), time.time()),
            name="dicomnode-pipeline", daemon=True,
        )
        self._proc.start()
        child_end.close()  # the child holds the only other end: its death reads as EOF here
        self._conn = parent_end

    def run(self, job: JobInput, timeout: float, stop: threading.Event | None = None,
            on_output: OnOutput = _ignore_output) -> Outcome:
        """Run ``pipeline(job, settings)`` in the child; kill it at ``timeout`` s or when ``stop`` is set.

        ``on_output`` gets each output the pipeline reports complete before it returns."""
        self.start()
        assert self._conn is not None
        try:
            self._conn.send(job)
        except (BrokenPipeError, OSError):  # died while idle (e.g. the OOM killer): one fresh child
            self.close()
            self.start()
            assert self._conn is not None
            self._conn.send(job)
        outcome = _await(self._conn, self._proc, job.job_id, timeout, stop, on_output)
        if outcome.ending not in (Ending.OK, Ending.REJECTED):
            self.close()
        return outcome

    def close(self) -> None:
        """End the child (killed: it may be hung in native code) and forget it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
            self._proc = None
