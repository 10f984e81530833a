"""create_app(): intake + verification, /healthz, /readyz, /metrics, one JSON error middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.errors import PayloadError
from bridge.models import Batch, NewDelivery
from bridge.outbox.base import open_explained
from bridge.parse import Verification, parse_request
from bridge.runtime import Runtime

log = logging.getLogger("bridge.http")

RUNTIME = web.AppKey("runtime", Runtime)


class BodyTooLarge(Exception):
    pass


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
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body: dict[str, object] = {"error": exc.reason}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            body["allowed"] = sorted(exc.allowed_methods)
        return web.json_response(body, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("request failed", extra={"path_kind": request.match_info.route.name})
        return web.json_response({"error": "internal error; nothing was accepted"}, status=500)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """Read the body, refusing as soon as it passes `limit` (never buffering beyond it)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds max_body_bytes {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(65536)
        except web.RequestPayloadError:  # aiohttp could not undo the Content-Encoding
            raise _undecodable(request, "cannot be decoded as") from None
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
    try:
        body = await read_limited(request, rt.config.server.max_body_bytes)
        parsed = parse_request(body)
        if isinstance(parsed, Verification):
            return verify(rt, parsed)
        async with rt.intake_slots:
            return await accept(rt, parsed, len(body))
    except (PayloadError, BodyTooLarge) as exc:
        # Every refusal, wherever it was found (reading, parsing, routing), is one log line
        # and one count; the error middleware turns it into the 400 or 413.
        if isinstance(exc, PayloadError):
            extra: dict[str, object] = {"error": exc.message, "where": exc.where, "status": 400}
        else:
            extra = {"error": str(exc), "status": 413}
        if extra.get("where") == "$.keyId":
            rt.metrics.verifications.labels("invalid").inc()
        else:
            rt.metrics.batches.labels("rejected").inc()
        log.info("refused request", extra=extra)
        raise


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


# Small batches are routed on the event loop. Routing costs ~10-25 us per delivery (more
# with templates), so a batch this small holds the loop for a few milliseconds at most.
# Handing it to the router thread costs more than that: the thread and the SQLite writer
# then contend with the loop for the GIL. With sends out of the way (receiver hung), inline
# routing accepted 17-50% more 10-item batches/s in most quick A/B pairs (benchmarks/).
INLINE_ROUTING_ITEMS = 20
INLINE_ROUTING_BYTES = 64 * 1024


async def route(rt: Runtime, batch: Batch, body_bytes: int) -> list[NewDelivery]:
    if len(batch.items) <= INLINE_ROUTING_ITEMS and body_bytes <= INLINE_ROUTING_BYTES:
        return rt.router.route_batch(batch)
    # A big batch (a 1 MiB body routes for tens of milliseconds) goes to the router's own
    # thread: the event loop gets the GIL back every few milliseconds meanwhile, so a
    # verification never waits for all of it.
    return await asyncio.get_running_loop().run_in_executor(
        rt.routing_thread, rt.router.route_batch, batch)


async def accept(rt: Runtime, batch: Batch, body_bytes: int) -> web.Response:
    deliveries = await route(rt, batch, body_bytes)
    new = await rt.outbox.enqueue(deliveries, time.time()) if deliveries else 0
    # Only now, with the deliveries committed, may isendu hear 200.
    rt.metrics.batches_accepted.inc()
    kinds = Counter(item.kind for item in batch.items)
    for kind, n in kinds.items():
        rt.metrics.items.labels(kind).inc(n)
    for d in deliveries:
        if d.error:
            rt.metrics.dead_letters.labels(d.sink, "template_error").inc()
            log.warning("template failed; delivery dead-lettered",
                        extra={"batch_id": batch.batch_id, "delivery_id": d.id,
                               "reason": d.error})
    if batch.unknown_keys:
        # `{"orders": ...}` or `{"keyid": ...}`: a 200 is what isendu's retries need if
        # isendu sent it, but someone testing by hand would never learn why nothing happened.
        log.warning("body has neither keyId, order nor tracking; accepted as an empty batch",
                    extra={"batch_id": batch.batch_id,
                           "keys": [shorten(k) for k in batch.unknown_keys[:10]]})
    if new:
        rt.dispatcher.wake()
    log.info("batch accepted", extra={"batch_id": batch.batch_id, "items": len(batch.items),
                                      "deliveries": new, "duplicates": len(deliveries) - new})
    return web.json_response({
        "accepted": len(batch.items), "deliveries": new,
        "duplicates": len(deliveries) - new, "batch_id": batch.batch_id,
    })


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        await asyncio.wait_for(rt.outbox.ping(), timeout=2.0)
    except Exception as exc:
        return web.json_response(
            {"status": "not ready", "storage": f"not writable: {exc.__class__.__name__}"},
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
        for status, n in (await rt.outbox.counts()).items():
            rt.metrics.outbox.labels(status).set(n)
    except Exception:
        log.exception("reading outbox depth failed")
    body = generate_latest(rt.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(rt: Runtime, own_lifecycle: bool = True) -> web.Application:
    """The app; with `own_lifecycle` its startup/cleanup hooks open the outbox and run the
    dispatcher (tests and `serve` both use this)."""
    app = web.Application(middlewares=[json_errors],
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
    await open_explained(rt.outbox, rt.config.storage, recover=True)
    await rt.dispatcher.start()


async def _shutdown(app: web.Application) -> None:
    # Runs after the listener stopped accepting: finish in-flight sends, leave the rest pending.
    await app[RUNTIME].dispatcher.stop(grace=10.0)


async def _cleanup(app: web.Application) -> None:
    rt = app[RUNTIME]
    rt.routing_thread.shutdown(wait=True)
    await rt.outbox.close()
