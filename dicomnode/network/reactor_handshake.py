"""A fix for pynetdicom's reactor handshake, which can lose the answer to a request we send.

Why: every pynetdicom association runs a reactor thread that takes each decoded DIMSE message off
the queue and serves it as a request. ``Association.send_c_store`` (and every other ``send_*``)
pauses that reactor before it sends, so that the answer stays on the queue for the sender: it
clears ``_reactor_checkpoint`` and spins until ``_is_paused`` is true. The reactor sets
``_is_paused = True``, waits on the checkpoint, sets ``_is_paused = False`` and then reads the
queue. When the sender clears the checkpoint just after the reactor's wait returned, the sender
still sees ``_is_paused`` true, sends, and the reactor, once it runs again, takes the answer off
the queue ("Received unexpected C-STORE service message"). The sender then waits for the DIMSE
timeout and aborts the association. On an idle machine the window is a few instructions; on two
busy cores the reactor thread is often descheduled inside it (seen here: a demo's C-STORE to
Orthanc and a node's refusal under the disk check were lost, in 2 of 2 full test runs with two
workers before the fix).

The fix: the checkpoint's ``wait`` (called only by the reactor) returns only when the checkpoint is
still set *after* the reactor has marked itself running again; if a sender cleared it in between,
the reactor marks itself paused again and goes back to waiting, before it reads the queue. A sender
that saw ``_is_paused`` true has therefore either a reactor blocked in ``wait`` or one that will
check the cleared checkpoint before touching the queue. Written against pynetdicom 3.0.x
(``tests/test_library_guard.py`` checks the reactor and ``send_*`` code it relies on;
``tests/test_reactor_handshake.py`` reproduces the loss without the fix); the upstream change is
proposed in ``docs/upstream.md`` §14.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom import AE

HANDSHAKE_PYNETDICOM = "3.0."  # the pynetdicom versions whose reactor this was written against


class ReactorCheckpoint(threading.Event):
    """``Association._reactor_checkpoint`` whose ``wait`` closes the pause handshake's window."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = weakref.ref(assoc)
        self.set()  # pynetdicom's checkpoint starts set: the reactor runs

    def _wait_until_set(self) -> None:
        """The plain event wait (its own method so a test can stretch the window after it)."""
        threading.Event.wait(self)

    def wait(self, timeout: float | None = None) -> bool:
        assoc = self._assoc()
        if timeout is not None or assoc is None:
            return super().wait(timeout)
        while True:
            self._wait_until_set()
            assoc._is_paused = False
            if self.is_set():  # no sender paused us after the wait returned: the queue is ours
                return True
            assoc._is_paused = True  # a sender saw "paused" and is sending: really pause

    def clear(self) -> None:
        super().clear()
        assoc = self._assoc()
        if assoc is not None and threading.current_thread() is assoc:
            # The reactor itself is about to send (its A-RELEASE when the network timeout expires):
            # it reads the answer itself, so it counts as paused (pynetdicom left the flag set there,
            # which :meth:`wait` no longer does).
            assoc._is_paused = True


def guard_reactor_handshake() -> bool:
    """Give every pynetdicom association made from now on a :class:`ReactorCheckpoint`
    (process-wide, idempotent); False, changing nothing, on a pynetdicom it was not written for."""
    import pynetdicom
    from pynetdicom.association import Association

    if not pynetdicom.__version__.startswith(HANDSHAKE_PYNETDICOM):
        return False
    if getattr(Association.__init__, "_dicomnode_checkpoint", False):
        return True
    original = Association.__init__

    @functools.wraps(original)
    def init(self: Association, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._reactor_checkpoint = ReactorCheckpoint(self)  # before run() starts the reactor

    init._dicomnode_checkpoint = True  # type: ignore[attr-defined]
    Association.__init__ = init  # type: ignore[method-assign]
    return True


def application_entity(ae_title: str) -> AE:
    """A pynetdicom ``AE`` whose associations keep the answers to what they send (every AE the node,
    the demo and the harness make comes from here)."""
    from pynetdicom import AE

    guard_reactor_handshake()
    return AE(ae_title=ae_title)
