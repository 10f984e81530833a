"""Intake and verification over real HTTP, on a real SQLite outbox."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sqlite3
import time
from typing import Any

import pytest

from bridge.logs import JsonFormatter
from tests.conftest import BridgeFactory
from tests.helpers.bridge import WEBHOOK, Bridge, sample_batch

CONFIG = """
integrations:
  - key_id: key-one
    secret: ${SECRET_ONE}
  - {key_id: key-two, secret: second-secret-value}
server:
  max_body_bytes: 64KiB
sinks:
  out: {type: console}
routes:
  - name: tracking
    kind: tracking
    to: out
"""
ENV = {"SECRET_ONE": "first-secret-value"}


async def _bridge(make_bridge: BridgeFactory) -> Bridge:
    return await make_bridge(CONFIG, ENV)


async def test_verification_answers_each_integrations_secret(make_bridge: BridgeFactory) -> None:
    bridge = await _bridge(make_bridge)
    assert await bridge.post({"keyId": "key-one"}) == (200, {"response": "first-secret-value"})
    assert await bridge.post({"keyId": "key-two"}) == (200, {"response": "second-secret-value"})


async def test_unknown_key_is_403_and_logged_without_secrets(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await _bridge(make_bridge)
    caplog.set_level(logging.INFO)
    status, body = await bridge.post({"keyId": "stranger"})
    assert status == 403
    assert "unknown keyId 'stranger'" in body["error"]
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any(json.loads(line).get("key_id") == "stranger" for line in lines)
    assert not any("secret-value" in line for line in lines)


async def test_verification_never_waits_for_storage(make_bridge: BridgeFactory) -> None:
    """Batches stuck behind a locked database, more than intake_concurrency of them, must
    not delay isendu's verification."""
    bridge = await _bridge(make_bridge)
    db = bridge.rt.config.storage.removeprefix("sqlite:///")
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the disk is "slow": every write now waits
    try:
        waiting = [asyncio.create_task(bridge.post(sample_batch()))
                   for _ in range(bridge.rt.config.server.intake_concurrency + 4)]
        await asyncio.sleep(0.3)
        assert not any(b.done() for b in waiting)  # every slot is taken, waiting for storage
        started = time.monotonic()
        assert await bridge.post({"keyId": "key-one"}) == (200, {"response": "first-secret-value"})
        assert time.monotonic() - started < 2.0  # isendu allows 5 s
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    results = [await b for b in waiting]
    assert all(status == 200 for status, _ in results)
    assert sum(body["deliveries"] for _, body in results) == len(sample_batch()["tracking"])


