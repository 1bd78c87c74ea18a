"""The DICOM listener: C-ECHO and C-STORE SCP for CT, writing each instance durably before success.

Why this shape: the PACS auto-routes thigh CT here and deletes nothing on its side, so an instance
the node acknowledged must exist on disk and in the index. The handler writes the dataset bytes as
received (no decode/re-encode of pixels; the header is parsed only to file the instance), which also
keeps every compressed transfer syntax intact. Any failure returns a failure status and leaves no
partial file; the listener keeps serving. Calling AE titles outside ``allowed_calling_aets`` are
rejected at association (a PACS answering the node's C-MOVE for priors must be on that list too), and
so is any called AE title but ``ae_title``, and a calling AE title pinned by ``calling_aet_hosts`` to
other addresses.

Bounded before anyone is authenticated (the listener faces the network): a PDU may be at most
ASSOCIATION_PDU_CAP long before association and our maximum PDU length after it, and its buffer grows
only as bytes arrive; a PDU must arrive whole within ARTIM (``acse_timeout_seconds``, counted from the
connection) before association and within ``network_timeout_seconds`` after it, or the connection is
dropped; an association with no whole PDU for ``network_timeout_seconds`` is aborted by pynetdicom and
logged here (:func:`_idle_abort`); a C-STORE data set over ``max_instance_mb`` stops being buffered
and is refused with 0xA700.
Disk back-pressure (:mod:`dicomnode.storage.diskspace`): while the storage volume has less than
``min_free_disk_mb`` free or more than ``max_disk_used_pct`` used, a new association is rejected as
transient temporary congestion and a C-STORE is answered 0xA700 without writing anything.
Any other request (C-FIND, C-MOVE, N-*: sent on a Verification or CT context anyway, the only ones
negotiated) is answered 0x0122, SOP class not supported, with one WARNING (see
:func:`_refuse_unserved_requests`).
A connection counts against ``max_associations`` only once its A-ASSOCIATE-RQ has arrived and been
accepted; until then it is pending, at most ``max_pending_connections`` in all and PENDING_PER_ADDRESS
per source address, the oldest closed past either (see :meth:`StorageSCP._enter_pending`).
All of it lives in the "pynetdicom internals" section below, which refuses to run on a pynetdicom
other than the one it was written for.

Throughput: PDUs are read into one buffer and the header is parsed only up to SeriesInstanceUID;
the rest (C-STORE served in the DUL thread, event waits instead of pynetdicom's 1 ms poll ticks, a
hand-encoded C-STORE-RSP, no per-PDU log formatting, P-DATA split with one copy) is
:mod:`dicomnode.network.pynetdicom_tuning`, switched off by ``pynetdicom_tuning = false`` and on an
unchecked pynetdicom. ``benchmarks/receive.py`` measures the effect against dcmtk storescp and Orthanc.

Status classes of a refused C-STORE: 0xA700 out of resources (disk low or failing, index, over
``max_instance_mb``), 0xA900 data set does not match the SOP class (another SOP class or Modality, a
Type 1 UID missing, a SOP Instance UID other than the request's), 0xC000 cannot understand (a byte
stream that does not parse, e.g. cut short inside the header).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class

from dicomnode.config import MB, Settings
from dicomnode.logs import error_text, event
from dicomnode.network.pynetdicom_tuning import attach_waiters, tune_pynetdicom
from dicomnode.network.reactor_handshake import application_entity
from dicomnode.network.sop import CT_CLASSES
from dicomnode.network.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from dicomnode.network.tls import describe, handshake, server_context
from dicomnode.network.validate import quick_header, validate_instance
from dicomnode.storage.diskspace import DiskGuard
from dicomnode.storage.store import (
    INFO_TAGS,
    LAST_HEADER_TAG,
    Store,
    StoreError,
    encode_file_meta,
    info_from_dataset,
    info_from_values,
    read_header,
)

log = logging.getLogger(__name__)

STORAGE_CLASSES = CT_CLASSES  # the only classes negotiated: anything else is refused at association

MAX_PDU = 1 << 20  # 1 MiB: a 512×512 slice arrives in one P-DATA PDU, the cheapest thing for a Python SCP
ASSOCIATION_PDU_CAP = 64 * 1024  # A-ASSOCIATE-RQ/AC/RJ, A-RELEASE, A-ABORT: real ones are a few KiB
COMMAND_SET_CAP = 64 * 1024  # a DIMSE command set is a few hundred bytes
FIRST_READ = 64 * 1024  # a PDU buffer starts at most this big and doubles only as bytes arrive
PENDING_PER_ADDRESS = 4  # connections from one address whose A-ASSOCIATE-RQ has not arrived yet

_REJECT_REASONS = {  # (source, diagnostic) of an A-ASSOCIATE-RJ, PS3.8 9.3.4
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


# == pynetdicom internals ================================================================================
# Everything security needs from pynetdicom's private code is in this section, written against 3.0.x
# (always on; the throughput patches, which can be switched off, are dicomnode/network/pynetdicom_tuning.py).
PATCHED_PYNETDICOM = "3.0."
# A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8
_ABORT_INVALID_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


def _require_patched_version() -> None:
    """Refuse to run on a pynetdicom other than the one this section was written for.

    Why refuse rather than carry on: without these patches a PDU's declared length is never capped (a
    10-byte header declaring 4 GiB is read for as long as bytes come) and half a PDU holds an association
    slot forever. Before widening the check, re-read what is
    replaced or read: ``DULServiceProvider._read_pdu_data`` and the DUL attributes it uses,
    ``DIMSEServiceProvider.receive_primitive`` (``tests/test_library_guard.py`` lists them all).
    """
    import pynetdicom

    if not pynetdicom.__version__.startswith(PATCHED_PYNETDICOM):
        raise RuntimeError(f"dicomnode.network.scp patches pynetdicom {PATCHED_PYNETDICOM}x internals, found "
                           f"{pynetdicom.__version__}: review dicomnode/network/scp.py before using it")


class _Stalled(TimeoutError):
    """A PDU did not arrive whole before its deadline (``received``: bytes of it that did)."""

    def __init__(self, received: int) -> None:
        super().__init__(f"PDU not complete in time ({received} bytes received)")
        self.received = received


def _fill(sock: socket.socket, buf: bytearray, start: int, end: int, deadline: float | None) -> int:
    """Read ``buf[start:end]`` from ``sock``; returns how far it got (short: the peer closed).

    ``buf`` grows (doubling, from FIRST_READ) only when bytes have arrived to fill it, so a declared
    length costs nothing until the peer sends it; it is kept per connection (see :func:`_read_pdu_data`)
    so the steady state allocates nothing. Raises :class:`_Stalled` when ``deadline`` (monotonic) passes.
    """
    got = start
    while got < end:
        if got == len(buf):
            buf.extend(bytes(min(max(len(buf), FIRST_READ), end - got)))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Stalled(got)
            sock.settimeout(left)
        try:
            nr_read = sock.recv_into(memoryview(buf)[got:end])
        except TimeoutError:
            raise _Stalled(got) from None
        if not nr_read:
            break
        got += nr_read
    return got


def _awaiting_request(dul: Any) -> bool:
    """An incoming connection whose A-ASSOCIATE-RQ has not been read yet (Sta1 before Evt5, or Sta2)."""
    return bool(dul.assoc.is_acceptor) and dul.state_machine.current_state in ("Sta1", "Sta2")


def _pdu_deadline(dul: Any) -> float | None:
    """When the PDU now starting must be complete: at ARTIM expiry while a caller is still to send its
    association request (so the whole request fits in acse_timeout from connect), else network_timeout."""
    artim = dul.artim_timer
    if _awaiting_request(dul) and artim.timeout is not None:
        return time.monotonic() + max(artim.remaining, 0.0)
    timeout = dul.network_timeout
    return None if timeout is None else time.monotonic() + timeout


def _pdu_cap(dul: Any, pdu_type: int) -> int | None:
    """The longest PDU of this type we read: our maximum length for P-DATA-TF (None: we offered no
    limit), ASSOCIATION_PDU_CAP for the rest."""
    if pdu_type != 0x04:
        return ASSOCIATION_PDU_CAP
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return local.maximum_length or None


def _drop_connection(dul: Any, reason: str, *, abort: bool, level: int = logging.WARNING,
                     **fields: Any) -> None:
    """Close this connection now: Evt17, as if the peer had closed it (optionally after an A-ABORT).

    Before association nothing else would end it: the acceptor's reactor waits up to acse_timeout for an
    A-ASSOCIATE-RQ that will never come, holding a slot. A None on its queue is what pynetdicom itself
    reads as that time-out, so the slot is freed at once.
    """
    assoc_sock = dul.socket
    sock = assoc_sock.socket
    try:
        address = sock.getpeername()[0]
    except (OSError, AttributeError):  # AttributeError: closed meanwhile (an eviction from another thread)
        address = "-"
    event(log, "connection dropped", level, reason=reason, address=address, **fields)
    if abort and sock is not None:
        with suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(_ABORT_INVALID_PDU)
    waiting = _awaiting_request(dul)
    assoc_sock.close()
    if waiting:
        dul.to_user_queue.put(None)


def _close_pending(assoc: Any, address: str, pending: int) -> None:
    """Close a pending connection evicted from the pool (``pending``: how many stay pending).

    Why one function: a single-process node and a receive worker
    (:mod:`dicomnode.network.receive_worker`) both close evicted connections, and the administrator
    greps one event with one set of fields (docs/pacs-admin.md §9) whatever ``receive_processes`` is.
    """
    assoc._dicomnode_evicted = True
    _drop_connection(assoc.dul, "pending-connections-full", abort=False, level=logging.INFO,
                     from_address=address, pending=pending)


def _read_pdu_data(self: Any) -> None:
    """Drop-in for ``DULServiceProvider._read_pdu_data`` (the same FSM events), bounded in size and time.

    Why: pynetdicom never checks a PDU's declared length against a cap (it reads up to whatever the header
    declares, 4 KiB at a time), and once a PDU has started it blocks in ``recv`` without a time-out, where
    neither ARTIM nor the idle timer is looked at: a 10-byte header declaring 4 GiB was read for as long
    as bytes came (the node's earlier reader even allocated it up front), and half a PDU held an
    association slot forever. Here a PDU longer than :func:`_pdu_cap` is answered with an A-ABORT, the
    buffer grows only as bytes arrive, and a PDU not complete by :func:`_pdu_deadline` drops the
    connection. It also reads straight into one buffer (pynetdicom extends a bytearray 4 KiB at a time).
    """
    sock = getattr(self.socket, "socket", None)
    if sock is None:
        self.event_queue.put("Evt17")
        return
    buf = getattr(self, "_dicomnode_pdu_buffer", None)
    if buf is None:
        buf = self._dicomnode_pdu_buffer = bytearray(6)
    restore = sock.gettimeout()
    self._dicomnode_reading = True  # a PDU has started: see _idle_abort
    try:
        deadline = _pdu_deadline(self)
        if _fill(sock, buf, 0, 6, deadline) < 6:
            self.event_queue.put("Evt17")  # closed between PDUs
            return
        pdu_type, _, length = struct.unpack_from(">BBL", buf)
        if not 0x01 <= pdu_type <= 0x07:
            self.event_queue.put("Evt19")  # unrecognised PDU: A-ABORT through the state machine
            return
        cap = _pdu_cap(self, pdu_type)
        if cap is not None and length > cap:
            _drop_connection(self, "pdu-too-long", abort=True, pdu_type=pdu_type, length=length, limit=cap)
            return
        if _fill(sock, buf, 6, 6 + length, deadline) < 6 + length:
            self.event_queue.put("Evt17")  # closed in the middle of a PDU
            return
    except _Stalled as exc:
        _drop_connection(self, "pdu-stalled", abort=False, received=exc.received)
        return
    except OSError:
        self.event_queue.put("Evt17")
        return
    finally:
        self._dicomnode_reading = False
        with suppress(OSError):
            sock.settimeout(restore)
    split = getattr(self, "_dicomnode_split_p_data", None) if pdu_type == 0x04 else None
    with memoryview(buf)[:6 + length] as pdu_bytes:
        pdu = split(pdu_bytes) if split is not None else None  # dicomnode.network.pynetdicom_tuning
        if pdu is not None:
            fsm_event = "Evt10"
        else:
            try:
                pdu, fsm_event = self._decode_pdu(pdu_bytes)  # copies the bytes (pynetdicom's bytes())
            except Exception as exc:  # undecodable PDU: A-ABORT through the state machine
                event(log, "pdu undecodable", logging.WARNING, pdu_type=pdu_type, error=type(exc).__name__)
                self.event_queue.put("Evt19")
                return
    self._dicomnode_pdu_done = time.monotonic()  # see _idle_abort
    _log_idle_abort(self)  # an idle abort that came while this PDU was arriving
    self.event_queue.put(fsm_event)
    self._recv_pdu.put(pdu)


def _idle_abort(dul: Any) -> None:
    """Log pynetdicom's abort of an association idle for ``network_timeout`` (called with EVT_ABORTED,
    which every abort fires) as ``connection dropped reason=network-timeout``; nothing for any other.

    Idle is counted here from the end of the last whole PDU (stamped by :func:`_read_pdu_data`), not
    read off the DUL's idle timer: pynetdicom restarts that when the peer closes after our A-ABORT,
    which may come before this handler runs. The timer runs out also while a PDU is half-read (it
    counts from the last whole one); pynetdicom's abort then waits for :func:`_read_pdu_data`: a PDU
    that stalls is dropped at its own deadline and logged as ``pdu-stalled``, one that arrives whole
    is logged here as network-timeout once it has (whoever takes the note first logs it).
    """
    done = getattr(dul, "_dicomnode_pdu_done", None)
    timeout = dul.network_timeout
    idle = None if done is None else time.monotonic() - done
    if idle is None or timeout is None or idle < timeout:
        return
    dul._dicomnode_idle_abort = idle
    if not getattr(dul, "_dicomnode_reading", False):
        _log_idle_abort(dul)


def _log_idle_abort(dul: Any) -> None:
    """The network-timeout line of a noted idle abort, once (the note is taken atomically)."""
    idle = dul.__dict__.pop("_dicomnode_idle_abort", None)
    if idle is None:
        return
    assoc = dul.assoc
    event(log, "connection dropped", logging.WARNING, reason="network-timeout",
          address=assoc.requestor.address, calling_aet=str(assoc.requestor.ae_title).strip(),
          idle_s=f"{idle:.1f}")


def _reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Reject from an EVT_REQUESTED handler the way pynetdicom's own negotiation does: A-ASSOCIATE-RJ,
    EVT_REJECTED, then end the association (pynetdicom skips negotiation once ``is_rejected``)."""
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _bound_dimse_messages(assoc: Any, max_data_set: int) -> None:
    """Stop buffering an incoming DIMSE data set once it passes ``max_data_set`` bytes.

    Why: pynetdicom keeps every fragment of a message in memory until the last one arrives. Past the
    limit the fragments are passed on empty, so the message still completes and is answered with a
    failure (``assoc._dicomnode_oversize`` holds its size for :meth:`StorageSCP._on_store`). A command
    set past COMMAND_SET_CAP is no DIMSE message at all: the association is aborted (Evt19).
    """
    dimse = assoc.dimse
    original = dimse.receive_primitive
    seen = [0, 0]  # command set bytes, data set bytes of the message being assembled

    def receive_primitive(primitive: Any) -> None:
        pdvs = primitive.presentation_data_value_list
        for i, (context_id, data) in enumerate(pdvs):
            if not data:
                continue
            if data[0] & 1:
                seen[0] += len(data) - 1
                if seen[0] > COMMAND_SET_CAP:
                    event(log, "command set too long", logging.WARNING, length=seen[0], limit=COMMAND_SET_CAP)
                    assoc.dul.event_queue.put("Evt19")
                    return
            else:
                seen[1] += len(data) - 1
                if seen[1] > max_data_set:
                    pdvs[i] = [context_id, data[:1]]  # keep only the "last fragment" flag
                    _forget_data_set(dimse.message)
                    assoc._dicomnode_oversize = seen[1]
        original(primitive)
        if dimse.message is None:  # the message is complete (and was served): count the next one
            seen[0] = seen[1] = 0
            assoc._dicomnode_oversize = 0

    dimse.receive_primitive = receive_primitive


