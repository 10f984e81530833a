"""Every metric, under the `bridge_` prefix, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
FAILURE_KINDS = ("auth_error", "rate_limited", "client_error", "server_error", "timeout",
                 "connection_error", "template_error", "config_error", "broker_error")


@dataclass(frozen=True, slots=True)
class SinkSends:
    """One sink's children of the metrics every send touches, bound once: `labels()` on
    each send would look them up again (a lock and a dict) for every delivery."""

    send_duration: Any
    delivered: Any
    latency: Any
    failing: Any


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
        self.sink_up = Gauge("bridge_sink_up",
                             "0 while the sink is held back because its receiver is unreachable",
                             ["sink"], registry=r)
        for outcome in ("accepted", "rejected"):
            self.batches.labels(outcome)
        self.batches_accepted = self.batches.labels("accepted")  # once per batch: bound once
        for kind in ("order", "tracking"):
            self.items.labels(kind)
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
