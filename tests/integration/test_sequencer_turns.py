"""The sequencer shares the event loop: it gives it back while it parses a large take, as it
does while it routes, so requests (and, with replicas, its lock's heartbeat) never wait for
a whole take of large bodies."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bridge.config import BridgeConfig
from bridge.metrics import Metrics
from bridge.models import InboxBatch
from bridge.outbox import from_url
from bridge.routing.router import Router, compile_routes
from bridge.runtime import build_sinks
from bridge.sequencer import TAKE, Sequencer, parse_stored


async def test_parsing_a_take_of_large_bodies_gives_the_loop_back() -> None:
    config = BridgeConfig.model_validate({
        "sinks": {"chat": {"type": "console", "message": "{{ item.uuid }}"}},
        "routes": [{"name": "none", "kind": "order", "to": "chat",
                    "when": {"path": "$.never", "exists": True}}]})
    store = from_url("memory://")
    await store.open()
    sequencer = Sequencer(store, Router(compile_routes(config, build_sinks(config))),
                          Metrics(), lambda: None, 86400.0)
    note = "x" * 1000
    for n in range(64):  # ~1 MiB each: many small items, as a large isendu batch is
        body = {"order": [{"uuid": f"o{n}-{i}", "note": note} for i in range(1000)]}
        await store.append(InboxBatch(f"{n:032x}", 100.0, 1000, json.dumps(body).encode()))
    taken = await store.waiting(TAKE)
    started = time.perf_counter()
    for row in taken:  # what parsing (and checking) them alone takes
        parse_stored(row)
    assert time.perf_counter() - started > 0.05  # the case: a take long to parse

    ticks = 0  # turns the loop gave other tasks

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    before_routing: list[int] = []  # ticks when the first item was routed: parsing done
    route_item = sequencer.router.route_item

    def watched(*args: Any, **kwargs: Any) -> Any:
        before_routing.append(ticks)
        return route_item(*args, **kwargs)

    sequencer.router.route_item = watched  # type: ignore[method-assign]  # only watched
    tick = asyncio.create_task(ticker())
    try:
        await sequencer.sequence(taken)
    finally:
        tick.cancel()
    assert (await store.inbox_depth())[0] == 0
    # Parsing gave the loop back every few milliseconds (in one step it gives none).
    assert before_routing[0] >= 5, before_routing[0]
