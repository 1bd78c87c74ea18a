"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): the node's SSL contexts.

Why one module: the listener (:mod:`dicomnode.network.scp`) and every association to the PACS (sender, prior
retrieval, ``dicomnode echo``) must agree on what "secure" means, and the rules live here only:

- TLS 1.2 or 1.3 (``tls.min_version``); SSL 3, TLS 1.0 and 1.1 never.
- TLS 1.2 cipher suites: forward-secret AEAD suites only (ECDHE or DHE with AES-GCM or ChaCha20), the
  suites of BCP 195 (RFC 9325) and of dcmtk's default "Non-downgrading BCP 195" profile. TLS 1.3 suites
  are OpenSSL's (all AEAD).
- Peers are verified against ``tls.ca_certificates`` only, never the system's web CAs: a DICOM PKI is
  the site's own. The node presents ``tls.certificate`` both as server and as client.
- The private key must be unencrypted: an encrypted one fails with a clear error instead of OpenSSL
  prompting on a terminal that a service does not have.
"""

from __future__ import annotations

import select
import ssl
import time
from contextlib import suppress
from dataclasses import dataclass
from socket import socket
from typing import Any

from dicomnode.config import Settings, TlsSettings

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the key and the file."""


def _no_password() -> bytes:
    """Answer OpenSSL's password callback with nothing, so an encrypted key fails instead of prompting."""
    return b""


def _reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. ``KEY_VALUES_MISMATCH``), else the exception's text."""
    return str(getattr(exc, "reason", None) or exc)


def _configure(ctx: ssl.SSLContext, tls: TlsSettings) -> ssl.SSLContext:
    """Versions, suites, trusted CAs and our own certificate: the same for both roles."""
    ctx.minimum_version = _MIN_VERSION[tls.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls.ca_certificates {tls.ca_certificates}: cannot load ({_reason(exc)})") from exc
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key), password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls.certificate {tls.certificate} / tls.private_key {tls.private_key}: cannot load "
                       f"({_reason(exc)}; the key must be unencrypted PEM and belong to the certificate)"
                       ) from exc
    return ctx


class _DeferredHandshake(ssl.SSLContext):
    """A server context whose sockets start without their handshake.

    Why: pynetdicom wraps each accepted socket in its one accept thread, handshake included and without a
    time-out, so a single silent TCP client would stall every later association. The handshake is done
    instead by :meth:`dicomnode.network.scp.StorageSCP._on_conn_open`, in the connection's own thread, within
    ``acse_timeout_seconds`` (see :func:`handshake`).
    """

    def wrap_socket(self, sock: socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | None = None,
                    session: Any = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The listener's context (None when TLS is off): a client certificate is required, or verified
    when the client sends one (``require_client_certificate``)."""
    if not tls.enabled:
        return None
    ctx = _configure(_DeferredHandshake(ssl.PROTOCOL_TLS_SERVER), tls)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_tls_args(settings: Settings) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to the PACS (None when TLS is off).

    Built per association, so renewed certificate files are used without a restart.
    """
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls)
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx, settings.pacs.host


@dataclass(frozen=True)
class HandshakeFailure:
    """Why a caller's handshake failed; ``peer_closed``: it hung up first (a port probe, not an attack)."""

    reason: str
    peer_closed: bool = False


def handshake(sock: socket, timeout: float) -> HandshakeFailure | None:
    """Complete a deferred server handshake within ``timeout`` in all; None when done, else why not.

    In all, not per read: a socket time-out restarts with every byte, so a caller trickling its hello
    a byte at a time would hold the connection for as long as it liked.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    deadline = time.monotonic() + timeout
    stalled = HandshakeFailure(f"no handshake within {timeout:g} s")
    try:
        sock.setblocking(False)
        while (wants := _handshake_step(sock)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return stalled
            reading, writing = ([sock], []) if wants == "read" else ([], [sock])
            if not any(select.select(reading, writing, [], left)):
                return stalled
    except ssl.SSLCertVerificationError as exc:
        return HandshakeFailure(f"client certificate refused: {exc.verify_message}")
    except (ssl.SSLEOFError, ConnectionError) as exc:
        return HandshakeFailure(_reason(exc), peer_closed=True)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return HandshakeFailure(_reason(exc))
    finally:
        with suppress(OSError):
            sock.setblocking(True)
    return None


def _handshake_step(sock: ssl.SSLSocket) -> str | None:
    """One non-blocking handshake step: None when done, else what it waits for ("read" or "write")."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return "read"
    except ssl.SSLWantWriteError:
        return "write"
    return None


def describe(sock: socket) -> dict[str, str]:
    """Protocol and suite of an established TLS connection, for a DEBUG log line."""
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    cipher = sock.cipher()
    return {"tls_version": sock.version() or "", "cipher": cipher[0] if cipher else ""}
