"""The DICOM listener: C-ECHO and C-STORE SCP for CT, writing each instance durably before success.

Why this shape: the PACS auto-routes thigh CT here and deletes nothing on its side, so an instance
the node acknowledged must exist on disk and in the index. The handler writes the dataset bytes as
received (no decode/re-encode of pixels; the header is parsed only to file the instance), which also
keeps every compressed transfer syntax intact. Any failure returns a failure status and leaves no
partial file; the listener keeps serving. Calling AE titles outside ``allowed_calling_aets`` are
rejected at association (a PACS answering the node's C-MOVE for priors must be on that list too).

Throughput: pynetdicom's per-instance cost is mostly thread hand-offs and poll ticks, not the disk.
:func:`tune_pynetdicom` and :func:`_attach_waiters` (a) serve C-STORE in the thread that assembled
the message, (b) replace the 1 ms poll sleeps with waits on the actual socket/queue, (c) read PDUs
into one buffer, (d) drop pynetdicom's per-PDU log formatting when its logger is off, and the header
is parsed only up to SeriesInstanceUID. ``benchmarks/receive.py`` measures the effect against
dcmtk storescp and Orthanc.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicomnode.config import Settings
from dicomnode.logs import event
from dicomnode.store import Store, StoreError, encode_file_meta, info_from_dataset, read_header

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT)

# failure statuses (PS3.4 Annex B / GG)
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
MAX_PDU = 1 << 20  # 1 MiB: a 512×512 slice arrives in one P-DATA PDU, the cheapest thing for a Python SCP


def _recv_into(self: Any, nr_bytes: int) -> bytearray:
    """Drop-in for ``AssociationSocket.recv``: same contract, but reads straight into one buffer.

    pynetdicom reads in 4 KiB ``recv`` calls and extends a bytearray (~130 Python iterations and copies
    per 512 KiB slice).
    """
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    nr_read = 0
    sock = self.socket
    while nr_read < nr_bytes:
        got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
        if not got:
            del view
            return buf[:nr_read]
        nr_read += got
    return buf


class _WakingTime:
    """Stands in for ``time`` inside pynetdicom's ``association`` and ``dul`` modules.

    pynetdicom's two per-association threads poll: the DUL thread sleeps ~1 ms between socket checks and
    the association reactor sleeps 1 ms between DIMSE-queue checks. Each instance therefore waits for
    several poll ticks (and the polling burns CPU on a busy machine). A thread that carries a
    ``_dicomnode_wait`` attribute (set in :meth:`StorageSCP._on_conn_open`) waits on the real event
    instead, for at most the same tick, so it is never slower than pynetdicom's own loop; every other
    thread and every other sleep behaves exactly as before.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        waiter = getattr(threading.current_thread(), "_dicomnode_wait", None)
        if waiter is None or seconds != 0.001:  # only pynetdicom's poll ticks
            self._real.sleep(seconds)
            return
        try:
            waiter(0.001)
        except (OSError, ValueError):  # socket already closed: fall back to the plain tick
            self._real.sleep(seconds)


def tune_pynetdicom() -> None:
    """Process-wide pynetdicom speed-ups that keep its behaviour (idempotent)."""
    import time

    import pynetdicom.association
    import pynetdicom.dul
    from pynetdicom import _config
    from pynetdicom.transport import AssociationSocket

    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # its "standard" notification handlers decode and format every PDU and DIMSE message for the
        # log even when that log is off
        _config.LOG_HANDLER_LEVEL = "none"
    if getattr(AssociationSocket.recv, "__name__", "") != "_recv_into":
        AssociationSocket.recv = _recv_into  # type: ignore[method-assign]
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(getattr(module, "time", None), _WakingTime):
            module.time = _WakingTime(time)  # type: ignore[attr-defined]


def _implicit(group_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group_elem >> 16, group_elem & 0xFFFF, len(value)) + value


