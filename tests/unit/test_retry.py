"""Retry decisions are pure: given a failure, when to try again, or why to give up."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config_types import RetryPolicy
from bridge.dispatch.retry import GiveUp, RetryAt, backoff, decide, sink_quiet_period
from bridge.errors import PermanentSinkError, TransientSinkError
from bridge.sinks.base import parse_retry_after
from bridge.sinks.console import ConsoleSink, ConsoleSinkConfig
from bridge.sinks.discord import retry_after as discord_retry_after

POLICY = RetryPolicy(max_attempts=5, initial_delay=1.0, max_delay=60.0, max_age=3600.0)


def test_permanent_gives_up_at_once_with_the_reason() -> None:
    d = decide(POLICY, PermanentSinkError("receiver answered HTTP 400: bad"), 1, 0.0, 10.0)
    assert d == GiveUp("receiver answered HTTP 400: bad")


def test_transient_retries_within_the_backoff_bound() -> None:
    d = decide(POLICY, TransientSinkError("HTTP 503"), 3, 0.0, 10.0, random.Random(1))
    assert isinstance(d, RetryAt)
    assert 10.0 <= d.at <= 10.0 + 4.0  # third failure: full jitter in [0, 1s * 2**2]


def test_retry_after_wins_over_backoff() -> None:
    d = decide(POLICY, TransientSinkError("429", "rate_limited", retry_after=30.0), 1, 0.0, 10.0)
    assert d == RetryAt(40.0, "429")


def test_max_attempts_exhausted() -> None:
    d = decide(POLICY, TransientSinkError("HTTP 503"), 5, 0.0, 10.0)
    assert isinstance(d, GiveUp) and "gave up after 5 attempts; last error: HTTP 503" in d.reason


def test_an_attempt_not_counted_never_exhausts_max_attempts_but_max_age_still_holds() -> None:
    refused = TransientSinkError("cannot connect", "connection_error")
    d = decide(POLICY, refused, 50, 0.0, 10.0, random.Random(1), counted=False)
    assert isinstance(d, RetryAt) and 10.0 <= d.at <= 70.0  # backoff capped at max_delay
    d = decide(POLICY, refused, 50, 0.0, 3600.5, counted=False)  # past max_age, any jitter
    assert isinstance(d, GiveUp) and "max_age 1h" in d.reason
    first = decide(POLICY, refused, 0, 0.0, 10.0, random.Random(1), counted=False)
    assert isinstance(first, RetryAt) and first.at <= 11.0  # a refunded first claim: attempt 1


def test_max_age_exceeded() -> None:
    d = decide(POLICY, TransientSinkError("timeout", retry_after=120.0), 1, 0.0, 3500.0)
    assert isinstance(d, GiveUp) and "max_age 1h" in d.reason


@given(attempt=st.integers(1, 40), seed=st.integers(0, 1000))
def test_backoff_is_bounded_by_exponential_and_cap(attempt: int, seed: int) -> None:
    bound = min(POLICY.max_delay, POLICY.initial_delay * 2 ** (attempt - 1))
    assert 0 <= backoff(POLICY, attempt, random.Random(seed)) <= bound
    assert 0 <= backoff(POLICY, attempt) <= bound  # tenacity's own strategy, same bound


def test_backoff_uses_full_jitter() -> None:
    draws = [backoff(POLICY, 6) for _ in range(200)]  # bound 32s
    assert min(draws) < 8 and max(draws) > 24  # spread over the whole range, not clustered


def test_retry_after_zero_waits_a_second_not_a_loop() -> None:
    d = decide(POLICY, TransientSinkError("429", "rate_limited", retry_after=0.0), 1, 0.0, 10.0)
    assert d == RetryAt(11.0, "429")


@given(st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e12)))
def test_a_sinks_quiet_period_is_at_least_a_second_and_at_most_an_hour(
    hint: float | None,
) -> None:
    quiet = sink_quiet_period(hint)
    assert 1.0 <= quiet <= 3600.0
    if hint is not None and 1.0 <= hint <= 3600.0:
        assert quiet == hint


@pytest.mark.parametrize("hint", [math.inf, math.nan, -1.0])
def test_a_hint_that_is_no_time_is_no_hint(hint: float) -> None:
    assert TransientSinkError("429", "rate_limited", retry_after=hint).retry_after is None


def test_no_answer_pauses_a_sink_past_an_hour_or_forever() -> None:
    sink = ConsoleSink("c", ConsoleSinkConfig(type="console"))
    for seconds in (math.inf, math.nan, -5.0):
        sink.pause_for(seconds)
        assert sink.paused_until == 0.0
    sink.pause_for(1e9)
    assert sink.paused_until - time.monotonic() <= 3600.0
    assert discord_retry_after('{"retry_after": Infinity}', {}) == 1.0  # Python's JSON reads it


def test_retry_after_that_is_no_time_is_ignored() -> None:
    assert parse_retry_after("inf") is None and parse_retry_after("nan") is None
    assert parse_retry_after("1e400") is None  # float overflow: inf
    assert parse_retry_after("-5") == 0.0 and parse_retry_after("2.5") == 2.5
