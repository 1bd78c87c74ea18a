"""Ports, waiting and the process environment shared by every harness peer (standard library only)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import TypeVar

T = TypeVar("T")


_HANDED_OUT: deque[int] = deque(maxlen=256)  # ports this process was given lately, maybe not bound yet
_HANDED_OUT_LOCK = threading.Lock()


def _port_share() -> tuple[int, int]:
    """(k, n): this process hands out only ports whose pair number (port // 2) is k modulo n.

    Why: the memory of handed-out ports is per process, and pytest-xdist runs the tests in n worker
    processes side by side, which could hand one port to two servers between "bind 0, close" and the
    server's own bind. xdist names each worker in PYTEST_XDIST_WORKER ("gw0", "gw1", ...) beside
    PYTEST_XDIST_WORKER_COUNT, and the nodes, Orthancs and demos a test starts inherit both. Pairs
    rather than single ports: Linux hands bind(0) odd ports (even ones only when the odd run out), so
    a split by parity would leave one worker none. (One share of one outside xdist.)
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port free on the loopback interface right now (the OS picks it), none of ``avoid``,
    none this process was handed lately (two calls before either server binds could otherwise get
    the same port from the OS: a node once failed "Address already in use" beside its Orthanc), and
    in this process's share when tests run in parallel workers (:func:`_port_share`)."""
    share, shares = _port_share()
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if (port // 2) % shares == share and port not in avoid and port not in _HANDED_OUT:
                _HANDED_OUT.append(port)
                return port


def port_problem(port: int, host: str = "127.0.0.1") -> str | None:
    """Why a server could not listen on ``host:port`` now ("in use", "permission denied"), or None.

    Bound with SO_REUSEADDR, as the servers bind: a port whose last connections are still in
    TIME_WAIT (the same demo run again at once) is free to them, and so it is here.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
    return None


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition",
             error: type[Exception] = TimeoutError) -> T:
    """Poll until ``predicate()`` is truthy; return its value or raise ``error`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def dcmtk_env() -> dict[str, str]:
    """This environment with ``TCP_NODELAY=1``.

    Why: Debian's dcmtk and Orthanc stall ~45 ms per instance on delayed ACKs without it.
    """
    return {**os.environ, "TCP_NODELAY": "1"}


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """Terminate a child (SIGTERM: a node shuts down cleanly), then kill it if it outlives ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
