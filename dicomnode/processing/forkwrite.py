"""Write a large DICOM file in a forked child while the pipeline goes on building the next object.

Why: pydicom serialises a SEG of thousands of frames in pure Python, seconds that hold the GIL; the
measurement SR is built in the meantime in the parent, on the other core. A fork shares the built
dataset copy-on-write, so nothing is pickled. The child only runs pydicom, numpy, matplotlib's Agg or
nibabel (never torch or OpenMP, whose threads do not survive a fork), writes to a temporary name and
renames, and leaves with ``os._exit``.
Whatever goes wrong in the child (an exit code, no exit within the deadline, no fork at all), the
parent writes the file itself: the result is the same file either way.

With ``on_written``, a thread awaits the child and reports the file as soon as it is on disk (the node
then sends the SEG while the SR and summary are still being built); a fallback write is reported by
:meth:`BackgroundWrite.wait`, from the caller's thread (the dataset is never written from two threads).

:meth:`BackgroundWrite.dataset` writes a built dataset; the constructor runs any ``make`` that writes one
file: the compressed label map, or a whole build (the summary page,
:class:`dicomnode.processing.pipeline.SummaryDraft`, whose fallback then builds it in the parent).
:meth:`BackgroundWrite.cancel` stops a child whose file is not wanted after all.
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

    def __init__(self, make: Callable[[], Path], path: Path,
                 on_written: Callable[[Path], None] | None = None) -> None:
        """Run ``make()``, which writes the file at ``path`` and returns that path, in a child."""
        self._make, self._path = make, Path(path)
        self._on_written = on_written
        self._pid: int | None = None
        self._waiter: threading.Thread | None = None
        self._child_ok = False
        self._written: Path | None = None
        try:
            pid = os.fork()
        except OSError as exc:
            log.debug("no fork for a background write (%s): writing in the pipeline process", exc)
            return
        if pid == 0:  # the child: write, then leave without running the parent's exit handlers
            code = 1
            try:
                make()
                code = 0
            finally:
                os._exit(code)
        self._pid = pid
        if on_written is not None:
            self._waiter = threading.Thread(target=self._await_child, name="background-write", daemon=True)
            self._waiter.start()

    @classmethod
    def dataset(cls, write: Callable[[Any, Path], Path], ds: Any, folder: Path,
                on_written: Callable[[Path], None] | None = None) -> BackgroundWrite:
        """``write(ds, folder)`` in a child: a built dataset, saved as ``<SOPInstanceUID>.dcm``."""
        return cls(lambda: write(ds, folder), Path(folder) / f"{ds.SOPInstanceUID}.dcm", on_written)

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
        """The written file's path; written here when the child did not succeed (once: a second call
        returns the same path)."""
        if self._written is not None:
            return self._written
        if self._waiter is not None:
            self._waiter.join()
            ok = self._child_ok
        else:
            ok = self._pid is not None and self._reap(deadline_s)
        if ok:
            self._written = self._path
            return self._path
        self._written = path = self._make()
        if self._waiter is not None:
            self._report(path)
        return path

    def cancel(self) -> None:
        """The file is not wanted after all: stop the child if it is still running (without
        ``on_written`` only: there the waiting thread reaps it). What it wrote is the caller's to remove."""
        assert self._waiter is None
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - reaped already
                pass
            os.waitpid(self._pid, 0)
            self._pid = None

    def _reap(self, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        assert self._pid is not None
        while True:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                self._pid = None
                ok = os.waitstatus_to_exitcode(status) == 0
                if not ok:
                    log.warning("background write failed (%s): writing in the pipeline process",
                                os.waitstatus_to_exitcode(status))
                return ok
            if time.monotonic() > end:
                log.warning("background write still running after %g s: killed, writing here", deadline_s)
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
                self._pid = None
                return False
            time.sleep(0.01)
