"""`coalesce:` on a route: one shipment's changes sequenced within the window go out as one
message carrying all their new steps; a step with an error is never held back. Through the
real intake, sequencer, dispatcher and an HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp import web

from bridge.config import BridgeConfig
from bridge.metrics import Metrics
from bridge.models import InboxBatch
from bridge.outbox import Store, from_url
from bridge.routing.router import Router, compile_routes
from bridge.runtime import build_sinks
from bridge.sequencer import TAKE, Sequencer, StateKeeping, state_book
from tests.conftest import BridgeFactory, require_service
from tests.helpers import postgres
from tests.helpers.bridge import eventually
from tests.helpers.receiver import Receiver

CONFIG = """
sinks:
  hook: {{type: http, url: "${{URL}}/in", concurrency: 4}}
routes:
  - name: shipments
    kind: tracking
    to: hook
    coalesce: {window}
    message: >-
      {{"uuid": "{{{{ item.uuid }}}}", "status": "{{{{ item.status }}}}",
       "new": {{{{ new_steps | map(attribute='timestamp') | list | tojson }}}},
       "was": {{{{ (previous.status if previous else none) | tojson }}}}}}
"""
STATUSES = ["CREATED", "PICKED_UP", "IN_TRANSIT", "OUT_FOR_DELIVERY", "EXCEPTION",
            "DELIVERED"]


def ts(i: int) -> str:
    return f"2025-11-04T{i:02d}:00:00Z"


def snapshot(uuid: str, upto: int, error_at: int | None = None) -> dict[str, Any]:
    steps = []
    for i in range(upto + 1):
        s: dict[str, Any] = {"timestamp": ts(i), "status": STATUSES[i]}
        if i == error_at:
            s["error"] = {"code": "ADDR", "message": "address not found"}
        steps.append(s)
    return {"uuid": uuid, "status": STATUSES[upto], "trackingNumber": uuid, "steps": steps}


async def test_changes_within_the_window_go_out_as_one_message(
        make_bridge: BridgeFactory, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG.format(window="1500ms"), {"URL": url})
    for upto in range(3):  # three updates of t1 in quick succession, and one of t2
        await bridge.post({"tracking": [snapshot("t1", upto)]})
    await bridge.post({"tracking": [snapshot("t2", 0)]})
    got = await rec.wait_for(2, timeout=15)
    await asyncio.sleep(0.5)  # nothing else follows
    bodies = {r.json()["uuid"]: r.json() for r in got}
    assert len(rec.requests) == 2
    assert bodies["t1"] == {"uuid": "t1", "status": "IN_TRANSIT",
                            "new": [ts(0), ts(1), ts(2)], "was": None}
    assert bodies["t2"]["new"] == [ts(0)]
    assert await bridge.rt.store.counts() == {"pending": 0, "delivered": 4, "dead": 0}

    # After the window closed, the next change opens a window of its own.
    await bridge.post({"tracking": [snapshot("t1", 3)]})
    later = await rec.wait_for(3, timeout=15)
    assert later[2].json() == {"uuid": "t1", "status": "OUT_FOR_DELIVERY", "new": [ts(3)],
                               "was": "IN_TRANSIT"}


async def test_a_step_with_an_error_is_never_held_back(
        make_bridge: BridgeFactory, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG.format(window="10m"), {"URL": url})
    await bridge.post({"tracking": [snapshot("t1", 2)]})
    await bridge.post({"tracking": [snapshot("t1", 3)]})
    await asyncio.sleep(0.3)
    assert rec.requests == []  # held for the window
    started = time.monotonic()
    await bridge.post({"tracking": [snapshot("t1", 4, error_at=4)]})
    [got] = await rec.wait_for(1, timeout=15)
    assert time.monotonic() - started < 60  # far inside the 10-minute window
    # It carries what the window held, and the window's changes are not sent again.
    assert got.json() == {"uuid": "t1", "status": "EXCEPTION",
                          "new": [ts(0), ts(1), ts(2), ts(3), ts(4)], "was": None}
    assert await bridge.rt.store.counts() == {"pending": 0, "delivered": 3, "dead": 0}


async def test_an_error_in_a_step_before_the_newest_is_not_held_back_either(
        make_bridge: BridgeFactory, receiver: tuple[Receiver, str]) -> None:
    """One snapshot brings three steps, the middle one failed (customs), and the shipment
    has moved on since: the error is news all the same."""
    rec, url = receiver
    bridge = await make_bridge(CONFIG.format(window="10m"), {"URL": url})
    await bridge.post({"tracking": [snapshot("t1", 1)]})
    await asyncio.sleep(0.3)
    assert rec.requests == []  # held for the window
    await bridge.post({"tracking": [snapshot("t1", 5, error_at=4)]})
    [got] = await rec.wait_for(1, timeout=15)
    assert got.json() == {"uuid": "t1", "status": "DELIVERED",
                          "new": [ts(i) for i in range(6)], "was": None}


ORDER_CONFIG = """
defaults:
  retry: {initial_delay: 200ms, max_delay: 200ms, max_attempts: 100}
