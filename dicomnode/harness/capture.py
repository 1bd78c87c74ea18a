"""A pynetdicom storage SCP that keeps what it receives: the stand-in node or PACS of tests and the demo.

Why one: the routing tests need a "node" that only counts what Orthanc forwards, the retrieval tests a
C-MOVE destination, the demo a PACS without Orthanc; each had its own copy of the same server.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from dicomnode.harness.net import free_port
from dicomnode.network.reactor_handshake import application_entity


class CapturingSCP:
    """Accepts every storage class (and C-ECHO) on 127.0.0.1; ``received`` holds each data set in order.

    ``on_dataset(ds)``, when given, is called with each data set (file meta attached) as it arrives,
    under the capture's lock; ``keep=False`` then keeps nothing in memory. ``on_request(event)``, when
    given, is called first with pynetdicom's C-STORE event, outside the lock (it may hold one
    association without holding the others: a PACS slow to store), and returns the status to answer;
    a data set answered with anything but success is not captured. ``transfer_syntaxes``, when given, are
    accepted for every storage class besides pynetdicom's default (uncompressed) ones, e.g. to take
    the node's RLE-compressed SEG as a PACS does. ``require_called_aet``: associations that call
    another AE title are rejected, as a PACS that checks its own title does. ``network_timeout``: how
    long an association may stay idle before this SCP aborts it (pynetdicom's default when None).
    """

    def __init__(self, ae_title: str, port: int | None = None, *,
                 on_dataset: Callable[[Any], None] | None = None, keep: bool = True,
                 extra_contexts: tuple[str, ...] = (),
                 on_request: Callable[[Any], int] | None = None,
                 transfer_syntaxes: Sequence[str] | None = None, require_called_aet: bool = False,
                 network_timeout: float | None = None) -> None:
        self.ae_title = ae_title
        self._require_called_aet = require_called_aet
        self.port = port or free_port()
        self.received: list[Any] = []
        self.lock = threading.Lock()
        self._on_dataset = on_dataset
        self._keep = keep
        self._extra = extra_contexts
        self._on_request = on_request
        self._syntaxes = list(transfer_syntaxes) if transfer_syntaxes else None
        self._network_timeout = network_timeout
        self._server: Any = None

    def start(self) -> CapturingSCP:
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = application_entity(self.ae_title)
        ae.require_called_aet = self._require_called_aet
        if self._network_timeout is not None:
            ae.network_timeout = self._network_timeout
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        for uid in self._extra:  # classes newer than pynetdicom's list (e.g. Label Map SEG)
            ae.add_supported_context(uid)
        if self._syntaxes:
            for cx in ae.supported_contexts:
                if cx.abstract_syntax != Verification:
                    ae.add_supported_context(cx.abstract_syntax, self._syntaxes)

        def on_store(event: Any) -> int:
            if self._on_request is not None and (status := self._on_request(event)) != 0x0000:
                return status
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self.lock:
                if self._keep:
                    self.received.append(ds)
                if self._on_dataset is not None:
                    self._on_dataset(ds)
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def series_counts(self) -> Counter[str]:
        """Distinct instances received per SeriesInstanceUID (a series routed again, e.g. when it
        became stable early and again once complete, counts each instance once)."""
        with self.lock:
            unique = {(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in self.received}
        return Counter(series for series, _ in unique)

    def active_associations(self) -> int:
        """Associations this SCP is serving now."""
        return len(self._server.active_associations) if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CapturingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
