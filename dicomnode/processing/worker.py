"""The worker: one job at a time, through the pipeline, outcome recorded in the queue.

Why one at a time: the segmentation model holds the GPU/CPU; a second job in parallel only slows
both. The pipeline is pluggable (``module:function``, default
``dicomnode.processing.pipeline:run_pipeline``) so
the node's own tests can run a tiny deterministic pipeline; choose it with ``dicomnode serve
--pipeline`` or the ``DICOMNODE_PIPELINE`` environment variable. An exception is a failed attempt
(retried with backoff up to ``worker.max_attempts``); ``SeriesRejected`` is a terminal ``rejected``
with its message.

Each call runs in a child process (:mod:`dicomnode.processing.isolation`), so a crash or hang of the model
fails that job and never the listener: a child that dies is a failed attempt
(``pipeline-crashed``, retried like an exception); one still running after
``worker.timeout_seconds`` is killed and the job failed for good (``pipeline-timeout``: a hang
would most likely hang again, and each try holds the only worker that long). The child is started
with the worker and kept warm between jobs (model loaded); any failure replaces it with a fresh one.
An output the pipeline reports complete before it returns (the SEG) goes to the outbox at once, and
the sender sends it while the job still runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.logs import event
from dicomnode.processing.isolation import Ending, Outcome, PipelineProcess
from dicomnode.processing.jobs import Job, JobState, ReasonCode
from dicomnode.processing.phases import PhaseLog
from dicomnode.processing.pipeline import JobInput
from dicomnode.processing.queue import JobQueue
from dicomnode.processing.sources import SeriesLookup
from dicomnode.processing.wakeups import JOB_QUEUED, OUTPUTS_READY
from dicomnode.storage.store import Store

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "dicomnode.processing.pipeline:run_pipeline"
PIPELINE_ENV = "DICOMNODE_PIPELINE"
PipelineFn = Callable[[Any, Settings], Any]


def pipeline_spec(explicit: str | None = None) -> str:
    """Which pipeline runs: explicit > environment > the real one (a test-only seam, so not a config key)."""
    return explicit or os.environ.get(PIPELINE_ENV) or DEFAULT_PIPELINE


def load_pipeline(spec: str) -> PipelineFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"pipeline must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


class Worker:
    """Claims queued jobs and runs the pipeline on them, one at a time, each in a child process."""

    def __init__(
        self, settings: Settings, store: Store, queue: JobQueue, pipeline: PipelineFn | str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        # a spec is loaded in the child only: the node's process never imports the model's libraries
        self.pipeline: PipelineFn | str = pipeline_spec(pipeline) if pipeline is None or isinstance(
            pipeline, str) else pipeline
        self.process = PipelineProcess(self.pipeline, settings)
        self.current: int | None = None
        self._stop = threading.Event()

    def retry_after(self, attempts: int) -> float | None:
        if attempts >= self.settings.worker.max_attempts:
            return None
        return self.settings.worker.poll_seconds * (2 ** (attempts - 1))

    def run_once(self) -> int | None:
        """Process one due job, if any; returns its id."""
        job = self.queue.claim()
        if job is None:
            return None
        self.current = job.id
        files = self.store.series_files(job.series_uid)
        event(
            log, "job running", job=job.id, series=job.series_uid, instances=len(files), attempt=job.attempts
        )
        started, wall = time.monotonic(), time.time()
        work_dir = self.store.job_dir(job.id)
        job_input = JobInput(job_id=job.id, series_instance_uid=job.series_uid, files=files,
                             work_dir=work_dir, series_files=SeriesLookup.of(self.settings),
                             outputs_in_outbox=self.queue.outputs_in_outbox(job.id))
        phases = PhaseLog(work_dir)

        def early(path: Path) -> None:  # the SEG, while the SR and summary are still being built
            if self.queue.early_output(job.id, path):
                OUTPUTS_READY.set()

        try:
            outcome = self.process.run(job_input, self.settings.worker.timeout_seconds, self._stop, early)
        finally:
            self.current = None
            phases.add("isolated call", wall, time.time())
        with phases.phase("outcome recorded"):
            self._record(job, outcome, time.monotonic() - started)
        return job.id

    def _record(self, job: Job, outcome: Outcome, seconds: float) -> None:
        """The outcome into the job's record, through the queue (and so through the transition table)."""
        if outcome.ending is Ending.OK:
            state = self.queue.finish(job.id, outcome.outputs, outcome.message)
            if state is JobState.SENDING:
                OUTPUTS_READY.set()
            event(log, "job processed", job=job.id, state=state, outputs=len(outcome.outputs),
                  seconds=round(seconds, 2))
        elif outcome.ending is Ending.REJECTED:
            self.queue.reject(job.id, outcome.detail)
            event(log, "job rejected", logging.WARNING, job=job.id, reason=outcome.detail)
        elif outcome.ending is Ending.STOPPED:  # left running: the next start's recovery queues it again
            event(log, "job interrupted", logging.WARNING, job=job.id, reason=outcome.detail)
        else:
            code, retry = {
                Ending.ERROR: (ReasonCode.PIPELINE_ERROR, self.retry_after(job.attempts)),
                Ending.CRASHED: (ReasonCode.PIPELINE_CRASHED, self.retry_after(job.attempts)),
                Ending.TIMEOUT: (ReasonCode.PIPELINE_TIMEOUT, None),
            }[outcome.ending]
            reason = f"attempt {job.attempts}: {outcome.detail}"  # kept whole in the index (`jobs`)
            state = self.queue.fail(job.id, reason, retry, code)
            level = logging.ERROR if state is JobState.FAILED else logging.WARNING
            event(log, f"job {state}", level, job=job.id, reason=f"attempt {job.attempts}: "
                  f"{outcome.logged or outcome.detail}", reason_code=code, seconds=round(seconds, 2))
            if outcome.traceback:
                log.debug("pipeline traceback (job %s):\n%s", job.id, outcome.traceback)

    def close(self) -> None:
        """End the pipeline process (the node is stopping)."""
        self.process.close()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self.process.start()  # warm up (imports, model) while the first series arrives
        try:
            while not stop.is_set():
                JOB_QUEUED.clear()
                try:
                    busy = self.run_once() is not None
                except Exception:
                    log.exception("worker loop")
                    busy = False
                if not busy:  # the next poll, or at once when the watcher queues a job
                    JOB_QUEUED.wait(min(self.settings.worker.poll_seconds, 0.5))
        finally:
            self.close()
