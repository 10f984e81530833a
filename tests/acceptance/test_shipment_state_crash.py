"""Issue #13 against real `bridge serve` processes: cumulative tracking snapshots of several
shipments, shuffled, repeated and split over hundreds of batches, become each real change
notified once, in step order, with the full history in shipment_state
- across `kill -9` in the middle of the shipments' sequence (SQLite), and
- through two replicas on one PostgreSQL fed the same shipments, with a sink sending
  several deliveries at once and a receiver that answers some with 503.

What each shipment was notified of is read from what the receiver got (at least once:
repeats dropped by webhook-id), in the order the sequencer made the deliveries (the outbox's
`seq`), and compared with an independent model of the accepted batches."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from bridge.outbox.sqlite import id_of_stored
from tests.acceptance.test_crash_recovery import _post_all
from tests.conftest import require_service
from tests.helpers import postgres
from tests.helpers.bridge import eventually
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.shipments import notified_items
from tests.helpers.tracking_feed import (
    CHAT_MESSAGE,
    FlakyReceiver,
    Note,
    Shipment,
    check_shipment,
    expected_notes,
    feed,
)

pytestmark = pytest.mark.slow

# `chat` notifies each change (the defaults). `all` takes every snapshot, repeats and stale
# ones too, to `fan` sinks: a batch weighs that many deliveries more, so the sequencer settles
# a take in several transactions (bridge/sequencer.py SETTLE_ROWS) and the inbox shows its
# progress. The first of them has an X-Slow header that costs milliseconds to render per
# item, so that sequencing lags the intake and a kill finds batches sequenced and waiting.
HEAD = """
storage: @STORAGE@
server:
  listen: ${BRIDGE_LISTEN}
defaults:
  retry: {initial_delay: 100ms, max_delay: 300ms}
sinks:
  chat:
    type: http
    url: @URL@/chat
    concurrency: @CONCURRENCY@
"""
FAN_SINK = """
  everything-@K@:
    type: http
    url: @URL@/all/@K@
    concurrency: 4
"""
SLOW = """    headers:
      X-Slow: "{% for i in range(@SLOW@) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x"
"""
ROUTES = """
routes:
  - name: chat
    kind: tracking
    to: chat
    message: '@MESSAGE@'
  - name: all
    kind: tracking
    to: [@FAN@]
    dedupe: false
    stale: deliver
"""


def config_text(storage: str, url: str, concurrency: int, fan: int, slow: int) -> str:
    sinks = "".join(FAN_SINK.replace("@K@", str(k)) + (SLOW if k == 0 and slow else "")
                    for k in range(fan))
    fan_names = ", ".join(f"everything-{k}" for k in range(fan))
    return ((HEAD + sinks + ROUTES).replace("@STORAGE@", storage).replace("@URL@", url)
            .replace("@CONCURRENCY@", str(concurrency)).replace("@SLOW@", str(slow))
            .replace("@FAN@", fan_names).replace("@MESSAGE@", CHAT_MESSAGE))


@dataclass
class Outcome:
    """What a run left: the batches in the order they were sequenced, the `chat`
    deliveries in the order the sequencer made them (uuid, id), the states stored."""

    accepted: list[dict[str, Any]]
    made: list[tuple[str, str]]
    states: dict[str, dict[str, Any]]


def check_outcome(ships: list[Shipment], batches: list[dict[str, Any]], outcome: Outcome,
                  receiver: FlakyReceiver, fan: int) -> None:
    """The per-shipment promises of issue #13, and that the receiver got all of it."""
    assert sorted(map(json.dumps, outcome.accepted)) == sorted(map(json.dumps, batches))
    got = receiver.accepted("/chat")
    made_ids = [did for _, did in outcome.made]
    assert len(made_ids) == len(set(made_ids))  # each delivery stored once
    assert set(got) == set(made_ids), "the receiver got exactly what the outbox holds"
    expected = expected_notes(ships, outcome.accepted)
    for ship in ships:
        ids = [did for uuid, did in outcome.made if uuid == ship.uuid]
        notes = [Note.of(got[did]) for did in ids]
        check_shipment(ship, notes, outcome.states.get(ship.uuid))
        assert notes == expected[ship.uuid], ship.uuid
    assert len(made_ids) == notified_items(outcome.accepted)
    # The route that takes everything got each distinct snapshot once (stable ids).
    distinct = {json.dumps(i, sort_keys=True) for b in batches for i in b["tracking"]}
    for k in range(fan):
        assert len(receiver.accepted(f"/all/{k}")) == len(distinct)