def _forget_data_set(message: Any) -> None:
    """Free the part of an oversize data set that pynetdicom buffered before the limit was reached."""
    data_set = getattr(message, "data_set", None)
    if isinstance(data_set, BytesIO) and data_set.tell():
        message.data_set = BytesIO()


def _serves(msg: Any) -> bool:
    """A request the node serves: C-ECHO of Verification, or C-STORE of a storage SOP class (whose
    handler answers a class its presentation context does not carry with 0xA900)."""
    if isinstance(msg, C_ECHO):
        return str(msg.AffectedSOPClassUID) == Verification
    if isinstance(msg, C_STORE):
        sop_class = str(msg.AffectedSOPClassUID)
        return sop_class in CT_CLASSES or uid_to_service_class(sop_class) is StorageServiceClass
    return False


def _refuse_unserved_requests(assoc: Any) -> None:
    """Answer any other DIMSE request (C-FIND, C-GET, C-MOVE, N-*) 0x0122, SOP class not supported.

    Why: the node negotiates Verification and CT storage only, so such a request comes on one of those
    contexts; pynetdicom hands it to the service class of its own SOP class, which raises on a context
    of another, logs that at ERROR with a traceback and aborts. Answered here, with one WARNING, the
    caller is told why and its association stays usable (a C-ECHO or C-STORE may follow, then release).
    A request pynetdicom itself turns away (an unknown context ID, one during release) is left to it.
    """
    original = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if context is None or assoc._sent_release or not msg.is_valid_request or _serves(msg):
            original(msg, context_id)
            return
        sop_class = getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", "")
        event(log, "request refused", logging.WARNING, operation=msg.msg_type, sop_class=str(sop_class),
              context=str(context.abstract_syntax), status=f"0x{SOP_CLASS_NOT_SUPPORTED:04X}",
              calling_aet=str(assoc.requestor.ae_title).strip())
        rsp = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.Status = SOP_CLASS_NOT_SUPPORTED
        with suppress(ValueError, TypeError):  # optional in every response; a malformed UID is left out
            rsp.AffectedSOPClassUID = sop_class
        assoc.dimse.send_msg(rsp, context_id)

    assoc._serve_request = serve_request


