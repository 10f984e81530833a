"""Per-shipment order at a sink, with the real dispatcher and a local HTTP receiver: one
shipment's deliveries leave one after the other in the order they were made, and one that
waits for a retry holds back only its own shipment's later ones."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.dispatch.dispatcher import IDLE_POLL
from tests.conftest import BridgeFactory, require_service
from tests.helpers import postgres
from tests.helpers.bridge import Bridge, eventually

CONFIG = """
defaults:
  retry: {initial_delay: 20ms, max_delay: 100ms, max_attempts: 200}
sinks:
  hook:
    type: http
    url: ${URL}/in
    concurrency: 4
routes:
  - name: all
    kind: tracking
    to: hook
"""
STEPS = ("CREATED", "PICKED_UP", "IN_TRANSIT", "DELIVERED")
A, B, C = (f"{c * 8}-0000-4000-8000-{c * 12}" for c in "abc")


@dataclass
class Arrival:
    shipment: str
    status: str
    answer: int
    at: float


class Receiver:
    """Answers 500 (an answer: the sink stays up, only the delivery is retried) to
    shipment A's first update, at least `at_least` times and until every other shipment's
    updates have arrived, for at most `give_up_after` seconds; 200 to everything else."""

    def __init__(self, others: int, at_least: int = 3, give_up_after: float = 15.0) -> None:
        self.arrivals: list[Arrival] = []
        self.others, self.at_least, self.give_up_after = others, at_least, give_up_after
        self.started: float | None = None

    def delivered(self, shipment: str | None = None) -> list[Arrival]:
        return [a for a in self.arrivals if a.answer == 200
                and (shipment is None or a.shipment == shipment)]

    async def handle(self, request: web.Request) -> web.Response:
        data = (await request.json())["data"]
        now = time.monotonic()
        self.started = self.started or now
        failures = sum(1 for a in self.arrivals if a.answer == 500)
        others_done = sum(1 for a in self.delivered() if a.shipment != A) >= self.others
        fail = (data["uuid"] == A and data["status"] == STEPS[0]
                and (failures < self.at_least or not others_done)
                and now - self.started < self.give_up_after)
        self.arrivals.append(Arrival(data["uuid"], data["status"], 500 if fail else 200, now))
        return web.Response(status=500 if fail else 200, text="boom" if fail else "ok")


def updates(shipment: str) -> list[dict[str, Any]]:
    return [{"uuid": shipment, "status": s, "steps": []} for s in STEPS]


@pytest.fixture(params=["sqlite", "postgres-two-replicas"])
async def bridges(request: pytest.FixtureRequest, make_bridge: BridgeFactory,
                  aiohttp_server: Any) -> AsyncIterator[tuple[list[Bridge], Receiver]]:
    receiver = Receiver(others=2 * len(STEPS))
    app = web.Application()
    app.router.add_post("/in", receiver.handle)
    server: TestServer = await aiohttp_server(app)
    env = {"URL": f"http://127.0.0.1:{server.port}"}
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            yield [await make_bridge(CONFIG, env)], receiver
            return
        require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                        "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
        env["STORAGE"] = await stack.enter_async_context(postgres.fresh_database())
        replicas = [await make_bridge(CONFIG, env) for _ in range(2)]
        yield replicas, receiver
        for bridge in replicas:
            await bridge.client.close()  # before the database is dropped


async def test_a_retry_holds_back_its_own_shipment_only(
    bridges: tuple[list[Bridge], Receiver]
) -> None:
    replicas, receiver = bridges
    # One batch, the shipments' updates interleaved: every delivery is due at once, and the
    # sink has slots for four at a time.
    items = [u for step in zip(updates(A), updates(B), updates(C), strict=True) for u in step]
    status, body = await replicas[0].post({"tracking": items})
    assert status == 200 and body["deliveries"] == 3 * len(STEPS)

    async def all_delivered() -> bool:
        return len(receiver.delivered()) == 3 * len(STEPS)
    await eventually(all_delivered, timeout=30, what="every update delivered")

    for shipment in (A, B, C):
        sent = [a.status for a in receiver.arrivals if a.shipment == shipment]
        if shipment == A:
            failed = sum(1 for a in receiver.arrivals if a.answer == 500)
            assert failed >= 3
            assert sent == [STEPS[0]] * (failed + 1) + list(STEPS[1:]), sent
        else:
            assert sent == list(STEPS), sent  # in order, each once
    # Each next update went out promptly once the one before it was delivered: the
    # dispatcher looks again when it has marked deliveries delivered, not at its idle poll.
    for shipment in (A, B, C):
        times = [a.at for a in receiver.delivered(shipment)]
        gaps = [later - before for before, later in itertools.pairwise(times)]
        assert max(gaps) < IDLE_POLL / 2, (shipment, gaps)
    # B and C were not held up by A's retries: all of theirs arrived while A's first update
    # was still failing (the receiver fails it until then, up to give_up_after).
    a_first = receiver.delivered(A)[0].at
    assert all(a.at < a_first for a in receiver.delivered() if a.shipment != A)
    counts = await replicas[0].rt.store.counts()
    assert counts == {"pending": 0, "delivered": 3 * len(STEPS), "dead": 0}
