"""The node's associations to its PACS (results sent, priors found and moved, `dicomnode echo`), and
why one could not be made, in the administrator's terms.

Why one place: pynetdicom hands back an association that is simply not established for a closed
port, a PACS that closes the connection or aborts the request, one that never answers, and a
rejection; only its own log tells them apart, in its own terms. The sender and `echo` said "no
connection, or dropped" for all but the rejection, and the prior retrieval said nothing at all,
so a PACS administrator looked at the firewall for a PACS that was up but hung. The association's
events tell more: whether the TCP connection opened (``EVT_CONN_OPEN``), whether the PACS sent
anything back (``EVT_PDU_RECV``), and how long the request waited against the ACSE timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicomnode.network.tls import client_tls_args

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

    from dicomnode.config import Settings

# A request that waited this share of the ACSE timeout without a PDU back was not answered
# (pynetdicom aborts it at the timeout; the rest is its polling).
_TIMED_OUT_SHARE = 0.9


class NoAssociation(ConnectionError):
    """No association with the configured PACS; the message says why."""


def pacs_peer(settings: Settings) -> str:
    """The PACS as the node's messages name it: AE title, host and port."""
    return f"{settings.pacs.ae_title}@{settings.pacs.host}:{settings.pacs.port}"


@dataclass
class _Attempt:
    """What one association request saw of the PACS."""

    connected: bool = False  # the TCP connection (and TLS handshake) opened
    answered: bool = False  # the PACS sent a PDU back (an A-ABORT when not established)

    def on_open(self, _event: Any) -> None:
        self.connected = True

    def on_pdu(self, _event: Any) -> None:
        self.answered = True


def associate(ae: AE, settings: Settings) -> Association:
    """An established association from ``ae`` to the configured PACS; :class:`NoAssociation`, with
    the reason in the administrator's terms, when there is none."""
    from pynetdicom import evt

    seen = _Attempt()
    handlers = [(evt.EVT_CONN_OPEN, seen.on_open), (evt.EVT_PDU_RECV, seen.on_pdu)]
    start = time.monotonic()
    assoc = ae.associate(settings.pacs.host, settings.pacs.port, ae_title=settings.pacs.ae_title,
                         tls_args=client_tls_args(settings), evt_handlers=handlers)
    if assoc.is_established:
        assoc.unbind(evt.EVT_PDU_RECV, seen.on_pdu)  # not called for every PDU of the transfer
        return assoc
    waited = time.monotonic() - start
    raise NoAssociation(f"no association with {pacs_peer(settings)}: "
                        f"{why_not(assoc, settings, seen, waited, float(ae.acse_timeout or 0))}")


def why_not(assoc: Any, settings: Settings, seen: _Attempt, waited_s: float, acse_timeout_s: float) -> str:
    """Why the request ended without an association: rejected, no connection, aborted, unanswered
    or dropped; the TLS setting named when it is on."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive  # the A-ASSOCIATE-RJ
        reason = getattr(rsp, "reason_str", None) or "no reason given"
        why = (f"rejected by the PACS ({reason}): does it know the node as {settings.ae_title}, and is "
               f"{settings.pacs.ae_title} its own AE title?")
    elif not seen.connected:
        why = "no connection (host or port wrong, the PACS down, or a firewall)"
    elif seen.answered:
        why = (f"the PACS aborted the association request: does it accept the node ({settings.ae_title}) "
               "from this address?")
    elif acse_timeout_s and waited_s >= _TIMED_OUT_SHARE * acse_timeout_s:
        why = (f"connected, but the PACS did not answer the association request within "
               f"{acse_timeout_s:g} s (busy or hung, or no DICOM service on this port)")
    else:
        why = ("the PACS closed the connection without an answer (no DICOM service on this port, or "
               "one that drops callers it does not know)")
    if settings.tls.enabled:
        why += "; TLS is on ([tls] enabled): the PACS must speak DICOM TLS on this port"
    return why