def harden_pynetdicom() -> None:
    """Process-wide security patch (idempotent, always on): bounded PDU reads (:func:`_read_pdu_data`)."""
    _require_patched_version()
    from pynetdicom.dul import DULServiceProvider

    if DULServiceProvider._read_pdu_data is not _read_pdu_data:
        DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]


# == end of pynetdicom internals ========================================================================


# Decoders that read a syntax only at 8 bits per sample, where CT is 12 or 16: Pillow alone offered
# JPEG Extended, whose 12-bit CT was stored and then failed every attempt ("Pillow does not support
# 'JPEG Extended' for samples with 12-bit precision"); not offered, the PACS sends another syntax.
EIGHT_BIT_ONLY = {"1.2.840.10008.1.2.4.51": frozenset({"pillow"})}


def transfer_syntaxes() -> list[str]:
    """Native syntaxes plus every compressed one a pixel-data decoder that reads CT is installed for."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    native = [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    ]
    found = list(native)
    for uid in AllTransferSyntaxes:
        if uid in found or not uid.is_compressed:
            continue
        try:
            if set(get_decoder(uid).available_plugins) - EIGHT_BIT_ONLY.get(str(uid), frozenset()):
                found.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return [str(u) for u in found]


def _unfiled_status(data: BytesIO, ctx: Any, message: str) -> tuple[int, str]:
    """Status for a data set whose filing UIDs could not be read: 0xC000 (with the validator's reason)
    when the byte stream itself is corrupt, e.g. cut short inside the header; else 0xA900, since a
    well-formed data set without a Type 1 UID does not match its SOP class."""
    verdict = validate_instance(data.getbuffer(), str(ctx.transfer_syntax), str(ctx.abstract_syntax))
    if not verdict.ok:
        return verdict.status, verdict.comment
    return DATA_SET_DOES_NOT_MATCH, message


def _ended(assoc: Any) -> bool:
    """An association thread that was started and has finished."""
    return assoc.ident is not None and not assoc.is_alive()


def _address_in(address: str, networks: list[Any]) -> bool:
    """Is this peer address (IPv4, IPv6 or IPv4-mapped IPv6) inside one of ``networks``?"""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class ListenError(RuntimeError):
    """The DICOM port cannot be opened (another process holds it, the host lacks the address)."""


class StorageSCP:
    """pynetdicom AE serving C-ECHO and C-STORE into a :class:`Store`."""

    def __init__(self, settings: Settings, store: Store,
                 on_release: Callable[[Iterable[str]], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        # series_complete_on_release: told the series an association delivered when it is released
        # normally and no other open association has delivered them (see _on_released)
        self.on_release = on_release
        self._delivered: dict[int, tuple[Any, set[str]]] = {}  # id(assoc) → (assoc, its series UIDs)
        self.server: Any = None
        self.received = 0
        self.failed = 0
        self._count_lock = threading.Lock()
        self._wakers: dict[int, socket.socket] = {}
        # connections by id(assoc), oldest first: pending = A-ASSOCIATE-RQ not yet arrived (address kept),
        # admitted = request accepted against max_associations (see _on_conn_open, _on_requested)
        self._pending: dict[int, tuple[Any, str]] = {}
        self._admitted: dict[int, Any] = {}
        self.disk = DiskGuard(store.root, settings.min_free_disk_mb, settings.max_disk_used_pct)
        self._pins = {aet.strip(): [ipaddress.ip_network(h, strict=False) for h in hosts]
                      for aet, hosts in settings.calling_aet_hosts.items()}
        harden_pynetdicom()  # always: the listener faces the network
        self.tuned = settings.pynetdicom_tuning and tune_pynetdicom()
        ae = application_entity(settings.ae_title)
        ae.maximum_pdu_size = MAX_PDU
        # max_associations is enforced in _on_requested, counting only admitted associations; pynetdicom's
        # own count (every acceptor thread alive, pending and closing ones too) is a loose backstop
        ae.maximum_associations = 2 * (settings.max_associations + settings.max_pending_connections)
        ae.require_calling_aet = list(settings.allowed_calling_aets)
        ae.require_called_aet = True
        ae.acse_timeout = settings.acse_timeout_seconds  # also the ARTIM timer
        ae.network_timeout = settings.network_timeout_seconds
        syntaxes = transfer_syntaxes()
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        self.ae = ae

    # -- handlers --------------------------------------------------------------------------------
    def _on_store(self, evt_: Any) -> int | Dataset:
        calling = str(evt_.assoc.requestor.ae_title).strip()
        ctx = evt_.context
        oversize = getattr(evt_.assoc, "_dicomnode_oversize", 0)
        if oversize:  # its bytes were not kept (see _bound_dimse_messages)
            limit = f"{self.settings.max_instance_mb:g}"
            return self._fail(OUT_OF_RESOURCES, f"{oversize} bytes > max_instance_mb {limit}", calling)
        disk_low = self.disk.refusal()
        if disk_low is not None:  # the guard logged entering the low state once; not one line per instance
            return self._fail(OUT_OF_RESOURCES, disk_low, calling, level=logging.DEBUG)
        data = evt_.request.DataSet.getbuffer()
        # one walk over the element headers gives identifiers and verdict when the data set is plain
        values = quick_header(data, str(ctx.transfer_syntax), str(ctx.abstract_syntax), INFO_TAGS,
                              LAST_HEADER_TAG)
        try:
            if values is not None:
                ds = None
            else:
                ds = read_header(evt_.request.DataSet, str(ctx.transfer_syntax))
                if ds is None:  # deflated or big endian: let pynetdicom/pydicom decode all of it
                    ds = evt_.dataset
        except Exception as exc:  # undecodable byte stream: refuse it, keep serving
            return self._fail(CANNOT_UNDERSTAND, f"cannot decode dataset: {type(exc).__name__}", calling)
        try:
            info = (info_from_values(values, str(ctx.abstract_syntax), str(ctx.transfer_syntax), calling)
                    if values is not None else
                    info_from_dataset(ds, str(ctx.abstract_syntax), str(ctx.transfer_syntax), calling))
        except StoreError as exc:  # a UID needed for filing is missing or invalid
            return self._fail(*_unfiled_status(evt_.request.DataSet, ctx, str(exc)), calling)
        except Exception as exc:  # a header pydicom cannot parse
            return self._fail(CANNOT_UNDERSTAND, f"cannot read header: {type(exc).__name__}", calling)
        affected = str(evt_.request.AffectedSOPInstanceUID or "")
        if affected and affected != info.sop_uid:
            return self._fail(DATA_SET_DOES_NOT_MATCH, "SOPInstanceUID differs from the C-STORE request",
                              calling)
        try:
            self.store.add(info, encode_file_meta(info), data, checked=values is not None)
        except StoreError as exc:  # refused by the store: its status (0xC000, 0xA900 or 0xA700) as is
            return self._fail(exc.status, str(exc), calling)
        except Exception as exc:
            log.debug("store failed", exc_info=True)  # the traceback quotes values: DEBUG only
            return self._fail(OUT_OF_RESOURCES, f"cannot store: {error_text(exc)}", calling)
        with self._count_lock:
            self.received += 1
            if self.on_release is not None:
                self._delivered.setdefault(id(evt_.assoc), (evt_.assoc, set()))[1].add(info.series_uid)
        return SUCCESS

    def _fail(self, code: int, comment: str, calling: str, level: int = logging.WARNING) -> Dataset:
        with self._count_lock:
            self.failed += 1
        event(
            log,
            "c-store refused",
            level,
            status=f"0x{code:04X}",
            reason=comment,
            calling_aet=calling,
        )
        return _status(code, comment)

    def _on_echo(self, evt_: Any) -> int:
        return SUCCESS

    def _on_conn_open(self, evt_: Any) -> None:
        """Bound the new connection: a place among the pending ones, the TLS handshake within ARTIM, a
        socket time-out for sends (reads get theirs per PDU, see :func:`_read_pdu_data`) and the data set
        limit; then the throughput waiters (when :mod:`dicomnode.network.pynetdicom_tuning` is on)."""
        self._enter_pending(evt_.assoc, str(evt_.address[0]))
        sock = getattr(evt_.assoc.dul.socket, "socket", None)
        if sock is not None and not self._tls_handshake(evt_.assoc, sock):
            return
        if sock is not None:
            sock.settimeout(self.settings.network_timeout_seconds)
        _bound_dimse_messages(evt_.assoc, int(self.settings.max_instance_mb * MB))
        _refuse_unserved_requests(evt_.assoc)
        wake = attach_waiters(evt_.assoc) if self.tuned else None
        if wake is not None:
            with self._count_lock:
                self._wakers[id(evt_.assoc)] = wake

    def _tls_handshake(self, assoc: Any, sock: socket.socket) -> bool:
        """Finish a TLS handshake in this connection's thread
        (see :class:`dicomnode.network.tls._DeferredHandshake`); a plain or untrusted caller, or one that
        stalls past ``acse_timeout_seconds``, is disconnected."""
        failure = handshake(sock, self.settings.acse_timeout_seconds)
        if failure is not None:
            level = logging.DEBUG if failure.peer_closed else logging.WARNING  # a hang-up: a port probe
            _drop_connection(assoc.dul, "tls-handshake-failed", abort=False, level=level,
                             error=failure.reason)
            return False
        if isinstance(sock, ssl.SSLSocket):
            event(log, "tls established", logging.DEBUG, address=assoc.requestor.address, **describe(sock))
        return True

    def _enter_pending(self, assoc: Any, address: str) -> None:
        """Count a new connection as pending until its A-ASSOCIATE-RQ arrives; past PENDING_PER_ADDRESS
        from its address, or max_pending_connections in all, close the oldest pending one.

        Why the oldest, not the newest: a caller sends its whole request within milliseconds of
        connecting, while a stalled socket stays pending until ARTIM. Refusing the newest would let a few
        stalled sockets from the caller's own address (or from many addresses) lock it out; closing the
        oldest bounds what they hold (threads, sockets) and leaves a real request room to arrive.
        """
        evicted = []
        with self._count_lock:
            self._forget_ended()
            self._pending[id(assoc)] = (assoc, address)
            same = [key for key, (_, addr) in self._pending.items() if addr == address]
            for key in same[:max(len(same) - PENDING_PER_ADDRESS, 0)]:
                evicted.append(self._pending.pop(key))
            while len(self._pending) > self.settings.max_pending_connections:
                evicted.append(self._pending.pop(next(iter(self._pending))))
            pending = len(self._pending)
        for old, addr in evicted:
            _close_pending(old, addr, pending)

    def _forget_ended(self) -> None:
        """Drop bookkeeping of connections whose thread has ended (not every way out fires
        EVT_CONN_CLOSE). Called with ``_count_lock`` held."""
        for key in [key for key, (assoc, _) in self._pending.items() if _ended(assoc)]:
            del self._pending[key]
        for key in [key for key, assoc in self._admitted.items() if _ended(assoc)]:
            del self._admitted[key]
        for key in [key for key, (assoc, _) in self._delivered.items() if _ended(assoc)]:
            del self._delivered[key]

    def _admit(self, assoc: Any) -> bool:
        """Move an association whose A-ASSOCIATE-RQ arrived from pending to admitted, if fewer than
        ``max_associations`` are admitted (False: the caller is to be rejected as local limit exceeded)."""
        with self._count_lock:
            self._forget_ended()
            self._pending.pop(id(assoc), None)
            if getattr(assoc, "_dicomnode_evicted", False):
                return True  # closed already: it never counts
            if len(self._admitted) >= self.settings.max_associations:
                return False
            self._admitted[id(assoc)] = assoc
            return True

    def _leave_pending(self, assoc: Any) -> None:
        """A pending connection refused at its A-ASSOCIATE-RQ: it no longer counts as pending."""
        with self._count_lock:
            self._pending.pop(id(assoc), None)

    def _on_conn_close(self, evt_: Any) -> None:
        with self._count_lock:
            self._pending.pop(id(evt_.assoc), None)
            self._admitted.pop(id(evt_.assoc), None)
            wake = self._wakers.pop(id(evt_.assoc), None)
        if wake is not None:
            wake.close()

    def _on_released(self, evt_: Any) -> None:
        """A-RELEASE (not an abort): the series this association delivered are complete, except those
        another open association has delivered instances of too (they close on its release, or when
        quiet). Fired after the A-RELEASE-RP is sent, so every C-STORE of this association is indexed."""
        if self.on_release is None:
            return
        with self._count_lock:
            _, mine = self._delivered.pop(id(evt_.assoc), (None, set()))
            others = set().union(*(uids for assoc, uids in self._delivered.values() if not _ended(assoc)))
        done = sorted(mine - others)
        if done:
            self.on_release(done)

    def _on_aborted(self, evt_: Any) -> None:
        """An A-ABORT either way or a dropped connection: its series are left to fall quiet.

        (Forgotten here and not at EVT_CONN_CLOSE, which after a release may come before EVT_RELEASED:
        the peer closes as soon as it has the A-RELEASE-RP.)"""
        with self._count_lock:
            self._delivered.pop(id(evt_.assoc), None)

    def _on_network_timeout(self, evt_: Any) -> None:
        """Log an association aborted for being idle ``network_timeout_seconds`` (see
        :func:`_idle_abort`).

        Why: pynetdicom aborts it with only its own ERROR line, without address or AE title; every
        other way the node drops a connection is a ``connection dropped reason=...`` event
        (docs/pacs-admin.md §9)."""
        _idle_abort(evt_.assoc.dul)

    def _on_assoc(self, evt_: Any) -> None:
        event(
            log,
            "association",
            logging.DEBUG,
            calling_aet=str(evt_.assoc.requestor.ae_title).strip(),
            address=evt_.assoc.requestor.address,
        )

    def _on_requested(self, evt_: Any) -> None:
        """Reject a calling AE title pinned by ``calling_aet_hosts`` when it calls from elsewhere, any
        caller while the disk is low (temporary congestion), and one past ``max_associations``."""
        assoc = evt_.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        networks = self._pins.get(calling)
        if networks is not None and not _address_in(assoc.requestor.address, networks):
            self._leave_pending(assoc)
            _reject(assoc, 0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
            return
        if self.disk.refusal() is not None:  # disk back-pressure: the PACS is to try again later
            self._leave_pending(assoc)
            _reject(assoc, 0x02, 0x03, 0x01)  # transient, service provider (presentation), congestion
            return
        if not self._admit(assoc):
            _reject(assoc, 0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit

    def _on_rejected(self, evt_: Any) -> None:
        assoc = evt_.assoc
        request = assoc.requestor.primitive
        answer = assoc.acceptor.primitive
        source, diagnostic = getattr(answer, "result_source", None), getattr(answer, "diagnostic", None)
        # temporary congestion is the disk guard's, which logged entering the low state once: a PACS
        # retrying every few seconds would otherwise write a warning each time
        level = logging.DEBUG if (source, diagnostic) == (0x03, 0x01) else logging.WARNING
        event(
            log,
            "association rejected",
            level,
            reason=_REJECT_REASONS.get((source, diagnostic), f"source {source} diagnostic {diagnostic}"),
            calling_aet=str(getattr(request, "calling_ae_title", "")).strip(),
            called_aet=str(getattr(request, "called_ae_title", "")).strip(),
            address=assoc.requestor.address,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom event handlers of a listener
        (also bound by :mod:`dicomnode.network.receive_worker`)."""
        return [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_ABORTED, self._on_network_timeout),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_assoc),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def start(self) -> None:
        """Listen (over TLS when ``tls.enabled``); a certificate, key or CA that cannot be loaded stops
        the node here with :class:`dicomnode.network.tls.TlsError`, a port that cannot be opened with
        :class:`ListenError`."""
        ssl_context = server_context(self.settings.tls)
        try:
            self.server = self.ae.start_server(
                (self.settings.host, self.settings.port), block=False, evt_handlers=self.handlers(),
                ssl_context=ssl_context,
            )
        except OSError as exc:  # typically another node (or an old one) still listening there
            raise ListenError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                              f"{exc.strerror or exc}") from exc
        event(
            log,
            "listening",
            ae_title=self.settings.ae_title,
            host=self.settings.host,
            port=self.settings.port,
            allowed=",".join(self.settings.allowed_calling_aets) or "any",
            pinned=",".join(sorted(self._pins)) or "none",
            tls=self._tls_summary(),
        )
        self.disk.refusal()  # a node started on a full volume says so now, not at the first caller

    def _tls_summary(self) -> str:
        """``off``, or what the listener asks of callers (for the start-up log line)."""
        tls = self.settings.tls
        if not tls.enabled:
            return "off"
        clients = "required" if tls.require_client_certificate else "optional"
        return f"TLS>={tls.min_version} client-certificate={clients}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