sinks:
  hook: {type: http, url: "${URL}/in", concurrency: 4}
routes:
  - name: shipments
    kind: tracking
    to: hook
    coalesce: 300ms
    message: '{"uuid": "{{ item.uuid }}", "status": "{{ item.status }}"}'
"""


@pytest.mark.parametrize("storage", ["sqlite", "postgres-two-replicas"])
async def test_a_window_waiting_for_a_retry_holds_back_its_shipment_s_next_window_only(
        storage: str, make_bridge: BridgeFactory, aiohttp_server: Any) -> None:
    arrivals: list[tuple[str, str, int]] = []

    async def handle(request: web.Request) -> web.Response:
        data = await request.json()
        failed = sum(1 for a in arrivals if a[2] == 500)
        t2_done = any(a[0] == "t2" for a in arrivals)
        # t1's first window fails 3 times at least, and until t2 arrived (60 at most).
        fail = (data["uuid"] == "t1" and data["status"] == STATUSES[0]
                and (failed < 3 or not t2_done) and failed < 60)
        arrivals.append((data["uuid"], data["status"], 500 if fail else 200))
        return web.Response(status=500 if fail else 200, text="boom" if fail else "ok")

    app = web.Application()
    app.router.add_post("/in", handle)
    server = await aiohttp_server(app)
    env = {"URL": f"http://127.0.0.1:{server.port}"}
    async with AsyncExitStack() as stack:
        if storage == "sqlite":
            bridges = [await make_bridge(ORDER_CONFIG, env)]
        else:
            require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                            "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
            env["STORAGE"] = await stack.enter_async_context(postgres.fresh_database())
            bridges = [await make_bridge(ORDER_CONFIG, env) for _ in range(2)]
        await bridges[0].post({"tracking": [snapshot("t1", 0)]})

        async def first_failed() -> bool:
            return any(a[2] == 500 for a in arrivals)
        await eventually(first_failed, timeout=15, what="t1's first window tried")
        # t1's first window waits for its retry; its next change opens a window of its own,
        # which closes meanwhile. t2 is another shipment.
        await bridges[-1].post({"tracking": [snapshot("t1", 1), snapshot("t2", 0)]})

        async def all_delivered() -> bool:
            return sum(1 for a in arrivals if a[2] == 200) == 3
        await eventually(all_delivered, timeout=30, what="every window delivered")
        t1 = [(status, answer) for uuid, status, answer in arrivals if uuid == "t1"]
        failed = len(t1) - 2
        assert failed >= 3
        assert t1 == [(STATUSES[0], 500)] * failed + [(STATUSES[0], 200),
                                                      (STATUSES[1], 200)], t1
        # t2 went while t1's first window was still failing (the receiver fails it until
        # then, 60 times at most).
        assert failed < 60

        async def settled() -> bool:  # outcomes are written a moment after the answers
            return await bridges[0].rt.store.counts() == {"pending": 0, "delivered": 3,
                                                           "dead": 0}
        await eventually(settled, timeout=10, what="every window marked delivered")
        for bridge in bridges:
            await bridge.client.close()  # before the database is dropped


async def _console_sequencer(routes: list[dict[str, Any]], clock: Callable[[], float]
                             ) -> tuple[Store, Sequencer]:
    """The real sequencer with shipment state on a memory store, `routes` to a console
    sink rendering each item's status, on the given clock."""
    config = BridgeConfig.model_validate({
        "sinks": {"chat": {"type": "console", "message": "{{ item.status }}"}},
        "routes": routes})
    store = from_url("memory://")
    await store.open()
    book = state_book(config.state)
    assert book is not None
    return store, Sequencer(store, Router(compile_routes(config, build_sinks(config))),
                            Metrics(), lambda: None, 86400.0, clock=clock,
                            state=StateKeeping(store, book, 86400.0))


