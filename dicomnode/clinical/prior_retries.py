"""The node's loop that asks the PACS again for the baselines it could not ask for.

Why a loop of the node's own process: the first attempt runs in the pipeline's process, right after
the follow-up is measured (:func:`dicomnode.clinical.prior_requests.ask_in_background`); that
process may be replaced before a PACS that is down comes back, and a thread sleeping through a
backoff would die with it. The index holds every attempt, so this loop finds what is due from it
(:func:`dicomnode.clinical.pairing.due_prior_requests`), also after a restart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from datetime import UTC, datetime

from dicomnode.clinical.pairing import due_prior_requests
from dicomnode.clinical.prior_requests import ask
from dicomnode.config import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # how often the index is read for requests whose backoff is over


class PriorRequestRetries:
    """Asks again, one request at a time, every prior request whose backoff is over."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = datetime.now(UTC)  # a "requested" row from before this was left by a stopped node
        self.poll_seconds = min(POLL_SECONDS, settings.send.initial_backoff_seconds)

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: every ``poll_seconds``, each request that is due, asked once."""
        while not stop.is_set():
            try:
                due = due_prior_requests(self.settings, datetime.now(UTC), unanswered_before=self.started)
            except sqlite3.Error as exc:
                log.warning("prior retrieval: the index could not be read (%s); trying again", exc)
                due = []
            for request, failed in due:
                if stop.is_set():
                    return
                ask(self.settings, request, failed_before=failed)
            stop.wait(self.poll_seconds)
