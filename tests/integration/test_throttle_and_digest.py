"""Rate limits and digests, end to end: real bridge, real outbox, real HTTP receiver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.models import NewDelivery
from bridge.outbox import from_url
from tests.conftest import BridgeFactory
from tests.helpers.bridge import eventually
from tests.helpers.receiver import Answer, Receiver

pytestmark = pytest.mark.slow


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
    for i, start in enumerate(times):  # in no one-second window more than rate + burst
        assert sum(1 for t in times[i:] if t - start < 1.0) <= 6


async def test_a_429_storm_is_ridden_out_without_dead_letters(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.answer(*[Answer(429, "slow down", {"Retry-After": "1"}) for _ in range(12)])
    bridge = await make_bridge(f"""
defaults:
  retry: {{max_attempts: 2, initial_delay: 50ms, max_delay: 200ms}}
sinks:
  hook: {{type: http, url: "{url}/in", rate_limit: 50/s, burst: 10}}
routes:
  - {{name: all, to: hook}}
""")
    status, body = await bridge.post({"tracking": [_tracking(i) for i in range(10)]})
    assert status == 200 and body["deliveries"] == 10

    async def delivered() -> bool:
        return (await bridge.rt.outbox.counts())["delivered"] == 10
    await eventually(delivered, timeout=60, what="all 10 delivered after the storm")
    assert await bridge.rt.outbox.list_dead() == []
    assert len(rec.requests) >= 22  # every 429 was answered, then each went through


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
        return (await bridge.rt.outbox.counts())["delivered"] == 31
    await eventually(all_delivered, what="every grouped delivery marked delivered")


async def test_group_on_a_sink_without_digests_is_a_config_error(tmp_path: Path) -> None:
    from bridge.config import load_config
    from bridge.errors import ConfigError

    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  k: {type: kafka, bootstrap_servers: 'x:9092', topic: t}\n"
                    "routes:\n  - name: r\n    group: {window: 5s}\n    to: k\n")
    with pytest.raises(ConfigError, match=r"routes\[0\]\.to\[0\]: sink 'k' \(kafka\) cannot send"):
        load_config(path, env={})
