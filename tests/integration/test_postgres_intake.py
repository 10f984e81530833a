"""The intake on PostgreSQL when the server cannot take a batch (restarted, failed over, out
of reach): a 503 with Retry-After and the reason, no traceback, and /readyz not ready; the
same bridge takes batches again once the server is back; asyncpg's tries to reconnect are
one line each."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import BridgeFactory, require_service
from tests.helpers import postgres
from tests.helpers.bridge import WEBHOOK, sample_batch
from tests.helpers.tcp_proxy import TcpProxy

CONFIG = """
storage: ${PG_URL}
integrations:
  - key_id: shop
    secret: shop-secret-value
sinks:
  out: {type: console}
routes:
  - {name: all, to: out}
"""


async def test_postgres_out_of_reach_is_a_503_with_the_reason_and_then_back(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as pg_url:
        proxy = TcpProxy(5432, 0)
        await proxy.start()
        via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert via_proxy != pg_url
        bridge = await make_bridge(CONFIG, {"PG_URL": via_proxy})
        assert (await bridge.post(sample_batch()))[0] == 200
        caplog.set_level(logging.INFO)

        await proxy.go_down()  # open connections reset, new ones refused
        for _ in range(2):
            resp = await bridge.client.post(WEBHOOK, json=sample_batch())
            assert resp.status == 503, await resp.text()
            assert int(resp.headers["Retry-After"]) > 0
            error = (await resp.json())["error"]
            assert error.startswith("PostgreSQL cannot take writes now ("), error
            assert error.endswith("); nothing was accepted"), error
            assert str(proxy.port) not in error and "bridge_test_" not in error  # no DSN
            ready = await bridge.client.get("/readyz")
            assert ready.status == 503
            reason = (await ready.json())["storage"]
            assert reason.startswith("not writable: PostgreSQL cannot take writes now ("), reason
        # Verification needs no storage: still answered.
        assert await bridge.post({"keyId": "shop"}) == (200, {"response": "shop-secret-value"})
        refused = [r for r in caplog.records if r.getMessage().startswith("batch not accepted")]
        assert len(refused) == 2 and all(r.levelno == logging.WARNING for r in refused)
        intake = [r for r in caplog.records if r.name.startswith("bridge.http")]
        assert not [r for r in intake if r.exc_info or r.levelno >= logging.ERROR]
        # The pool, its connection gone, tries to open one again (1 s, 2 s ... apart): each
        # try is one line with the reason, not asyncpg's 40-line traceback.
        for _ in range(100):
            pool = [r for r in caplog.records if r.name == "asyncpg.pool"]
            if pool:
                break
            await asyncio.sleep(0.05)
        assert pool, "asyncpg's pool did not try to reconnect while the server was away"
        assert all(r.exc_info is None and r.exc_text is None for r in pool), pool
        assert {(r.getMessage(), r.__dict__.get("error")) for r in pool} == {
            ("PostgreSQL: reconnecting the pool failed; retrying", "connection refused")}

        await proxy.start()
        status, answer = await bridge.post(sample_batch())
        assert status == 200 and answer["accepted"] > 0
        ready = await bridge.client.get("/readyz")
        assert ready.status == 200
        await bridge.client.close()
        await proxy.go_down()
