"""One attempt of the Kafka sink ends by one deadline, whatever the broker client does, and a
producer that broke is replaced.

The broker client, aiokafka's AIOKafkaProducer, is played by `FakeProducer`: a real broker
cannot be made to hang in each of these places on cue (tests/integration/test_kafka.py does
the outages a real broker can play). Everything of the sink itself is the real code.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bridge.errors import SinkError, TransientSinkError
from bridge.models import Delivery, Status
from bridge.sinks.kafka import MAX_DELIVERY_TIMEOUT, KafkaSink, KafkaSinkConfig

DEADLINE = 0.3  # delivery_timeout of these tests
SLACK = 0.5  # what a loaded 2-core machine may add to a wait


class Broker:
    """How the fake producers behave right now; tests change it between attempts."""

    def __init__(self) -> None:
        self.mode = "up"  # up | silent (never acknowledges) | start_hangs
        self.take = 10**9  # records a producer takes before send() waits for buffer space
        self.received: list[tuple[str, bytes | None, bytes]] = []
        self.made: list[FakeProducer] = []

    def producer(self, **kwargs: Any) -> FakeProducer:
        made = FakeProducer(self, kwargs)
        self.made.append(made)
        return made


class FakeProducer:
    """The parts of AIOKafkaProducer the sink uses, its two private ones included: the
    sender task (alive while not done) and the accumulator's fail_all."""

    def __init__(self, broker: Broker, kwargs: dict[str, Any]) -> None:
        self.broker = broker
        self.kwargs = kwargs
        self.client = SimpleNamespace(cluster=SimpleNamespace(partitions_for_topic=lambda t: {0}))
        self._sender = SimpleNamespace(sender_task=None)
        self._message_accumulator = self
        self.unacknowledged: list[asyncio.Future[Any]] = []
        self.taken = 0
        self.failed_all: BaseException | None = None
        self.stopped = False

    async def start(self) -> None:
        if self.broker.mode == "start_hangs":
            await asyncio.Event().wait()
        self._sender.sender_task = asyncio.get_running_loop().create_future()

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        if self.taken >= self.broker.take:
            await asyncio.Event().wait()  # the buffer stays full
        self.taken += 1
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.broker.mode == "silent":
            self.unacknowledged.append(ack)
        else:
            self.broker.received.append((topic, key, value))
            ack.set_result(SimpleNamespace(topic=topic, partition=0, offset=self.taken))
        return ack

    def fail_all(self, exc: BaseException) -> None:
        self.failed_all = exc
        for ack in self.unacknowledged:
            if not ack.done():
                ack.set_exception(exc)

    async def stop(self) -> None:
        self.stopped = True


def config(**overrides: Any) -> KafkaSinkConfig:
    return KafkaSinkConfig.model_validate(
        {"type": "kafka", "bootstrap_servers": "127.0.0.1:9", "topic": "t",
         "request_timeout": "200ms", "delivery_timeout": f"{int(DEADLINE * 1000)}ms",
         **overrides})


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
async def sink(broker: Broker) -> Any:
    made = KafkaSink("kafka", config())
    made.producer_factory = broker.producer
    yield made
    await made.close()


def deliveries(count: int, start: int = 0) -> list[Delivery]:
    return [Delivery(id=f"dlv_{n}", sink="kafka", route="r", item_uuid=f"u{n}", kind="tracking",
                     payload={"topic": "t", "key": f"u{n}", "value": f"v{n}"},
                     status=Status.PENDING, attempts=1, next_attempt_at=0.0, created_at=0.0,
                     updated_at=0.0, enqueued_at=0.0)
            for n in range(start, start + count)]


async def timed(sink: KafkaSink, batch: list[Delivery]) -> tuple[list[SinkError | None], float]:
    started = time.monotonic()
    # A bound of the test's own, so that a sink without a deadline fails instead of hanging.
    results = await asyncio.wait_for(sink.send_many(batch), DEADLINE + 5)
    return results, time.monotonic() - started


