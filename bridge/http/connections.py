"""The connections of `bridge serve`: a deadline for each request's headers and body, a
keep-alive timeout, a cap on open connections, and JSON answers for the requests aiohttp's
parser refuses before any handler sees them.

aiohttp alone closes an idle connection after an hour and never times out a request that
arrives a byte a second. Each connection here is in one phase at a time, and one timer
watches it:

    IDLE      no request in progress                      -> keepalive_timeout, then closed
    HEADERS   a request's first bytes came, headers not yet -> read_timeout, then 408, closed
    BODY      its handler runs, the body may still arrive   -> the rest of read_timeout, then
                                                             the body read fails (408)
    HANDLING  the body is in (or the handler answered)      -> none: our own code runs
    DRAINING  answered before the whole body came            -> aiohttp reads the rest for at
                                                             most its lingering time

The read timer stops while a body waits for an intake slot (`intake_slot`): the client is
not slow then, the bridge is.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from bridge.config import ServerConfig
from bridge.metrics import Metrics

log = logging.getLogger("bridge.http")

# What aiohttp undoes for us; `br` and `zstd` only with optional packages, and even then a
# body the bridge accepts should not depend on what happens to be installed.
ACCEPTED_ENCODINGS = ("gzip", "deflate", "identity")
# aiohttp reads what is left of a body answered early (a 413) for this long, so the client
# sees the answer instead of a reset; then it closes the connection.
LINGERING_SECONDS = 10.0
# What one connection reads ahead of its handler. asyncio reads up to 256 KiB a call and
# aiohttp buffers up to twice its read_bufsize (256 KiB by default) before it stops reading:
# some 730 KiB for each body that waits for an intake slot. At 16 KiB a call and a 16 KiB
# read_bufsize, a waiting body holds at most 48 KiB (one call past the 32 KiB mark).
READ_CHUNK = 16 * 1024
# Logged at most this often while connections are refused for the cap: a flood of them must
# not become a flood of log lines.
CAP_LOG_INTERVAL = 60.0


class Phase(enum.Enum):
    IDLE = "idle"
    HEADERS = "headers"
    BODY = "body"
    HANDLING = "handling"
    DRAINING = "draining"
    CLOSED = "closed"


class ReadTimedOut(TimeoutError):
    """Set on a request's body stream when its read deadline passes. A TimeoutError, so that
    aiohttp's lingering read after the 408 takes it as the end and closes the connection."""


class BodyAbandoned(TimeoutError):
    """Set on the rest of a body aiohttp could not decompress, once it was refused: reading
    on would meet aiohttp's error again and log the same refusal a second time."""


def refused(metrics: Metrics, error: str, status: int, where: str | None = None) -> None:
    """Every refusal, wherever it is found (aiohttp's parser, reading, parsing, routing), is
    this one log line and one count."""
    if where == "$.keyId":
        metrics.verifications.labels("invalid").inc()
    else:
        metrics.batches.labels("rejected").inc()
    extra: dict[str, object] = {"error": error, "status": status}
    if where is not None:
        extra["where"] = where
    log.info("refused request", extra=extra)


def unaccepted_encoding(encoding: str) -> dict[str, object]:
    """The 415's body: what was sent and what would have been read."""
    return {"error": f"Content-Encoding {encoding} is not accepted; expected one of "
                     f"{', '.join(ACCEPTED_ENCODINGS)}, or none",
            "accepted": list(ACCEPTED_ENCODINGS)}


