"""In-process wake-ups between the node's loops: a job was queued, a job's outputs are ready to send.

Why: the worker and the sender poll the index (every 0.5 s at most); the loop that has just handed
work on sets the next loop's event, so that one starts now instead of at its next tick. Polling stays
the source of truth: a missed or a spurious wake-up changes only latency, so several nodes in one
process (tests) may share these events.
"""

from __future__ import annotations

import threading


class Wakeup:
    """A poll interval that ends early when another loop says there is work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        """Call before looking for work, so that work handed on while looking is not missed."""
        self._event.clear()

    def wait(self, seconds: float) -> bool:
        """Until woken or ``seconds`` have passed; True when woken."""
        return self._event.wait(seconds)


JOB_QUEUED = Wakeup()  # set by the stability watcher, waited on by the worker
OUTPUTS_READY = Wakeup()  # set by the worker, waited on by the sender
