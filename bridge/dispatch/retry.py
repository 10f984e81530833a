"""Retry decisions, as pure functions: given what happened, when to try again or give up.

The answer is written to the outbox; nothing sleeps in memory, so decisions survive restarts.
tenacity supplies the wait strategy (exponential backoff with full jitter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import tenacity

from bridge.config_types import RetryPolicy, format_duration
from bridge.errors import PermanentSinkError, SinkError, TransientSinkError
from bridge.sinks.base import MAX_PAUSE


@dataclass(frozen=True, slots=True)
class RetryAt:
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


Decision = RetryAt | GiveUp

# A receiver's Retry-After is obeyed, within bounds: "0" (or a date already past) answered
# on every try would otherwise make a retry loop as fast as the network, and since 429s
# are refunded, nothing but max_age would end it.
MIN_RETRY_AFTER = 1.0


def honoured_wait(policy: RetryPolicy, retry_after: float) -> float:
    """How long one delivery waits on a receiver's Retry-After: at least a second, and
    never past max_age (a longer wait dead-letters it in `decide`)."""
    return min(max(retry_after, MIN_RETRY_AFTER), policy.max_age)


def sink_quiet_period(retry_after: float | None) -> float:
    """How long a whole sink holds back after a 429: the hint (1 s without one), at most
    an hour. Services that count violations (Telegram's flood control) get their full wait;
    one absurd Retry-After cannot silence a sink for days: after the hour the next delivery
    asks again, and a receiver still busy says so."""
    hint = 1.0 if retry_after is None else retry_after
    return min(max(hint, MIN_RETRY_AFTER), MAX_PAUSE)


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff for the `attempt`-th failure (1-based)."""
    wait = tenacity.wait_random_exponential(multiplier=policy.initial_delay, max=policy.max_delay)
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    if rng is None:
        return float(wait(state))
    # Deterministic variant for tests: same bound as tenacity, our own random source.
    high = min(policy.max_delay, policy.initial_delay * 2 ** (attempt - 1))
    return rng.uniform(0, high)


def decide(
    policy: RetryPolicy,
    error: SinkError,
    attempts: int,
    enqueued_at: float,
    now: float,
    rng: random.Random | None = None,
    *,
    counted: bool = True,
) -> Decision:
    """What to do after attempt number `attempts` failed with `error`. `counted=False`: the
    attempt does not count towards max_attempts (its sink is down: it failed with the rest)."""
    reason = error.reason
    if isinstance(error, PermanentSinkError) or not isinstance(error, TransientSinkError):
        return GiveUp(reason)
    # "Slow down" is not a failure: only max_age bounds how long a 429 storm is ridden out.
    counted = counted and error.kind != "rate_limited"
    if counted and attempts >= policy.max_attempts:
        return GiveUp(f"gave up after {attempts} attempts; last error: {reason}")
    if error.retry_after is not None:
        delay = honoured_wait(policy, error.retry_after)  # the receiver's own hint wins
    else:
        delay = backoff(policy, max(1, attempts), rng)
    at = now + delay
    if at - enqueued_at > policy.max_age:
        return GiveUp(
            f"gave up: next attempt would be past max_age {format_duration(policy.max_age)}; "
            f"last error: {reason}"
        )
    return RetryAt(at, reason)