async def test_an_error_change_never_shares_a_window_with_the_change_after_it() -> None:
    """An error change goes at once; the next change of its shipment, in the same batch,
    opens a window. Routed within one millisecond (the clock stands still here), the two
    once got the same window id, and the error change waited for the window's close."""
    now = 1_700_000_000.0
    store, sequencer = await _console_sequencer(
        [{"name": "r", "kind": "tracking", "to": "chat", "coalesce": "60s"}], lambda: now)
    body = {"tracking": [snapshot("t1", 3, error_at=3), snapshot("t1", 4, error_at=3)]}
    await store.append(InboxBatch("b" * 32, now, 2, json.dumps(body).encode()))
    await sequencer.sequence(await store.waiting(TAKE))
    [error] = await store.claim("chat", 10, now, 30)  # at once, alone
    assert error.payload["text"] == "OUT_FOR_DELIVERY"  # its step 3 failed
    assert await store.claim_group("chat", error.group_key or "", 10, now, 30) == []
    await store.complete([error.id], now)
    assert await store.claim("chat", 10, now + 59, 30) == []  # the next change waits
    [held] = await store.claim("chat", 10, now + 60, 30)
    assert held.payload["text"] == "EXCEPTION"


async def test_a_change_routed_after_a_lagging_window_closed_waits_for_it() -> None:
    """The sequencer lags: a change that joined a window before its close is settled after
    it. The window has closed all the same (its members are due at the close, not a window
    after they were stored): the next change's other delivery waits for its message."""
    clock = {"now": 1000.0, "lag": 0.0}
    store, sequencer = await _console_sequencer(
        [{"name": "held", "kind": "tracking", "to": "chat", "coalesce": "10s"},
         {"name": "plain", "kind": "tracking", "to": "chat"}], lambda: clock["now"])
    settle = sequencer._settle

    async def settled_late(rows: list[InboxBatch], outcomes: list[Any]) -> bool:
        clock["now"] += clock["lag"]  # the take's settle comes `lag` after its routing
        return await settle(rows, outcomes)

    sequencer._settle = settled_late  # type: ignore[method-assign]

    async def take(n: int, upto: int, at: float, lag: float = 0.0) -> None:
        clock["now"], clock["lag"] = at, lag
        body = json.dumps({"tracking": [snapshot("t1", upto)]}).encode()
        await store.append(InboxBatch(f"{n:032x}", at, 1, body))
        await sequencer.sequence(await store.waiting(TAKE))

    await take(1, 0, 1000.0)  # opens the window: it closes at 1010
    await take(2, 1, 1008.5, lag=4.5)  # joins it, settled at 1013
    await take(3, 2, 1013.5)  # after the close: a window of its own, and its plain send
    sent = []
    while claimed := await store.claim("chat", 10, 1013.6, 30):
        for d in list(claimed):
            if d.group_key is not None:
                claimed += await store.claim_group("chat", d.group_key, 500, 1013.6, 30)
        sent.append(sorted((d.route, d.payload["text"]) for d in claimed))
        await store.complete([d.id for d in claimed], 1013.6)
    # Change 3's window is open still; its plain send goes after the first window's message.
    assert sent[-1] == [("plain", STATUSES[2])], sent
    assert [("held", STATUSES[0]), ("held", STATUSES[1])] in sent
