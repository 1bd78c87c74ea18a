"""Throughput patches for pynetdicom's receive path: switchable, version-pinned, never needed.

Why a separate module: pynetdicom's per-instance cost is mostly thread hand-offs and poll ticks, not the
disk. These patches (a) serve C-STORE in the DUL thread that assembled the message, (b) replace the
1 ms poll sleeps of the DUL thread and the association reactor with waits on the actual socket/queue,
(c) send a plain successful C-STORE-RSP from a hand-encoded command set, (d) drop pynetdicom's
per-PDU log formatting when its logger is off, and (e) split a received P-DATA-TF PDU into its values
with one copy of its bytes instead of pynetdicom's three (:func:`split_p_data`). They change speed,
not behaviour, so the node turns them off (plain pynetdicom) with ``pynetdicom_tuning = false`` and on
any pynetdicom other than TUNED_PYNETDICOM. The security patches (bounded PDU reads, deadlines, data
set limit) are not here: they are always on, in the "pynetdicom internals" section of
:mod:`dicomnode.network.scp`.

``tests/test_library_guard.py`` fails when a pynetdicom internal used here or there changes;
``docs/upstream.md`` proposes the upstream changes that would make this module unnecessary.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
from typing import Any

from pynetdicom import evt

from dicomnode.logs import event

log = logging.getLogger(__name__)

TUNED_PYNETDICOM = "3.0."  # the pynetdicom versions these patches were written and tested against
POLL_TICK = 0.001  # pynetdicom's poll sleep (DULServiceProvider._run_loop_delay, Association._run_reactor)
_warned: list[str] = []


def tuning_supported(version: str | None = None) -> bool:
    """Were these patches checked against this pynetdicom version (default: the installed one)?"""
    if version is None:
        import pynetdicom

        version = pynetdicom.__version__
    return version.startswith(TUNED_PYNETDICOM)


class _WakingTime:
    """Stands in for ``time`` inside pynetdicom's ``association`` and ``dul`` modules.

    pynetdicom's two per-association threads poll: the DUL thread sleeps 1 ms between socket checks and
    the association reactor sleeps 1 ms between DIMSE-queue checks. Each instance therefore waits for
    several poll ticks (and the polling burns CPU on a busy machine). A thread that carries a
    ``_dicomnode_wait`` attribute (set by :func:`attach_waiters`) waits on the real event instead, for
    at most the same tick, so it is never slower than pynetdicom's own loop; every other thread and
    every other sleep behaves exactly as before.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        waiter = getattr(threading.current_thread(), "_dicomnode_wait", None)
        if waiter is None or seconds != POLL_TICK:  # only pynetdicom's poll ticks
            self._real.sleep(seconds)
            return
        try:
            waiter(POLL_TICK)
        except (OSError, ValueError):  # socket already closed: fall back to the plain tick
            self._real.sleep(seconds)


def tune_pynetdicom() -> bool:
    """Install the process-wide patches (idempotent); False, with one warning, on a pynetdicom version
    they were not checked against (the node then runs on plain pynetdicom, only slower)."""
    import pynetdicom

    if not tuning_supported():
        if pynetdicom.__version__ not in _warned:
            _warned.append(pynetdicom.__version__)
            event(log, "pynetdicom tuning off", logging.WARNING, version=pynetdicom.__version__,
                  tested=f"{TUNED_PYNETDICOM}x")
        return False
    import time as time_module

    import pynetdicom.association
    import pynetdicom.dul
    from pynetdicom import _config

    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # its "standard" notification handlers decode and format every PDU and DIMSE message for the
        # log even when that log is off
        _config.LOG_HANDLER_LEVEL = "none"
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(getattr(module, "time", None), _WakingTime):
            module.time = _WakingTime(time_module)  # type: ignore[attr-defined]
    return True


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


_ITEM_LENGTH = struct.Struct(">L")


class _SplitPData:
    """A P-DATA-TF PDU already split into its presentation data values: all the FSM asks of one
    (``to_primitive()``, in DT-2 and AR-6)."""

    __slots__ = ("pdvs",)

    def __init__(self, pdvs: list[tuple[int, memoryview]]) -> None:
        self.pdvs = pdvs

    def to_primitive(self) -> Any:
        from pynetdicom.pdu_primitives import P_DATA

        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # filled as pynetdicom's own to_primitive does: the
        primitive.presentation_data_value_list.extend(self.pdvs)  # setter would insist on bytes
        return primitive


def split_p_data(assoc: Any, pdu: memoryview) -> _SplitPData | None:
    """A received P-DATA-TF PDU (``pdu``: all of it, header included) as its presentation data values,
    each a view into one copy of the PDU's body; None (pynetdicom decodes it) for a malformed item list
    or when someone listens to the raw PDU events.

    Why: pynetdicom copies a PDU's bytes three times before the DIMSE layer copies the data set out of
    it (``bytes()``, the items' slice, each value's slice); at 0.5 MB a slice that is most of its
    decoding time. Here the body is copied once, and the DIMSE layer's own copy is the second.
    """
    if assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV):
        return None
    body = pdu[6:].tobytes()  # the caller's buffer is reused for the next PDU
    view = memoryview(body)
    pdvs = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 5:
            return None
        item_length = _ITEM_LENGTH.unpack_from(body, pos)[0]
        if item_length < 1 or pos + 4 + item_length > end:
            return None
        pdvs.append((body[pos + 4], view[pos + 5:pos + 4 + item_length]))
        pos += 4 + item_length
    return _SplitPData(pdvs)


def attach_waiters(assoc: Any) -> socket.socket | None:
    """Make this association's DUL thread wake on socket data or a queued outgoing PDU (and serve C-STORE
    requests itself), and its reactor wake on a complete DIMSE message; needs :func:`tune_pynetdicom`.
    Returns the wake-up socket to close when the connection ends."""
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
        if threading.current_thread() is dul:  # a C-STORE-RSP of serve_inline: the DUL thread sends it
            return  # on its next loop without waiting, so waking it would only cost a syscall
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
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select cannot see
            return
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
    dul._dicomnode_split_p_data = lambda pdu: split_p_data(assoc, pdu)  # see scp._read_pdu_data
    dul._dicomnode_wait = dul_wait
    assoc._dicomnode_wait = reactor_wait
    return wake_w
