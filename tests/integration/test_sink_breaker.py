"""A sink whose receiver is away goes down: its deliveries spend no attempts while one probe
at a time asks, /readyz and bridge_sink_up say so, and the first answer brings it back.
(The 60 s outages against a real `bridge serve` are in tests/acceptance/test_long_outage.py.)
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BridgeFactory
from tests.helpers.bridge import Bridge, eventually, sample_batch
from tests.helpers.process import free_port
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.tcp_proxy import TcpProxy

# Without the breaker, three attempts would dead-letter every delivery within a second.
TEAMS = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 3}
sinks:
  teams:
    type: teams
    webhook_url: ${URL}/workflows/abc/triggers/manual/paths/invoke?sig=s3cr3t-signature
    probe_interval: 100ms
routes:
  - name: everything
    to: teams
"""

HOOK = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 3}
sinks:
  hook:
    type: http
    url: ${URL}/in
routes:
  - name: everything
    to: hook
"""


async def sink_up(bridge: Bridge, sink: str) -> float:
    text = await (await bridge.client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bridge_sink_up" and sample.labels == {"sink": sink}:
                return float(sample.value)
    raise AssertionError(f"bridge_sink_up{{sink={sink!r}}} not exported")


async def readyz(bridge: Bridge) -> tuple[int, dict[str, Any]]:
    resp = await bridge.client.get("/readyz")
    return resp.status, await resp.json()


async def settle(bridge: Bridge, delivered: int) -> None:
    async def done() -> bool:
        counts = await bridge.rt.store.counts()
        return counts.get("delivered", 0) == delivered and counts.get("pending", 0) == 0
    await eventually(done, timeout=30, what=f"{delivered} delivered, none pending")


async def test_a_gateway_answering_503_takes_a_chat_sink_down_without_spending_attempts(
    make_bridge: BridgeFactory, aiohttp_server: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Receiver(default=Answer(503, "<html>Service Unavailable</html>"))
    server = await aiohttp_server(rec.app())
    caplog.set_level(logging.INFO)
    bridge = await make_bridge(TEAMS, {"URL": f"http://127.0.0.1:{server.port}"})
    status, answer = await bridge.post(sample_batch())
    assert status == 200
    accepted = answer["deliveries"]
    assert accepted > 3

    async def down() -> bool:
        return await sink_up(bridge, "teams") == 0
    await eventually(down, timeout=30, what="bridge_sink_up{sink=teams} == 0")
    before = len(rec.requests)
    await rec.wait_for(before + 10, timeout=30)  # probes, one at a time, 100 ms apart
    status, body = await readyz(bridge)
    assert status == 200
    assert body["sinks_down"]["teams"]["cause"] == (
        "Teams workflow answered HTTP 503: <html>Service Unavailable</html>")
    assert body["sinks_down"]["teams"]["probes"] >= 10
    dead = await bridge.rt.store.list_dead()
    assert dead == []  # ten probes, max_attempts 3: none of them was counted
    assert "s3cr3t-signature" not in str(body)

    rec.default = Answer(202, "")
    await settle(bridge, accepted)
    assert await sink_up(bridge, "teams") == 1
    status, body = await readyz(bridge)
    assert status == 200 and "sinks_down" not in body
    lines = [r for r in caplog.records if r.name == "bridge.dispatch"]
    went = [r for r in lines if r.getMessage().startswith("sink down")]
    back = [r for r in lines if r.getMessage() == "sink back up"]
    assert len(went) == 1 and len(back) == 1
    assert back[0].__dict__["probes"] >= 10 and back[0].__dict__["down_for"] > 0.5
    # Before it went down: at most the two unreachable attempts that were still counted.
    assert len([r for r in lines if r.getMessage() == "will retry"]) <= 2


async def test_a_refused_connection_holds_deliveries_until_the_receiver_returns(
    make_bridge: BridgeFactory, aiohttp_server: Any,
) -> None:
    rec = Receiver()
    server = await aiohttp_server(rec.app())
    proxy = TcpProxy(target_port=server.port, port=free_port())  # not started: refused
    try:
        bridge = await make_bridge(HOOK, {"URL": f"http://127.0.0.1:{proxy.port}"})
        status, answer = await bridge.post(sample_batch())
        assert status == 200

        async def down() -> bool:
            return await sink_up(bridge, "hook") == 0
        await eventually(down, timeout=30, what="bridge_sink_up{sink=hook} == 0")
        status, body = await readyz(bridge)
        assert "cannot connect to receiver" in body["sinks_down"]["hook"]["cause"]

        async def probed_a_while() -> bool:
            return (await readyz(bridge))[1]["sinks_down"]["hook"]["probes"] >= 5
        await eventually(probed_a_while, timeout=30, what="five probes")
        assert await bridge.rt.store.list_dead() == []
        await proxy.start()
        await settle(bridge, answer["deliveries"])
        # Each delivery spent at most the attempts made before the sink went down, plus one.
        ids = {r.headers["webhook-id"] for r in rec.requests}
        rows = [await bridge.rt.store.get(i) for i in ids]
        assert all(row is not None and row.attempts <= 3 for row in rows)
        assert len(ids) == answer["deliveries"]
    finally:
        await proxy.close()


async def test_a_500_is_an_answer_the_sink_stays_up(
    make_bridge: BridgeFactory, aiohttp_server: Any,
) -> None:
    rec = Receiver(default=Answer(500, "boom"))
    server = await aiohttp_server(rec.app())
    bridge = await make_bridge(HOOK, {"URL": f"http://127.0.0.1:{server.port}"})
    status, answer = await bridge.post(sample_batch())
    assert status == 200

    async def all_dead() -> bool:
        return len(await bridge.rt.store.list_dead()) == answer["deliveries"]
    await eventually(all_dead, timeout=30, what="every delivery dead after max_attempts")
    assert len(rec.requests) == 3 * answer["deliveries"]
    assert await sink_up(bridge, "hook") == 1
