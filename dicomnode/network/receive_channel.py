"""The wire between the accepting parent and its receive worker processes
(:mod:`dicomnode.network.receive_pool`).

Why a Unix SOCK_SEQPACKET pair: each message arrives whole (no framing of our own), an accepted TCP
connection travels with its message as a file descriptor (SCM_RIGHTS), and the peer's death shows as
end of file on the other side at once, with nothing to poll.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

MAX_MESSAGE = 1 << 18  # the settings message is the largest (a few KiB)


class Op(StrEnum):
    """What a message says. Parent → worker: SETTINGS (first), CONN (with its fd), EVICT, ANSWER, STOP.
    Worker → parent: READY, ADMIT (asks), LEFT (refused while pending), CLOSED."""

    SETTINGS = "settings"
    READY = "ready"
    CONN = "conn"
    EVICT = "evict"
    ADMIT = "admit"
    ANSWER = "answer"
    LEFT = "left"
    CLOSED = "closed"
    STOP = "stop"


@dataclass(frozen=True)
class Message:
    """One message; ``conn`` is the parent's number for a connection, ``ok`` an admission answer,
    ``pending`` (EVICT) how many connections stay pending node-wide, for the worker's log line."""

    op: Op
    conn: int = 0
    address: tuple[str, int] | None = None
    ok: bool = True
    pending: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        data = asdict(self)
        data["op"] = self.op.value
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Message:
        data = json.loads(raw)
        address = data.get("address")
        return cls(op=Op(data["op"]), conn=int(data.get("conn", 0)),
                   address=(str(address[0]), int(address[1])) if address else None,
                   ok=bool(data.get("ok", True)), pending=int(data.get("pending", 0)),
                   settings=dict(data.get("settings") or {}))


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected (parent end, worker end) pair; the worker end is inheritable for the child process."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child.set_inheritable(True)
    return parent, child


def send(sock: socket.socket, message: Message, fd: int | None = None) -> None:
    """Send one message (with ``fd`` attached when given); OSError when the peer is gone."""
    if fd is None:
        sock.sendall(message.encode())
    else:
        socket.send_fds(sock, [message.encode()], [fd])


def receive(sock: socket.socket) -> tuple[Message, int | None] | None:
    """The next message and its attached fd (None when there is none); None at end of file."""
    raw, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not raw:
        for fd in fds:  # cannot happen on SEQPACKET, but never leak a descriptor
            socket.close(fd)
        return None
    return Message.decode(raw), (fds[0] if fds else None)
