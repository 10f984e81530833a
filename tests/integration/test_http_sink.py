"""The HTTP sink against a real local HTTP server: what it sends, and how it rides failures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.canonical import canonical_json
from bridge.logs import JsonFormatter
from bridge.models import Status
from bridge.routing.router import delivery_id
from tests.conftest import BridgeFactory
from tests.helpers.bridge import WEBHOOK, eventually, sample_batch
from tests.helpers.process import ROOT, BridgeProcess, free_port
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.sinks import assert_no_leak, dead

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  hook:
    type: http
    url: ${URL}/hooks/isendu
    headers:
      X-Static: fixed
      X-Shipment: "{{ item.uuid }}"
    signing_secret: ${SIGNING_SECRET}
routes:
  - name: tracking-to-hook
    kind: tracking
    to: hook
"""

TRACKING = {
    "uuid": "1f95e905-8713-4be1-8bcc-0d1cd5a93145", "status": "DELIVERED",
    "trackingNumber": "GLS821026103283", "trackingUrl": "https://example.test/t/1",
    "delivered": True, "steps": [], "carrierExtra": {"unknown": [1, 2, 3]},
}


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks verification algorithm, written from the spec (not our code)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig.split(",", 1)[1] == expected for sig in headers["webhook-signature"].split())


