"""A real `bridge serve`, killed with SIGKILL between accepting and sequencing, and in the
middle of sequencing under load: every accepted batch is routed after the restart, no
delivery is lost and none is stored twice. And two replicas on one PostgreSQL, the one
holding the sequencer killed mid-load: the other takes over within seconds."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.outbox.postgres import SEQUENCER_HEARTBEAT, SEQUENCER_SILENT_FOR
from tests.acceptance.test_crash_recovery import _post_all
from tests.conftest import require_service
from tests.helpers import postgres
from tests.helpers.bridge import eventually, sample_batches
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.shipments import notified_items

pytestmark = pytest.mark.slow

# The X-Slow header's template takes milliseconds per item, so sequencing lags the intake
# and a kill finds batches waiting and batches half-way (as a busy bridge would).
CONFIG = """
storage: {storage}
server:
  listen: ${{BRIDGE_LISTEN}}
defaults:
  retry: {{initial_delay: 100ms, max_delay: 500ms}}
sinks:
  hook:
    type: http
    url: {url}/in
    concurrency: 4
    headers:
      X-Slow: "{{% for i in range({outer} * 100) %}}{{% endfor %}}x"
routes:
  - name: every-item
    to: hook
"""


def _inbox(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT status, COUNT(*) FROM inbox GROUP BY status"))
    finally:
        conn.close()


def _deliveries(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])
    finally:
        conn.close()


def _sequenced_lines(log: Path) -> Counter[str]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return Counter(x["batch_id"] for x in lines if x.get("msg") == "batch sequenced")


async def test_kill_9_before_and_while_sequencing(tmp_path: Path, aiohttp_server: Any) -> None:
    receiver = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(receiver.app())
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(storage=f"sqlite:///{db}", outer=300,
                                    url=f"http://127.0.0.1:{server.port}"))
    log = tmp_path / "bridge.log"
    batches = sample_batches()
    first, second = batches[:25], batches[25:]

    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())
        ids = await _post_all(bridge.url, first)
        bridge.kill()  # right after the last 200: the sequencer is far behind
    at_first_kill = _inbox(db)
    assert at_first_kill.get("waiting", 0) > 0, at_first_kill  # accepted, not yet routed
    assert sum(at_first_kill.values()) == len(ids)  # every 200 was a stored row

    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())
        ids += await _post_all(bridge.url, second)  # load while it catches up

        def halfway() -> bool:
            inbox = _inbox(db)
            return inbox.get("sequenced", 0) > 0 and inbox.get("waiting", 0) > 0

        await eventually(_async(halfway),
                         timeout=60, what="some batches sequenced, some waiting")
        bridge.kill()  # in the middle of sequencing
    assert sum(_inbox(db).values()) == len(ids) == len(batches)

    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())

        async def everything_delivered() -> bool:
            return _inbox(db) == {"sequenced": len(ids)} and receiver_ids() >= expected

        expected = notified_items(batches)

        def receiver_ids() -> int:
            return len({r.headers["webhook-id"] for r in receiver.requests})

        await eventually(everything_delivered, timeout=180,
                         what="every accepted batch sequenced and every delivery sent")
        assert await bridge.terminate() == 0
    assert _deliveries(db) == expected  # none stored twice, none lost
    assert receiver_ids() == expected
    # A batch is logged as sequenced only after its commit: never twice.
    assert max(_sequenced_lines(log).values()) == 1


def _async(check: Any) -> Any:
    async def run() -> bool:
        return bool(check())
    return run


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    try:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


async def _sequencer_of(session: aiohttp.ClientSession,
                        replicas: list[BridgeProcess]) -> BridgeProcess:
    """The replica that says it holds the sequencer (polled for up to 10 s)."""
    for _ in range(100):
        active = [await _metric(session, r.url, "bridge_sequencer_active") for r in replicas]
        if 1.0 in active:
            return replicas[active.index(1.0)]
        await asyncio.sleep(0.1)
    raise AssertionError("neither replica says it is the sequencer")


async def _all_delivered(dsn: str, accepted: int) -> tuple[int, list[Any]]:
    """Wait until all `accepted` batches are sequenced and every delivery delivered; the
    deliveries stored and the batches in the order they were sequenced."""
    conn = await asyncpg.connect(dsn)
    try:
        async def all_done() -> bool:
            rows = await conn.fetch("SELECT status, COUNT(*) AS n FROM inbox GROUP BY status")
            pending = await conn.fetchval(
                "SELECT COUNT(*) FROM deliveries WHERE status <> 'delivered'")
            return {r["status"]: r["n"] for r in rows} == {"sequenced": accepted} \
                and pending == 0
        await eventually(all_done, timeout=180, what="every accepted item delivered")
        stored = int(await conn.fetchval("SELECT COUNT(*) FROM deliveries"))
        # Posted through both replicas at once, the batches were accepted (and so
        # sequenced) in an order of their own: what is news depends on it.
        bodies = await conn.fetch("SELECT body FROM inbox ORDER BY sequenced_at, seq")
        return stored, [json.loads(bytes(r["body"])) for r in bodies]
    finally:
        await conn.close()


def _each_change_once(batches: list[Any], stored: int, in_sequence: list[Any],
                      receiver: Receiver, logs: list[Path]) -> None:
    assert sorted(map(json.dumps, in_sequence)) == sorted(map(json.dumps, batches))
    assert stored == notified_items(in_sequence) == len({r.headers["webhook-id"]
                                                       for r in receiver.requests})
    lines = _sequenced_lines(logs[0]) + _sequenced_lines(logs[1])
    assert max(lines.values()) == 1  # no batch sequenced twice


async def test_replica_holding_the_sequencer_killed_mid_load(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    receiver = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(receiver.app())
    batches = sample_batches()
    async with postgres.fresh_database() as dsn:
        config = tmp_path / "routes.yaml"
        config.write_text(CONFIG.format(storage=dsn, outer=1000,
                                        url=f"http://127.0.0.1:{server.port}"))
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        async with BridgeProcess(config, logs[0]) as a, BridgeProcess(config, logs[1]) as b, \
                aiohttp.ClientSession() as session:
            await a.start(free_port())
            await b.start(free_port())
            replicas = [a, b]
            posted = await asyncio.gather(*(_post_all(replicas[i % 2].url, [batch])
                                            for i, batch in enumerate(batches[:24])))
            ids = [i for one in posted for i in one]
            holder = await _sequencer_of(session, replicas)
            survivor = b if holder is a else a
            conn = await asyncpg.connect(dsn)
            try:
                waiting = await conn.fetchval(
                    "SELECT COUNT(*) FROM inbox WHERE status = 'waiting'")
            finally:
                await conn.close()
            holder.kill()
            killed = time.monotonic()

            async def survivor_sequences() -> bool:
                return await _metric(session, survivor.url, "bridge_sequencer_active") == 1.0

            await eventually(survivor_sequences, timeout=15, what="the other replica takes over")
            took_over = time.monotonic() - killed
            ids += await _post_all(survivor.url, batches[24:])
            stored, in_sequence = await _all_delivered(dsn, len(ids))
    assert waiting > 0  # it died with work left to sequence
    assert took_over < 15  # "within seconds": the lock goes with the dead connection
    _each_change_once(batches, stored, in_sequence, receiver, logs)


async def test_replica_holding_the_sequencer_frozen_mid_load_is_taken_over(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """SIGSTOP, as a paused container or a replica cut off from the database looks to the
    server: its session stays open with the lock. The other replica ends that session once
    it has been silent for SEQUENCER_SILENT_FOR, and takes over; the frozen one, resumed,
    finds its session gone and sequences nothing twice."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    receiver = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(receiver.app())
    batches = sample_batches()
    async with postgres.fresh_database() as dsn:
        config = tmp_path / "routes.yaml"
        config.write_text(CONFIG.format(storage=dsn, outer=1000,
                                        url=f"http://127.0.0.1:{server.port}"))
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        async with BridgeProcess(config, logs[0]) as a, BridgeProcess(config, logs[1]) as b, \
                aiohttp.ClientSession() as session:
            await a.start(free_port())
            await b.start(free_port())
            replicas = [a, b]
            posted = await asyncio.gather(*(_post_all(replicas[i % 2].url, [batch])
                                            for i, batch in enumerate(batches[:24])))
            ids = [i for one in posted for i in one]
            holder = await _sequencer_of(session, replicas)
            survivor = b if holder is a else a
            assert holder.proc is not None
            holder.proc.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                async def survivor_sequences() -> bool:
                    return await _metric(session, survivor.url,
                                         "bridge_sequencer_active") == 1.0

                await eventually(survivor_sequences, timeout=30,
                                 what="the other replica takes over")
                took_over = time.monotonic() - frozen
                ids += await _post_all(survivor.url, batches[24:])
            finally:
                holder.proc.send_signal(signal.SIGCONT)
            stored, in_sequence = await _all_delivered(dsn, len(ids))
            # The resumed replica keeps serving, now as a contender.
            assert await _metric(session, holder.url, "bridge_sequencer_active") == 0.0
    # Silent since its last statement, up to a heartbeat before it was stopped.
    assert SEQUENCER_SILENT_FOR - SEQUENCER_HEARTBEAT <= took_over < SEQUENCER_SILENT_FOR + 10
    _each_change_once(batches, stored, in_sequence, receiver, logs)
    said = [json.loads(x) for log in logs for x in log.read_text().splitlines()
            if x.startswith("{")]
    assert any(x.get("msg", "").startswith("the sequencer's holder was silent") for x in said)
