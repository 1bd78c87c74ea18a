"""The worker: one job at a time, through the pipeline, outcome recorded in the queue.

Why one at a time: the segmentation model holds the GPU/CPU; a second job in parallel only slows
both. The pipeline is pluggable (``module:function``, default ``dicomnode.pipeline:run_pipeline``) so
the node's own tests can run a tiny deterministic pipeline; choose it with ``dicomnode serve
--pipeline`` or the ``DICOMNODE_PIPELINE`` environment variable. An exception is a failed attempt
(retried with backoff up to ``worker.max_attempts``); ``SeriesRejected`` is a terminal ``rejected``
with its message.
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
from dicomnode.jobs import JobState
from dicomnode.logs import event
from dicomnode.pipeline import JobInput, SeriesRejected
from dicomnode.queue import JobQueue
from dicomnode.store import Store

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "dicomnode.pipeline:run_pipeline"
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
    """Claims queued jobs and runs the pipeline on them, one at a time."""

    def __init__(
        self, settings: Settings, store: Store, queue: JobQueue, pipeline: PipelineFn | str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self._pipeline = pipeline
        self.current: int | None = None

    @property
    def pipeline(self) -> PipelineFn:
        if self._pipeline is None or isinstance(self._pipeline, str):
            self._pipeline = load_pipeline(pipeline_spec(self._pipeline))
        return self._pipeline

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
        work_dir = self.store.job_dir(job.id)
        event(
            log, "job running", job=job.id, series=job.series_uid, instances=len(files), attempt=job.attempts
        )
        started = time.monotonic()
        try:
            output = self.pipeline(
                JobInput(job_id=job.id, series_instance_uid=job.series_uid, files=files, work_dir=work_dir,
                         series_files=self.store.series_files),
                self.settings,
            )
        except Exception as exc:
            if isinstance(exc, SeriesRejected):
                self.queue.reject(job.id, str(exc) or type(exc).__name__)
                event(log, "job rejected", logging.WARNING, job=job.id, reason=str(exc))
            else:
                reason = f"attempt {job.attempts}: {type(exc).__name__}: {exc}".strip().rstrip(":")
                state = self.queue.fail(job.id, reason, self.retry_after(job.attempts))
                level = logging.ERROR if state is JobState.FAILED else logging.WARNING
                event(log, f"job {state}", level, job=job.id, reason=reason)
                if level == logging.ERROR:
                    log.debug("pipeline traceback", exc_info=True)
            return job.id
        finally:
            self.current = None
        outputs = [Path(p) for p in getattr(output, "outputs", []) or []]
        message = str(getattr(output, "message", "") or "")
        state = self.queue.finish(job.id, outputs, message)
        event(
            log,
            "job processed",
            job=job.id,
            state=state,
            outputs=len(outputs),
            seconds=round(time.monotonic() - started, 2),
        )
        return job.id

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once() is not None
            except Exception:
                log.exception("worker loop")
                busy = False
            if not busy:
                stop.wait(min(self.settings.worker.poll_seconds, 0.5))
