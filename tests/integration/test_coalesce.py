"""`coalesce:` on a route: one shipment's changes sequenced within the window go out as one
message carrying all their new steps; a step with an error is never held back. Through the
real intake, sequencer, dispatcher and an HTTP receiver."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import BridgeFactory
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
