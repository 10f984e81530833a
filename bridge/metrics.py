"""Every metric, under the `bridge_` prefix, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge.errors import FailureKind
from bridge.models import KINDS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
CLOSE_REASONS = ("read_timeout", "keepalive_timeout", "max_connections")
FAILURE_KINDS: tuple[str, ...] = get_args(FailureKind)  # dead_letters_total's reasons


@dataclass(frozen=True, slots=True)
class SinkSends:
    """One sink's children of the metrics every send touches, bound once: `labels()` on
    each send would look them up again (a lock and a dict) for every delivery."""

    send_duration: Any
    delivered: Any
    latency: Any
    failing: Any


VERDICTS = ("first_seen", "change", "repeat", "stale")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter("bridge_batches_received", "isendu batches by outcome",
                               ["outcome"], registry=r)
        self.items = Counter("bridge_items_received", "items received in accepted batches",
                             ["kind"], registry=r)
        self.verifications = Counter("bridge_verification_requests",
                                     "isendu verification requests by outcome", ["outcome"],
                                     registry=r)
        self.deliveries = Counter("bridge_deliveries", "delivery attempts by sink and outcome",
                                  ["sink", "outcome"], registry=r)
        self.retries = Counter("bridge_retries", "retries scheduled", ["sink"], registry=r)
        self.dead_letters = Counter("bridge_dead_letters", "deliveries dead-lettered",
                                    ["sink", "reason"], registry=r)
        self.outbox = Gauge("bridge_outbox_deliveries", "deliveries in the outbox by status",
                            ["status"], registry=r)
        self.latency = Histogram("bridge_delivery_latency_seconds",
                                 "from acceptance to confirmed delivery", ["sink"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.send_duration = Histogram("bridge_send_duration_seconds", "one send attempt",
                                       ["sink"], buckets=LATENCY_BUCKETS, registry=r)
        self.sink_failing = Gauge("bridge_sink_failing",
                                  "1 while the sink's latest attempt failed", ["sink"], registry=r)
        self.inbox = Gauge("bridge_inbox_batches",
                           "accepted batches not sequenced: waiting, or failed to route",
                           ["status"], registry=r)
        self.sequencer_lag = Gauge("bridge_sequencer_lag_seconds",
                                   "age of the oldest batch waiting in the inbox (0: none)",
                                   registry=r)
        self.batches_sequenced = Counter("bridge_batches_sequenced",
                                         "batches the sequencer settled, by outcome",
                                         ["outcome"], registry=r)
        self.sequencer_active = Gauge("bridge_sequencer_active",
                                      "1 while this process is the one sequencing",
                                      registry=r)
        self.verdicts = Counter(
            "bridge_items_observed",
            "items the sequencer compared with their shipment's state, by kind and verdict "
            "(first_seen, change, repeat: nothing new, stale: older than what was seen)",
            ["kind", "verdict"], registry=r)
        for kind in ("order", "tracking"):
            for verdict in VERDICTS:
                self.verdicts.labels(kind, verdict)
        for status in ("waiting", "failed"):
            self.inbox.labels(status)
        for outcome in ("sequenced", "failed"):
            self.batches_sequenced.labels(outcome)
        self.connections_open = Gauge("bridge_connections_open",
                                      "client connections open (refused ones not counted)",
                                      registry=r)
        self.connections_closed = Counter(
            "bridge_connections_closed", "client connections the bridge closed on its own",
            ["reason"], registry=r)
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason)
        self.sink_up = Gauge("bridge_sink_up",
                             "0 while the sink is held back because its receiver is unreachable",
                             ["sink"], registry=r)
        for outcome in ("accepted", "rejected"):
            self.batches.labels(outcome)
        self.batches_accepted = self.batches.labels("accepted")  # once per batch: bound once
        # Bound once: counted for every accepted batch, and labels() costs a lookup each time.
        self.items_of = {kind: self.items.labels(kind) for kind in KINDS}
        for outcome in ("ok", "unknown_key", "invalid"):
            self.verifications.labels(outcome)
        for status in ("pending", "delivered", "dead"):
            self.outbox.labels(status)
        self.sends: dict[str, SinkSends] = {}

    def add_sinks(self, names: Iterable[str]) -> None:
        """Create label values up front so dashboards show zeros, not gaps."""
        for name in names:
            for outcome in ("delivered", "retried", "dead"):
                self.deliveries.labels(name, outcome)
            self.retries.labels(name)
            for reason in FAILURE_KINDS:
                self.dead_letters.labels(name, reason)
            self.latency.labels(name)
            self.send_duration.labels(name)
            self.sink_failing.labels(name).set(0)
            self.sink_up.labels(name).set(1)
            self.sends[name] = SinkSends(
                send_duration=self.send_duration.labels(name),
                delivered=self.deliveries.labels(name, "delivered"),
                latency=self.latency.labels(name), failing=self.sink_failing.labels(name))

    def sends_of(self, sink: str) -> SinkSends:
        if sink not in self.sends:  # a sink added without add_sinks (tests build a few)
            self.add_sinks([sink])
        return self.sends[sink]