async def test_sends_envelope_headers_and_verifiable_signature(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    status, body = await bridge.post({"tracking": [TRACKING]})
    assert status == 200 and body["accepted"] == 1 and body["deliveries"] == 1

    [req] = await rec.wait_for(1)
    assert req.method == "POST" and req.path == "/hooks/isendu"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-Static"] == "fixed"
    assert req.headers["X-Shipment"] == TRACKING["uuid"]
    assert req.headers["Idempotency-Key"] == req.headers["webhook-id"]
    assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 60
    assert verify_standard_webhook(SECRET, req.headers, req.body)
    assert not verify_standard_webhook(SECRET, req.headers, req.body + b" ")

    envelope = req.json()
    assert envelope["id"] == req.headers["webhook-id"]
    assert envelope["kind"] == "tracking" and envelope["route"] == "tracking-to-hook"
    assert envelope["received_at"].endswith("Z")
    assert envelope["data"] == TRACKING  # unknown fields pass through untouched


async def test_500_then_200_is_delivered_once_after_a_retry(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.answer(Answer(500, "boom"))
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    first, second = await rec.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]

    async def delivered() -> bool:
        counts = await bridge.rt.store.counts()
        return counts["delivered"] == 1
    await eventually(delivered, what="delivery marked delivered")
    [row] = [await bridge.rt.store.get(first.headers["webhook-id"])]
    assert row is not None and row.status is Status.DELIVERED and row.attempts == 2
    await _quiet(0.5)
    assert len(rec.requests) == 2  # delivered once after the retry, not again


async def test_429_retry_after_is_honoured(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    rec, url = receiver
    rec.answer(Answer(429, "slow down", {"Retry-After": "2"}))
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    first, second = await rec.wait_for(2, timeout=15)
    assert second.at - first.at >= 2.0
    # The log says what storage holds: the 429 spent no attempt.
    [retry] = [r for r in caplog.records if r.getMessage() == "will retry"]
    assert retry.__dict__["counted"] is False
    row = await bridge.rt.store.get(first.headers["webhook-id"])
    assert row is not None and row.attempts == 1  # the send after the 429 only


async def test_400_is_dead_at_once_with_the_reason(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.answer(Answer(400, '{"error": "field trackingNumber rejected"}'))
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    await rec.wait_for(1)
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error is not None
    assert "HTTP 400" in row.last_error and "trackingNumber rejected" in row.last_error
    await _quiet(0.3)
    assert len(rec.requests) == 1


async def test_a_redirect_is_dead_at_once_saying_where_with_its_token_masked(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    """Not followed (a POST's method and body do not survive every kind of redirect): the
    reason says where the receiver went, so the url can be set, a token in it masked."""
    rec, url = receiver
    moved = "https://erp.example.com/v2/hooks/Zq8xT0kenAbc123456789xyz?sig=s3cr3t-sig-value"
    rec.answer(Answer(308, "", {"Location": moved}))
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    [row] = await dead(bridge)
    assert row.attempts == 1 and len(rec.requests) == 1
    assert row.last_error == ("receiver answered HTTP 308 (redirected to "
                              "https://erp.example.com/v2/hooks/********?sig=********; set "
                              "the sink's url to where it points)")


async def test_a_huge_error_page_is_read_only_as_far_as_its_excerpt_needs(
    make_bridge: BridgeFactory
) -> None:
    """A receiver answering 400 with a 200 MB page: the bridge reads its first KBs, keeps
    the excerpt as the reason, and hangs up; the receiver cannot send the rest."""
    page, sent, finished = 200 * 2**20, [0], asyncio.Event()

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Length": str(page)})
        await resp.prepare(request)
        chunk = b"refused: field trackingNumber " + b"x" * (2**16 - 30)
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                while sent[0] < page:
                    await resp.write(chunk)
                    sent[0] += len(chunk)
        finally:
            finished.set()
        return resp

    app = web.Application()
    app.router.add_post("/hooks/isendu", refuse)
    async with TestServer(app) as server:
        bridge = await make_bridge(CONFIG, {"URL": str(server.make_url("")).rstrip("/"),
                                            "SIGNING_SECRET": SECRET})
        await bridge.post({"tracking": [TRACKING]})
        [row] = await dead(bridge)
        assert row.last_error is not None
        assert row.last_error.startswith("receiver answered HTTP 400: refused: field trackingN")
        assert row.last_error.endswith("...") and len(row.last_error) < 300
        await asyncio.wait_for(finished.wait(), 10)  # hung up on: it could write no more
        assert sent[0] < page / 4, f"{sent[0]} of {page} bytes were read"


async def test_a_password_in_the_url_is_masked_in_its_basic_auth_form_too(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp sends the URL's user:password as `Authorization: Basic <base64>`; a receiver
    whose 400 page echoes that header must not carry it into the reason or the log."""
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, text=f"refused auth={request.headers['Authorization']}")

    app = web.Application()
    app.router.add_post("/hooks/isendu", echo)
    caplog.set_level(logging.DEBUG)
    async with TestServer(app) as server:
        url = str(server.make_url("")).replace("://", "://erpuser:urlPassw0rdX@").rstrip("/")
        bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
        await bridge.post({"tracking": [TRACKING]})
        [row] = await dead(bridge)
    basic = base64.b64encode(b"erpuser:urlPassw0rdX").decode()
    assert row.last_error == "receiver answered HTTP 400: refused auth=Basic ********"
    ours = [r for r in caplog.records if r.name.startswith("bridge")]
    assert ours
    assert_no_leak([basic, "urlPassw0rdX"], ours, row.last_error)


async def test_a_line_break_rendered_into_a_header_is_dead_at_once_with_the_reason(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    """isendu data that puts CR/LF into a templated header (`X-Shipment: {{ item.uuid }}`):
    aiohttp would refuse it on every attempt; it is a template failure, dead at once, and
    the other item of the batch is delivered."""
    rec, url = receiver
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [dict(TRACKING, uuid="hdr-1\r\nX-Evil: 1"), TRACKING]})
    [got] = await rec.wait_for(1)
    assert got.headers["X-Shipment"] == TRACKING["uuid"]
    [row] = await dead(bridge)
    assert row.attempts == 0 and row.item_uuid == "hdr-1\r\nX-Evil: 1"
    assert row.last_error is not None and row.last_error.startswith(
        "template failed: header X-Shipment: the value holds the control character U+000D")
    await _quiet(0.3)
    assert len(rec.requests) == 1


async def test_receiver_down_then_up_is_delivered(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge = await make_bridge(CONFIG, {"URL": f"http://127.0.0.1:{port}",
                                        "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})

    async def retried() -> bool:
        row = (await _rows(bridge))[0]
        return row.last_error is not None and row.status is Status.PENDING
    await eventually(retried, what="a failed attempt while the receiver is down")
    [row] = await _rows(bridge)
    assert row.last_error and "cannot connect" in row.last_error
    # Never heard from since the start: nothing counted (a send in flight holds one attempt
    # until its failure gives it back).
    assert row.attempts == 0 or (row.attempts == 1 and row.lease_until is not None)
    assert str(port) not in row.last_error  # reasons describe, they do not carry the URL

    rec = Receiver()
    server = TestServer(rec.app(), port=port)
    await server.start_server()
    try:
        await rec.wait_for(1, timeout=10)

        async def delivered() -> bool:
            return (await bridge.rt.store.counts())["delivered"] == 1
        await eventually(delivered, what="delivery after the receiver came up")
    finally:
        await server.close()


async def test_sample_batch_routes_each_tracking_item(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    batch = sample_batch()
    status, body = await bridge.post(batch)
    assert status == 200
    assert body["accepted"] == len(batch["order"]) + len(batch["tracking"])
    assert body["deliveries"] == len(batch["tracking"])
    got = await rec.wait_for(len(batch["tracking"]))
    assert sorted(json.dumps(r.json()["data"], sort_keys=True) for r in got) == sorted(
        json.dumps(t, sort_keys=True) for t in batch["tracking"])


async def _rows(bridge: Any) -> list[Any]:
    """The one delivery TRACKING causes, looked up by the id the router gives it."""
    did = delivery_id("hook", "tracking-to-hook", "tracking", canonical_json(TRACKING))
    return [await bridge.rt.store.get(did)]


async def _quiet(seconds: float) -> None:
    """Let the dispatcher run a while, to see that nothing more is sent."""
    await asyncio.sleep(seconds)


LEAKY_CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  hook:
    type: http
    url: ${URL}/hooks/isendu?format=json&access_token=${QUERY_TOKEN}
    headers:
      Authorization: "Bearer ${SHOP_BEARER}"
      X-Api-Key: literal-api-key-0123
      X-Env: production
    signing_secret: ${SIGNING_SECRET}
routes:
  - name: tracking-to-hook
    kind: tracking
    to: hook
"""


async def test_credentials_a_receiver_echoes_never_reach_logs_or_reasons(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Receivers' error pages echo what they were sent. The bearer token (from a variable
    the user did not name as secret), a literal API key, a `?access_token=` and the signing
    secret are scrubbed from dead-letter reasons and logs, even where the 200-character
    excerpt of the page would cut through one; an ordinary header value is not."""
    rec, url = receiver
    bearer, query = "bearer-value-0123456789", "query-token-0123456789"
    page = (f"invalid credentials: Authorization: Bearer {bearer}, X-Api-Key: "
            f"literal-api-key-0123, url ?access_token={query}, X-Env: production")
    rec.answer(Answer(401, page), Answer(400, "y" * 190 + SECRET + "z" * 50))
    caplog.set_level(logging.DEBUG)
    bridge = await make_bridge(LEAKY_CONFIG, {"URL": url, "SIGNING_SECRET": SECRET,
                                              "SHOP_BEARER": bearer, "QUERY_TOKEN": query})
    other = dict(TRACKING, uuid="5b0ad4c2-44b8-4d84-9a3b-4a0fb2b7f1a2")
    await bridge.post({"tracking": [TRACKING]})
    await rec.wait_for(1)
    await bridge.post({"tracking": [other]})
    await rec.wait_for(2)
    assert rec.requests[0].headers["Authorization"] == f"Bearer {bearer}"  # sent as written

    reasons = [row.last_error or "" for row in await dead(bridge, 2)]
    echoed = next(r for r in reasons if "HTTP 401" in r)
    assert "X-Env: production" in echoed and "********" in echoed
    cut = next(r for r in reasons if "HTTP 400" in r)
    assert cut.endswith("...") and "********" in cut
    secrets = [bearer, query, "literal-api-key-0123", SECRET, SECRET[:10]]
    ours = [r for r in caplog.records if r.name.startswith("bridge")]  # not the receiver's
    assert ours
    assert_no_leak(secrets, ours, *reasons)
    lines = [JsonFormatter().format(r) for r in ours]
    assert_no_leak(secrets, [], *lines)


PATH_TOKEN = "3f2b8c1e-5d4a-4b6e-9f1a-2c3d4e5f6a7b"  # an n8n webhook id
CAPABILITY_CONFIG = (
    "defaults: {retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 1}}\n"
    f"sinks: {{hook: {{type: http, url: '${{URL}}/webhook/{PATH_TOKEN}'}}}}\n"
    "routes: [{name: tracking-to-hook, kind: tracking, to: hook}]\n")


async def test_a_token_in_the_urls_path_never_reaches_logs_or_reasons(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A capability URL (n8n, Make, Zapier: whoever knows it may post) carries its secret in
    the path, written literally in routes.yaml. n8n's 404 for a workflow switched off
    names it; the dead-letter reason and the logs do not."""
    rec, url = receiver
    token = PATH_TOKEN
    rec.answer(Answer(404, json.dumps({
        "code": 404, "message": f'The requested webhook "POST {token}" is not registered.',
        "hint": "The workflow must be active for a production URL to run successfully."})))
    caplog.set_level(logging.DEBUG)
    bridge = await make_bridge(CAPABILITY_CONFIG, {"URL": url})
    await bridge.post({"tracking": [TRACKING]})
    await rec.wait_for(1)
    assert rec.requests[0].path == f"/webhook/{token}"  # sent as written
    [row] = await dead(bridge)
    assert row.last_error is not None
    assert 'The requested webhook \\"POST ********\\" is not registered' in row.last_error
    ours = [r for r in caplog.records if r.name.startswith("bridge")]
    assert ours
    assert_no_leak([token], ours, row.last_error,
                   *[JsonFormatter().format(r) for r in ours])


QUICK_RETRY = CONFIG.replace("max_delay: 200ms", "max_delay: 1s, max_age: 1h")


async def test_a_retry_after_past_max_age_dead_letters_and_holds_the_sink_an_hour_at_most(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    """A 429 asking for 100,000 s dead-letters that delivery (past max_age) and holds the
    sink back for an hour at most, not for a day."""
    rec, url = receiver
    rec.answer(Answer(429, "come back tomorrow", {"Retry-After": "100000"}))
    bridge = await make_bridge(QUICK_RETRY, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    await rec.wait_for(1)
    [row] = await dead(bridge)
    assert row.last_error is not None and "past max_age 1h" in row.last_error
    held = bridge.rt.sinks["hook"].paused_until - time.monotonic()
    assert 3500 < held <= 3600


async def test_retry_after_zero_is_not_a_retry_storm(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    """`Retry-After: 0` on every answer: one try a second, not one per round trip."""
    rec, url = receiver
    rec.default = Answer(429, "busy", {"Retry-After": "0"})
    bridge = await make_bridge(QUICK_RETRY, {"URL": url, "SIGNING_SECRET": SECRET})
    await bridge.post({"tracking": [TRACKING]})
    await rec.wait_for(1)
    await asyncio.sleep(2.5)
    tries = [r.at for r in rec.requests]
    assert 3 <= len(tries) <= 4, tries
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(tries))


ECHO_CONFIG = """
server: {listen: "${BRIDGE_LISTEN:-127.0.0.1:8080}"}
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 3}
sinks:
  hook:
    type: http
    url: ${URL}/hooks/isendu
    headers: {Authorization: "Bearer ${SHOP_BEARER}"}
routes:
  - name: tracking-to-hook
    kind: tracking
    to: hook
"""


async def test_a_credential_echoed_in_another_case_is_masked_in_the_log_and_dlq_list(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    """A real `bridge serve` process; the receiver's 400 page echoes the Authorization
    header lower-cased and upper-cased, as some frameworks do. Neither form reaches the
    process's log or `bridge dlq list` (text or --json)."""
    rec, url = receiver
    token = "SecretToken123abc"
    rec.answer(Answer(400, f"bad header: authorization: bearer {token.lower()} "
                           f"(AUTHORIZATION: BEARER {token.upper()}) for shop 7"))
    config = tmp_path / "routes.yaml"
    config.write_text(ECHO_CONFIG)
    env = {"URL": url, "SHOP_BEARER": token}
    log = tmp_path / "bridge.log"
    async with BridgeProcess(config, log, env) as bridge:
        await bridge.start(free_port())
        async with aiohttp.ClientSession() as session, session.post(
                bridge.url + WEBHOOK, json={"tracking": [TRACKING]}) as resp:
            assert resp.status == 200
        await rec.wait_for(1)
        assert rec.requests[0].headers["Authorization"] == f"Bearer {token}"

        async def dead_logged() -> bool:
            return "HTTP 400" in log.read_text()
        await eventually(dead_logged, timeout=20, what="the dead letter logged")
        assert await bridge.terminate() == 0
    outputs = [log.read_text()]
    for extra in ([], ["--json"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "dlq", "list", "--config", str(config), *extra,
            cwd=tmp_path, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "for shop 7" in out.decode() and "********" in out.decode()  # the page, masked
        outputs.append(out.decode())
    for text in outputs:
        for form in (token, token.lower(), token.upper()):
            assert form not in text


async def test_http_proxy_from_the_environment_is_used_and_no_proxy_honoured(
    make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HTTP_PROXY / HTTPS_PROXY / NO_PROXY as every HTTP client reads them: a receiver
    behind an egress proxy is reached through it (aiohttp reads none of them by itself),
    one NO_PROXY names is reached directly, and the proxy's password is a secret."""
    seen: list[tuple[str, str, str | None]] = []

    async def forward_proxy(request: web.Request) -> web.Response:
        # A plain-HTTP forward proxy gets the absolute URL; this one answers for the host.
        seen.append((request.host, request.path, request.headers.get("Proxy-Authorization")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward_proxy)
    proxy = TestServer(app, port=free_port())
    await proxy.start_server()
    direct = Receiver()
    direct_server = TestServer(direct.app(), port=free_port())
    await direct_server.start_server()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://egress:pr0xy-passw0rd@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", "localhost")
        caplog.set_level(logging.DEBUG)
        config = CONFIG + "  - name: direct\n    kind: tracking\n    to: near\n"
        config = config.replace("sinks:\n", "sinks:\n  near: {type: http, url: "
                                f"'http://localhost:{direct_server.port}/in'}}\n")
        bridge = await make_bridge(config, {"URL": "http://erp.invalid", "SIGNING_SECRET": SECRET})
        await bridge.post({"tracking": [TRACKING]})

        async def both() -> bool:
            return len(seen) == 1 and len(direct.requests) == 1
        await eventually(both, what="one send through the proxy, one direct")
        host, path, auth = seen[0]
        assert (host, path) == ("erp.invalid", "/hooks/isendu")  # DNS never asked: the proxy was
        assert auth == "Basic " + base64.b64encode(b"egress:pr0xy-passw0rd").decode()
        assert_no_leak(["pr0xy-passw0rd"], caplog.records, "")
    finally:
        await proxy.close()
        await direct_server.close()


async def test_a_send_is_cut_off_before_its_claim_s_lease_runs_out(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever a sink's timeout (or the number of calls a send makes), the dispatcher ends
    the send at two thirds of the lease, as a transient timeout: past the lease the delivery
    would be taken for lost and sent again while the first send still waits."""
    caplog.set_level(logging.DEBUG)
    rec, url = receiver
    rec.answer(Answer(200, "ok", delay=3.0))  # a hang, well within the sink's own 10s
    bridge = await make_bridge(CONFIG, {"URL": url, "SIGNING_SECRET": SECRET})
    bridge.rt.store.lease_seconds = 1.5  # type: ignore[misc]  # the send may take 1 s
    await bridge.post({"tracking": [TRACKING]})
    await eventually(lambda: _delivered(bridge), what="delivered by the next attempt")
    assert len(rec.requests) == 2
    # The delivery's last_error is cleared when it is delivered: the retry's line says why.
    reasons = [r.__dict__.get("reason") for r in caplog.records if r.getMessage() == "will retry"]
    assert reasons == [
        "the send did not end within 1s, two thirds of the 1.5s its claim is leased for"]


async def _delivered(bridge: Any) -> bool:
    return bool((await bridge.rt.store.counts())["delivered"])
