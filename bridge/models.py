"""The few shapes data takes on its way through the bridge."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["order", "tracking"]
KINDS: tuple[Kind, ...] = ("order", "tracking")


class Status(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Item:
    """One order or tracking snapshot from a batch; `data` passes through untouched."""

    kind: Kind
    uuid: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    received_at: str  # ISO 8601, UTC
    items: list[Item]
    unknown_keys: tuple[str, ...] = ()  # the body's keys, if it had neither order nor tracking


# Group keys of a coalescing route's windows begin so: a window's deliveries leave together
# as its last one (a `group:` digest's keys are "route>sink" and leave as one list).
COALESCED = "coalesce:"


@dataclass(slots=True)
class NewDelivery:
    """What routing produces and the outbox stores in the sequencer's transaction.

    `payload` holds the sink's rendered fields (e.g. {"body": ...}); `error` set means
    rendering failed and the delivery is stored dead with that reason.
    """

    id: str
    sink: str
    route: str
    item_uuid: str
    kind: Kind
    payload: dict[str, str]
    batch_id: str
    error: str | None = None
    group_key: str | None = None  # set: wait `delay` seconds, then go out as one digest
    delay: float = 0.0


@dataclass(slots=True)
class Delivery:
    """A delivery as stored in the outbox."""

    id: str
    sink: str
    route: str
    item_uuid: str
    kind: Kind
    payload: dict[str, str]
    status: Status
    attempts: int
    next_attempt_at: float  # unix seconds
    created_at: float
    updated_at: float
    enqueued_at: float  # when it last became pending from scratch; `max_age` counts from here
    last_error: str | None = None
    batch_id: str | None = None
    group_key: str | None = None
    # Set on a claimed delivery: the lease it was claimed with, which identifies the claim
    # (after it runs out, another replica's claim sets another).
    lease_until: float | None = None
    # Set on a claimed delivery: its place in the order the sequencer made deliveries.
    seq: int = 0


class BatchStatus(enum.StrEnum):
    WAITING = "waiting"  # accepted (durable), not routed yet
    SEQUENCED = "sequenced"  # routed; its deliveries are in the outbox
    FAILED = "failed"  # routing it raised; kept until `bridge batches reroute`


@dataclass(frozen=True, slots=True)
class InboxBatch:
    """An accepted batch as the inbox keeps it: the body as received (after undoing its
    Content-Encoding), parsed again by the sequencer."""

    id: str
    received_at: float  # unix seconds
    items: int
    body: bytes
    rerouted: bool = False  # sequenced before and sent back by `bridge batches reroute`


@dataclass(slots=True)
class BatchInfo:
    """A batch as `bridge batches` shows it."""

    id: str
    received_at: float
    items: int
    status: BatchStatus
    deliveries: int | None = None  # new deliveries it made
    duplicates: int | None = None  # deliveries already stored (a repeated item)
    error: str | None = None
    sequenced_at: float | None = None
    summary: str | None = None  # JSON: per item, the routes matched and the deliveries made
    body: bytes | None = None


@dataclass(slots=True)
class Sequenced:
    """A batch routed: its deliveries, stored with it marked sequenced in one transaction,
    and the shipment states it changed ((kind, uuid) -> the state as JSON)."""

    batch_id: str
    deliveries: list[NewDelivery]
    summary: str
    states: dict[tuple[str, str], str] = field(default_factory=dict)
    # Sent back by `bridge batches reroute`: a delivery of it stored dead because its
    # template failed (nothing rendered) takes this rendering and is pending again.
    rerouted: bool = False


@dataclass(slots=True)
class Failed:
    """A batch whose routing raised ("poison"): marked failed with the reason."""

    batch_id: str
    reason: str


Outcome = Sequenced | Failed
