"""The read-only operations page (``/``) and Prometheus metrics (``/metrics``) of ``dicomnode serve``.

Why: an operator should see the node's jobs, their reasons, throughput, disk and recent errors without
a terminal on the node, and a monitoring system should scrape the same facts. Starlette serves them
(two GET routes, a Jinja2 template with autoescaping); uvicorn runs that app in one daemon thread of the
node on a socket bound here first, so a port in use stops ``serve`` at start-up with a clear error.

Safety: off by default and on 127.0.0.1 (``[ops]`` in dicomnode/config.py refuses another address
without a token). With a token every request must carry it (``Authorization: Bearer``, or the
password of HTTP Basic so a browser can ask for it); without one, only requests whose Host is this
machine are answered (no DNS rebinding from a web page). Before any token is read the port holds at
most MAX_CONNECTIONS connections (the oldest closed past it) for at most CONNECTION_SECONDS each
(:class:`BoundedConnection`), so idle or half-sent requests cannot take the node's file descriptors,
which its DICOM listener and store share. Patients appear only by pseudonym. All reads
go through :mod:`dicomnode.processing.jobs` on a connection of the page's own, so the page never waits on the
node's writer lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from dicomnode.clinical.prior_requests import RequestView, request_views
from dicomnode.config import MIN_TOKEN_CHARS, Settings, loopback_host
from dicomnode.db import Database
from dicomnode.logs import event
from dicomnode.ops.metrics import node_registry
from dicomnode.processing import jobs
from dicomnode.sizefmt import mb_text, percent_text, size_text
from dicomnode.storage.diskspace import DiskSpace, judge, read_space
from dicomnode.timefmt import duration, local_time, short_uid

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
JOBS_SHOWN = 100
PROBLEMS_SHOWN = 10
PRIORS_SHOWN = 20
HOUR = 3600.0
REFRESH_SECONDS = 15
MAX_CONNECTIONS = 32  # open connections to the page at once; past it the oldest is closed
CONNECTION_SECONDS = 15.0  # a connection is closed this long after it opened, whatever it is doing
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CHALLENGE = 'Basic realm="dicomnode operations", charset="UTF-8"'  # a browser then asks for the token
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class OpsPageError(RuntimeError):
    """The page cannot be served (its port is taken, its address does not exist)."""


# ---------------------------------------------------------------- what the page shows


@dataclass(frozen=True)
class Disk:
    space: DiskSpace
    min_free_mb: float
    max_used_pct: float

    @property
    def low(self) -> bool:
        """Below the thresholds at which the receiver refuses instances (its own rule)."""
        return judge(self.space, self.min_free_mb, self.max_used_pct) is not None


@dataclass(frozen=True)
class PageData:
    ae_title: str
    dicom_port: int
    generated_at: float
    counts: dict[str, int]  # every job state, zeros included
    last_hour: jobs.Throughput
    disk: Disk | None
    jobs: list[jobs.JobView]
    links: dict[int, str]  # job id → its study in the viewer
    problems: list[jobs.Problem]
    priors: list[RequestView]  # baselines asked of the PACS and not got, newest first
    send_attempts: int


def viewer_link(template: str | None, job: jobs.JobView) -> str | None:
    """The ``[ops] viewer_url`` template filled for one job; None without a template or a known study."""
    if template is None or job.study_instance_uid is None:
        return None
    quote = urllib.parse.quote
    return template.format(study_uid=quote(job.study_instance_uid, safe=""),
                           series_uid=quote(job.series_instance_uid, safe=""))


def page_data(settings: Settings, db: Database, t: float | None = None) -> PageData:
    t = time.time() if t is None else t
    overview = jobs.overview(db)
    listing = jobs.listing(db, limit=JOBS_SHOWN)
    try:
        disk: Disk | None = Disk(read_space(os.statvfs(settings.storage_dir)),
                                 settings.min_free_disk_mb, settings.max_disk_used_pct)
    except OSError:
        disk = None
    links = {j.id: link for j in listing if (link := viewer_link(settings.ops.viewer_url, j)) is not None}
    with db.lock:
        priors = request_views(db.con, settings.send.attempts)[::-1][:PRIORS_SHOWN]
    return PageData(
        ae_title=settings.ae_title, dicom_port=settings.port, generated_at=t,
        counts={s.value: overview.jobs.get(s.value, 0) for s in jobs.JobState},
        last_hour=jobs.throughput(db, t - HOUR, t), disk=disk, jobs=listing, links=links,
        problems=jobs.problems(db, PROBLEMS_SHOWN), priors=priors, send_attempts=settings.send.attempts)


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters.update(when=local_time, series=short_uid, size=size_text, mb=mb_text, pct=percent_text)
    env.globals.update(took=duration, refresh=REFRESH_SECONDS)
    return env


# ---------------------------------------------------------------- access


def token_matches(authorization: str | None, token: str) -> bool:
    """``Bearer <token>``, or HTTP Basic with the token as password (any user name); constant time."""
    scheme, _, value = (authorization or "").partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    return hmac.compare_digest(given.encode(), token.encode())


def _host_of(header: str | None) -> str:
    """The host name of a Host header (``[::1]:8089`` → ``::1``)."""
    try:
        return (urllib.parse.urlsplit(f"//{header or ''}").hostname or "").lower()
    except ValueError:
        return ""


class Gate:
    """ASGI middleware in front of every route: the token when one is set, else a local Host only."""

    def __init__(self, app: ASGIApp, token: str | None, host: str) -> None:
        self.app = app
        self.token = token
        self.hosts = LOCAL_HOSTS | {host.strip("[]").lower()}

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal: Response | None = None
            if self.token is not None:
                if not token_matches(headers.get("authorization"), self.token):
                    refusal = PlainTextResponse("401: this page needs the node's [ops] token\n", 401,
                                                headers={"WWW-Authenticate": CHALLENGE})
            elif _host_of(headers.get("host")) not in self.hosts:
                refusal = PlainTextResponse("400: unexpected Host\n", 400)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- connections


class BoundedConnection(asyncio.Protocol):
    """One connection to the page: uvicorn's HTTP protocol inside, bounded in number and lifetime.

    Why: uvicorn keeps a connection open for as long as its request headers have not all arrived, with
    no limit on how many, and the token is checked only once they have. Idle sockets from anyone who
    can reach the port used up the node's file descriptors within seconds (the DICOM listener then
    failed to accept). Here each connection is aborted CONNECTION_SECONDS after it opened (a request
    takes milliseconds; a browser reconnects), and past MAX_CONNECTIONS the oldest is aborted, as the
    DICOM listener does with pending connections: a real request is answered before it is the oldest.
    Only the asyncio protocol interface is used, so any uvicorn HTTP protocol fits inside.
    """

    def __init__(self, inner: type[asyncio.Protocol], open_now: dict[BoundedConnection, None],
                 **uvicorn_args: Any) -> None:
        self.inner = inner(**uvicorn_args)
        self.open_now = open_now  # every open connection of this server, oldest first
        self.transport: asyncio.Transport | None = None
        self.expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open_now[self] = None
        self.expiry = asyncio.get_running_loop().call_later(CONNECTION_SECONDS, self.abort)
        self.inner.connection_made(transport)
        while len(self.open_now) > MAX_CONNECTIONS:
            next(iter(self.open_now)).abort()

    def abort(self) -> None:
        """Drop the connection now (no flush: a peer that does not read must not keep it)."""
        self.open_now.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_now.pop(self, None)
        if self.expiry is not None:
            self.expiry.cancel()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined,no-any-return]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def bounded_http() -> Callable[..., BoundedConnection]:
    """The ``http`` protocol factory of one server (its own set of open connections)."""
    return functools.partial(BoundedConnection, AutoHTTPProtocol, {})


# ---------------------------------------------------------------- the app and its server


def create_app(settings: Settings, db: Database) -> Gate:
    """The page and ``/metrics`` over ``db`` (GET/HEAD only: any other method gets 405)."""
    env = templates()
    registry = node_registry(db, settings.storage_dir, settings.send.attempts)

    def page(_request: Request) -> Response:
        html = env.get_template("ops.html").render(d=page_data(settings, db), states=jobs.JobState)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})

    app = Starlette(routes=[Route("/", page), Route("/metrics", metrics)])
    token = settings.ops.token.get_secret_value() if settings.ops.token is not None else None
    return Gate(app, token, settings.ops.host)


class OpsServer:
    """The page in a daemon thread of the node: ``start()`` binds (or raises OpsPageError), ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.ops.host
        port = self.sock.getsockname()[1] if self.sock is not None else self.settings.ops.port
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self, timeout: float = 10.0) -> None:
        ops = self.settings.ops
        if ops.token is None and not loopback_host(ops.host):  # config refuses this; embedding code might not
            raise OpsPageError(f"[ops] host {ops.host!r} is reachable from other machines: set ops.token")
        if ops.token is not None and len(ops.token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise OpsPageError(f"ops.token must be {MIN_TOKEN_CHARS} characters or more "
                               "(a random secret: openssl rand -hex 24)")
        host = ops.host.strip("[]")
        try:
            self.sock = socket.create_server(
                (host, ops.port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                backlog=MAX_CONNECTIONS)
        except OSError as exc:
            raise OpsPageError(f"operations page cannot listen on {ops.host}:{ops.port}: "
                               f"{exc.strerror or exc}") from exc
        self.db = Database(self.settings.db_path, busy_timeout=5.0)
        config = uvicorn.Config(create_app(self.settings, self.db), http=bounded_http(),  # type: ignore[arg-type]
                                log_config=None, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=2,
                                backlog=MAX_CONNECTIONS)  # also how many asyncio accepts at one go
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="dicomnode-ops", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OpsPageError("operations page did not start (see the log)")
            time.sleep(0.02)
        event(log, "operations page listening", url=self.url, token="required" if ops.token else "off",
              viewer_links="on" if ops.viewer_url else "off")

    def stop(self, timeout: float = 5.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        if self.sock is not None:
            self.sock.close()
        if self.db is not None:
            self.db.close()
        self.server = self.thread = self.sock = self.db = None
