"""create_app(): intake + verification, /healthz, /readyz, /metrics, one JSON error middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.errors import PayloadError, StorageUnwritable
from bridge.http.connections import (
    ACCEPTED_ENCODINGS,
    ReadTimedOut,
    connection_phases,
    intake_slot,
    refused,
    unaccepted_encoding,
)
from bridge.logs import log_failure
from bridge.models import KINDS, Batch, InboxBatch
from bridge.outbox.base import open_explained
from bridge.parse import Verification, parse_request
from bridge.redact import MASK, TOKEN_SEGMENT, redact
from bridge.runtime import Runtime
from bridge.sequencer import received_iso

log = logging.getLogger("bridge.http")
# POSTs the router refuses, logged apart: with a secret webhook path they are the only
# refusal a stranger can make, so bridge/logs.py lets one of them through a minute.
path_log = logging.getLogger("bridge.http.paths")
# Batches refused while storage takes no writes: one a minute is enough (bridge/logs.py).
storage_log = logging.getLogger("bridge.http.storage")
# Seconds isendu is asked to wait before sending a batch refused for storage again.
STORAGE_RETRY_AFTER = 30

RUNTIME = web.AppKey("runtime", Runtime)


# A body up to this size (by its Content-Length) is read before an intake slot is taken, so
# that a verification ({"keyId": ...}, tens of bytes) never waits behind batches. Anything
# bigger, or without a length (chunked), takes its slot first: unfinished bodies then hold at
# most intake_concurrency x max_body_bytes, plus this much per open connection.
SMALL_BODY_BYTES = 4096


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client closed its connection before its body had arrived: nobody to answer."""