async def test_verification_while_a_1000_item_batch_is_accepted(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(CONFIG.replace("64KiB", "4MiB"), ENV)
    template = sample_batch()["tracking"][0]
    big = {"tracking": [{**template, "uuid": f"u-{i}"} for i in range(1000)]}
    batch = asyncio.create_task(bridge.post(big))
    await asyncio.sleep(0)  # let the batch start first
    started = time.monotonic()
    assert (await bridge.post({"keyId": "key-two"}))[0] == 200
    waited = time.monotonic() - started
    status, body = await batch
    assert status == 200 and body == {**body, "accepted": 1000, "deliveries": 1000}
    assert waited < 2.0  # well under isendu's 5 s


SLOW_ROUTE = """
integrations:
  - {key_id: key-two, secret: second-secret-value}
sinks:
  hook:
    type: http
    url: http://127.0.0.1:9/in
    headers:
      X-Slow: "{% for i in range(200) %}{% for j in range(100) %}{% endfor %}{% endfor %}x"
routes:
  - {name: all, to: hook}
"""


async def test_the_sequencer_gives_way_to_requests(make_bridge: BridgeFactory) -> None:
    """Routing moved after the 200 shares the event loop with intake and verification: it
    yields every few milliseconds, so a ticker (standing for any request) runs while a
    batch whose templates take long is sequenced, and a verification is answered."""
    bridge = await make_bridge(SLOW_ROUTE)
    template = sample_batch()["tracking"][0]
    big = {"tracking": [{**template, "uuid": f"u-{i}"} for i in range(200)]}
    status, answer = await bridge.post(big, settle=False)
    assert status == 200 and answer == {"accepted": 200, "batch_id": answer["batch_id"]}
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        assert await bridge.post({"keyId": "key-two"}) == (200, {"response": "second-secret-value"})
        started = time.monotonic()
        settled = await bridge.settled(answer["batch_id"])
        took = time.monotonic() - started
    finally:
        stop.set()
        await task
    assert settled["verdicts"] == ["first_seen"] * 200
    assert len(set(settled["delivery_ids"])) == 200
    assert settled | {"verdicts": None, "delivery_ids": None} == {
        "deliveries": 200, "duplicates": 0, "status": "sequenced", "verdicts": None,
        "delivery_ids": None}
    # Not a speed check: however long routing took, the loop turned about every 5 ms.
    assert ticks >= min(200, took / 0.05), (ticks, took)


async def _outbox_state(bridge: Bridge) -> dict[str, int]:
    return await bridge.rt.store.counts()


@pytest.mark.parametrize(("body", "where", "fragment"), [
    (b"{not json", "$", "malformed JSON"),
    (b"[]", "$", "expected a JSON object, got an array"),
    (b"null", "$", "expected a JSON object, got null"),
    (b'{"order": "x"}', "$.order", "expected a list of order items"),
    (b'{"tracking": {"uuid": "a"}}', "$.tracking", "expected a list of tracking items"),
    (b'{"tracking": [{"uuid": "a"}, "b"]}', "$.tracking[1]", "expected an object, got a string"),
    (b'{"order": [{"uuid": "a"}], "tracking": [{"status": "X"}]}', "$.tracking[0].uuid",
     "uuid missing"),
    (b'{"keyId": ""}', "$.keyId", "non-empty string"),
])
async def test_bad_input_is_400_and_stores_nothing(
    make_bridge: BridgeFactory, body: bytes, where: str, fragment: str
) -> None:
    bridge = await _bridge(make_bridge)
    before = await _outbox_state(bridge)
    status, answer = await bridge.post(body)
    assert status == 400
    assert answer["where"] == where and fragment in answer["error"]
    assert await _outbox_state(bridge) == before == {"pending": 0, "delivered": 0, "dead": 0}


async def test_body_over_the_limit_is_413(make_bridge: BridgeFactory) -> None:
    bridge = await _bridge(make_bridge)
    huge = json.dumps({"tracking": [{"uuid": "x", "pad": "p" * 70_000}]})
    status, answer = await bridge.post(huge)
    assert status == 413 and "max_body_bytes 65536" in answer["error"]

    async def chunks() -> Any:  # no Content-Length: the limit holds while streaming too
        for _ in range(100):
            yield b"x" * 1024

    resp = await bridge.client.post("/isendu/webhook", data=chunks())
    assert resp.status == 413
    assert await _outbox_state(bridge) == {"pending": 0, "delivered": 0, "dead": 0}


def _count(bridge: Bridge, metric: str, outcome: str) -> float:
    value = bridge.rt.metrics.registry.get_sample_value(metric, {"outcome": outcome})
    return value or 0.0


def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(("body", "status", "counted"), [
    (b"{not json", 400, "batch"),  # found while parsing
    ('{"tracking": [{"uuid": "deep", "x": ' + _nested(1000) + "}]}", 400, "batch"),  # routing
    (json.dumps({"tracking": [{"uuid": "x", "pad": "p" * 70_000}]}), 413, "batch"),  # reading
    (b'{"keyId": ""}', 400, "verification"),
])
async def test_every_refusal_is_one_log_line_and_one_count(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture,
    body: bytes | str, status: int, counted: str,
) -> None:
    bridge = await _bridge(make_bridge)
    caplog.set_level(logging.INFO)
    got, answer = await bridge.post(body)
    assert got == status, answer
    refused = [r for r in caplog.records if r.getMessage() == "refused request"]
    assert len(refused) == 1 and refused[0].__dict__["status"] == status
    assert refused[0].__dict__["error"] == answer["error"]
    rejected = _count(bridge, "bridge_batches_received_total", "rejected")
    invalid = _count(bridge, "bridge_verification_requests_total", "invalid")
    assert (rejected, invalid) == ((1.0, 0.0) if counted == "batch" else (0.0, 1.0))


async def test_compressed_bodies_are_read_and_a_broken_one_is_named(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await _bridge(make_bridge)
    batch = json.dumps({"tracking": [{"uuid": "gz-1", "status": "CREATED"}]}).encode()
    resp = await bridge.client.post("/isendu/webhook", data=gzip.compress(batch),
                                    headers={"Content-Encoding": "gzip"})
    assert resp.status == 200 and (await resp.json())["accepted"] == 1
    resp = await bridge.client.post("/isendu/webhook", data=b"\x1f\x8b\x08\x00garbage",
                                    headers={"Content-Encoding": "gzip"})
    assert resp.status == 400  # a gzip header and nothing after it
    assert (await resp.json())["error"].startswith(
        "body is empty after undoing Content-Encoding gzip; expected a JSON object")
    resp = await bridge.client.post("/isendu/webhook", data=b"not gzip at all",
                                    headers={"Content-Encoding": "gzip"})
    assert resp.status == 400
    assert (await resp.json())["error"] == (
        "body cannot be decoded as Content-Encoding gzip; expected a JSON object, compressed "
        "as the header says")
    assert bridge.rt.metrics.registry.get_sample_value(
        "bridge_batches_received_total", {"outcome": "rejected"}) == 2


async def test_a_body_with_no_known_key_is_accepted_empty_with_a_warning(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """`{"orders": [...]}` (a typo, or a test by hand) is a 200 with nothing in it, as an
    empty batch from isendu would be, and a warning names the keys it did not know."""
    bridge = await _bridge(make_bridge)
    caplog.set_level(logging.INFO)
    status, answer = await bridge.post({"orders": [{"uuid": "a"}], "keyid": "key-one"})
    assert status == 200 and answer["accepted"] == 0 and "response" not in answer
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("body has neither keyId, order nor tracking")
    assert warning.__dict__["keys"] == ["orders", "keyid"]
    caplog.clear()
    assert (await bridge.post({}))[0] == 200  # an empty batch as such is no news
    assert (await bridge.post({"order": [], "note": "x"}))[0] == 200  # isendu's own, empty
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_huge_unknown_key_id_is_not_echoed_whole(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    bridge = await _bridge(make_bridge)
    caplog.set_level(logging.INFO)
    status, answer = await bridge.post({"keyId": "k" * 60_000})  # within max_body_bytes
    assert status == 403 and len(answer["error"]) < 300
    assert "(60000 characters)" in answer["error"]
    assert all(len(JsonFormatter().format(r)) < 1000 for r in caplog.records)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(make_bridge: BridgeFactory, method: str) -> None:
    bridge = await _bridge(make_bridge)
    resp = await bridge.client.request(method, "/isendu/webhook")
    assert resp.status == 405
    assert (await resp.json())["allowed"] == ["POST"]
    assert resp.headers["Allow"] == "POST"


async def test_batch_matching_no_route_is_still_accepted(make_bridge: BridgeFactory) -> None:
    bridge = await _bridge(make_bridge)
    status, body = await bridge.post({"order": sample_batch()["order"]})
    assert status == 200 and body["accepted"] == 1 and body["deliveries"] == 0


async def test_repeated_batch_is_accepted_but_not_delivered_twice(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await _bridge(make_bridge)
    batch = sample_batch()
    first = (await bridge.post(batch))[1]
    second = (await bridge.post(batch))[1]
    assert first["deliveries"] == len(batch["tracking"]) and first["duplicates"] == 0
    assert set(first["verdicts"]) == {"first_seen", "change"}  # one uuid comes twice
    # Nothing new against the shipments' states: not routed at all, so nothing to store.
    assert second["deliveries"] == 0 and second["duplicates"] == 0
    # The same uuid's CREATED snapshot, before its PICKED_UP one, is stale the second time.
    assert second["verdicts"] == ["repeat", "repeat", "stale", "repeat", "repeat", "repeat"]


async def test_one_failing_template_dead_letters_only_that_delivery(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge("""
sinks:
  out: {type: console, message: "{{ item.uuid }} costs {{ 100 / item.parcels }}"}
routes:
  - {name: all, to: out}
""")
    status, body = await bridge.post({"order": [{"uuid": "ok", "parcels": 4},
                                                {"uuid": "broken", "parcels": 0}]})
    assert status == 200 and body["deliveries"] == 2
    [dead] = await bridge.rt.store.list_dead()
    assert dead.item_uuid == "broken"
    assert dead.last_error is not None and "ZeroDivisionError" in dead.last_error


async def test_health_readiness_and_metrics(make_bridge: BridgeFactory) -> None:
    bridge = await _bridge(make_bridge)
    assert (await bridge.client.get("/healthz")).status == 200
    assert (await bridge.client.get("/readyz")).status == 200
    await bridge.post(sample_batch())
    await bridge.post({"keyId": "key-one"})
    await bridge.post({"keyId": "nobody"})
    await bridge.post(b"{")
    text = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_batches_received_total{outcome="accepted"} 1.0' in text
    assert 'bridge_batches_received_total{outcome="rejected"} 1.0' in text
    assert 'bridge_items_received_total{kind="tracking"} 5.0' in text
    assert 'bridge_items_received_total{kind="order"} 1.0' in text
    assert 'bridge_verification_requests_total{outcome="ok"} 1.0' in text
    assert 'bridge_verification_requests_total{outcome="unknown_key"} 1.0' in text
    assert 'bridge_outbox_deliveries{status="pending"}' in text
    assert 'bridge_delivery_latency_seconds_bucket{le="0.005",sink="out"}' in text
    # Zeros before the first one, not a gap (an alert on increase() sees the first).
    assert 'bridge_dead_letters_total{reason="server_error",sink="out"} 0.0' in text
    assert 'bridge_items_observed_total{kind="tracking",verdict="repeat"} 0.0' in text
    assert "secret-value" not in text


async def test_metrics_never_show_a_batch_neither_waiting_nor_by_its_deliveries(
    make_bridge: BridgeFactory,
) -> None:
    """A batch settled while /metrics reads storage counts as waiting or by its deliveries:
    a load test that waits for an empty inbox takes the outbox as all the load made."""
    bridge = await _bridge(make_bridge)
    await bridge.rt.sequencer.stop()
    status, _ = await bridge.post(sample_batch(), settle=False)
    assert status == 200
    store, reads = bridge.rt.store, 0

    def settling_after_the_first_read(read: Any) -> Any:
        async def wrapped() -> Any:
            nonlocal reads
            result = await read()
            reads += 1
            if reads == 1:  # between /metrics' two reads of storage, the batch is settled
                await bridge.rt.sequencer.sequence(await store.waiting(10))
            return result
        return wrapped

    store.counts = settling_after_the_first_read(store.counts)  # type: ignore[method-assign]
    store.inbox_depth = settling_after_the_first_read(store.inbox_depth)  # type: ignore[method-assign]
    text = await (await bridge.client.get("/metrics")).text()
    assert reads == 2
    waiting = _sample(text, 'bridge_inbox_batches{status="waiting"}')
    stored = sum(_sample(text, f'bridge_outbox_deliveries{{status="{s}"}}')
                 for s in ("pending", "delivered", "dead"))
    assert waiting == 1 or stored == len(sample_batch()["tracking"]), (waiting, stored)


def _sample(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + " "))


async def test_readyz_is_503_when_storage_cannot_be_written(make_bridge: BridgeFactory) -> None:
    bridge = await _bridge(make_bridge)
    db = bridge.rt.config.storage.removeprefix("sqlite:///")
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        resp = await bridge.client.get("/readyz")
        assert resp.status == 503
        assert "not writable" in (await resp.json())["storage"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert (await bridge.client.get("/readyz")).status == 200  # recovers by itself


async def test_webhook_path_with_a_token(make_bridge: BridgeFactory,
                                        caplog: pytest.LogCaptureFixture) -> None:
    token = "t0k3n-abcdefghijklmnop"
    bridge = await make_bridge(CONFIG.replace("server:", "server:\n  webhook_path: /isendu/${TOK}"),
                               {**ENV, "TOK": token})
    assert (await bridge.post({"keyId": "key-one"}, path=f"/isendu/{token}"))[0] == 200
    caplog.set_level(logging.INFO)
    assert (await bridge.post({"keyId": "key-one"}, path="/isendu/webhook"))[0] == 404
    # The token with its last character lost: not the token, but all of it but one.
    assert (await bridge.post({"keyId": "key-one"}, path=f"/isendu/{token[:-1]}"))[0] == 404
    paths = [r.__dict__["path"] for r in caplog.records if r.getMessage() == "refused request"]
    assert paths == ["/isendu/webhook", f"/isendu/********({len(token) - 1} characters)"]
    assert not [r for r in caplog.records if token[:-1] in JsonFormatter().format(r)]


async def test_a_full_storage_is_a_503_and_not_ready_until_room_is_made(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite's own size limit gives SQLITE_FULL for real, as a full disk does: the batch
    is answered 503 with Retry-After and why, /readyz says not ready until a write that needs
    room succeeds again, and the log has the reason without a traceback. (It was a 500
    "internal error" with a traceback, and /readyz stayed ready.)"""
    bridge = await _bridge(make_bridge)
    store = bridge.rt.store
    assert (await bridge.post(sample_batch()))[0] == 200
    caplog.set_level(logging.INFO)
    # max_page_count holds for the connection that sets it, and the store has one, on its
    # writer thread. Set below the file's size, it becomes the file's size: no page more.
    await store._call(lambda c: c.execute("PRAGMA max_page_count = 1"))  # type: ignore[attr-defined]
    big = {"tracking": [{"uuid": "large", "notes": "n" * 40_000}]}
    for _ in range(2):
        resp = await bridge.client.post(WEBHOOK, json=big)
        assert resp.status == 503
        assert await resp.json() == {"error": "storage is full (SQLite: database or disk is "
                                              "full); nothing was accepted"}
        assert int(resp.headers["Retry-After"]) > 0
        ready = await bridge.client.get("/readyz")
        assert ready.status == 503
        assert await ready.json() == {
            "status": "not ready",
            "storage": "not writable: storage is full (SQLite: database or disk is full)"}
    assert await bridge.post({"keyId": "key-one"}) == (200, {"response": "first-secret-value"})

    await store._call(lambda c: c.execute("PRAGMA max_page_count = 1000000"))  # type: ignore[attr-defined]
    ready = await bridge.client.get("/readyz")
    assert (ready.status, (await ready.json())["status"]) == (200, "ready")
    status, answer = await bridge.post(big)
    assert status == 200 and answer["accepted"] == 1
    refused = [r for r in caplog.records if r.getMessage().startswith("batch not accepted")]
    assert len(refused) == 2 and all(r.levelno == logging.WARNING for r in refused)
    assert refused[0].__dict__["error"] == "storage is full (SQLite: database or disk is full)"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
