"""Guard on the library internals the node patches, and the node with its pynetdicom tuning off.

Why: dicomnode/network/scp.py (security bounds, always on),
dicomnode/network/pynetdicom_tuning.py (throughput, switchable) and
dicomnode/network/reactor_handshake.py (a lost-answer race, always on) replace or wrap private
pynetdicom code.
A pynetdicom release that renames, re-signs or
restructures any of it must fail here, loudly and by name, not at a hospital. Each check names what
relies on it; widen PATCHED_PYNETDICOM / TUNED_PYNETDICOM only after re-reading that code.
(highdicom's byte splice has its guard in tests/test_reporting_seg.py.)
"""

from __future__ import annotations

import inspect
import queue
import re
import socket
import struct
import threading
import time
from io import BytesIO
from pathlib import Path

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationSocket

from dicomnode import logs
from dicomnode.config import ConfigError, Settings, load_settings
from dicomnode.network import pynetdicom_tuning as tuning
from dicomnode.network import scp


def params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


@pytest.fixture
def assoc() -> Association:
    """An acceptor association as pynetdicom builds one before its connection (no thread started)."""
    return Association(AE(), mode="acceptor")


def test_installed_pynetdicom_is_the_one_patched_and_tuned() -> None:
    assert scp.PATCHED_PYNETDICOM == tuning.TUNED_PYNETDICOM == "3.0."
    assert pynetdicom.__version__.startswith(scp.PATCHED_PYNETDICOM), pynetdicom.__version__
    assert tuning.tuning_supported() and not tuning.tuning_supported("3.1.0")


def test_security_internals_read_pdu_data(assoc: Association) -> None:
    """scp._read_pdu_data replaces DULServiceProvider._read_pdu_data (bounded PDU reads)."""
    dul_source = source(pynetdicom.dul)
    assert "    def _read_pdu_data(self) -> None:" in dul_source  # the method replaced, as pynetdicom has it
    assert params(scp._read_pdu_data) == ["self"]
    assert source(DULServiceProvider._is_transport_event).count("self._read_pdu_data()") == 2  # its callers
    assert params(DULServiceProvider._decode_pdu) == ["self", "bytestream"]
    dul = assoc.dul
    assert isinstance(dul, DULServiceProvider) and dul.assoc is assoc
    for name in ("event_queue", "_recv_pdu", "to_user_queue", "to_provider_queue"):
        assert isinstance(getattr(dul, name), queue.Queue), name
    assert isinstance(dul.artim_timer, Timer)
    assert isinstance(inspect.getattr_static(Timer, "remaining"), property)
    assert isinstance(inspect.getattr_static(Timer, "timeout"), property)
    assert isinstance(inspect.getattr_static(DULServiceProvider, "network_timeout"), property)
    assert dul.state_machine.current_state == "Sta1"
    assert params(AssociationSocket.close) == ["self"] and "self.socket" in source(AssociationSocket.__init__)
    assert assoc.is_acceptor and assoc.acceptor.maximum_length is not None
    assert hasattr(assoc.requestor, "maximum_length")
    assert "to_user_queue.get" in source(DULServiceProvider.receive_pdu)  # a None there reads as time-out


def test_security_internals_dimse_and_reject(assoc: Association) -> None:
    """scp._bound_dimse_messages wraps receive_primitive; scp._reject follows pynetdicom's own reject."""
    assert params(DIMSEServiceProvider.receive_primitive) == ["self", "primitive"]
    assert assoc.dimse.message is None
    assert "self.message = None" in source(DIMSEServiceProvider.receive_primitive)  # message complete
    assert isinstance(DIMSEMessage().data_set, BytesIO)
    assert params(assoc.acse.send_reject) == ["result", "source", "diagnostic"]
    assert params(Association.kill) == ["self"]
    assert params(evt.trigger) == ["assoc", "event", "attrs"]
    assert evt.EVT_REJECTED and evt.EVT_REQUESTED and evt.EVT_CONN_OPEN
    # scp._refuse_unserved_requests wraps the acceptor's _serve_request and answers as its SCPs do
    assert params(Association._serve_request) == ["self", "msg", "context_id"]
    assert "self._serve_request(msg, " in source(Association._run_reactor)
    assert assoc._accepted_cx == {} and assoc._sent_release is False
    assert params(DIMSEServiceProvider.send_msg) == ["self", "primitive", "context_id"]
    find = C_FIND()
    assert find.msg_type == "C-FIND" and find.is_valid_request is False
    for name in ("MessageID", "MessageIDBeingRespondedTo", "Status", "AffectedSOPClassUID"):
        assert hasattr(find, name), name


