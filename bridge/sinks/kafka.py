"""`kafka`: produce each delivery to a topic through one aiokafka producer per sink.

The dispatcher hands over up to `batch_size` deliveries at once. All of them are appended to
the producer before any is awaited, so the producer packs them into few requests; a delivery
counts as sent only once the broker acknowledged it (as strongly as `acks` asks).

Every wait of one such attempt (for earlier batches, the producer's start, metadata, buffer
space, acknowledgements) shares one deadline, `delivery_timeout`, so that the attempt ends
well inside the outbox lease on its deliveries: after the lease another replica may claim
them and send them again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import aiokafka.codec
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.config_types import (
    ByteSize,
    PositiveDuration,
    SinkConfigBase,
    TemplateField,
    format_duration,
    refuse_each,
)
from bridge.errors import (
    PermanentSinkError,
    SinkError,
    TemplateRenderError,
    TransientSinkError,
)
from bridge.models import Delivery
from bridge.redact import MASK
from bridge.sinks.base import RenderContext, Sink, excerpt
from bridge.sinks.chat import burst_problem
from bridge.templates import Template, envelope

log = logging.getLogger("bridge.sinks.kafka")

Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
CODEC_AVAILABLE = {
    "none": lambda: True,
    "gzip": aiokafka.codec.has_gzip,
    "snappy": aiokafka.codec.has_snappy,
    "lz4": aiokafka.codec.has_lz4,
    "zstd": aiokafka.codec.has_zstd,
}
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
_LEGAL_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's own rule for topic names

# The longest one attempt of a batch may take. The PostgreSQL outbox leases claimed deliveries
# for 60 s (SQLite: 300 s); an attempt that outlived its lease could be sent again by another
# replica meanwhile. 40 s leaves the rest for writing the outcomes back.
MAX_DELIVERY_TIMEOUT = 40.0
LEASE_NOTE = (f"one attempt of a batch (waiting for the producer, metadata and every "
              f"acknowledgement) must end within {MAX_DELIVERY_TIMEOUT:g}s, well inside the 60s "
              "lease the PostgreSQL outbox gives claimed deliveries, after which another "
              "replica may send them again")

# The broker's answer for this one record or topic; sending it again cannot help.
REFUSED = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.CorruptRecordException,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.PolicyViolationError,
)
AUTH_REFUSED = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.ClusterAuthorizationFailedError,
)
UNREACHABLE = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.NoBrokersAvailable,
    OSError,
)
TIMED_OUT = (kafka_errors.KafkaTimeoutError, kafka_errors.RequestTimedOutError, TimeoutError)
# After these the producer itself is unusable (its sender stopped, its id was fenced ...).
PRODUCER_BROKEN = (
    kafka_errors.ProducerClosed,
    kafka_errors.ProducerFenced,
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.IllegalStateError,
)


def _server_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _acks(value: Any) -> Any:
    if isinstance(value, int | str) and not isinstance(value, bool):
        text = str(value).strip().lower()
        return "all" if text == "-1" else text
    return value


def topic_name_problem(name: str) -> str | None:
    if name in (".", "..") or not _LEGAL_TOPIC.match(name):
        return (f"{name!r} is not a legal Kafka topic name: expected 1 to 249 of "
                "A-Z a-z 0-9 . _ - (and not '.' or '..')")
    return None


class KafkaSinkConfig(SinkConfigBase):
    """Settings that must agree with each other are compared in field validators, not a
    model validator: those run beside every other field's check, so a bad field does not
    hide a contradiction, and each problem is its own error line. A comparison runs in the
    validator of the last setting it reads (with validate_default, so that it runs when
    that setting is left out too; its error then points at the sink)."""

    type: Literal["kafka"]
    bootstrap_servers: Annotated[list[str], BeforeValidator(_server_list)] = Field(min_length=1)
    topic: TemplateField
    key: TemplateField | None = None  # default: the item's uuid
    value: TemplateField | None = None  # default: the JSON envelope of the http sink
    content_type: str = Field("application/json", min_length=1)
    acks: Annotated[Literal["all", "1", "0"], BeforeValidator(_acks)] = "all"
    enable_idempotence: bool = Field(True, validate_default=True)
    compression: Compression = "none"
    linger_ms: int = Field(0, ge=0, le=60_000)
    batch_bytes: ByteSize = 256 * 1024
    max_message_bytes: ByteSize = 1 << 20
    request_timeout: PositiveDuration = 30.0
    # Default: aiokafka's own limit for a record (one expiry, one retry), capped.
    delivery_timeout: PositiveDuration | None = Field(None, validate_default=True)
    client_id: str = Field("isendu-bridge", min_length=1)
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ca_file: str | None = None  # PEM bundle to verify the brokers; default: the system's
    # Last: its validator compares the sasl settings and ca_file with it.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validate_default=True)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, servers: list[str]) -> list[str]:
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port such as kafka-1:9092, got {server!r}")
        return servers

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: Template) -> Template:
        # A templated name is only known per item; the broker judges it at send time.
        if topic.is_static and (problem := topic_name_problem(topic.source)):
            raise ValueError(problem)
        return topic

    @field_validator("compression")
    @classmethod
    def _codec(cls, codec: Compression) -> Compression:
        if not CODEC_AVAILABLE[codec]():
            usable = ", ".join(c for c, ok in CODEC_AVAILABLE.items() if ok())
            raise ValueError(
                f"compression {codec!r} is not available in this install: aiokafka finds no "
                f"{codec} library (it comes with the cramjam package); available here: {usable}")
        return codec

    @field_validator("enable_idempotence")
    @classmethod
    def _idempotence(cls, enabled: bool, info: ValidationInfo) -> bool:
        acks = info.data.get("acks")  # absent: refused by its own check
        if enabled and acks is not None and acks != "all":
            raise ValueError(f"enable_idempotence needs acks: all (got acks: {acks}); "
                             "set enable_idempotence: false to use acks 1 or 0")
        return enabled

    @field_validator("delivery_timeout")
    @classmethod
    def _delivery_timeout(cls, limit: float | None, info: ValidationInfo) -> float | None:
        if limit is not None and limit > MAX_DELIVERY_TIMEOUT:
            raise ValueError(f"delivery_timeout {format_duration(limit)} is too long: "
                             f"expected at most {MAX_DELIVERY_TIMEOUT:g}s, because {LEASE_NOTE}")
        request_timeout = info.data.get("request_timeout")  # absent: refused by its own
        linger_ms = info.data.get("linger_ms")  # check, nothing to compare
        if request_timeout is None or linger_ms is None:
            return limit
        attempt = attempt_timeout(limit, request_timeout, linger_ms)
        if request_timeout + linger_ms / 1000 > attempt:
            given = (f"delivery_timeout {format_duration(attempt)}" if limit is not None
                     else f"delivery_timeout's default {format_duration(attempt)}, the most "
                     "allowed")
            raise ValueError(
                f"request_timeout {format_duration(request_timeout)} + linger_ms "
                f"{linger_ms} do not fit in one attempt ({given}): expected "
                "request_timeout + linger_ms at most delivery_timeout, which is at most "
                f"{MAX_DELIVERY_TIMEOUT:g}s because {LEASE_NOTE}")
        return limit

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, path: str | None) -> str | None:
        # Loaded whatever the protocol (validated after it): with PLAINTEXT, a bundle
        # OpenSSL cannot read is a problem of its own beside "only used with TLS".
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"expected a readable PEM file, but {path!r} is not a file")
            _load_ca_bundle(path)
        return path

    @field_validator("security_protocol")
    @classmethod
    def _protocol(cls, protocol: str, info: ValidationInfo) -> str:
        # Each setting compared here comes before security_protocol: one missing from
        # info.data was refused by its own check, so it was written all the same.
        given = [name for name in (*SASL_SETTINGS, "ca_file")
                 if name not in info.data or info.data[name] is not None]
        mechanism = info.data.get("sasl_mechanism")
        refuse_each([p for p in (_sasl_problem(protocol, given, mechanism),
                                 _tls_problem(protocol, given)) if p])
        return protocol

    @property
    def attempt_timeout(self) -> float:
        """The deadline of one attempt of a batch: `delivery_timeout`, or its default."""
        return attempt_timeout(self.delivery_timeout, self.request_timeout, self.linger_ms)

    @model_validator(mode="after")
    def _burst(self) -> KafkaSinkConfig:
        problem = burst_problem(self, "Kafka")
        if problem:
            raise ValueError(problem)
        return self


def attempt_timeout(delivery_timeout: float | None, request_timeout: float,
                    linger_ms: int) -> float:
    """`delivery_timeout`, or its default: aiokafka's own limit for a record, capped."""
    if delivery_timeout is not None:
        return delivery_timeout
    return min(MAX_DELIVERY_TIMEOUT, 2 * request_timeout + linger_ms / 1000 + 5.0)


