"""One receive worker process: the node's C-STORE SCP, serving connections its parent accepted.

Why a process: pynetdicom's association threads share one interpreter lock, so several associations
in one process take turns. Here each worker is a full :class:`~dicomnode.network.scp.StorageSCP` (allow-list,
called AE, host pins, TLS, PDU caps and deadlines, data set limit, disk back-pressure, the store's
durable write and its own connection to the one SQLite index), except for what must be counted
node-wide: whether a connection is still pending, and how many associations are admitted. Those
belong to the parent (:class:`dicomnode.network.receive_pool.ConnectionTable`), which this worker asks over
its channel (:mod:`dicomnode.network.receive_channel`) when an A-ASSOCIATE-RQ arrives, and which tells it to
close a pending connection when the pending pool overflows.

Run as ``python -m dicomnode.network.receive_worker FD`` by the parent only; it exits when the parent says
stop or disappears (end of file on the channel), so a killed node leaves no worker behind.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.logs import event, setup_logging
from dicomnode.network.receive_channel import Message, Op, receive, send
from dicomnode.network.scp import StorageSCP, _awaiting_request, _close_pending, _ended
from dicomnode.network.tls import server_context
from dicomnode.storage.diskspace import DiskGuard
from dicomnode.storage.store import Store, one_flush_setting, restrict_umask

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0  # how often ended connections that fired no EVT_CONN_CLOSE are reported


class _HandedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server without a socket of its own: connections arrive from the parent
    and are given to :meth:`process_request` (one thread each, as the listening server does)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


class WorkerSCP(StorageSCP):
    """The SCP of one worker process; pending pool and admission are asked of the parent."""

    def __init__(self, settings: Settings, store: Store, channel: socket.socket) -> None:
        super().__init__(settings, store)
        # the same thresholds, refusing as before; the parent's guard logs entering and leaving the low state
        self.disk = DiskGuard(store.root, settings.min_free_disk_mb, settings.max_disk_used_pct, quiet=True)
        self.channel = channel
        self._send_lock = threading.Lock()
        self._state = threading.Lock()
        self._by_fd: dict[int, int] = {}  # fd of a handed connection → the parent's number, until opened
        self._conns: dict[int, Any] = {}  # parent's number → its association
        self._evicted_early: dict[int, int] = {}  # evicted before its association existed → pending
        self._answers: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._ssl = server_context(settings.tls)

    def _tell(self, message: Message) -> None:
        with self._send_lock:
            try:
                send(self.channel, message)
            except OSError:  # the parent is gone: the serve loop sees end of file and exits
                pass

    # -- the node-wide counts, kept by the parent ---------------------------------------------------
    def _enter_pending(self, assoc: Any, address: str) -> None:
        sock = getattr(assoc.dul.socket, "socket", None)
        with self._state:
            conn = self._by_fd.pop(sock.fileno(), 0) if sock is not None else 0
            assoc._dicomnode_conn = conn
            if conn:
                self._conns[conn] = assoc
            early = self._evicted_early.pop(conn, None)
        if early is not None:
            self._evict(assoc, early)

    def _leave_pending(self, assoc: Any) -> None:
        conn = getattr(assoc, "_dicomnode_conn", 0)
        if conn:
            self._tell(Message(Op.LEFT, conn=conn))

    def _admit(self, assoc: Any) -> bool:
        """Ask the parent; no answer within ``acse_timeout_seconds`` (a parent that hangs) is a refusal."""
        if getattr(assoc, "_dicomnode_evicted", False):
            return True  # closed already: it never counts
        conn = getattr(assoc, "_dicomnode_conn", 0)
        if not conn:
            return False
        waiter: tuple[threading.Event, list[bool]] = (threading.Event(), [])
        with self._state:
            self._answers[conn] = waiter
        self._tell(Message(Op.ADMIT, conn=conn))
        answered = waiter[0].wait(self.settings.acse_timeout_seconds)
        with self._state:
            self._answers.pop(conn, None)
        return answered and bool(waiter[1]) and waiter[1][0]

    def _on_conn_close(self, evt_: Any) -> None:
        super()._on_conn_close(evt_)
        self._closed(getattr(evt_.assoc, "_dicomnode_conn", 0))

    def _closed(self, conn: int) -> None:
        with self._state:
            known = self._conns.pop(conn, None) is not None
        if known:
            self._tell(Message(Op.CLOSED, conn=conn))

    def _evict(self, assoc: Any, pending: int) -> None:
        """Close a connection the parent evicted from the node-wide pending pool (``pending``: how
        many stay pending there)."""
        if not _awaiting_request(assoc.dul):
            return  # its request arrived meanwhile: the parent counts it as admitted or refused
        _close_pending(assoc, assoc.requestor.address, pending)

    def _sweep(self) -> None:
        """Report connections whose thread ended without EVT_CONN_CLOSE (see ``_forget_ended``)."""
        with self._state:
            ended = [conn for conn, assoc in self._conns.items() if _ended(assoc)]
        for conn in ended:
            self._closed(conn)

    # -- serving --------------------------------------------------------------------------------
    def start(self) -> None:
        self.server = self.ae.make_server(("127.0.0.1", 0), evt_handlers=self.handlers(),
                                          server_class=_HandedServer)

    def _take(self, message: Message, fd: int) -> None:
        """Serve one connection handed over by the parent (TLS-wrapped as pynetdicom's server does)."""
        sock = socket.socket(fileno=fd)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_side=True)
        with self._state:
            self._by_fd[sock.fileno()] = message.conn
        address = message.address or ("", 0)
        self.server.process_request(sock, address)

    def serve(self) -> None:
        """Handle the parent's messages until it says stop or goes away."""
        self.channel.settimeout(SWEEP_INTERVAL_S)
        self._tell(Message(Op.READY))
        swept = time.monotonic()
        while True:
            if time.monotonic() - swept >= SWEEP_INTERVAL_S:
                self._sweep()
                swept = time.monotonic()
            try:
                got = receive(self.channel)
            except TimeoutError:  # nothing for a while: sweep, then wait again
                continue
            except OSError:
                return
            if got is None:
                return
            message, fd = got
            if message.op is Op.CONN and fd is not None:
                self._take(message, fd)
            elif message.op is Op.EVICT:
                self._on_evict(message.conn, message.pending)
            elif message.op is Op.ANSWER:
                with self._state:
                    waiter = self._answers.get(message.conn)
                if waiter is not None:
                    waiter[1].append(message.ok)
                    waiter[0].set()
            elif message.op is Op.STOP:
                return
            elif fd is not None:
                os.close(fd)

    def _on_evict(self, conn: int, pending: int) -> None:
        with self._state:
            assoc = self._conns.get(conn)
            if assoc is None and conn in self._by_fd.values():  # handed over, its thread not started yet
                self._evicted_early[conn] = pending
        if assoc is not None:
            self._evict(assoc, pending)


def main(argv: list[str]) -> None:
    """Entry point of a worker process: settings from the channel, then serve until told to stop."""
    channel = socket.socket(fileno=int(argv[0]))
    first = receive(channel)
    if first is None or first[0].op is not Op.SETTINGS:
        raise SystemExit("receive worker: no settings from the parent")
    settings = Settings.model_validate(first[0].settings)
    restrict_umask()
    setup_logging(settings.log_level, settings.log_json)
    store = Store(settings.storage_dir, Database(settings.db_path), cross_process=True,
                  one_flush=one_flush_setting(settings.receive_flush))
    scp = WorkerSCP(settings, store, channel)
    scp.start()
    event(log, "receive worker ready", logging.DEBUG, pid=os.getpid())
    try:
        scp.serve()
    finally:
        # associations still running end with the process, unanswered: their instances were not
        # acknowledged, so the caller sends them again; everything acknowledged is on disk and indexed
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
