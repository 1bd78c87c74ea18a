"""The DICOM listener: C-ECHO and C-STORE SCP for CT, writing each instance durably before success.

Why this shape: the PACS auto-routes thigh CT here and deletes nothing on its side, so an instance
the node acknowledged must exist on disk and in the index. The handler writes the dataset bytes as
received (no decode/re-encode of pixels; the header is parsed only to file the instance), which also
keeps every compressed transfer syntax intact. Any failure returns a failure status and leaves no
partial file; the listener keeps serving. Calling AE titles outside ``allowed_calling_aets`` are
rejected at association.
"""

from __future__ import annotations

import logging
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
from dicomnode.store import Store, StoreError, encode_file_meta, info_from_dataset

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
# pynetdicom's DUL thread polls with a 1 ms sleep when idle; during an association a shorter poll cuts
# the per-instance latency (measured: ~1.5× instances/s with dcmtk storescu on loopback)
DUL_POLL_SECONDS = 0.0001


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
        dul = getattr(evt_.assoc, "dul", None)
        if dul is not None and hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = DUL_POLL_SECONDS

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