SASL_SETTINGS = ("sasl_mechanism", "sasl_username", "sasl_password")


def _sasl_problem(protocol: str, given: list[str], mechanism: str | None) -> str | None:
    sasl_given = [name for name in SASL_SETTINGS if name in given]
    if protocol not in SASL_PROTOCOLS:
        if sasl_given:
            return (f"{', '.join(sasl_given)} given, but security_protocol is {protocol}; "
                    "expected SASL_PLAINTEXT or SASL_SSL")
        return None
    if "sasl_mechanism" not in given:
        return (f"security_protocol {protocol} needs sasl_mechanism: PLAIN, SCRAM-SHA-256 "
                "or SCRAM-SHA-512")
    missing = [name for name in ("sasl_username", "sasl_password") if name not in given]
    if missing:
        named = f"sasl_mechanism {mechanism}" if mechanism else "sasl_mechanism"
        return (f"{named} needs {' and '.join(missing)} "
                "(e.g. sasl_password: ${KAFKA_PASSWORD}, taken from the environment)")
    return None


def _tls_problem(protocol: str, given: list[str]) -> str | None:
    if "ca_file" in given and protocol not in TLS_PROTOCOLS:
        return (f"ca_file is only used with TLS, but security_protocol is {protocol}; "
                "expected SSL or SASL_SSL")
    return None