# --- 1. kill -9 mid-sequence, SQLite ------------------------------------------------------

def _inbox(db: Path) -> list[tuple[str, bytes]]:
    """(status, body) of every inbox row, in acceptance order."""
    conn = sqlite3.connect(db)
    try:
        return [(s, bytes(b)) for s, b in conn.execute(
            "SELECT status, body FROM inbox ORDER BY seq")]
    finally:
        conn.close()


def _pending(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE status <> 'delivered'").fetchone()[0])
    finally:
        conn.close()


def _sqlite_outcome(db: Path) -> Outcome:
    conn = sqlite3.connect(db)
    try:
        accepted = [json.loads(b) for (b,) in conn.execute(
            "SELECT body FROM inbox ORDER BY sequenced_at, seq")]
        made = [(u, id_of_stored(i)) for u, i in conn.execute(
            "SELECT item_uuid, id FROM deliveries WHERE route = 'chat' ORDER BY seq")]
        states = {u: json.loads(s) for u, s in conn.execute(
            "SELECT uuid, state FROM shipment_state WHERE kind = 'tracking'")}
    finally:
        conn.close()
    return Outcome(accepted, made, states)


def _split_shipments(db: Path) -> int:
    """Shipments with snapshots both sequenced and still waiting."""
    seen: dict[str, set[str]] = {}
    for status, body in _inbox(db):
        for item in json.loads(body)["tracking"]:
            seen.setdefault(item["uuid"], set()).add(status)
    return sum(1 for s in seen.values() if {"sequenced", "waiting"} <= s)


async def _post_at_once(url: str, batches: list[dict[str, Any]], clients: int = 8) -> None:
    await asyncio.gather(*(_post_all(url, batches[i::clients]) for i in range(clients)))


def _sequenced_twice(logs: list[Path]) -> list[str]:
    lines = [json.loads(x) for log in logs for x in log.read_text().splitlines()
             if x.startswith("{")]
    counts = Counter(x["batch_id"] for x in lines if x.get("msg") == "batch sequenced")
    return [b for b, n in counts.items() if n > 1]


FAN = 6


async def test_kill_9_mid_sequence_keeps_state_and_guarantees(
        tmp_path: Path, aiohttp_server: Any) -> None:
    ships, batches = feed(seed=13)
    receiver = FlakyReceiver(fail_share=0.1, max_delay=0.01, seed=13)
    server = await aiohttp_server(receiver.app())
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(config_text(f"sqlite:///{db}", f"http://127.0.0.1:{server.port}",
                                  concurrency=2, fan=FAN, slow=500))
    log = tmp_path / "bridge.log"
    half = len(batches) // 2
    at_kills: list[tuple[int, int, int]] = []

    async def midway(posted: int) -> None:
        """Until a good part of what was posted is sequenced and a good part waits."""
        async def check() -> bool:
            statuses = Counter(s for s, _ in _inbox(db))
            return (statuses["sequenced"] >= posted // 5 and statuses["waiting"] >= posted // 5
                    and statuses["sequenced"] > sum(n for n, _, _ in at_kills[-1:]))
        await eventually(check, timeout=30, what="some batches sequenced, some waiting")

    for phase in (batches[:half], batches[half:]):
        async with BridgeProcess(config, log) as bridge:
            await bridge.start(free_port())
            # Several clients at once (the second time while it catches up): the
            # intake runs ahead of the sequencer. The order is read back from the inbox.
            await _post_at_once(bridge.url, phase)
            posted = len(_inbox(db))
            await midway(posted)
            bridge.kill()
        statuses = Counter(s for s, _ in _inbox(db))
        at_kills.append((statuses["sequenced"], statuses["waiting"], _split_shipments(db)))

    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())

        async def everything_delivered() -> bool:
            inbox = _inbox(db)
            return (all(s == "sequenced" for s, _ in inbox) and _pending(db) == 0
                    and len(inbox) == len(batches))
        await eventually(everything_delivered, timeout=40,
                         what="every batch sequenced and every delivery delivered")
        assert await bridge.terminate() == 0

    for sequenced, waiting, split in at_kills:
        assert sequenced > 0 and waiting > 0, at_kills  # killed in the middle of sequencing
        assert split > 0, at_kills  # ... and of some shipment's sequence
    check_outcome(ships, batches, _sqlite_outcome(db), receiver, FAN)
    assert _sequenced_twice([log]) == []


# --- 2. two replicas on one PostgreSQL ----------------------------------------------------

