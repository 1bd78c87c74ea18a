"""One running node per storage folder: an exclusive lock taken before anything is recovered.

Why: start-up recovery puts running jobs back in the queue, discards their outputs and removes
half-written incoming files. A second ``dicomnode serve`` on the same ``storage_dir`` (an admin's
test run beside systemd's) did all that to the live node before it found the DICOM port taken, and a
few such starts failed a patient's job for good. The lock is ``flock`` on ``storage_dir/node.lock``:
the kernel releases it when the process ends, however it ends, so a crash leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "node.lock"


class NodeLockError(RuntimeError):
    """Another node holds this storage folder."""


class NodeLock:
    """Held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, storage_dir: Path) -> None:
        self.path = Path(storage_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`NodeLockError` naming the process that holds it."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeLockError(f"another node (pid {holder}) is running on storage_dir "
                                f"{self.path.parent}: stop it first, or give this one its own "
                                "storage_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