def encode_c_store_success(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RSP with status Success (implicit VR little endian, PS3.7 9.3.1.2).

    Hand-encoded because pynetdicom builds and encodes it twice through pydicom (~1 ms per instance).
    ``tests/test_node_units.py`` checks it against pynetdicom's own encoding.
    """
    def ui(uid: str) -> bytes:
        raw = uid.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join((
        _implicit(0x00000002, ui(sop_class)),
        _implicit(0x00000100, struct.pack("<H", 0x8001)),
        _implicit(0x00000120, struct.pack("<H", message_id)),
        _implicit(0x00000800, struct.pack("<H", 0x0101)),
        _implicit(0x00000900, struct.pack("<H", 0x0000)),
        _implicit(0x00001000, ui(sop_instance)),
    ))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def _fast_store_response(assoc: Any, dimse: Any, dul: Any) -> None:
    """Send plain successful C-STORE responses without pynetdicom's pydicom round trip."""
    from pynetdicom.pdu_primitives import P_DATA

    original_send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        plain = (type(primitive).__name__ == "C_STORE" and primitive.MessageIDBeingRespondedTo is not None
                 and primitive.Status == 0 and getattr(primitive, "ErrorComment", None) is None
                 and getattr(primitive, "OffendingElement", None) is None
                 and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                 and not assoc.get_handlers(evt.EVT_DIMSE_SENT))
        if plain:
            command = encode_c_store_success(str(primitive.AffectedSOPClassUID),
                                             str(primitive.AffectedSOPInstanceUID),
                                             int(primitive.MessageIDBeingRespondedTo))
            limit = dimse.maximum_pdu_size
            if not limit or len(command) + 6 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                dul.send_pdu(pdata)
                return
        original_send(primitive, context_id)

    dimse.send_msg = send_msg


def _attach_waiters(assoc: Any) -> socket.socket | None:
    """Make this association's DUL thread wake on socket data or a queued outgoing PDU (and serve C-STORE
    requests itself), and its reactor wake on a complete DIMSE message. Returns the wake-up socket to
    close when the connection ends."""
    dul = getattr(assoc, "dul", None)
    dimse = getattr(assoc, "dimse", None)
    if dul is None or dimse is None or not hasattr(dul, "to_provider_queue"):
        return None
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    outgoing = dul.to_provider_queue
    original_put = outgoing.put

    def put(item: Any, *args: Any, **kwargs: Any) -> None:
        original_put(item, *args, **kwargs)
        try:
            wake_w.send(b"\0")
        except OSError:  # buffer full (already awake) or closed
            pass

    outgoing.put = put

    def dul_wait(timeout: float) -> None:
        if outgoing.qsize():
            return
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if sock is None:
            raise OSError("no socket")
        ready, _, _ = select.select([sock, wake_r], [], [], timeout)
        if wake_r in ready:
            try:
                while wake_r.recv(4096):
                    pass
            except OSError:
                pass

    incoming = dimse.msg_queue
    original_incoming_put = incoming.put

    def serve_inline(item: Any, *args: Any, **kwargs: Any) -> None:
        # A complete C-STORE request is served right here in the DUL thread that assembled it, as
        # pynetdicom itself does for N-EVENT-REPORT: this saves two thread hand-offs per instance
        # (DUL → reactor → DUL), each of which can cost a scheduler time slice on a busy machine.
        # The response is queued to the same DUL thread, which sends it on its next loop.
        _, primitive = item
        if (threading.current_thread() is dul and type(primitive).__name__ == "C_STORE"
                and getattr(primitive, "is_valid_request", False)):
            assoc._serve_request(primitive, item[0])
            return
        original_incoming_put(item, *args, **kwargs)

    incoming.put = serve_inline

    def reactor_wait(timeout: float) -> None:
        with incoming.not_empty:
            if not incoming._qsize():
                incoming.not_empty.wait(timeout)

    _fast_store_response(assoc, dimse, dul)
    dul._dicomnode_wait = dul_wait
    assoc._dicomnode_wait = reactor_wait
    return wake_w


def transfer_syntaxes() -> list[str]:
    """Native syntaxes plus every compressed one a pixel-data decoder is installed for."""
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
            if get_decoder(uid).is_available:
                found.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return [str(u) for u in found]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    """pynetdicom AE serving C-ECHO and C-STORE into a :class:`Store`."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.server: Any = None
        self.received = 0
        self.failed = 0
        self._count_lock = threading.Lock()
        self._wakers: dict[int, socket.socket] = {}
        tune_pynetdicom()
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = MAX_PDU
        ae.maximum_associations = settings.max_associations
        ae.require_calling_aet = list(settings.allowed_calling_aets)
        syntaxes = transfer_syntaxes()
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        self.ae = ae

    # -- handlers --------------------------------------------------------------------------------
    def _on_store(self, evt_: Any) -> int | Dataset:
        calling = str(evt_.assoc.requestor.ae_title).strip()
        ctx = evt_.context
        try:
            ds = read_header(evt_.request.DataSet, str(ctx.transfer_syntax))
            if ds is None:  # deflated or big endian: let pynetdicom/pydicom decode all of it
                ds = evt_.dataset
        except Exception as exc:  # undecodable byte stream: refuse it, keep serving
            return self._fail(CANNOT_UNDERSTAND, f"cannot decode dataset: {type(exc).__name__}", calling)
        try:
            info = info_from_dataset(ds, str(ctx.abstract_syntax), str(ctx.transfer_syntax), calling)
            affected = str(evt_.request.AffectedSOPInstanceUID or "")
            if affected and affected != info.sop_uid:
                raise StoreError("SOPInstanceUID differs from the C-STORE request")
        except StoreError as exc:
            return self._fail(DATA_SET_DOES_NOT_MATCH, str(exc), calling)
        except Exception as exc:  # a header pydicom cannot parse
            return self._fail(CANNOT_UNDERSTAND, f"cannot read header: {type(exc).__name__}", calling)
        try:
            self.store.add(info, encode_file_meta(info), evt_.request.DataSet.getbuffer())
        except Exception as exc:
            log.exception("store failed")
            return self._fail(OUT_OF_RESOURCES, f"cannot store: {type(exc).__name__}: {exc}", calling)
        with self._count_lock:
            self.received += 1
        return 0x0000

    def _fail(self, code: int, comment: str, calling: str) -> Dataset:
        with self._count_lock:
            self.failed += 1
        event(
            log,
            "c-store refused",
            logging.WARNING,
            status=f"0x{code:04X}",
            reason=comment,
            calling_aet=calling,
        )
        return _status(code, comment)

    def _on_echo(self, evt_: Any) -> int:
        return 0x0000

    def _on_conn_open(self, evt_: Any) -> None:
        wake = _attach_waiters(evt_.assoc)
        if wake is not None:
            with self._count_lock:
                self._wakers[id(evt_.assoc)] = wake

    def _on_conn_close(self, evt_: Any) -> None:
        with self._count_lock:
            wake = self._wakers.pop(id(evt_.assoc), None)
        if wake is not None:
            wake.close()

    def _on_assoc(self, evt_: Any) -> None:
        event(
            log,
            "association",
            logging.DEBUG,
            calling_aet=str(evt_.assoc.requestor.ae_title).strip(),
            address=evt_.assoc.requestor.address,
        )

    def _on_rejected(self, evt_: Any) -> None:
        event(
            log,
            "association rejected",
            logging.WARNING,
            calling_aet=str(evt_.assoc.requestor.ae_title).strip(),
            address=evt_.assoc.requestor.address,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ACCEPTED, self._on_assoc),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        event(
            log,
            "listening",
            ae_title=self.settings.ae_title,
            host=self.settings.host,
            port=self.settings.port,
            allowed=",".join(self.settings.allowed_calling_aets) or "any",
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
