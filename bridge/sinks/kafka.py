"""`kafka`: produce each delivery to a topic through one aiokafka producer per sink.

The dispatcher hands over up to `batch_size` deliveries at once. All of them are appended to
the producer before any is awaited, so the producer packs them into few requests; a delivery
counts as sent only once the broker acknowledged it (as strongly as `acks` asks).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import aiokafka.codec
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from bridge.config_types import ByteSize, Duration, SinkConfigBase, TemplateField
from bridge.errors import (
    PermanentSinkError,
    SinkError,
    TemplateRenderError,
    TransientSinkError,
)
from bridge.models import Delivery
from bridge.redact import MASK
from bridge.sinks.base import RenderContext, Sink, excerpt
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
    type: Literal["kafka"]
    bootstrap_servers: Annotated[list[str], BeforeValidator(_server_list)] = Field(min_length=1)
    topic: TemplateField
    key: TemplateField | None = None  # default: the item's uuid
    value: TemplateField | None = None  # default: the JSON envelope of the http sink
    content_type: str = Field("application/json", min_length=1)
    acks: Annotated[Literal["all", "1", "0"], BeforeValidator(_acks)] = "all"
    enable_idempotence: bool = True
    compression: Compression = "none"
    linger_ms: int = Field(0, ge=0, le=60_000)
    batch_bytes: ByteSize = 256 * 1024
    max_message_bytes: ByteSize = 1 << 20
    request_timeout: Duration = 30.0
    client_id: str = Field("isendu-bridge", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ca_file: str | None = None  # PEM bundle to verify the brokers; default: the system's

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

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"expected a readable PEM file, but {path!r} is not a file")
        return path

    @model_validator(mode="after")
    def _coherent(self) -> KafkaSinkConfig:
        problems = [p for p in (self._idempotence_problem(), self._sasl_problem(),
                                self._tls_problem()) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _idempotence_problem(self) -> str | None:
        if self.enable_idempotence and self.acks != "all":
            return (f"enable_idempotence needs acks: all (got acks: {self.acks}); "
                    "set enable_idempotence: false to use acks 1 or 0")
        return None

    def _sasl_problem(self) -> str | None:
        sasl_set = [k for k in ("sasl_mechanism", "sasl_username", "sasl_password")
                    if getattr(self, k) is not None]
        if self.security_protocol not in SASL_PROTOCOLS:
            if sasl_set:
                return (f"{', '.join(sasl_set)} given, but security_protocol is "
                        f"{self.security_protocol}; expected SASL_PLAINTEXT or SASL_SSL")
            return None
        if self.sasl_mechanism is None:
            return (f"security_protocol {self.security_protocol} needs sasl_mechanism: "
                    "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
        missing = [k for k in ("sasl_username", "sasl_password") if getattr(self, k) is None]
        if missing:
            return (f"sasl_mechanism {self.sasl_mechanism} needs {' and '.join(missing)} "
                    "(e.g. sasl_password: ${KAFKA_PASSWORD}, taken from the environment)")
        return None

    def _tls_problem(self) -> str | None:
        if self.ca_file is not None and self.security_protocol not in TLS_PROTOCOLS:
            return (f"ca_file is only used with TLS, but security_protocol is "
                    f"{self.security_protocol}; expected SSL or SASL_SSL")
        return None


class KafkaSink(Sink):
    type_name = "kafka"
    config_model = KafkaSinkConfig
    config: KafkaSinkConfig
    batch_size = 500  # the producer batches what it is handed; this is how much at once

    def __init__(self, name: str, config: KafkaSinkConfig) -> None:
        super().__init__(name, config)
        self._producer: AIOKafkaProducer | None = None
        # Held while appending, so chunks enter the producer in the order they were claimed:
        # per-key order then follows acceptance order when nothing fails.
        self._append_lock = asyncio.Lock()
        self._content_type = config.content_type.encode()
        self._password = (config.sasl_password.get_secret_value()
                          if config.sasl_password else None)
        # aiokafka gives up on a record after about two request timeouts (expiry, one retry).
        self._ack_timeout = 2 * config.request_timeout + config.linger_ms / 1000 + 5.0

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
        results: list[SinkError | None] = [None] * len(deliveries)
        async with self._append_lock:
            producer, waiting = await self._append(deliveries, results)
        if producer is not None and waiting:
            await self._await_acks(producer, waiting, results)
        return results

    async def close(self) -> None:
        async with self._append_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop(producer)

    def secrets(self) -> list[str]:
        return [self._password] if self._password else []

    def headers(self, delivery: Delivery) -> list[tuple[str, bytes]]:
        return [("kind", delivery.kind.encode()), ("route", delivery.route.encode()),
                ("delivery-id", delivery.id.encode()), ("content-type", self._content_type)]

    async def _append(
        self, deliveries: list[Delivery], results: list[SinkError | None]
    ) -> tuple[AIOKafkaProducer | None, list[tuple[int, asyncio.Future[Any]]]]:
        """Hand every delivery to the producer; returns it and the acknowledgements to await."""
        try:
            producer = await self._ready_producer()
            refused = await self._refused_topics(producer, {d.payload["topic"]
                                                            for d in deliveries})
        except SinkError as exc:
            results[:] = [exc] * len(deliveries)
            return None, []
        waiting: list[tuple[int, asyncio.Future[Any]]] = []
        for i, d in enumerate(deliveries):
            topic = d.payload["topic"]
            if topic in refused:
                results[i] = refused[topic]
                continue
            try:
                ack = await producer.send(topic, d.payload["value"].encode(),
                                          key=d.payload["key"].encode() or None,
                                          headers=self.headers(d))
            except Exception as exc:
                results[i] = error = await self._failure(exc, producer)
                if isinstance(error, TransientSinkError):
                    # The producer cannot take records now; the rest would only wait as long.
                    results[i + 1:] = [error] * (len(deliveries) - i - 1)
                    break
                continue
            ack.add_done_callback(_retrieve)
            waiting.append((i, ack))
        return producer, waiting

    async def _await_acks(
        self, producer: AIOKafkaProducer, waiting: list[tuple[int, asyncio.Future[Any]]],
        results: list[SinkError | None],
    ) -> None:
        _, pending = await asyncio.wait([ack for _, ack in waiting], timeout=self._ack_timeout)
        for i, ack in waiting:
            if ack in pending:
                results[i] = TransientSinkError(
                    f"kafka: no acknowledgement within {self._ack_timeout:g}s", "timeout")
            elif ack.cancelled():  # the producer was stopped under it
                results[i] = TransientSinkError("kafka: send cancelled by a producer stop",
                                                "broker_error")
            elif (exc := ack.exception()) is not None:
                results[i] = await self._failure(exc, producer)
        if pending:
            await self._discard(producer, "acknowledgements stopped arriving")

    async def _failure(self, exc: BaseException, producer: AIOKafkaProducer | None) -> SinkError:
        error = self.classify(exc)
        if producer is not None and (isinstance(exc, PRODUCER_BROKEN)
                                     or not isinstance(exc, kafka_errors.KafkaError | OSError
                                                       | TimeoutError)):
            await self._discard(producer, exc.__class__.__name__)
        return error

    # ---- the producer -------------------------------------------------------------------

    async def _ready_producer(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is not None and not _sender_alive(producer):
            await self._discard(producer, "its sender task ended")
            producer = None
        if producer is None:
            producer = self._build_producer()
            try:
                await producer.start()
            except Exception as exc:
                await self._stop(producer)
                raise self._start_error(exc) from None
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
        return AIOKafkaProducer(
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

    async def _discard(self, producer: AIOKafkaProducer, why: str) -> None:
        """Drop a producer that broke; the next send builds a fresh one."""
        if self._producer is producer:
            self._producer = None
            log.warning("kafka producer will be rebuilt", extra={"sink": self.name, "why": why})
            await self._stop(producer)

    async def _stop(self, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), self._ack_timeout)
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
                raise await self._failure(exc, producer) from None
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


def _retrieve(ack: asyncio.Future[Any]) -> None:
    """Mark a failed acknowledgement as seen, so one abandoned by a stop is not reported."""
    if not ack.cancelled():
        ack.exception()


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
