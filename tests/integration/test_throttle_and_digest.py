"""Rate limits and digests, end to end: real bridge, real outbox, real HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.models import NewDelivery
from bridge.outbox import from_url
from tests.conftest import BridgeFactory
from tests.helpers.bridge import eventually
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Answer, Receiver

pytestmark = pytest.mark.slow

JITTER = 0.1  # seconds of receiver-side timing noise forgiven (event loop, 2-core CI boxes)


def over_limit(times: list[float], rate: float, burst: int) -> list[tuple[int, int]]:
    """Every stretch of consecutive arrivals that a (rate, burst) token bucket would not allow:
    n sends within d seconds need n <= burst + rate * d (sliding window over all pairs)."""
    times = sorted(times)
    return [(i, j) for i in range(len(times)) for j in range(i + 1, len(times))
            if j - i + 1 > burst + rate * (times[j] - times[i] + JITTER) + 1e-9]


def _tracking(i: int, error: bool = False) -> dict[str, Any]:
    step: dict[str, Any] = {"timestamp": f"2025-11-03T10:{i % 60:02d}:00Z", "status": "IN_TRANSIT",
                            "description": "Hub scan", "location": "Milano"}
    if error:
        step["error"] = {"code": "ADDR", "message": "address not found"}
    return {"uuid": f"ship-{i}", "status": "EXCEPTION" if error else "IN_TRANSIT",
            "trackingNumber": f"GLS{i:06d}", "steps": [step]}


async def test_rate_limit_holds_even_right_after_a_restart_with_a_backlog(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    rec, url = receiver
    # A backlog left by an earlier process: 50 deliveries due now.
    box = from_url(f"sqlite:///{tmp_path}/bridge.db")
    await box.open()
    await box.enqueue([NewDelivery(f"d{i:03d}", "hook", "r", f"u{i}", "tracking",
                                   {"body": json.dumps({"n": i})}, "b") for i in range(50)], 0.0)
    await box.close()

    await make_bridge(f"""
sinks:
  hook: {{type: http, url: "{url}/in", rate_limit: 5/s, concurrency: 8}}
routes: []
""")
    got = await rec.wait_for(50, timeout=60)
    times = sorted(r.at for r in got)
    assert times[-1] - times[0] >= 9.0  # 50 at 5/s, burst 1: ~9.8 s of sink-side time
    assert over_limit(times, rate=5.0, burst=1) == []


RESTART_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN}}
sinks:
  hook: {{type: http, url: "{url}/in", rate_limit: 2/s, burst: 4, concurrency: 4}}
routes:
  - name: every-item
    to: hook
"""


