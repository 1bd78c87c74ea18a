"""Receive in several processes: the node accepts, ``receive_processes`` workers serve associations.

Why: pynetdicom's association threads share one interpreter lock, so a node serving four associations
in one process is hardly faster than with one. With ``receive_processes = N > 1`` the node's process
keeps the one listening socket and accepts; each connection is handed (its file descriptor, over a
Unix socket pair, :mod:`dicomnode.network.receive_channel`) to the worker process serving the fewest
connections (:mod:`dicomnode.network.receive_worker`), which runs the same SCP as a single-process node: the
allow-list, called-AE and host checks, TLS, PDU caps and deadlines, disk back-pressure, the durable
write (:meth:`dicomnode.storage.store.Store.write`) and the index row before success, UID-collision
handling (a byte-range lock per SOP UID slot, shared by the workers).

What must be counted node-wide stays here, in :class:`ConnectionTable`: the pending pool
(``max_pending_connections``, PENDING_PER_ADDRESS per source address, the oldest closed first, as
:meth:`dicomnode.network.scp.StorageSCP._enter_pending` does in one process) and ``max_associations``
(a worker asks before it accepts an A-ASSOCIATE-RQ).

A worker that dies (kill -9, a crash) loses only the instances it had not acknowledged: its callers'
associations drop and they send those again. The parent forgets its connections, deletes the temp
files it left, and starts a replacement; the other workers keep serving meanwhile. The SQLite index
stays one file (WAL): each worker writes through short transactions with the receive path's busy
timeout, so at most one writes at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

from dicomnode.config import Settings
from dicomnode.logs import event
from dicomnode.network.receive_channel import Message, Op, pair, receive, send
from dicomnode.network.scp import PENDING_PER_ADDRESS, ListenError
from dicomnode.network.tls import server_context
from dicomnode.storage.diskspace import DiskGuard
from dicomnode.storage.store import Store

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # a worker must be serving this long after it was started
STOP_TIMEOUT_S = 5.0  # a worker told to stop is killed after this long
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0)  # a worker dying again and again is restarted ever slower
STABLE_S = 30.0  # a worker that served this long resets the back-off
LISTEN_BACKLOG = 128  # connections the kernel queues while the parent hands the previous ones over


@dataclass
class _Conn:
    worker: int
    address: str


class ConnectionTable:
    """Every connection handed to a worker, pending (no A-ASSOCIATE-RQ yet) or admitted; thread-safe.

    Why here and not in the workers: both limits are node-wide. A stalled-socket attack spread over
    the workers must not hold more than ``max_pending`` sockets in all, and ``max_associations`` is
    what the PACS administrator was promised, whatever the number of processes.
    """

    def __init__(self, max_pending: int, max_associations: int, per_address: int = PENDING_PER_ADDRESS):
        self.max_pending = max_pending
        self.max_associations = max_associations
        self.per_address = per_address
        self._lock = threading.Lock()
        self._pending: dict[int, _Conn] = {}  # oldest first
        self._admitted: dict[int, _Conn] = {}

    def add(self, conn: int, worker: int, address: str) -> list[tuple[int, _Conn]]:
        """Count a new connection as pending; returns the connections to close now (oldest first)."""
        evicted = []
        with self._lock:
            self._pending[conn] = _Conn(worker, address)
            same = [key for key, c in self._pending.items() if c.address == address]
            for key in same[:max(len(same) - self.per_address, 0)]:
                evicted.append((key, self._pending.pop(key)))
            while len(self._pending) > self.max_pending:
                key = next(iter(self._pending))
                evicted.append((key, self._pending.pop(key)))
        return evicted

    def admit(self, conn: int) -> bool:
        """Its A-ASSOCIATE-RQ arrived: admitted if fewer than ``max_associations`` are. An evicted one
        whose request crossed the eviction is refused too (the caller retries; transient), so that no
        association ever runs uncounted."""
        with self._lock:
            entry = self._pending.pop(conn, None)
            if entry is None:
                return False
            if len(self._admitted) >= self.max_associations:
                return False
            self._admitted[conn] = entry
            return True

    def close(self, conn: int) -> None:
        """Refused while pending, or closed: it counts no more."""
        with self._lock:
            self._pending.pop(conn, None)
            self._admitted.pop(conn, None)

    def drop_worker(self, worker: int) -> int:
        """A worker died: its connections died with it; returns how many."""
        with self._lock:
            gone = 0
            for table in (self._pending, self._admitted):
                for key in [k for k, c in table.items() if c.worker == worker]:
                    del table[key]
                    gone += 1
            return gone

    def counts(self) -> tuple[int, int]:
        """(pending, admitted) now."""
        with self._lock:
            return len(self._pending), len(self._admitted)

    def load(self, worker: int) -> int:
        """Connections a worker holds now (how the next connection's worker is chosen)."""
        with self._lock:
            return sum(1 for table in (self._pending, self._admitted) for c in table.values()
                       if c.worker == worker)


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def tell(self, message: Message, fd: int | None = None) -> bool:
        with self.send_lock:
            try:
                send(self.channel, message, fd)
                return True
            except OSError:
                return False


class ReceivePool:
    """The node's listener with ``receive_processes`` worker processes; ``start()``/``stop()`` as
    :class:`dicomnode.network.scp.StorageSCP`."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.size = settings.receive_processes
        self.table = ConnectionTable(settings.max_pending_connections, settings.max_associations)
        self.workers: dict[int, _Worker] = {}
        self._deaths: dict[int, int] = {}  # slot → deaths in a row (restart back-off)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._numbers = itertools.count(1)
        self._threads: list[threading.Thread] = []
        # the workers refuse by their own (quiet) guards; this one says when the volume goes low or recovers
        self.disk = DiskGuard(store.root, settings.min_free_disk_mb, settings.max_disk_used_pct)

    # -- workers --------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> _Worker:
        parent_end, child_end = pair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.network.receive_worker", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        worker = _Worker(slot, proc, parent_end)
        # without [ops]: a worker serves no page, and its secret would arrive masked (and so refused)
        worker.tell(Message(Op.SETTINGS, settings=self.settings.model_dump(mode="json", exclude={"ops"})))
        with self._changed:
            self.workers[slot] = worker
        thread = threading.Thread(target=self._listen_to, args=(worker,), name=f"dicomnode-receive-{slot}",
                                  daemon=True)
        thread.start()
        return worker

    def _listen_to(self, worker: _Worker) -> None:
        """Answer one worker's messages; when its channel ends, it died (or was stopped): clean up
        after it and start another."""
        while True:
            try:
                got = receive(worker.channel)
            except OSError:
                got = None
            if got is None:
                break
            message, fd = got
            if fd is not None:
                os.close(fd)
            if message.op is Op.READY:
                worker.ready.set()
                with self._changed:
                    self._changed.notify_all()
            elif message.op is Op.ADMIT:
                worker.tell(Message(Op.ANSWER, conn=message.conn, ok=self.table.admit(message.conn)))
            elif message.op in (Op.LEFT, Op.CLOSED):
                self.table.close(message.conn)
        self._worker_ended(worker)

    def _worker_ended(self, worker: _Worker) -> None:
        worker.channel.close()
        with suppress(subprocess.TimeoutExpired):
            worker.proc.wait(STOP_TIMEOUT_S)
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
        with self._changed:
            if self.workers.get(worker.slot) is worker:
                del self.workers[worker.slot]
            self._changed.notify_all()
        dropped = self.table.drop_worker(worker.slot)
        removed = self._remove_temp_files(worker.proc.pid)
        if self._stopping.is_set():
            return
        event(log, "receive worker died", logging.WARNING, slot=worker.slot, pid=worker.proc.pid,
              exit=worker.proc.returncode, connections=dropped, tmp_removed=removed)
        served = time.monotonic() - worker.started
        deaths = 0 if served > STABLE_S else self._deaths.get(worker.slot, 0) + 1
        self._deaths[worker.slot] = deaths
        if self._stopping.wait(RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S) - 1)]):
            return
        self._spawn(worker.slot)

    def _remove_temp_files(self, pid: int) -> int:
        """The half-written files of a dead worker (``.<sop>.<pid>.<n>.tmp``, see Store.write)."""
        removed = 0
        for tmp in self.store.incoming.glob(f"*/*/.*.{pid}.*.tmp"):
            with suppress(OSError):
                tmp.unlink()
                removed += 1
        return removed

    def _ready(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.ready.is_set()]

    # -- accepting ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            with self._changed:  # accept only while a worker can take the connection (else: backlog)
                self._changed.wait_for(lambda: self._stopping.is_set() or bool(self._ready()), 1.0)
            if self._stopping.is_set():
                return
            self.disk.refusal()  # read at most once a CHECK_INTERVAL_S; logs a change of state once
            try:
                readable, _, _ = select.select([listener], [], [], 0.5)
                if not readable:
                    continue
                sock, address = listener.accept()
            except OSError:  # closed by stop(), or the caller gave up before we accepted
                continue
            self._hand_over(sock, address)

    def _hand_over(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Give one accepted connection to the least busy worker, then close the pending ones over
        the limits (this one is the newest, so never itself)."""
        try:
            with self._changed:
                ready = self._ready()
            if not ready:
                return
            worker = min(ready, key=lambda w: (self.table.load(w.slot), w.slot))
            conn = next(self._numbers)
            evicted = self.table.add(conn, worker.slot, str(address[0]))
            if not worker.tell(Message(Op.CONN, conn=conn, address=(str(address[0]), int(address[1]))),
                               sock.fileno()):
                self.table.close(conn)  # the worker just died: the caller sees the connection close
        finally:
            sock.close()  # the worker holds its own copy now
        pending = self.table.counts()[0] if evicted else 0
        for key, entry in evicted:  # the worker closes it and logs it, as a single-process node does
            target = self.workers.get(entry.worker)
            if target is not None:
                target.tell(Message(Op.EVICT, conn=key, pending=pending))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind, start the workers and wait until they serve, then listen: a caller is never accepted
        before a worker can take it. A TLS file that cannot be loaded stops the node here (TlsError), a
        port that cannot be opened too (ListenError)."""
        server_context(self.settings.tls)  # fail now, with the same error as a single-process node
        family, kind, proto, _, address = socket.getaddrinfo(
            self.settings.host, self.settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom's server does
        try:
            listener.bind(address)
        except OSError as exc:
            listener.close()
            raise ListenError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                              f"{exc.strerror or exc}") from exc
        listener.setblocking(False)
        self._listener = listener
        for slot in range(self.size):
            self._spawn(slot)
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._ready()) == self.size,
                                          max(deadline - time.monotonic(), 0)):
                self.stop()
                raise RuntimeError(f"receive workers not ready after {READY_TIMEOUT_S:.0f} s")
        listener.listen(LISTEN_BACKLOG)
        accept = threading.Thread(target=self._accept_loop, name="dicomnode-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        event(log, "listening", ae_title=self.settings.ae_title, host=self.settings.host,
              port=self.settings.port, processes=self.size,
              allowed=",".join(self.settings.allowed_calling_aets) or "any",
              pinned=",".join(sorted(self.settings.calling_aet_hosts)) or "none",
              tls="on" if self.settings.tls.enabled else "off")
        self.disk.refusal()  # a node started on a full volume says so now, not at the first caller

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
            workers = list(self.workers.values())
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for worker in workers:
            worker.tell(Message(Op.STOP))
        for worker in workers:
            with suppress(subprocess.TimeoutExpired):
                worker.proc.wait(STOP_TIMEOUT_S)
            if worker.proc.poll() is None:
                worker.proc.kill()
        for thread in self._threads:
            thread.join(2.0)