def timeouts(results: list[SinkError | None], what: str) -> bool:
    return all(isinstance(r, TransientSinkError) and r.kind == "timeout"
               and r.reason.startswith("kafka timed out: ") and what in r.reason
               and "delivery_timeout (0.3s)" in r.reason for r in results)


async def settle() -> None:
    """Let the background stop of a discarded producer run."""
    for _ in range(5):
        await asyncio.sleep(0)


# ---- the deadline ------------------------------------------------------------------------------

async def test_acks_that_never_come_end_the_attempt_and_the_producer_is_rebuilt(
    sink: KafkaSink, broker: Broker
) -> None:
    broker.mode = "silent"
    results, took = await timed(sink, deliveries(5))
    assert DEADLINE - 0.05 <= took < DEADLINE + SLACK
    assert timeouts(results, "no acknowledgement arrived")
    await settle()
    [first] = broker.made
    # Given up on: what it holds is failed (not flushed late as duplicates), and it is stopped.
    assert first.stopped and first.failed_all is not None
    assert all(ack.done() for ack in first.unacknowledged)

    broker.mode = "up"
    results, _ = await timed(sink, deliveries(5))
    assert results == [None] * 5
    assert len(broker.made) == 2 and not broker.made[1].stopped
    assert [key for _, key, _ in broker.received] == [f"u{n}".encode() for n in range(5)]


async def test_a_start_that_never_finishes_is_cut_at_the_deadline(
    sink: KafkaSink, broker: Broker
) -> None:
    broker.mode = "start_hangs"
    results, took = await timed(sink, deliveries(3))
    assert took < DEADLINE + SLACK
    assert timeouts(results, "the producer did not take the record")
    await settle()
    assert broker.made[0].stopped  # the half-started producer is not left behind

    broker.mode = "up"
    assert (await timed(sink, deliveries(3)))[0] == [None] * 3
    assert len(broker.made) == 2


async def test_records_taken_before_the_deadline_count_the_rest_time_out(
    sink: KafkaSink, broker: Broker
) -> None:
    broker.take = 2  # then send() waits for buffer space that never frees
    results, took = await timed(sink, deliveries(5))
    assert took < DEADLINE + SLACK
    assert results[:2] == [None, None]  # acknowledged: delivered, even though the attempt ended
    assert timeouts(results[2:], "the producer did not take the record")
    await settle()
    assert broker.made[0].stopped  # cut off mid-send: not used again

    broker.take = 10**9
    assert (await timed(sink, deliveries(3, start=5)))[0] == [None] * 3
    assert len(broker.made) == 2


async def test_concurrent_attempts_share_no_wait_each_ends_by_its_own_deadline(
    sink: KafkaSink, broker: Broker
) -> None:
    """Attempts queue for the producer one after the other; a queue of eight behind a start
    that hangs must not take eight deadlines."""
    broker.mode = "start_hangs"
    started = time.monotonic()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(sink.send_many(deliveries(2, start=10 * n)) for n in range(8))),
        8 * DEADLINE + 5)
    assert time.monotonic() - started < DEADLINE + SLACK
    for results in outcomes:
        assert all(isinstance(r, TransientSinkError) and r.kind == "timeout" for r in results)
    assert any(timeouts(results, "earlier batches were still being handed to the producer")
               for results in outcomes)


async def test_a_producer_whose_sender_died_is_replaced(sink: KafkaSink, broker: Broker) -> None:
    assert (await timed(sink, deliveries(2)))[0] == [None, None]
    [first] = broker.made
    first._sender.sender_task.set_result(None)  # aiokafka's sender task ended
    assert (await timed(sink, deliveries(2, start=2)))[0] == [None, None]
    await settle()
    assert len(broker.made) == 2 and first.stopped
    assert len(broker.received) == 4


