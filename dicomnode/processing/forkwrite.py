"""Write a file in a forked child while the pipeline goes on with the next object.

Why: building and serialising an output is seconds of pure Python that hold the GIL; a forked child
does it on the core that is idle after inference (the measurement SR beside the SEG's frames, the
summary page, the compressed label map), and shares what the parent built copy-on-write, so nothing is
pickled. The child only runs pydicom, highdicom, numpy, scipy, matplotlib's Agg or nibabel (never
torch or OpenMP, whose threads do not survive a fork), writes to a temporary name and renames, and
leaves with ``os._exit``.
Whatever goes wrong in the child (an exit code, no exit within the deadline, no fork at all), the
parent runs the same ``make`` itself: the result is the same file either way. A child still running
at the deadline is first asked for its Python stack (faulthandler on SIGUSR1, through a pipe), which
the warning names: a child that hangs (on a lock another thread of the parent held at the fork)
says where. The parent's objects are frozen out of the child's garbage collector
(``gc.freeze``): a collection in the child could run the finalizers of the parent's garbage (a
child once hung 120 s at an allocation in pure Python, where a collection may start).
:meth:`BackgroundWrite.cancel` stops a child whose file is not wanted after all.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 120.0
STACK_WAIT_SECONDS = 2.0  # how long a hung child gets to write its stack before it is killed


class BackgroundWrite:
    """One file being written by a child; :meth:`wait` returns its path once it is on disk."""

    def __init__(self, make: Callable[[], Path], path: Path) -> None:
        """Run ``make()``, which writes the file at ``path`` and returns that path, in a child."""
        self._make, self._path = make, Path(path)
        self._pid: int | None = None
        self._written: Path | None = None
        self._stack: int | None = None  # the read end of the pipe the child's stack comes through
        try:
            stack_r, stack_w = os.pipe()
        except OSError as exc:
            log.debug("no pipe for a background write (%s): writing in the pipeline process", exc)
            return
        # The child's garbage collector must never visit what the parent holds: a collection there
        # can run the finalizers of the parent's uncollected cycles (a database connection or a
        # socket closing, on a lock another thread of the parent held at the fork: a hung child) and
        # copies every page it touches. Frozen objects stay out of the child's collections; the
        # parent unfreezes them at once.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            gc.unfreeze()
            os.close(stack_r)
            os.close(stack_w)
            log.debug("no fork for a background write (%s): writing in the pipeline process", exc)
            return
        if pid != 0:
            gc.unfreeze()
        if pid == 0:  # the child: write, then leave without running the parent's exit handlers
            code = 1
            try:
                os.close(stack_r)
                faulthandler.register(signal.SIGUSR1, file=stack_w, all_threads=False)
                make()
                code = 0
            finally:
                os._exit(code)
        os.close(stack_w)
        self._pid, self._stack = pid, stack_r

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
            self._close_stack()

    def _reap(self, deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        assert self._pid is not None
        while True:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                self._pid = None
                self._close_stack()
                ok = os.waitstatus_to_exitcode(status) == 0
                if not ok:
                    log.warning("background write failed (%s): writing in the pipeline process",
                                os.waitstatus_to_exitcode(status))
                return ok
            if time.monotonic() > end:
                log.warning("background write still running after %g s: killed, writing here; it was at %s",
                            deadline_s, self._hung_at())
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
                self._pid = None
                self._close_stack()
                return False
            time.sleep(0.01)

    def _hung_at(self) -> str:
        """The running child's innermost Python frames, from its faulthandler dump ("unknown" if none
        came within STACK_WAIT_SECONDS)."""
        assert self._pid is not None and self._stack is not None
        os.kill(self._pid, signal.SIGUSR1)
        dump = b""
        end = time.monotonic() + STACK_WAIT_SECONDS
        while True:  # until the dump has begun and then paused, the pipe closed, or the time is up
            left = end - time.monotonic()
            wait = min(left, 0.2) if b"File" in dump else left
            if wait <= 0 or not select.select([self._stack], [], [], wait)[0]:
                break
            chunk = os.read(self._stack, 65536)
            if not chunk:
                break
            dump += chunk
        lines = dump.decode(errors="replace").splitlines()
        frames = [line.strip() for line in lines if line.strip().startswith("File")]
        return " < ".join(frames[:3]) if frames else "unknown"

    def _close_stack(self) -> None:
        if self._stack is not None:
            os.close(self._stack)
            self._stack = None
