"""pynetdicom senders: a scanner's series over one association, arbitrary items with their statuses."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.network.reactor_handshake import application_entity


def nodelay(assoc: Any) -> None:
    """Switch Nagle off on an established pynetdicom association.

    Why: pynetdicom writes the C-STORE command and its data set as separate PDUs; with Nagle on, the
    second waits for the peer's delayed ACK (~40 ms against Orthanc/dcmtk): ~17 instances/s instead of
    hundreds. The same reason Orthanc and dcmtk run with TCP_NODELAY=1.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(host: str, port: int, aet: str, calling: str = "DEMO", patience: float = 0.0) -> bool:
    """One C-ECHO; True when the peer answers Success.

    A refused association is tried again for ``patience`` s (a peer's slots may still be ending).
    """
    from pynetdicom.sop_class import Verification

    ae = application_entity(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + patience
    while not (assoc := ae.associate(host, port, ae_title=aet)).is_established:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return echoed(assoc)


def echoed(assoc: Any) -> bool:
    """C-ECHO over an association (then released); False when it was not established or not Success."""
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def send_series(folder: Path, port: int, called_aet: str, calling_aet: str = "CTSCANNER",
                host: str = "127.0.0.1") -> int:
    """C-STORE every ``*.dcm`` of a folder (CT Image Storage) in one association, as a scanner would.

    Returns the number sent; raises ConnectionError when the association is refused or a store fails.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    files = sorted(Path(folder).glob("*.dcm"))
    ae = application_entity(calling_aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"{called_aet} on port {port} refused the association")
    nodelay(assoc)
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            if not status or status.Status != 0:
                code = status.Status if status else "no answer"
                raise ConnectionError(f"C-STORE of {f.name} failed: {code}")
    finally:
        assoc.release()
    return len(files)


def store_statuses(port: int, items: list[Any], *, aet: str = "PYSCU", called: str = "THIGHNODE",
                   timeout: float = 10.0, verbatim: bool = False,
                   on_status: Callable[[int, int | None], bool | None] | None = None) -> list[Any]:
    """C-STORE files or datasets with a pynetdicom SCU over one association; each C-STORE-RSP status
    data set (None: no response, e.g. the association is gone).

    ``verbatim``: files go out byte for byte (pynetdicom's chunked sending), never decoded and
    re-encoded, so a malformed file arrives as it is. ``on_status(index, status)`` may return False
    to stop. Raises ConnectionError when the association is refused.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import _config

    ae = application_entity(aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pairs: set[tuple[str, str]] = set()
    for item in items:
        if isinstance(item, str | Path):
            meta = pydicom.dcmread(item, stop_before_pixels=True).file_meta
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        else:
            pairs.add((str(item.SOPClassUID), str(ExplicitVRLittleEndian)))
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = verbatim
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise ConnectionError(f"association with {called}@{port} failed")
        statuses: list[Any] = []
        try:
            for i, item in enumerate(items):
                if not assoc.is_established:
                    statuses.append(None)
                    continue
                status = assoc.send_c_store(item)
                statuses.append(status if status and "Status" in status else None)
                if on_status is not None and on_status(i, _code(statuses[-1])) is False:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return statuses


def _code(status: Any) -> int | None:
    return int(status.Status) if status is not None else None


def pynetdicom_send(port: int, items: list[Any], **kw: Any) -> list[int | None]:
    """:func:`store_statuses`, as each item's status code (None: no response)."""
    return [_code(s) for s in store_statuses(port, items, **kw)]


def send_verbatim(port: int, files: list[Path], aet: str = "PYSCU", timeout: float = 20.0,
                  ) -> list[tuple[int | None, str]]:
    """Each file's bytes exactly as they are (no decode, no re-encode): (status, error comment)."""
    return [(_code(s), str(s.get("ErrorComment", "") or "") if s is not None else "")
            for s in store_statuses(port, files, aet=aet, timeout=timeout, verbatim=True)]