def test_idle_abort_internals(assoc: Association) -> None:
    """scp.StorageSCP._on_network_timeout (EVT_ABORTED) and logs.library_info_as_debug read
    pynetdicom's idle abort: the acceptor's reactor, running in the Association thread, logs
    logs._IDLE_ABORT and aborts once the DUL's idle timer (restarted after each PDU read, whose end
    scp._read_pdu_data stamps) has run out; the abort fires EVT_ABORTED, which takes several
    handlers."""
    reactor = source(Association._run_reactor)
    expired = reactor.index("if self.dul.idle_timer_expired():")
    logged = reactor.index(f'LOGGER.error("{logs._IDLE_ABORT}")', expired)
    assert logged < reactor.index("self.abort()", expired)
    assert "return self._abort_blocking(block)" in source(Association.abort)
    assert "evt.trigger(self, evt.EVT_ABORTED, {})" in source(Association._abort_blocking)
    dul_loop = source(DULServiceProvider.run_reactor)
    assert "elif self._is_transport_event():  # receive and decode PDU\n" in dul_loop
    assert dul_loop.index("self._is_transport_event()") < dul_loop.index("self._idle_timer.restart()")
    assert isinstance(assoc, threading.Thread) and assoc.is_acceptor is True
    assert Association(AE(), mode="requestor").is_acceptor is False
    assert isinstance(inspect.getattr_static(Association, "network_timeout"), property)
    assert isinstance(evt.EVT_ABORTED, evt.NotificationEvent)


def test_reactor_handshake_internals() -> None:
    """reactor_handshake.ReactorCheckpoint replaces ``Association._reactor_checkpoint`` (a
    threading.Event made in ``__init__``): the reactor marks itself paused, waits on it, marks
    itself running and only then reads the DIMSE queue; every ``send_*`` and ``release`` clears it
    and spins until the reactor says paused; serving a request marks it paused (a handler may
    send); on its network timeout the reactor may release the association itself."""
    assoc = Association(AE(), mode="requestor")
    assert isinstance(assoc._reactor_checkpoint, threading.Event) and assoc._reactor_checkpoint.is_set()
    assert "self._reactor_checkpoint: threading.Event = threading.Event()" in source(Association.__init__)
    reactor = source(Association._run_reactor)
    paused = reactor.index("self._is_paused = True\n")
    waited = reactor.index("self._reactor_checkpoint.wait()\n", paused)
    running = reactor.index("self._is_paused = False\n", waited)
    assert running < reactor.index("self.dimse.get_msg(block=False)", running)
    end = reactor.index('if self.network_timeout_response == "A-RELEASE":')
    assert reactor.index("self._reactor_checkpoint.wait()", end) < reactor.index("self.release()", end)
    for method in (Association.send_c_store, Association.send_c_echo, Association.release):
        text = source(method)
        assert "self._reactor_checkpoint.clear()\n" in text, method.__name__
        assert text.index("self._reactor_checkpoint.clear()") < text.index("while not self._is_paused:")
    serve = source(Association._serve_request)
    assert serve.index("self._is_paused = True") < serve.index("service_class.SCP(msg, context)")


def test_tuning_internals_time_and_poll_ticks(assoc: Association) -> None:
    """_WakingTime stands in for the ``time`` module of association/dul and intercepts 1 ms sleeps."""
    for module in (pynetdicom.association, pynetdicom.dul):
        assert module.time is time or isinstance(module.time, tuning._WakingTime), module.__name__
        assert "\nimport time\n" in source(module), module.__name__
    assert "time.sleep(0.001)" in source(Association._run_reactor)
    assert "time.sleep(self._run_loop_delay)" in source(DULServiceProvider.run_reactor)
    assert assoc.dul._run_loop_delay == tuning.POLL_TICK
    assert _config.LOG_HANDLER_LEVEL in ("standard", "none")


def test_tuning_internals_queues_and_dimse(assoc: Association) -> None:
    """attach_waiters wraps the DUL's outgoing queue and the DIMSE message queue; _fast_store_response
    replaces DIMSEServiceProvider.send_msg and sends through DULServiceProvider.send_pdu."""
    dul, dimse = assoc.dul, assoc.dimse
    assert isinstance(dul, threading.Thread)  # serve_inline: threading.current_thread() is dul
    assert isinstance(dul.to_provider_queue, queue.Queue) and "to_provider_queue.put" in source(
        DULServiceProvider.send_pdu)
    assert isinstance(dimse.msg_queue, queue.Queue)
    assert isinstance(dimse.msg_queue.not_empty, threading.Condition) and callable(dimse.msg_queue._qsize)
    assert "self.msg_queue.put((context_id," in source(DIMSEServiceProvider.receive_primitive)
    assert params(Association._serve_request) == ["self", "msg", "context_id"]
    assert params(DIMSEServiceProvider.send_msg) == ["self", "primitive", "context_id"]
    assert params(DULServiceProvider.send_pdu) == ["self", "primitive"]
    assert isinstance(inspect.getattr_static(DIMSEServiceProvider, "maximum_pdu_size"), property)
    assert params(Association.get_handlers) == ["self", "event"] and evt.EVT_DIMSE_SENT
    assert P_DATA().presentation_data_value_list == []
    rsp = C_STORE()
    for name in ("MessageIDBeingRespondedTo", "Status", "ErrorComment", "OffendingElement",
                 "AffectedSOPClassUID", "AffectedSOPInstanceUID", "is_valid_request"):
        assert hasattr(rsp, name), name


