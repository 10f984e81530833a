"""Two bridges sharing one PostgreSQL database: work is shared, nothing sent twice or lost."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import BridgeFactory, require_service
from tests.helpers import postgres
from tests.helpers.bridge import Bridge, eventually, sample_batches
from tests.helpers.receiver import Answer, Receiver

CONFIG = """
storage: ${PG_URL}
integrations:
  - key_id: shop
    secret: shop-secret-value
sinks:
  hook: {type: http, url: "${URL}/in", concurrency: 4}
routes:
  - {name: all, to: hook}
"""


async def _delivered_metric(bridge: Bridge) -> float:
    text = await (await bridge.client.get("/metrics")).text()
    line = 'bridge_deliveries_total{outcome="delivered",sink="hook"} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


async def test_two_replicas_share_the_outbox(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    rec, url = receiver
    rec.default = Answer(200, "ok", delay=0.02)  # slow enough that both replicas get work
    async with postgres.fresh_database() as pg_url:
        env = {"PG_URL": pg_url, "URL": url}
        a = await make_bridge(CONFIG, env)
        b = await make_bridge(CONFIG, env)
        batches = sample_batches()
        answers = await asyncio.gather(*(
            (a if i % 2 else b).post(batch) for i, batch in enumerate(batches)))
        assert all(status == 200 for status, _ in answers)
        accepted = sum(body["deliveries"] for _, body in answers)
        assert accepted > 100

        async def all_delivered() -> bool:
            return (await a.rt.store.counts())["delivered"] == accepted
        await eventually(all_delivered, timeout=90, what="every delivery delivered once")

        ids = Counter(r.headers["webhook-id"] for r in rec.requests)
        assert len(ids) == accepted and max(ids.values()) == 1  # no delivery sent twice
        a_sent, b_sent = [await _delivered_metric(x) for x in (a, b)]
        assert a_sent > 0 and b_sent > 0 and a_sent + b_sent == accepted
        # the verification answer needs no storage, on either replica
        assert await b.post({"keyId": "shop"}) == (200, {"response": "shop-secret-value"})
        await a.client.close()
        await b.client.close()