@dataclass
class ReplicaRun:
    ships: list[Shipment]
    batches: list[dict[str, Any]]
    outcome: Outcome
    receiver: FlakyReceiver
    logs: list[Path]


async def _pg_outcome(dsn: str) -> Outcome:
    conn = await asyncpg.connect(dsn)
    try:
        # The replicas accept at once: BIGSERIAL is not commit ordered, so the order is
        # what the sequencer made of it (a row that committed late is taken later).
        accepted = [json.loads(bytes(r["body"])) for r in await conn.fetch(
            "SELECT body FROM inbox ORDER BY sequenced_at, seq")]
        made = [(r["item_uuid"], r["id"]) for r in await conn.fetch(
            "SELECT item_uuid, id FROM deliveries WHERE route = 'chat' ORDER BY seq")]
        states = {r["uuid"]: json.loads(r["state"]) for r in await conn.fetch(
            "SELECT uuid, state FROM shipment_state WHERE kind = 'tracking'")}
    finally:
        await conn.close()
    return Outcome(accepted, made, states)


async def _two_replicas(tmp_path: Path) -> ReplicaRun:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    ships, batches = feed(seed=31)
    receiver = FlakyReceiver(fail_share=0.25, max_delay=0.03, seed=31)
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        async with postgres.fresh_database() as dsn:
            config = tmp_path / "routes.yaml"
            config.write_text(config_text(dsn, f"http://127.0.0.1:{port}", concurrency=4,
                                          fan=1, slow=0))
            async with BridgeProcess(config, logs[0]) as a, BridgeProcess(config, logs[1]) as b:
                await a.start(free_port())
                await b.start(free_port())
                # The same shipments through both replicas at once: even batches to one,
                # odd ones to the other. The receiver stalls meanwhile, so that each
                # shipment's deliveries then go out close together, several at once.
                receiver.gate.clear()
                await asyncio.gather(_post_all(a.url, batches[0::2]),
                                     _post_all(b.url, batches[1::2]))
                conn = await asyncpg.connect(dsn)
                try:
                    async def all_sequenced() -> bool:
                        return not await conn.fetchval(
                            "SELECT COUNT(*) FROM inbox WHERE status <> 'sequenced'")
                    await eventually(all_sequenced, timeout=20, what="everything sequenced")
                    receiver.gate.set()

                    async def all_done() -> bool:
                        waiting = await conn.fetchval(
                            "SELECT COUNT(*) FROM inbox WHERE status <> 'sequenced'")
                        pending = await conn.fetchval(
                            "SELECT COUNT(*) FROM deliveries WHERE status <> 'delivered'")
                        return bool(waiting == 0 and pending == 0)
                    await eventually(all_done, timeout=40, what="everything delivered")
                finally:
                    await conn.close()
                assert await a.terminate() == 0
                assert await b.terminate() == 0
            outcome = await _pg_outcome(dsn)
    finally:
        receiver.gate.set()  # or cleaning up would wait for the requests it holds
        await runner.cleanup()
    return ReplicaRun(ships, batches, outcome, receiver, logs)


@pytest.fixture(scope="module")
def replica_run(tmp_path_factory: pytest.TempPathFactory) -> ReplicaRun:
    """One run for the tests below (each asserts a part of it); its own event loop, as the
    tests' loops are per function."""
    return asyncio.run(_two_replicas(tmp_path_factory.mktemp("replicas")))


def test_two_replicas_notify_each_change_once_in_step_order(replica_run: ReplicaRun) -> None:
    run = replica_run
    check_outcome(run.ships, run.batches, run.outcome, run.receiver, 1)
    assert _sequenced_twice(run.logs) == []
    # Some first attempts were refused: later deliveries of the same shipment could overtake.
    assert any(a.status == 503 and a.path == "/chat" for a in run.receiver.arrivals)


def test_two_replicas_deliver_each_shipment_in_sequencer_order(
        replica_run: ReplicaRun) -> None:
    """README "Ordering": for one sink, a uuid's deliveries leave in the order the
    sequencer made them; a delivery waiting for a retry holds back the later ones."""
    got = list(replica_run.receiver.accepted("/chat"))
    out_of_order = []
    for ship in replica_run.ships:
        made = [did for uuid, did in replica_run.outcome.made if uuid == ship.uuid]
        if [did for did in got if did in set(made)] != made:
            out_of_order.append(ship.uuid)
    assert got and out_of_order == [], \
        f"{len(out_of_order)} of {len(replica_run.ships)} shipments: {out_of_order}"
