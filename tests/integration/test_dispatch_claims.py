"""The dispatcher's claims: claimed ahead only while the lease leaves room for a whole send,
more of them for a fast sink (within a bound), and given back untouched when the bridge
stops before sending them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bridge.dispatch.dispatcher import MAX_AHEAD_PER_SLOT, claim_ahead
from bridge.http.app import create_app
from bridge.models import Delivery, Status
from bridge.runtime import build_runtime
from tests.helpers.bridge import Bridge, write_config
from tests.helpers.receiver import Answer, Receiver

CONFIG = """
storage: sqlite:///{db}
sinks:
  hook:
    type: http
    url: {url}
    timeout: 1s
    concurrency: {concurrency}
routes:
  - name: all
    kind: tracking
    to: hook
"""


def tracking(n: int) -> dict[str, Any]:
    return {"uuid": f"shipment-{n}", "status": "IN_TRANSIT", "steps": []}


async def start(aiohttp_client: Any, tmp_path: Path, url: str, lease: float,
                claims: list[tuple[float, list[str]]], concurrency: int = 1) -> Bridge:
    rt = build_runtime(write_config(tmp_path, CONFIG.format(
        db=tmp_path / "b.db", url=url, concurrency=concurrency)))
    rt.store.lease_seconds = lease
    real_claim = rt.store.claim

    async def recorded_claim(sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        rows = await real_claim(sink, limit, now, lease)  # the real outbox; only watched
        claims.append((time.monotonic(), [d.id for d in rows]))
        return rows

    rt.store.claim = recorded_claim  # type: ignore[method-assign]
    return Bridge(client=await aiohttp_client(create_app(rt)), rt=rt)


async def test_a_claim_never_waits_past_what_its_lease_leaves_for_the_send(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    rec = Receiver(default=Answer(200, "ok", delay=0.8))
    server = await aiohttp_server(rec.app())
    claims: list[tuple[float, list[str]]] = []
    # lease 3.1 s - 3 x timeout 1 s: a claimed delivery may wait 0.1 s for its slot, not the
    # 0.8 s the one before it takes.
    bridge = await start(aiohttp_client, tmp_path, f"http://127.0.0.1:{server.port}", 3.1,
                         claims)
    status, body = await bridge.post({"tracking": [tracking(n) for n in range(4)]})
    assert status == 200 and body["deliveries"] == 4
    await rec.wait_for(4, timeout=15)

    sent = {r.headers["webhook-id"]: r.at for r in rec.requests}
    assert len(rec.requests) == 4 and len(sent) == 4  # each exactly once
    for delivery_id, arrived in sent.items():
        claimed = max(at for at, ids in claims if delivery_id in ids and at <= arrived)
        assert arrived - claimed < 0.1 + 0.45, f"{delivery_id} waited {arrived - claimed:.2f}s"
    assert any(len(ids) > 1 for _, ids in claims)  # it did claim ahead (concurrency 1)


async def test_stopping_gives_back_claims_that_never_started(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    rec = Receiver(default=Answer(200, "ok", delay=0.2))
    server = await aiohttp_server(rec.app())
    claims: list[tuple[float, list[str]]] = []
    bridge = await start(aiohttp_client, tmp_path, f"http://127.0.0.1:{server.port}", 300.0,
                         claims)
    status, _ = await bridge.post({"tracking": [tracking(n) for n in range(4)]})
    assert status == 200
    await rec.wait_for(1, timeout=10)
    assert sum(len(ids) for _, ids in claims) >= 2  # one in flight, one claimed ahead

    await bridge.rt.dispatcher.stop(grace=5.0)
    counts = await bridge.rt.store.counts()
    assert counts["delivered"] == len(rec.requests) and counts["dead"] == 0
    rest = await bridge.rt.store.claim("hook", 10, time.time(), 300)  # none still leased
    assert len(rest) == 4 - len(rec.requests)
    assert all(d.status is Status.PENDING and d.attempts == 1 for d in rest)  # this claim's


def test_claim_ahead_covers_what_a_sink_sends_while_a_claim_refills() -> None:
    assert claim_ahead(8, None) == 8  # nothing measured yet: one per slot
    assert claim_ahead(8, 0.4) == 8  # slow sends (a chat API): one per slot, as ever
    assert claim_ahead(8, 0.025) == 16  # two sends per slot fit in the refill horizon
    assert claim_ahead(8, 0.0005) == 8 * MAX_AHEAD_PER_SLOT  # a local receiver: the bound
    assert claim_ahead(1, 0.01) == 5


async def test_a_fast_sink_claims_in_bigger_chunks_within_the_bound(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    rec = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(rec.app())
    claims: list[tuple[float, list[str]]] = []
    limit = 2
    bridge = await start(aiohttp_client, tmp_path, f"http://127.0.0.1:{server.port}", 300.0,
                         claims, concurrency=limit)
    for start_at in range(0, 120, 40):
        status, body = await bridge.post(
            {"tracking": [tracking(n) for n in range(start_at, start_at + 40)]})
        assert status == 200 and body["deliveries"] == 40
    await rec.wait_for(120, timeout=30)

    assert len({r.headers["webhook-id"] for r in rec.requests}) == len(rec.requests) == 120
    sizes = [len(ids) for _, ids in claims]
    # One slot's worth ahead would claim at most 2 x limit at once; a receiver answering in
    # milliseconds gets more claimed ahead, never more than the bound.
    assert max(sizes) > 2 * limit, sizes
    assert max(sizes) <= limit * (1 + MAX_AHEAD_PER_SLOT), sizes


async def test_claims_held_through_a_long_pause_are_given_back_at_once(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    import sqlite3

    rec = Receiver(default=Answer(200, "ok"))
    rec.answer(Answer(429, "slow down", headers={"Retry-After": "2"}))
    server = await aiohttp_server(rec.app())
    claims: list[tuple[float, list[str]]] = []
    # lease 3.1 s - 3 x timeout 1 s: a claimed delivery may wait 0.1 s; the pause is 2 s.
    bridge = await start(aiohttp_client, tmp_path, f"http://127.0.0.1:{server.port}", 3.1,
                         claims)
    status, _ = await bridge.post({"tracking": [tracking(n) for n in range(3)]})
    assert status == 200
    await rec.wait_for(1, timeout=10)  # the 429: the sink pauses for 2 s
    await asyncio.sleep(0.3)
    first = next(ids for _, ids in claims if ids)
    assert len(first) == 2  # one sent, one held ahead when the pause began
    with sqlite3.connect(tmp_path / "b.db") as db:
        leased = db.execute("SELECT COUNT(*) FROM deliveries "
                            "WHERE lease_until IS NOT NULL").fetchone()[0]
    assert leased == 0  # nothing stays claimed by a paused sink for another replica to clash

    await rec.wait_for(4, timeout=15)
    await asyncio.sleep(0.3)
    ids = [r.headers["webhook-id"] for r in rec.requests]
    assert len(ids) == 4 and len(set(ids[1:])) == 3  # the 429'd one again, each once
    assert (await bridge.rt.store.counts())["delivered"] == 3


async def test_deliveries_of_a_sink_no_longer_configured_are_said_at_start(
        aiohttp_client: Any, tmp_path: Path, caplog: Any) -> None:
    """A sink renamed or removed keeps its pending rows, never claimed: one warning per such
    sink at start, with how many wait, instead of a backlog nobody sees."""
    import logging

    from bridge.models import NewDelivery
    from bridge.outbox import from_url

    store = from_url(f"sqlite:///{tmp_path}/bridge.db")
    await store.open()
    await store.enqueue([NewDelivery(id=f"dlv_{n:032x}", sink="erp", route="all",
                                     item_uuid=f"u{n}", kind="tracking",
                                     payload={"body": "{}"}, batch_id="b") for n in range(3)],
                        time.time())
    await store.close()
    caplog.set_level(logging.INFO)
    rt = build_runtime(write_config(tmp_path, CONFIG.format(
        db=f"{tmp_path}/bridge.db", url="http://127.0.0.1:1/hook", concurrency=1)))
    client = await aiohttp_client(create_app(rt))
    [warning] = [r for r in caplog.records if "a sink the config does not name" in
                 r.getMessage()]
    assert (warning.__dict__["sink"], warning.__dict__["pending"]) == ("erp", 3)
    assert warning.__dict__["sinks"] == ["hook"]
    await client.close()


async def test_a_lease_run_out_behind_a_window_in_retry_makes_no_busy_loop(
        aiohttp_client: Any, tmp_path: Path) -> None:
    """A delivery claimed while an earlier window was open, its replica gone mid-send (the
    lease runs out), and the window closed since and waiting for a retry: next_due names
    the past lease, the claim takes nothing (the window holds it back). The dispatcher then
    waits for its poll, not 10 ms at a time until the retry."""
    from bridge.models import COALESCED, NewDelivery

    rt = build_runtime(write_config(tmp_path, CONFIG.format(
        db=tmp_path / "b.db", url="http://127.0.0.1:9/never", concurrency=1)))
    store = rt.store
    await store.open()
    t = time.time() - 100

    def window(n: int, until: float) -> NewDelivery:
        return NewDelivery(id=f"dlv_{n:032x}", sink="hook", route=f"r{n}", item_uuid="A",
                           kind="tracking", payload={"body": "{}"}, batch_id="b",
                           group_key=f"{COALESCED}r{n}>hook>A>{until:.3f}", delay=until - t)

    await store.enqueue([window(1, t + 60), window(2, t + 10)], t)  # two routes' windows
    assert [d.id for d in await store.claim("hook", 10, t + 10, 30)] == [f"dlv_{2:032x}"]
    [first] = await store.claim("hook", 10, t + 60, 30)  # the 60 s window, closed
    await store.retry_at(first.id, time.time() + 300, "HTTP 503", t + 61)
    assert await store.claim("hook", 10, time.time(), 30) == []
    due = await store.next_due("hook")
    assert due is not None and due < time.time()  # the run-out lease: the case itself

    claims: list[float] = []
    real_claim = store.claim

    async def counted(sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        claims.append(now)
        return await real_claim(sink, limit, now, lease)

    store.claim = counted  # type: ignore[method-assign]
    await rt.dispatcher.start()
    try:
        await asyncio.sleep(2.5)
    finally:
        await rt.dispatcher.stop()
        await store.close()
    assert 1 <= len(claims) <= 6, len(claims)  # about one a second (IDLE_POLL)


async def test_a_delivery_due_just_after_an_empty_claim_is_looked_for_at_once(
        tmp_path: Path) -> None:
    """Only what was due when the claim took nothing makes the dispatcher wait for its poll
    (the case above); a delivery falling due between the claim and next_due is claimed
    in 10 ms, as before."""
    from bridge.models import NewDelivery

    rt = build_runtime(write_config(tmp_path, CONFIG.format(
        db=tmp_path / "b.db", url="http://127.0.0.1:9/never", concurrency=1)))
    await rt.store.open()
    try:
        await rt.store.enqueue([NewDelivery(
            id=f"dlv_{1:032x}", sink="hook", route="all", item_uuid="A", kind="tracking",
            payload={"body": "{}"}, batch_id="b", delay=0.002)], 100.0)  # due at 100.002
        clock = {"now": 100.0}
        rt.dispatcher.clock = lambda: clock["now"]
        assert await rt.dispatcher._claim("hook", 10) == []
        clock["now"] = 100.003  # next_due answers after it fell due
        assert await rt.dispatcher._idle_timeout("hook") < 0.1
    finally:
        await rt.store.close()
