"""pynetdicom's reactor can take the answer to our C-STORE off the queue; the checkpoint fix keeps it.

The race needs two threads descheduled at the wrong moments (two busy cores do that now and then):
the reactor right after its checkpoint wait returned, and the sender between sending its request
and reading the answer. Here both moments are stretched on purpose (50 and 150 ms), so plain
pynetdicom loses an answer in nearly every C-STORE, and the fix is shown to keep every answer under
the same stretches. The peer is the harness's pynetdicom Storage SCP, in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.association import Association

from dicomnode.harness.capture import CapturingSCP
from dicomnode.network.reactor_handshake import ReactorCheckpoint, application_entity, guard_reactor_handshake
from tests.series_factory import CT_IMAGE, write_ct_series

STRETCH = 0.05  # seconds the reactor stays descheduled after its wait returns
SENDER_STRETCH = 0.15  # seconds the sender stays descheduled after its request went out


class _StretchedPlain(threading.Event):
    """pynetdicom's own checkpoint (a plain Event), the reactor descheduled after its wait."""

    def wait(self, timeout: float | None = None) -> bool:
        done = super().wait(timeout)
        time.sleep(STRETCH)
        return done


class _StretchedFixed(ReactorCheckpoint):
    """The fixed checkpoint, the reactor descheduled at the same place."""

    def _wait_until_set(self) -> None:
        super()._wait_until_set()
        time.sleep(STRETCH)


@pytest.fixture(scope="module")
def store_scp() -> Iterator[int]:
    """The harness's pynetdicom Storage SCP, answering Success at once, keeping nothing (its port)."""
    with CapturingSCP("STORESCP", keep=False) as scp:
        yield scp.port


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    series = write_ct_series(tmp_path_factory.mktemp("race"), name="race", n=8, size=8)
    return [pydicom.dcmread(f) for f in series.files]


def _associate(port: int) -> Association:
    """An association whose sender pauses for SENDER_STRETCH after each request it sends."""
    ae = application_entity("RACESCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = 1  # a lost answer costs this much
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    send = assoc.dimse.send_msg

    def send_then_stall(*args: object, **kwargs: object) -> None:
        send(*args, **kwargs)
        time.sleep(SENDER_STRETCH)

    assoc.dimse.send_msg = send_then_stall  # type: ignore[method-assign]
    return assoc


def _answered(assoc: Association, items: list[pydicom.Dataset]) -> list[bool]:
    """For each C-STORE until the association ends: did its answer (Success) come back?"""
    got = []
    for ds in items:
        if not assoc.is_established:
            break
        status = assoc.send_c_store(ds)
        got.append("Status" in status and status.Status == 0x0000)
    if assoc.is_established:
        assoc.release()
    return got


def test_every_association_gets_the_fixed_checkpoint(store_scp: int) -> None:
    assert guard_reactor_handshake()
    assoc = _associate(store_scp)
    try:
        assert type(assoc._reactor_checkpoint) is ReactorCheckpoint
    finally:
        assoc.release()


def test_plain_pynetdicom_loses_the_answer_when_the_reactor_is_descheduled(
        store_scp: int, instances: list[pydicom.Dataset], caplog: pytest.LogCaptureFixture) -> None:
    """The race exists in this pynetdicom (if a release fixes it, the fix and this test can go:
    docs/upstream.md §14)."""
    assoc = _associate(store_scp)
    checkpoint = _StretchedPlain()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint  # the reactor reads it again on its next turn
    answered = _answered(assoc, instances)
    assert False in answered, answered
    assert "Received unexpected C-STORE service message" in caplog.text


def test_the_fixed_checkpoint_keeps_every_answer_under_the_same_stretch(
        store_scp: int, instances: list[pydicom.Dataset]) -> None:
    assoc = _associate(store_scp)
    assoc._reactor_checkpoint = _StretchedFixed(assoc)
    assert _answered(assoc, instances) == [True] * len(instances)


def test_the_reactor_can_still_send_its_own_release(store_scp: int) -> None:
    """pynetdicom's reactor releases the association itself when its network timeout expires (with
    ``network_timeout_response = "A-RELEASE"``): it clears the checkpoint and waits for its own pause,
    which the fixed checkpoint gives it instead of a spin for ever."""
    scu = application_entity("IDLESCU")
    scu.network_timeout = 0.5
    scu.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", store_scp, ae_title="STORESCP")
    assert assoc.is_established
    assoc.network_timeout_response = "A-RELEASE"
    assoc.join(timeout=10)
    assert not assoc.is_alive() and assoc.is_released


def test_the_fix_applies_only_to_the_pynetdicom_it_was_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom

    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert not guard_reactor_handshake()


def test_the_module_is_where_the_node_makes_its_application_entities() -> None:
    """Every pynetdicom AE the node, the demo and the harness make comes from application_entity."""
    root = Path(__file__).resolve().parents[1]
    makers = []
    for folder in ("dicomnode", "reporting", "seg"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if "AE(" in text and path.name != "reactor_handshake.py":
                makers += [f"{path.relative_to(root)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                           if " AE(" in line or "=AE(" in line]
    assert makers == [], makers