def test_tuning_internals_p_data_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """split_p_data stands in for pynetdicom's P-DATA-TF decoding: the FSM only asks a P-DATA-TF PDU for
    ``to_primitive()`` (DT-2, AR-6), and the values it gives are pynetdicom's, as views; a malformed
    item list is left to pynetdicom (which aborts), and so is every PDU while raw PDU events are bound."""
    import pynetdicom.fsm as fsm
    from pynetdicom.pdu import P_DATA_TF

    assert pynetdicom.dul._PDU_TYPES[b"\x04"] == (P_DATA_TF, "Evt10")
    table = fsm.TRANSITION_TABLE
    assert table[("Evt10", "Sta6")] == "DT-2" and table[("Evt10", "Sta7")] == "AR-6"
    for action in (fsm.DT_2, fsm.AR_6):
        body = source(action)
        assert re.findall(r"(?<!\w)pdu\.\w+", body) == ["pdu.to_primitive"], action.__name__
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((1, b"\x03" + b"c" * 10))
    primitive.presentation_data_value_list.append((3, b"\x02" + bytes(range(256)) * 3))
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    encoded = pdu.encode()
    # pynetdicom's PDU log handlers bound ("standard"; set here: a node started earlier in the same
    # process turned them off globally)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    logged = Association(AE(), mode="acceptor")
    assert logged.get_handlers(evt.EVT_PDU_RECV) and tuning.split_p_data(logged, memoryview(encoded)) is None
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as tune_pynetdicom sets it, log off
    assoc = Association(AE(), mode="acceptor")
    theirs = P_DATA_TF()
    theirs.decode(encoded)
    split = tuning.split_p_data(assoc, memoryview(bytearray(encoded)))
    assert split is not None
    ours = split.to_primitive()
    assert isinstance(ours, P_DATA)
    assert [(c, bytes(v)) for c, v in ours.presentation_data_value_list] == list(
        theirs.to_primitive().presentation_data_value_list)
    header = encoded[:6]
    for bad in (b"\0\0\0\0\1", b"\0\0\0\x09\1abc", b"\0\0\0\x02\1a" + b"\0\0"):
        assert tuning.split_p_data(assoc, memoryview(header[:2] + struct.pack(">L", len(bad)) + bad)) is None
        with pytest.raises(Exception):  # noqa: B017 - pynetdicom refuses these too (A-ABORT in the node)
            P_DATA_TF().decode(header[:2] + struct.pack(">L", len(bad)) + bad)
    assoc.bind(evt.EVT_DATA_RECV, lambda event: None)
    assert tuning.split_p_data(assoc, memoryview(encoded)) is None


def test_tuning_switch_is_a_strict_boolean(tmp_path: Path) -> None:
    assert Settings().pynetdicom_tuning is True
    assert Settings(pynetdicom_tuning="false").pynetdicom_tuning is False  # DICOMNODE_PYNETDICOM_TUNING
    for bad in ("yes", "1", "on"):
        path = tmp_path / "node.toml"
        path.write_text(f'pynetdicom_tuning = "{bad}"\n')
        with pytest.raises(ConfigError, match="pynetdicom_tuning"):
            load_settings(path)


def test_tuning_skipped_on_an_unchecked_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    monkeypatch.setattr(pynetdicom.dul, "time", time)
    monkeypatch.setattr(pynetdicom.association, "time", time)
    assert tuning.tune_pynetdicom() is False
    assert pynetdicom.dul.time is time and pynetdicom.association.time is time


