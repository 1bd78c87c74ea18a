"""Write a file in a forked child while the pipeline goes on with the next object.

Why: building and serialising an output is seconds of pure Python that hold the GIL; a forked child
does it on the core that is idle after inference (the measurement SR beside the SEG's frames, the
summary page, the compressed label map), and shares what the parent built copy-on-write, so nothing is
pickled. The child only runs pydicom, highdicom, numpy, scipy, matplotlib's Agg or nibabel (never
torch or OpenMP, whose threads do not survive a fork), writes to a temporary name and renames, and
leaves with ``os._exit``.
Whatever goes wrong in the child (an exit code, no exit within the deadline, no fork at all), the
parent runs the same ``make`` itself: the result is the same file either way.
:meth:`BackgroundWrite.cancel` stops a child whose file is not wanted after all.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 120.0


class BackgroundWrite:
    """One file being written by a child; :meth:`wait` returns its path once it is on disk."""

    def __init__(self, make: Callable[[], Path], path: Path) -> None:
        """Run ``make()``, which writes the file at ``path`` and returns that path, in a child."""
        self._make, self._path = make, Path(path)
        self._pid: int | None = None
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

    def wait(self, deadline_s: float = DEADLINE_SECONDS) -> Path:
        """The written file's path; written here when the child did not succeed (once: a second call
        returns the same path)."""
        if self._written is not None:
            return self._written
        if self._pid is not None and self._reap(deadline_s):
            self._written = self._path
            return self._path
        self._written = path = self._make()
        return path

    def cancel(self) -> None:
        """The file is not wanted after all: stop the child if it is still running. What it wrote is
        the caller's to remove."""
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