async def test_rate_limit_holds_across_a_real_restart(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """One `bridge serve` spends its full burst and is stopped; a second one on the same
    storage carries on. Seen from the receiver, the two together keep to 2/s with burst 4:
    the new process does not get a fresh burst on top of the one just spent."""
    rec = Receiver()
    server = await aiohttp_server(rec.app())
    db, config = tmp_path / "bridge.db", tmp_path / "routes.yaml"
    config.write_text(RESTART_CONFIG.format(db=db, url=f"http://127.0.0.1:{server.port}"))
    rate, burst, total = 2.0, 4, 12

    async with BridgeProcess(config, tmp_path / "first.log") as first:
        await first.start(free_port())
        await asyncio.sleep(burst / rate + 0.3)  # idle long enough for the bucket to fill
        async with aiohttp.ClientSession() as session:
            body = json.dumps({"tracking": [_tracking(i) for i in range(total)]})
            async with session.post(f"{first.url}/isendu/webhook", data=body) as resp:
                assert resp.status == 200 and (await resp.json())["accepted"] == total
        await rec.wait_for(burst, timeout=10)  # the burst went out at once ...
        assert await first.terminate() == 0  # ... and the bridge is stopped right after it
    stopped_at, sent_by_first = time.monotonic(), len(rec.requests)
    assert sent_by_first < total

    async with BridgeProcess(config, tmp_path / "second.log") as second:
        await second.start(free_port())
        ready_at = time.monotonic()
        await rec.wait_for(total, timeout=30)
        await asyncio.sleep(0.5)  # nothing more should come
        assert await second.terminate() == 0

    uuids = [r.json()["data"]["uuid"] for r in rec.requests]
    assert sorted(uuids) == sorted(f"ship-{i}" for i in range(total))  # each once, none lost
    times = [r.at for r in rec.requests]
    # The test can see a restart burst: the second process was ready sooner after the first
    # burst than a full bucket's worth of time, so `burst` more at once would break the limit.
    assert ready_at - times[burst - 1] < burst / rate, "restart too slow to tell"
    assert all(t > stopped_at for t in times[sent_by_first:])
    assert over_limit(times, rate, burst) == []


async def test_a_429_storm_is_ridden_out_without_dead_letters(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    """Each 429's Retry-After is waited out in full before the next request (the sink holds
    back for up to max_delay); no attempt is spent on it (max_attempts 2, yet one delivery
    may meet several 429s)."""
    rec, url = receiver
    waits = [1, 2, 1, 1, 1]
    rec.answer(*[Answer(429, "slow down", {"Retry-After": str(n)}) for n in waits])
    bridge = await make_bridge(f"""
defaults:
  retry: {{max_attempts: 2, initial_delay: 50ms, max_delay: 5s}}
sinks:
  hook: {{type: http, url: "{url}/in", rate_limit: 50/s, burst: 10, concurrency: 1}}
routes:
  - {{name: all, to: hook}}
""")
    status, body = await bridge.post({"tracking": [_tracking(i) for i in range(10)]})
    assert status == 200 and body["deliveries"] == 10

    async def delivered() -> bool:
        return (await bridge.rt.store.counts())["delivered"] == 10
    await eventually(delivered, timeout=60, what="all 10 delivered after the storm")
    assert await bridge.rt.store.list_dead() == []
    got = rec.requests
    assert len(got) == len(waits) + 10  # every 429 was answered, then each went through
    for n, wait in enumerate(waits):  # one send at a time: request n + 1 follows answer n
        gap = got[n + 1].at - got[n].at
        assert gap >= wait - 0.05, f"request {n + 1} came {gap:.2f}s after a Retry-After {wait}"
    uuids = [r.json()["data"]["uuid"] for r in got[len(waits):]]
    assert sorted(uuids) == sorted(f"ship-{i}" for i in range(10))


async def test_digest_groups_items_and_errors_skip_the_queue(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    bridge = await make_bridge(f"""
sinks:
  hook: {{type: http, url: "{url}/in", rate_limit: "off"}}
routes:
  - name: updates
    kind: tracking
    group: {{window: 2s, max_items: 20}}
    to: hook
""")
    items = [_tracking(i) for i in range(30)] + [_tracking(99, error=True)]
    status, body = await bridge.post({"tracking": items})
    assert status == 200 and body["deliveries"] == 31

    [first] = await rec.wait_for(1, timeout=10)
    alone = first.json()
    assert alone["data"]["uuid"] == "ship-99"  # the error item went at once, on its own
    assert len(rec.requests) == 1  # the others wait for the window

    got = await rec.wait_for(3, timeout=20)
    digests = [r.json() for r in got[1:]]
    assert [d["kind"] for d in digests] == ["digest", "digest"]
    assert sorted(d["count"] for d in digests) == [10, 20]
    uuids = [item["data"]["uuid"] for d in digests for item in d["items"]]
    assert sorted(uuids) == sorted(f"ship-{i}" for i in range(30))
    assert got[1].at - first.at >= 1.0  # the window was waited for

    async def all_delivered() -> bool:
        return (await bridge.rt.store.counts())["delivered"] == 31
    await eventually(all_delivered, what="every grouped delivery marked delivered")


async def test_group_on_a_sink_without_digests_is_a_config_error(tmp_path: Path) -> None:
    from bridge.config import load_config
    from bridge.errors import ConfigError

    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  k: {type: kafka, bootstrap_servers: 'x:9092', topic: t}\n"
                    "routes:\n  - name: r\n    group: {window: 5s}\n    to: k\n")
    with pytest.raises(ConfigError, match=r"routes\[0\]\.to\[0\]: sink 'k' \(kafka\) cannot send"):
        load_config(path, env={})