def _raw_abort_on_oversize_pdu(port: int) -> bytes:
    """Declare a 10 MB A-ASSOCIATE-RQ: the (always on) bound answers with an A-ABORT before reading it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 10_000_000))
        return sock.recv(64)


@pytest.mark.parametrize("tuned", [False, True], ids=["tuning-off", "tuning-on"])
def test_node_receives_with_tuning_on_and_off(tuned: bool, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A real C-STORE into an in-process SCP: stored and indexed either way; off, nothing of the tuning
    is installed (plain ``time`` in pynetdicom, no waiters, pynetdicom's own C-STORE-RSP) while the
    security bound still answers an oversize PDU with an A-ABORT."""
    from peers import free_port, pynetdicom_send
    from series_factory import write_ct_series

    from dicomnode.db import Database
    from dicomnode.storage.store import Store

    monkeypatch.setattr(pynetdicom.dul, "time", time)  # restored afterwards: no other test sees ours
    monkeypatch.setattr(pynetdicom.association, "time", time)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    encoded: list[str] = []
    real_encode = tuning.encode_c_store_success
    monkeypatch.setattr(tuning, "encode_c_store_success",
                        lambda *a: encoded.append(a[1]) or real_encode(*a))
    split: list[int] = []
    real_split = tuning.split_p_data
    monkeypatch.setattr(tuning, "split_p_data", lambda *a: split.append(1) or real_split(*a))
    settings = Settings(storage_dir=tmp_path / "var", host="127.0.0.1", port=free_port(),
                        min_free_disk_mb=0, max_disk_used_pct=100, pynetdicom_tuning=tuned)
    db = Database(settings.db_path)
    node = scp.StorageSCP(settings, Store(settings.storage_dir, db))
    node.start()
    try:
        series = write_ct_series(tmp_path / "in", name="guard", n=3, size=8)
        assert pynetdicom_send(settings.port, series.files) == [0, 0, 0]
        assert db.one("SELECT COUNT(*) FROM instances")[0] == 3 and node.received == 3
        assert DULServiceProvider._read_pdu_data is scp._read_pdu_data
        assert _raw_abort_on_oversize_pdu(settings.port) == struct.pack(">BBLBBBB", 7, 0, 4, 0, 0, 2, 6)
        assert node.tuned is tuned
        assert isinstance(pynetdicom.dul.time, tuning._WakingTime) is tuned
        assert isinstance(pynetdicom.association.time, tuning._WakingTime) is tuned
        assert encoded == (series.sop_uids if tuned else [])  # hand-encoded responses only when tuned
        assert (len(split) >= 6) is tuned and (not split) is (not tuned)  # command + data set PDUs
    finally:
        node.stop()
        db.close()


def test_highdicom_tables_the_warm_up_preloads_are_cached_module_functions() -> None:
    """``dicomnode.processing.pipeline._load_highdicom_tables`` calls private highdicom functions so that
    the first job's SEG does not parse the standard's tables (≈0.25–0.5 s). If highdicom renames them or
    stops caching them, the preload silently does nothing: this test says so. Upstream fix: a public
    ``highdicom.preload()`` (or lazily loaded per-IOD tables)."""
    from highdicom import _standard_utils as tables

    from dicomnode.processing.pipeline import _load_highdicom_tables

    names = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")
    _load_highdicom_tables()
    for name in names:
        func = getattr(tables, name)
        assert func() is func(), f"highdicom's {name} no longer caches its table"


def test_highdicom_still_refuses_the_character_sets_the_node_rewrites() -> None:
    """reporting/charset.py rewrites what highdicom 0.28 refuses (docs/upstream.md §10); when this
    fails, highdicom takes them: narrow the rewrite (Korean could then keep its bytes)."""
    import highdicom as hd

    from reporting.charset import declarable

    for values in (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 149"], ["ISO 2022 IR 100"]):
        assert not declarable(values)
        with pytest.raises(ValueError):
            hd.valuerep._check_specific_character_set(values if len(values) > 1 else values[0])
    for values in (["ISO 2022 IR 6", "ISO 2022 IR 87"], ["ISO_IR 192"], ["ISO_IR 100"]):
        assert declarable(values)
        hd.valuerep._check_specific_character_set(values if len(values) > 1 else values[0])


def test_pydicom_encoder_plugin_order_is_ours_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """reporting/rle_encoder.py reorders pydicom's private ``Encoder._available`` (docs/upstream.md
    §11): the dict must still exist, decide which plugin an unnamed encode uses, and take ours first."""
    import numpy as np
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import RLELossless

    from reporting import rle_encoder

    encoder = get_encoder(RLELossless)
    assert isinstance(encoder._available, dict)
    assert rle_encoder.install() and next(iter(encoder._available)) == rle_encoder.PLUGIN
    calls = []

    def counted(src: bytes, runner: object) -> bytes:
        calls.append(len(src))
        return rle_encoder.encode_frame(src, runner)

    monkeypatch.setitem(encoder._available, rle_encoder.PLUGIN, counted)  # same place, restored after
    encoder.encode(np.zeros((4, 6), dtype=np.uint8), rows=4, columns=6, samples_per_pixel=1,
                   bits_allocated=8, bits_stored=8, pixel_representation=0, number_of_frames=1,
                   photometric_interpretation="MONOCHROME2")
    assert calls == [24], "pydicom no longer tries its plugins in _available's order"