def parser_refusal(exc: HttpProcessingError) -> tuple[int, dict[str, object]]:
    """The status and JSON body for a request aiohttp's parser could not take."""
    text = " ".join(str(exc.message).split())
    if isinstance(exc, ContentEncodingError):  # br or zstd, whose decoder is not installed
        name = "br" if "(br)" in text else "zstd" if "(zstd)" in text else "of this request"
        return 415, unaccepted_encoding(name)
    if isinstance(exc, LineTooLong):
        # aiohttp's text quotes the start of the line, which can be the webhook path (its
        # token) or a credential in a header: the answer says which part, not what it held.
        line = exc.args[0] if exc.args else b""
        limit = exc.args[1] if len(exc.args) > 1 else 8190
        start = (bytes(line[:12]) if isinstance(line, bytes | bytearray)
                 else str(line)[:12].encode())
        if start.startswith((b"/", b"*")) or b"://" in start:  # a header name has neither
            return 414, {"error": f"the request's URL is longer than {limit} bytes; expected "
                                  "the webhook path"}
        return 431, {"error": f"a request header line is longer than {limit} bytes; expected "
                              "each header (name and value) shorter"}
    if text == "Too many headers received":
        return 431, {"error": "too many request headers; expected an ordinary request's few"}
    if "Content-Length" in text and "Transfer-Encoding" in text:
        return 400, {"error": "request has both Content-Length and Transfer-Encoding; "
                              "expected one of them (with both, where the body ends is "
                              "ambiguous)"}
    return 400, {"error": f"malformed HTTP request: {text[:200]}"}


