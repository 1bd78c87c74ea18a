"""One running node: recovery, then the SCP plus stability-watcher, worker and sender threads.

Why threads in one process: the embedded default needs no broker; all state lives in SQLite and
the store, so ``dicomnode jobs``/``retry`` work from another process and a restart resumes. Only the
listener may use more: with ``receive_processes > 1`` its associations are served by worker processes
(:mod:`dicomnode.network.receive_pool`), which write the same store and index.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.logs import event
from dicomnode.network.receive_pool import ReceivePool
from dicomnode.network.scp import StorageSCP
from dicomnode.network.sender import Sender
from dicomnode.processing.queue import SQLiteJobQueue
from dicomnode.processing.worker import PipelineFn, Worker, pipeline_spec
from dicomnode.storage.node_lock import NodeLock
from dicomnode.storage.retention import Retention
from dicomnode.storage.series import StabilityWatcher
from dicomnode.storage.store import Store, one_flush_setting

if TYPE_CHECKING:
    from dicomnode.ops.page import OpsServer

log = logging.getLogger(__name__)


class Node:
    """Everything ``dicomnode serve`` runs; ``start()``/``stop()`` for tests and embedding."""

    def __init__(
        self,
        settings: Settings,
        pipeline: PipelineFn | str | None = None,
        worker_enabled: bool | None = None,
    ) -> None:
        self.settings = settings
        self.lock = NodeLock(settings.storage_dir)
        self.db = Database(settings.db_path)
        self.store = Store(settings.storage_dir, self.db, one_flush=one_flush_setting(settings.receive_flush))
        self.queue = SQLiteJobQueue(self.db)
        self.watcher = StabilityWatcher(settings, self.db)
        # receive_processes > 1: associations served in worker processes (dicomnode.network.receive_pool);
        # series_complete_on_release (one process only, see Settings): releases are told to the watcher
        self.scp: StorageSCP | ReceivePool = (
            ReceivePool(settings, self.store) if settings.receive_processes > 1
            else StorageSCP(settings, self.store,
                            on_release=self.watcher.release if settings.series_complete_on_release else None))
        self.worker = Worker(settings, self.store, self.queue, pipeline)
        self.sender = Sender(settings, self.db)
        self.retention = Retention(settings, self.store)
        self.ops: OpsServer | None = None
        if settings.ops.enabled:  # the read-only operations page and /metrics (off by default)
            from dicomnode.ops.page import OpsServer

            self.ops = OpsServer(settings)
        self.worker_enabled = settings.worker.enabled if worker_enabled is None else worker_enabled
        self.pipeline_name = pipeline if isinstance(pipeline, str) or pipeline is None else repr(pipeline)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.lock.acquire()  # before recovery: another node's running jobs are not ours to re-queue
        try:
            if self.ops is not None:  # a taken port stops ``serve`` before anything else runs
                self.ops.start()
        except Exception:
            self.lock.release()
            raise
        self.store.recover(max_attempts=self.settings.worker.max_attempts)
        try:
            self.scp.start()
        except Exception:
            if self.ops is not None:  # nothing else runs yet: the page must not keep the process alive
                self.ops.stop()
            self.lock.release()
            raise
        loops: list[tuple[str, Any]] = [("watcher", self.watcher.run), ("sender", self.sender.run)]
        if self.worker_enabled:
            loops.append(("worker", self.worker.run))
        if self.settings.retention_days is not None:
            loops.append(("retention", self.retention.run))
        if self.settings.pairing.retrieve_priors:  # a follow-up's baseline the PACS could not give yet
            from dicomnode.clinical.prior_retries import PriorRequestRetries

            loops.append(("prior-requests", PriorRequestRetries(self.settings).run))
        for name, target in loops:
            thread = threading.Thread(
                target=target, args=(self.stop_event,), name=f"dicomnode-{name}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
        event(
            log,
            "node started",
            ae_title=self.settings.ae_title,
            port=self.settings.port,
            storage=self.settings.storage_dir,
            worker="on" if self.worker_enabled else "off",
            pipeline=pipeline_spec(self.pipeline_name),
            pacs=f"{self.settings.pacs.ae_title}@{self.settings.pacs.host}:{self.settings.pacs.port}",
            retention_days=self.settings.retention_days or "off",
        )

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.watcher.wake()
        if self.ops is not None:
            self.ops.stop()
        self.scp.stop()
        for thread in self.threads:
            thread.join(timeout)
        self.store.close()
        self.db.close()
        self.lock.release()
        event(log, "node stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        done = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            event(log, "signal", signal=signal.Signals(signum).name)
            done.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
