"""Write a large DICOM file in a forked child while the pipeline goes on building the next object.

Why: pydicom serialises a SEG of thousands of frames in pure Python, seconds that hold the GIL; the
measurement SR is built in the meantime in the parent, on the other core. A fork shares the built
dataset copy-on-write, so nothing is pickled. The child only runs pydicom (never torch or OpenMP, whose
threads do not survive a fork), writes to a temporary name and renames, and leaves with ``os._exit``.
Whatever goes wrong in the child (an exit code, no exit within the deadline, no fork at all), the
parent writes the file itself: the result is the same file either way.

With ``on_written``, a thread awaits the child and reports the file as soon as it is on disk (the node
then sends the SEG while the SR and summary are still being built); a fallback write is reported by
:meth:`BackgroundWrite.wait`, from the caller's thread (the dataset is never written from two threads).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 120.0


class BackgroundWrite:
    """One file being written by a child; :meth:`wait` returns its path once it is on disk."""

    def __init__(self, write: Callable[[Any, Path], Path], ds: Any, folder: Path,
                 on_written: Callable[[Path], None] | None = None) -> None:
        self._write, self._ds, self._folder = write, ds, folder
        self._on_written = on_written
        self._pid: int | None = None
        self._waiter: threading.Thread | None = None
        self._child_ok = False
        try:
            pid = os.fork()
        except OSError as exc:
            log.debug("no fork for a background write (%s): writing in the pipeline process", exc)
            return
        if pid == 0:  # the child: write, then leave without running the parent's exit handlers
            code = 1
            try:
                write(ds, folder)
                code = 0
            finally:
                os._exit(code)
        self._pid = pid
        if on_written is not None:
            self._waiter = threading.Thread(target=self._await_child, name="background-write", daemon=True)
            self._waiter.start()

    @property
    def _path(self) -> Path:
        return Path(self._folder) / f"{self._ds.SOPInstanceUID}.dcm"

    def _report(self, path: Path) -> None:
        try:
            assert self._on_written is not None
            self._on_written(path)
        except Exception:  # a report is a head start for the sender, never a reason to fail the job
            log.exception("background write: written file not reported")

    def _await_child(self) -> None:
        self._child_ok = self._pid is not None and self._reap(DEADLINE_SECONDS)
        if self._child_ok:
            self._report(self._path)

    def wait(self, deadline_s: float = DEADLINE_SECONDS) -> Path:
        """The written file's path; written here when the child did not succeed."""
        if self._waiter is not None:
            self._waiter.join()
            ok = self._child_ok
        else:
            ok = self._pid is not None and self._reap(deadline_s)
        if ok:
            return self._path
        path = self._write(self._ds, self._folder)
        if self._waiter is not None:
            self._report(path)
        return path

    def _reap(self, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        assert self._pid is not None
        while True:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                ok = os.waitstatus_to_exitcode(status) == 0
                if not ok:
                    log.warning("background write failed (%s): writing in the pipeline process",
                                os.waitstatus_to_exitcode(status))
                return ok
            if time.monotonic() > end:
                log.warning("background write still running after %g s: killed, writing here", deadline_s)
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
                return False
            time.sleep(0.01)