def raw_answer(status: int, reason: str, body: dict[str, object],
               headers: tuple[str, ...] = ()) -> bytes:
    """A complete JSON response, for a connection that has no request to answer through."""
    data = json.dumps(body).encode()
    head = "".join(f"{h}\r\n" for h in (
        f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(data)}", "Connection: close", *headers))
    return head.encode() + b"\r\n" + data


@dataclass
class Guard:
    """What every connection of one listener shares: the limits and the count of open ones."""

    read_timeout: float
    keepalive_timeout: float
    max_connections: int
    metrics: Metrics
    open: int = 0
    refused_unlogged: int = 0
    cap_logged_at: float = float("-inf")

    @classmethod
    def of(cls, server: ServerConfig, metrics: Metrics) -> Guard:
        return cls(server.read_timeout, server.keepalive_timeout, server.max_connections,
                   metrics)

    def refuse_over_cap(self) -> None:
        self.metrics.connections_closed.labels("max_connections").inc()
        self.refused_unlogged += 1
        now = time.monotonic()
        if now - self.cap_logged_at >= CAP_LOG_INTERVAL:
            log.warning("connection refused: max_connections reached", extra={
                "max_connections": self.max_connections, "refused": self.refused_unlogged,
                "status": 503})
            self.cap_logged_at, self.refused_unlogged = now, 0


class Connection(RequestHandler):
    """aiohttp's request handler, with the phases and timers described above."""

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._phase = Phase.IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # of the read timer, on the loop's clock
        self._held: float | None = None  # read time left while waiting for an intake slot
        self._request: BaseRequest | None = None
        self._counted = False

    # ---- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(getattr(transport, "max_size", None), int):  # asyncio's own transports
            transport.max_size = READ_CHUNK  # type: ignore[attr-defined]
        super().connection_made(transport)
        guard = self._guard
        if guard.open >= guard.max_connections:
            self._phase = Phase.CLOSED
            guard.refuse_over_cap()
            if self.transport is not None:
                self.transport.write(raw_answer(
                    503, "Service Unavailable",
                    {"error": f"too many open connections (max_connections "
                              f"{guard.max_connections}); try again shortly"},
                    ("Retry-After: 1",)))
            self.force_close()
            return
        guard.open += 1
        guard.metrics.connections_open.inc()
        self._counted = True
        self._idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._phase = Phase.CLOSED
        self._stop_timer()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
            self._guard.metrics.connections_open.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase is Phase.IDLE and data:
            self._phase = Phase.HEADERS
            self._start_read_timer(self._guard.read_timeout)
        elif (self._phase is Phase.DRAINING and self._request is not None
              and self._request.content.is_eof()):
            self._idle()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's plain-text answer to what its parser refused, as JSON and a refusal
        like any other. Anything else (a 500 outside our middleware) stays aiohttp's."""
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status, body = parser_refusal(exc)
        refused(self._guard.metrics, str(body["error"]), status)
        headers = {"Accept-Encoding": "gzip, deflate"} if status == 415 else None
        resp = web.json_response(body, status=status, headers=headers)
        resp.force_close()  # the parser lost its place in the stream
        return resp

    # ---- phases, moved by the middleware and the webhook -----------------------------------

    def request_started(self, request: BaseRequest) -> None:
        if self._phase is not Phase.HEADERS:  # pipelined: its first byte came in another phase
            self._start_read_timer(self._guard.read_timeout)
        self._phase, self._request = Phase.BODY, request

    def request_done(self, request: BaseRequest) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._stop_timer()
        self._held = None
        if request.content.is_eof():
            self._idle()
            return
        self._phase = Phase.DRAINING
        if request.content.exception() is not None:
            request.content.set_exception(BodyAbandoned())

    def hold(self) -> None:
        """Stop the read clock: the body waits for the bridge, not for the client."""
        if self._phase is Phase.BODY and self._timer is not None:
            self._held = max(0.0, self._deadline - self._loop.time())
            self._stop_timer()

    def resume(self) -> None:
        if self._phase is Phase.BODY and self._held is not None:
            self._start_read_timer(self._held)
        self._held = None

    # ---- timers ----------------------------------------------------------------------------

    def _idle(self) -> None:
        self._phase, self._request = Phase.IDLE, None
        self._stop_timer()
        self._timer = self._loop.call_later(self._guard.keepalive_timeout, self._idle_expired)

    def _start_read_timer(self, seconds: float) -> None:
        self._stop_timer()
        self._deadline = self._loop.time() + seconds
        self._timer = self._loop.call_at(self._deadline, self._read_expired)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if self._phase is Phase.IDLE:
            self._guard.metrics.connections_closed.labels("keepalive_timeout").inc()
            self._phase = Phase.CLOSED
            self.force_close()

    def _read_expired(self) -> None:
        self._timer = None
        timeout = self._guard.read_timeout
        if self._phase is Phase.HEADERS:
            self._guard.metrics.connections_closed.labels("read_timeout").inc()
            log.info("connection closed: request headers not received within read_timeout",
                     extra={"read_timeout": timeout, "status": 408})
            self._phase = Phase.CLOSED
            if self.transport is not None:
                self.transport.write(raw_answer(408, "Request Timeout", {
                    "error": f"request headers not received within read_timeout {timeout:g}s"}))
            self.force_close()
        elif self._phase is Phase.BODY and self._request is not None:
            self._phase = Phase.HANDLING
            if not self._request.content.is_eof():
                # The handler reading it answers 408 (see app.read_limited); the connection
                # closes after that answer.
                self._guard.metrics.connections_closed.labels("read_timeout").inc()
                self._request.content.set_exception(ReadTimedOut(
                    f"request body not received within read_timeout {timeout:g}s"))


def connection_of(request: web.Request) -> Connection | None:
    """The request's connection, when it is one of ours (an in-process test server's is not)."""
    protocol = request.protocol
    return protocol if isinstance(protocol, Connection) else None


@web.middleware
async def connection_phases(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    conn = connection_of(request)
    if conn is None:
        return await handler(request)
    conn.request_started(request)
    try:
        return await handler(request)
    finally:
        conn.request_done(request)


@asynccontextmanager
async def intake_slot(request: web.Request, slots: asyncio.Semaphore) -> AsyncIterator[None]:
    """Hold one of `slots`; the read clock stops while waiting for it."""
    conn = connection_of(request)
    if conn is not None:
        conn.hold()
    try:
        await slots.acquire()
    finally:
        if conn is not None:
            conn.resume()
    try:
        yield
    finally:
        slots.release()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection a `Connection`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: Guard) -> None:
        super().__init__(runner)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        guard = self._guard
        # aiohttp's own keep-alive timer stays as a backstop set past ours: each phase's
        # own timer always fires first.
        backstop = guard.keepalive_timeout + guard.read_timeout + LINGERING_SECONDS

        def connection() -> Connection:
            return Connection(server, guard, loop=loop, keepalive_timeout=backstop,
                              access_log=None, lingering_time=LINGERING_SECONDS,
                              read_bufsize=READ_CHUNK)

        self._server = await loop.create_server(connection, self._host, self._port,
                                                reuse_address=True)