class KafkaSink(Sink):
    type_name = "kafka"
    config_model = KafkaSinkConfig
    config: KafkaSinkConfig
    batch_size = 500  # the producer batches what it is handed; this is how much at once

    def __init__(self, name: str, config: KafkaSinkConfig) -> None:
        super().__init__(name, config)
        # aiokafka's producer class; tests put a stand-in for the broker client here.
        self.producer_factory: Callable[..., AIOKafkaProducer] = AIOKafkaProducer
        self._producer: AIOKafkaProducer | None = None
        # Held while appending, so chunks enter the producer in the order they were claimed:
        # per-key order then follows acceptance order when nothing fails.
        self._append_lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()  # discarded producers being stopped
        self._content_type = config.content_type.encode()
        self._password = (config.sasl_password.get_secret_value()
                          if config.sasl_password else None)
        self._deadline = config.attempt_timeout

    # ---- intake side ----------------------------------------------------------------------

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        cfg = self.config
        variables = ctx.vars(route, delivery_id)
        topic = cfg.topic.render(variables).strip()
        if not topic:
            raise TemplateRenderError(f"topic template {cfg.topic.source!r} rendered empty")
        key = cfg.key.render(variables) if cfg.key else str(ctx.item.get("uuid", ""))
        template = message or cfg.value
        if template is None:
            value = envelope(delivery_id, ctx.kind, route, ctx.received_at, ctx.item_json)
        else:
            value = template.render(variables)
        return {"topic": topic, "key": key, "value": value}

    # ---- dispatch side --------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> None:
        [error] = await self.send_many([delivery])
        if error is not None:
            raise error

    async def send_many(self, deliveries: list[Delivery]) -> list[SinkError | None]:
        """One attempt for every delivery, ended by one deadline whatever the broker does.

        Nothing after the deadline awaits the broker (a producer given up on is stopped in
        the background), so the call returns within `delivery_timeout` plus bookkeeping.
        """
        deadline = asyncio.get_running_loop().time() + self._deadline
        try:
            async with asyncio.timeout_at(deadline):
                await self._append_lock.acquire()
        except TimeoutError:
            return [self._timed_out("earlier batches were still being handed to the producer")
                    ] * len(deliveries)
        results: list[SinkError | None] = [None] * len(deliveries)
        try:
            producer, waiting = await self._append(deliveries, results, deadline)
        finally:
            self._append_lock.release()
        if producer is not None and waiting:
            await self._await_acks(producer, waiting, results, deadline)
        return results

    async def drop_connections(self) -> None:
        # A producer whose broker is away reconnects and refreshes metadata every
        # retry_backoff_ms, with a log line each time, for as long as the outage lasts.
        if self._producer is not None:
            self._discard(self._producer, "the broker is unreachable")

    async def close(self) -> None:
        async with self._append_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop(producer, abandon=False)  # flush what the producer still holds
        if self._stopping:
            await asyncio.wait(self._stopping)

    def secrets(self) -> list[str]:
        return [self._password] if self._password else []

    def headers(self, delivery: Delivery) -> list[tuple[str, bytes]]:
        return [("kind", delivery.kind.encode()), ("route", delivery.route.encode()),
                ("delivery-id", delivery.id.encode()), ("content-type", self._content_type)]

    async def _append(
        self, deliveries: list[Delivery], results: list[SinkError | None], deadline: float
    ) -> tuple[AIOKafkaProducer | None, list[tuple[int, asyncio.Future[Any]]]]:
        """Hand every delivery to the producer; returns it and the acknowledgements to await."""
        producer: AIOKafkaProducer | None = None
        waiting: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            async with asyncio.timeout_at(deadline):
                producer = await self._ready_producer()
                refused = await self._refused_topics(producer, {d.payload["topic"]
                                                                for d in deliveries})
                for i, d in enumerate(deliveries):
                    if (error := refused.get(d.payload["topic"])) is not None:
                        results[i] = error
                        continue
                    try:
                        ack = await producer.send(d.payload["topic"], d.payload["value"].encode(),
                                                  key=d.payload["key"].encode() or None,
                                                  headers=self.headers(d))
                    except Exception as exc:
                        results[i] = error = self._failure(exc, producer)
                        if isinstance(error, TransientSinkError):
                            # The producer cannot take records now; the rest would wait as long.
                            results[i + 1:] = [error] * (len(deliveries) - i - 1)
                            break
                        continue
                    ack.add_done_callback(_retrieve)
                    waiting.append((i, ack))
        except SinkError as exc:  # no producer, or the broker could not be asked about topics
            results[:] = [exc] * len(deliveries)
            return None, []
        except TimeoutError:
            # Cut off while starting, asking for metadata or waiting for buffer space: what
            # the producer did with the record in hand is unknown, so it is not used again.
            if producer is not None:
                self._discard(producer, "delivery_timeout passed while handing it records")
            handed = {i for i, _ in waiting}
            late = self._timed_out("the producer did not take the record")
            for i in range(len(deliveries)):
                if results[i] is None and i not in handed:
                    results[i] = late
        return producer, waiting

    async def _await_acks(
        self, producer: AIOKafkaProducer, waiting: list[tuple[int, asyncio.Future[Any]]],
        results: list[SinkError | None], deadline: float,
    ) -> None:
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        _, pending = await asyncio.wait([ack for _, ack in waiting], timeout=left)
        for i, ack in waiting:
            if ack in pending:
                results[i] = self._timed_out("no acknowledgement arrived")
            elif ack.cancelled():  # the producer was stopped under it
                results[i] = TransientSinkError("kafka: send cancelled by a producer stop",
                                                "broker_error")
            elif (exc := ack.exception()) is not None:
                results[i] = self._failure(exc, producer)
        if pending:
            self._discard(producer, "acknowledgements did not arrive within delivery_timeout")

    def _failure(self, exc: BaseException, producer: AIOKafkaProducer | None) -> SinkError:
        error = self.classify(exc)
        if producer is not None and (isinstance(exc, PRODUCER_BROKEN)
                                     or not isinstance(exc, kafka_errors.KafkaError | OSError
                                                       | TimeoutError)):
            self._discard(producer, exc.__class__.__name__)
        return error

    def _timed_out(self, what: str) -> TransientSinkError:
        return TransientSinkError(
            f"kafka timed out: {what} within delivery_timeout ({self._deadline:g}s)", "timeout")

    # ---- the producer -------------------------------------------------------------------

    async def _ready_producer(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is not None and not _sender_alive(producer):
            self._discard(producer, "its sender task ended")
            producer = None
        if producer is None:
            producer = self._build_producer()
            try:
                await producer.start()
            except BaseException as exc:  # the deadline's cancellation included
                self._stop_later(producer)
                if isinstance(exc, Exception):
                    raise self._start_error(exc) from None
                raise
            self._producer = producer
            log.info("kafka producer started", extra={"sink": self.name})
        return producer

    def _build_producer(self) -> AIOKafkaProducer:
        cfg = self.config
        try:
            context = self._ssl_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TransientSinkError(
                f"kafka: cannot load ca_file: {exc.__class__.__name__}", "config_error") from None
        return self.producer_factory(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=cfg.client_id,
            acks=cfg.acks if cfg.acks == "all" else int(cfg.acks),
            enable_idempotence=cfg.enable_idempotence,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.batch_bytes,
            max_request_size=cfg.max_message_bytes,
            request_timeout_ms=int(cfg.request_timeout * 1000),
            security_protocol=cfg.security_protocol,
            ssl_context=context,
            sasl_mechanism=cfg.sasl_mechanism or "PLAIN",
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=self._password,
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.security_protocol not in TLS_PROTOCOLS:
            return None
        context: ssl.SSLContext = create_ssl_context(cafile=self.config.ca_file)
        return context

    def _discard(self, producer: AIOKafkaProducer, why: str) -> None:
        """Drop a producer that broke; the next send builds a fresh one."""
        if self._producer is producer:
            self._producer = None
            log.warning("kafka producer will be rebuilt", extra={"sink": self.name, "why": why})
            self._stop_later(producer)

    def _stop_later(self, producer: AIOKafkaProducer) -> None:
        """Stop a producer given up on without making the attempt that gave up wait for it."""
        task = asyncio.create_task(self._stop(producer, abandon=True))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, producer: AIOKafkaProducer, *, abandon: bool) -> None:
        if abandon:
            # Its records already counted as failed and go back to the outbox: delivering
            # them now would only add late duplicates, and an idempotent producer would
            # keep retrying them while the broker is away.
            _fail_pending(producer)
        # A stop waits for requests in flight, each bounded by request_timeout.
        limit = self.config.request_timeout + 5.0 if abandon else self._deadline
        try:
            await asyncio.wait_for(producer.stop(), limit)
        except Exception as exc:
            log.warning("kafka producer did not stop cleanly",
                        extra={"sink": self.name, "error": exc.__class__.__name__})

    async def _refused_topics(
        self, producer: AIOKafkaProducer, topics: set[str]
    ) -> dict[str, SinkError]:
        """Ask the broker about topics the producer has not used yet.

        aiokafka only logs a refused topic name and keeps asking for its metadata until
        request_timeout passes; one direct question turns the broker's answer into a decision.
        """
        refused: dict[str, SinkError] = {}
        for topic in topics:
            if producer.client.cluster.partitions_for_topic(topic) is not None:
                continue
            try:
                code = await _topic_error_code(producer, topic)
            except Exception as exc:
                raise self._failure(exc, producer) from None
            error_type = kafka_errors.for_code(code)
            if code and issubclass(error_type, REFUSED):
                refused[topic] = PermanentSinkError(
                    f"kafka broker refused topic {topic!r}: {error_type.__name__} "
                    f"({error_type.message}, error {code})", "broker_error")
        return refused

    # ---- errors -------------------------------------------------------------------------

    def classify(self, exc: BaseException) -> SinkError:
        """Transient: the broker is away or slow. Permanent: it refused this very record."""
        name = exc.__class__.__name__
        if isinstance(exc, REFUSED):
            return PermanentSinkError(self._reason("broker refused the record", exc),
                                      "broker_error")
        if isinstance(exc, AUTH_REFUSED):
            return PermanentSinkError(self._reason("authentication failed", exc), "auth_error")
        if isinstance(exc, TIMED_OUT):
            return TransientSinkError(self._reason("timed out", exc), "timeout")
        if isinstance(exc, UNREACHABLE):
            return TransientSinkError(self._reason("broker unreachable", exc), "connection_error")
        if isinstance(exc, kafka_errors.KafkaError):
            return TransientSinkError(self._reason("broker error", exc), "broker_error")
        return TransientSinkError(f"kafka: unexpected {name} in the producer", "broker_error")

    def _start_error(self, exc: BaseException) -> SinkError:
        if isinstance(exc, kafka_errors.KafkaConnectionError):
            # aiokafka's own text lists socket tuples, and hides why each server failed.
            sasl = self.config.security_protocol in SASL_PROTOCOLS
            return TransientSinkError(
                "kafka broker unreachable: KafkaConnectionError: no bootstrap server of "
                f"{', '.join(self.config.bootstrap_servers)} accepted the connection"
                + ("; a refused SASL mechanism or password looks the same (aiokafka's log "
                   "names it)" if sasl else ""), "connection_error")
        error = self.classify(exc)
        if (self.config.enable_idempotence and isinstance(exc, kafka_errors.BrokerResponseError)
                and not isinstance(exc, AUTH_REFUSED)):
            # InitProducerId is the only broker request of start() besides metadata.
            error.reason += ("; the broker refused an idempotent producer id "
                             "(InitProducerId): if it does not support them, set "
                             "enable_idempotence: false")
        return error

    def _reason(self, what: str, exc: BaseException) -> str:
        text = excerpt(str(exc)) or exc.__class__.__name__
        if exc.__class__.__name__ not in text:
            text = f"{exc.__class__.__name__}: {text}"
        if self._password:
            text = text.replace(self._password, MASK)
        return f"kafka {what}: {text}"


def _load_ca_bundle(path: str) -> None:
    """Raise ValueError unless OpenSSL loads CA certificates from the PEM file `path`."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        detail = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
        raise ValueError(
            f"ca_file {path!r} is not a PEM CA bundle: OpenSSL loads no certificate from it "
            f"({detail}); expected one or more -----BEGIN CERTIFICATE----- blocks") from None
    except OSError as exc:
        raise ValueError(f"ca_file {path!r} cannot be read: "
                         f"{exc.strerror or exc.__class__.__name__}") from None


def _retrieve(ack: asyncio.Future[Any]) -> None:
    """Mark a failed acknowledgement as seen, so one abandoned by a stop is not reported."""
    if not ack.cancelled():
        ack.exception()


def _fail_pending(producer: AIOKafkaProducer) -> None:
    # Not public in aiokafka: what its sender does itself when it dies.
    fail_all = getattr(getattr(producer, "_message_accumulator", None), "fail_all", None)
    if callable(fail_all):
        fail_all(kafka_errors.KafkaTimeoutError("the bridge gave up on this producer"))


def _sender_alive(producer: AIOKafkaProducer) -> bool:
    # Not public in aiokafka: a producer whose sender task ended never delivers again.
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return task is None or not task.done()


async def _topic_error_code(producer: AIOKafkaProducer, topic: str) -> int:
    """The broker's error code for `topic` in a metadata answer (0: known or just created)."""
    client = producer.client
    node = client.get_random_node()
    if node is None:
        raise kafka_errors.NoBrokersAvailable()
    response = await client.send(node, _metadata_request(topic))
    for entry in response.topics:
        if entry[1] == topic:
            code: int = entry[0]
            return code
    return 0


def _metadata_request(topic: str) -> Any:
    # aiokafka 0.14 picks the protocol version itself; older releases export one class per
    # version in a list, and version 1 is understood by every broker they support.
    if isinstance(MetadataRequest, list | tuple):
        return MetadataRequest[1]([topic])
    return MetadataRequest([topic])