class EncodingNotAccepted(Exception):
    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.body = unaccepted_encoding(encoding)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except PayloadError as exc:
        return web.json_response({"error": exc.message, "where": exc.where}, status=400)
    except BodyTooLarge as exc:
        return web.json_response({"error": str(exc)}, status=413)
    except ClientGone as exc:
        # Anyone can hang up mid-body: one info line, not an error with a traceback.
        log.info("request abandoned", extra={"error": str(exc)})
        return web.json_response({"error": str(exc)}, status=400)  # written to nobody
    except EncodingNotAccepted as exc:
        return web.json_response(exc.body, status=415,
                                 headers={"Accept-Encoding": "gzip, deflate"})
    except StorageUnwritable as exc:
        # Not this request's fault, nor a bug: no traceback. The storage said why already.
        request.app[RUNTIME].metrics.batches.labels("rejected").inc()
        storage_log.warning("batch not accepted: storage cannot be written",
                            extra={"error": str(exc), "status": 503})
        # A connection lost mid-statement cannot say whether the server committed it.
        outcome = ("it may have been stored all the same: sending it again delivers nothing "
                   "twice" if exc.uncertain else "nothing was accepted")
        return web.json_response({"error": f"{exc}; {outcome}"}, status=503,
                                 headers={"Retry-After": str(STORAGE_RETRY_AFTER)})
    except ReadTimedOut as exc:
        resp = web.json_response({"error": str(exc)}, status=408)
        resp.force_close()  # what is left of the body is not worth waiting for
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if request.method == "POST" and request.match_info.http_exception is not None:
            refused_path(request, exc.status)
        body: dict[str, object] = {"error": exc.reason}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            body["allowed"] = sorted(exc.allowed_methods)
        return web.json_response(body, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("request failed", extra={"path_kind": request.match_info.route.name})
        return web.json_response({"error": "internal error; nothing was accepted"}, status=500)


def refused_path(request: web.Request, status: int) -> None:
    """A POST to a path that is not the webhook (a typo, a trailing slash, a 405 on /healthz):
    isendu configured with it would lose every batch, so say where it should go. The path
    is masked before it is cut (a cut token is no longer found to mask) and has no query
    string, which may carry secrets."""
    rt = request.app[RUNTIME]
    rt.metrics.batches.labels("rejected").inc()  # as every refused POST is
    path_log.warning("refused request", extra={
        "status": status, "method": shorten(request.method, 16),
        "path": shorten(_masked_segments(redact(request.path))),
        "webhook_path": rt.config.server.webhook_path,
        "error": ("no such path" if status == 404 else "POST not allowed on this path")
                 + "; isendu must post to server.webhook_path"})


def check_headers(request: web.Request, limit: int) -> None:
    """What can be refused before reading a byte of the body (or waiting for a slot)."""
    encodings = request.headers.getall("Content-Encoding", [])
    if encodings and (len(encodings) > 1 or encodings[0].strip().lower() not in (
            "", *ACCEPTED_ENCODINGS)):
        # aiohttp would hand a `compress` or `gzip, br` body over as it came.
        raise EncodingNotAccepted(shorten(", ".join(encodings)))
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds max_body_bytes {limit}")


async def read_limited(request: web.Request, limit: int) -> bytes:
    """Read the body, refusing as soon as it passes `limit` (never buffering beyond it).
    A body that does not arrive within server.read_timeout raises ReadTimedOut."""
    check_headers(request, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(65536)
        except web.RequestPayloadError:  # aiohttp could not undo the Content-Encoding
            raise _undecodable(request, "cannot be decoded as") from None
        except ConnectionError:
            raise ClientGone(f"client closed the connection after {size} bytes of its "
                             "body") from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds max_body_bytes {limit}")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body and request.headers.get("Content-Encoding", "identity") != "identity":
        # aiohttp undoes gzip/deflate; a body that was not what it said leaves nothing.
        raise _undecodable(request, "is empty after undoing")
    return body


def _undecodable(request: web.Request, what: str) -> PayloadError:
    encoding = shorten(request.headers.get("Content-Encoding", "none"))
    return PayloadError(f"body {what} Content-Encoding {encoding}; expected a JSON object, "
                        "compressed as the header says")


async def webhook(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    limit = rt.config.server.max_body_bytes
    try:
        check_headers(request, limit)
        length = request.content_length
        if length is not None and length <= SMALL_BODY_BYTES:
            body = await read_limited(request, limit)
            return await answer(rt, body, rt.intake_slots)
        async with intake_slot(request, rt.intake_slots):
            body = await read_limited(request, limit)
            return await answer(rt, body)
    except (PayloadError, BodyTooLarge, EncodingNotAccepted, ReadTimedOut) as exc:
        # Every refusal, wherever it was found (reading, parsing, routing), is one log line
        # and one count; the error middleware turns it into the 400, 408, 413 or 415.
        if isinstance(exc, PayloadError):
            refused(rt.metrics, exc.message, 400, exc.where)
        elif isinstance(exc, EncodingNotAccepted):
            refused(rt.metrics, str(exc.body["error"]), 415)
        else:
            refused(rt.metrics, str(exc), 413 if isinstance(exc, BodyTooLarge) else 408)
        raise


async def answer(rt: Runtime, body: bytes, slots: asyncio.Semaphore | None = None
                 ) -> web.Response:
    """Verify or accept a body that has arrived, taking one of `slots` first if given.

    Counted in flight only from here: while requests are, in a burst or on a saturated loop,
    later stages give way. A request still waiting for its body waits for its client, not
    for the loop, and anyone can hold many such open at no cost (bridge/pressure.py)."""
    with rt.pressure:
        received_at = time.time()
        parsed = parse_request(body, received_iso(received_at))
        if isinstance(parsed, Verification):
            return verify(rt, parsed)
        if slots is None:
            return await accept(rt, parsed, body, received_at)
        async with slots:
            return await accept(rt, parsed, body, received_at)


def _masked_segments(path: str) -> str:
    """Long segments of a refused path masked, their length kept: a webhook path's token
    copied with one character lost or added is not the token, so the redactor lets it
    through, yet it is all of the token but that character."""
    return "/".join(MASK + f"({len(part)} characters)"
                    if len(part) >= TOKEN_SEGMENT else part
                    for part in path.split("/"))


def shorten(text: str, limit: int = 64) -> str:
    """Text from a request, cut for an answer or a log line: nobody needs 500 KB echoed."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def verify(rt: Runtime, v: Verification) -> web.Response:
    """Answered from memory: a slow disk must never make isendu reject the URL."""
    secret = rt.secrets_by_key.get(v.key_id)
    if secret is None:
        rt.metrics.verifications.labels("unknown_key").inc()
        key_id = shorten(v.key_id)
        log.warning("verification for unknown keyId", extra={"key_id": key_id})
        return web.json_response(
            {"error": f"unknown keyId {key_id!r}; add it under integrations in routes.yaml"},
            status=403)
    rt.metrics.verifications.labels("ok").inc()
    log.info("verification answered", extra={"key_id": v.key_id})
    return web.json_response({"response": secret})


async def accept(rt: Runtime, batch: Batch, body: bytes, received_at: float) -> web.Response:
    """Make the batch durable as one inbox row, and only then answer 200: routing,
    rendering and the deliveries come after, in the sequencer."""
    await rt.store.append(InboxBatch(batch.batch_id, received_at, len(batch.items), body))
    rt.sequencer.wake()
    rt.metrics.batches_accepted.inc()
    counts = dict.fromkeys(KINDS, 0)
    for item in batch.items:
        counts[item.kind] += 1
    for kind, n in counts.items():
        if n:
            rt.metrics.items_of[kind].inc(n)
    if batch.unknown_keys:
        # `{"orders": ...}` or `{"keyid": ...}`: a 200 is what isendu's retries need if
        # isendu sent it, but someone testing by hand would never learn why nothing happened.
        log.warning("body has neither keyId, order nor tracking; accepted as an empty batch",
                    extra={"batch_id": batch.batch_id,
                           "keys": [shorten(k) for k in batch.unknown_keys[:10]]})
    # Debug: `batch sequenced` (info) follows with what the batch became.
    log.debug("batch accepted", extra={"batch_id": batch.batch_id, "items": len(batch.items)})
    # orjson rather than json_response (json.dumps): this answer goes out for every batch.
    return web.Response(text=orjson.dumps({"accepted": len(batch.items),
                                           "batch_id": batch.batch_id}).decode(),
                        content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        await asyncio.wait_for(rt.store.ping(), timeout=2.0)
    except Exception as exc:
        # Only our own reasons are shown: others (a driver's) may name hosts and paths.
        why = str(exc) if isinstance(exc, StorageUnwritable) else exc.__class__.__name__
        return web.json_response({"status": "not ready", "storage": f"not writable: {why}"},
                                 status=503)
    body: dict[str, object] = {"status": "ready"}
    # Still ready: a sink's receiver being away is no reason to stop taking batches, whose
    # deliveries wait in storage. Which sinks are held back is said here, for people.
    if down := rt.dispatcher.sinks_down():
        body["sinks_down"] = down
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        # The inbox first: a batch settled between the two reads is then counted as waiting
        # and by its deliveries, never as neither. A load test that waits for an empty
        # inbox takes the outbox's rows as all the load made (benchmarks/common.py).
        waiting, oldest, failed = await rt.store.inbox_depth()
        counts = await rt.store.counts()
        rt.metrics.inbox.labels("waiting").set(waiting)
        rt.metrics.inbox.labels("failed").set(failed)
        rt.metrics.sequencer_lag.set(0 if oldest is None else max(0.0, time.time() - oldest))
        for status, n in counts.items():
            rt.metrics.outbox.labels(status).set(n)
    except Exception as exc:
        log_failure(log, "reading storage depths failed", exc)
    body = generate_latest(rt.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(rt: Runtime, own_lifecycle: bool = True) -> web.Application:
    """The app; with `own_lifecycle` its startup/cleanup hooks open the store and run the
    sequencer and the dispatcher (tests and `serve` both use this)."""
    app = web.Application(middlewares=[connection_phases, json_errors],
                          client_max_size=rt.config.server.max_body_bytes)
    app[RUNTIME] = rt
    app.router.add_post(rt.config.server.webhook_path, webhook, name="webhook")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    if own_lifecycle:
        app.on_startup.append(_startup)
        app.on_shutdown.append(_shutdown)
        app.on_cleanup.append(_cleanup)
    return app


async def _startup(app: web.Application) -> None:
    rt = app[RUNTIME]
    await open_explained(rt.store, rt.config.storage, recover=True, origin=rt.storage_origin)
    rt.pressure.start()
    await rt.dispatcher.start()
    await rt.sequencer.start()
    # Other replicas' intakes and sequencer (PostgreSQL): woken at once, not at the next poll.
    await rt.store.subscribe(rt.sequencer.wake, rt.dispatcher.wake)


async def _shutdown(app: web.Application) -> None:
    # Runs after the listener stopped accepting: the settle in flight finishes (what is not
    # settled stays waiting), then sends in flight finish, and the rest stays pending.
    rt = app[RUNTIME]
    await rt.sequencer.stop(grace=10.0)
    await rt.dispatcher.stop(grace=10.0)
    await rt.pressure.stop()


async def _cleanup(app: web.Application) -> None:
    await app[RUNTIME].store.close()