async def test_close_flushes_the_producer_instead_of_failing_what_it_holds(
    broker: Broker
) -> None:
    sink = KafkaSink("kafka", config())
    sink.producer_factory = broker.producer
    assert (await timed(sink, deliveries(1)))[0] == [None]
    await sink.close()
    [producer] = broker.made
    assert producer.stopped and producer.failed_all is None


async def test_the_producer_gets_the_configured_request_timeout(
    sink: KafkaSink, broker: Broker
) -> None:
    await timed(sink, deliveries(1))
    assert broker.made[0].kwargs["request_timeout_ms"] == 200


# ---- what the configuration allows ---------------------------------------------------------------

@pytest.mark.parametrize(("settings", "expected"), [
    ({}, MAX_DELIVERY_TIMEOUT),  # 2 x 30s + 5s, capped
    ({"request_timeout": "1s"}, 7.0),  # aiokafka's own limit: expiry, one retry, and 5s
    ({"request_timeout": "10s", "linger_ms": 500}, 25.5),
    ({"request_timeout": "10s", "delivery_timeout": "12s"}, 12.0),
])
def test_delivery_timeout_default(settings: dict[str, Any], expected: float) -> None:
    cfg = KafkaSinkConfig.model_validate(
        {"type": "kafka", "bootstrap_servers": "k:9092", "topic": "t", **settings})
    assert cfg.attempt_timeout == pytest.approx(expected)


@given(request_timeout=st.floats(0.001, 120), linger_ms=st.integers(0, 60_000),
       delivery_timeout=st.none() | st.floats(0.001, 120))
def test_no_accepted_configuration_outlives_the_lease(
    request_timeout: float, linger_ms: int, delivery_timeout: float | None
) -> None:
    settings: dict[str, Any] = {"type": "kafka", "bootstrap_servers": "k:9092", "topic": "t",
                                "request_timeout": request_timeout, "linger_ms": linger_ms}
    if delivery_timeout is not None:
        settings["delivery_timeout"] = delivery_timeout
    try:
        cfg = KafkaSinkConfig.model_validate(settings)
    except ValidationError as exc:
        assert "60s lease" in str(exc)
        return
    assert cfg.attempt_timeout <= MAX_DELIVERY_TIMEOUT
    assert cfg.request_timeout + cfg.linger_ms / 1000 <= cfg.attempt_timeout


# ---- ca_file ------------------------------------------------------------------------------------

def tls(ca_file: Path | str) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": "k:9093", "topic": "t",
            "security_protocol": "SSL", "ca_file": str(ca_file)}


def test_a_pem_ca_bundle_is_accepted() -> None:
    import certifi  # installed with the test extra (apprise -> requests): never a skip
    assert KafkaSinkConfig.model_validate(tls(certifi.where())).ca_file == certifi.where()


@pytest.mark.parametrize("text", [
    "",
    "not a certificate\n",
    "-----BEGIN CERTIFICATE-----\nMIIBbroken\n-----END CERTIFICATE-----\n",
])
def test_a_file_that_is_no_pem_ca_bundle_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ca.pem"
    path.write_text(text)
    with pytest.raises(ssl.SSLError):  # what the producer would meet at its first start
        ssl.create_default_context(cafile=str(path))
    with pytest.raises(ValidationError) as info:
        KafkaSinkConfig.model_validate(tls(path))
    message = str(info.value)
    assert f"ca_file {str(path)!r} is not a PEM CA bundle" in message
    assert "-----BEGIN CERTIFICATE-----" in message


def test_an_unreadable_ca_file_is_refused() -> None:
    # A regular file whose first bytes cannot be read (EIO), by root too: a file of mode 0
    # would be read by root, which is what the suite runs as here and in CI.
    with pytest.raises(ValidationError, match="cannot be read: Input/output error"):
        KafkaSinkConfig.model_validate(tls("/proc/self/mem"))


def test_a_ca_file_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing.pem"):
        with pytest.raises(ValidationError, match=f"{str(path)!r} is not a file"):
            KafkaSinkConfig.model_validate(tls(path))
