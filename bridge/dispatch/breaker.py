"""A circuit breaker per sink, as a pure state machine: the dispatcher feeds it each send's
outcome and asks it whether to claim, probe or wait. It does no I/O and reads no clock.

    up --TRIP_AFTER unreachable sends in a row--> down --any answer--> up

"Unreachable" is decided from the error alone (bridge/errors.py `says_unreachable`). While
down the dispatcher claims nothing for the sink but one probe at a time, at growing intervals
(or the sink's fixed `probe_interval`), and the attempts of deliveries failing with the rest
are not counted: only max_age bounds how long they wait. Any answer from the receiver, a
success or a failure that is not unreachability (a 500, a 4xx, a 429), closes it again: the
receiver is there, and from then on max_attempts counts what fails one delivery alone.

A breaker starts up but not yet `heard_from`: until its receiver has answered once in this
process, unreachable failures are not counted either. A bridge restarted during an outage
(a rolling deploy, a crash loop) would otherwise spend attempts on the sends that trip it
again after every start, and enough restarts would dead-letter work that an outage alone
never does.

Each process has its own breakers: replicas sharing PostgreSQL each find out for themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bridge.config_types import MAX_PROBE_INTERVAL, RetryPolicy
from bridge.errors import SinkError, says_unreachable

# One refused connection or one timeout is a blip (a receiver restarting, a lost packet)
# and is retried like any failure; this many sends in a row, with no answer between them,
# are an outage.
TRIP_AFTER = 3
MIN_PROBE = 0.05  # an initial_delay of 0 must not make probing a busy loop


def probe_schedule(policy: RetryPolicy, probe_interval: float | None) -> tuple[float, float]:
    """(first, longest) probe interval: the sink's fixed `probe_interval`, or its retry
    policy's initial_delay doubling up to max_delay; never above MAX_PROBE_INTERVAL, so a
    receiver that came back waits at most that long for its backlog."""
    if probe_interval is not None:
        return probe_interval, probe_interval
    first = min(max(policy.initial_delay, MIN_PROBE), MAX_PROBE_INTERVAL)
    return first, min(max(policy.max_delay, first), MAX_PROBE_INTERVAL)


# Kinds of failure that happen on our side, before or without the receiver: they say
# nothing about whether it is there.
_OURS = frozenset({"template_error", "config_error"})


def judge(errors: Sequence[SinkError | None]) -> tuple[Literal["answered", "away"] | None, str]:
    """What one send (a single delivery, a digest, a Kafka batch) says about its receiver:
    "answered" if any of it got an answer, else "away" (with the first cause) if any failed
    as unreachable, else None. A batch counts once, however many records it held."""
    cause = ""
    for error in errors:
        if error is None or (error.kind not in _OURS and not says_unreachable(error)):
            return "answered", ""
        if not cause and says_unreachable(error):
            cause = error.reason
    return ("away", cause) if cause else (None, "")


@dataclass(frozen=True, slots=True)
class WentDown:
    cause: str  # the failure that tripped it, already scrubbed of secrets


@dataclass(frozen=True, slots=True)
class CameBack:
    down_for: float  # seconds
    cause: str  # what had taken it down
    probes: int  # probe sends made while it was down (the one that answered included)


class Breaker:
    def __init__(self, first_probe: float, max_probe: float, trip_after: int = TRIP_AFTER) -> None:
        """Probes `first_probe` seconds after it goes down, then each interval twice the
        last, up to `max_probe`; equal values give a fixed interval."""
        if not 0 < first_probe <= max_probe:
            raise ValueError("expected 0 < first_probe <= max_probe")
        if trip_after < 1:
            raise ValueError("trip_after must be at least 1")
        self.first_probe = first_probe
        self.max_probe = max_probe
        self.trip_after = trip_after
        self.down_since: float | None = None
        self.cause = ""
        self.probe_at = 0.0  # when the next probe may start (only while down)
        self.probing = False  # a probe send is in flight
        self.probes = 0
        self.heard_from = False  # the receiver has answered since this process started
        self._streak = 0  # unreachable sends in a row while up
        self._interval = first_probe

    @property
    def up(self) -> bool:
        return self.down_since is None

    @property
    def counts_unreachable(self) -> bool:
        """Whether a send failing as unreachable spends an attempt: only while up, and once
        the receiver is known to be there (it answered since this process started)."""
        return self.down_since is None and self.heard_from

    def answered(self, now: float) -> CameBack | None:
        """A send reached the receiver (delivered, or refused for a reason of its own).
        Returns what to report if that ends an outage."""
        self._streak = 0
        self.heard_from = True
        if self.down_since is None:
            return None
        back = CameBack(now - self.down_since, self.cause, self.probes)
        self.down_since, self.cause, self.probing, self.probes = None, "", False, 0
        self._interval = self.first_probe
        return back

    def unreachable(self, now: float, cause: str) -> WentDown | None:
        """A send found the receiver away. Returns what to report if that trips the breaker.
        While down this changes nothing: sends started before the trip end this way too, and
        only a probe's failure (`probe_failed`) moves the next probe."""
        if self.down_since is not None:
            return None
        self._streak += 1
        if self._streak < self.trip_after:
            return None
        self._streak = 0
        self.down_since, self.cause, self.probes = now, cause, 0
        self._interval = self.first_probe
        self.probe_at = now + self._interval
        return WentDown(cause)

    def may_probe(self, now: float) -> bool:
        return self.down_since is not None and not self.probing and now >= self.probe_at

    def probe_started(self) -> None:
        self.probing = True
        self.probes += 1

    def probe_failed(self, now: float) -> None:
        """The probe found the receiver still away: the next one waits longer."""
        if self.down_since is None:
            return  # another send answered meanwhile: the outage is over
        self.probing = False
        self._interval = min(self._interval * 2, self.max_probe)
        self.probe_at = now + self._interval

    def probe_void(self) -> None:
        """No probe was made after all (nothing was due, the send never reached the sink's
        code, the bridge is stopping): the next chance is taken as soon as there is one."""
        if self.probing:
            self.probing = False
            self.probes -= 1

    def wait(self, now: float) -> float | None:
        """Seconds until the next probe may start; None while up or while one is in flight."""
        if self.down_since is None or self.probing:
            return None
        return max(0.0, self.probe_at - now)
