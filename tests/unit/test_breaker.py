"""The circuit breaker is pure: outcomes in, "down", "probe now" and "back" out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config_types import RetryPolicy
from bridge.dispatch.breaker import (
    TRIP_AFTER,
    Breaker,
    CameBack,
    WentDown,
    judge,
    probe_schedule,
)
from bridge.errors import PermanentSinkError, SinkError, TransientSinkError, says_unreachable
from bridge.sinks.base import classify_http
from bridge.sinks.telegram import telegram_error

REFUSED = TransientSinkError("cannot connect to receiver: ClientConnectorError",
                             "connection_error")


def trip(b: Breaker, now: float = 0.0) -> WentDown:
    for _ in range(TRIP_AFTER - 1):
        assert b.unreachable(now, "refused") is None
    down = b.unreachable(now, "refused")
    assert down is not None
    return down


def http_error(status: int) -> SinkError:
    with pytest.raises(SinkError) as info:
        classify_http(status, {}, "")
    return info.value


@pytest.mark.parametrize(("error", "away"), [
    (REFUSED, True),
    (TransientSinkError("receiver did not answer within 10s", "timeout"), True),
    (http_error(502), True), (http_error(503), True), (http_error(504), True),
    (http_error(500), False), (http_error(408), False), (http_error(429), False),
    (http_error(400), False), (http_error(401), False),
    (TransientSinkError("kafka broker unreachable: KafkaConnectionError", "connection_error"),
     True),
    (TransientSinkError("kafka broker error: NotLeaderForPartitionError", "broker_error"), False),
    (PermanentSinkError("kafka broker refused the record", "broker_error"), False),
    (TransientSinkError("apprise: 1 of 1 notifications failed", "server_error"), False),
    (telegram_error(502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}), True),
    (telegram_error(500, {"ok": False, "error_code": 500, "description": "Internal"}), False),
    (telegram_error(429, {"ok": False, "error_code": 429, "parameters": {"retry_after": 3}}),
     False),
])
def test_unreachable_is_decided_from_the_error(error: SinkError, away: bool) -> None:
    assert says_unreachable(error) is away


def test_a_few_failures_are_a_blip_several_in_a_row_an_outage() -> None:
    b = Breaker(1.0, 60.0)
    assert b.unreachable(0.0, "refused") is None and b.up
    assert b.answered(1.0) is None  # an answer between them: the streak starts again
    for _ in range(TRIP_AFTER - 1):
        assert b.unreachable(2.0, "refused") is None
    assert b.up
    assert b.unreachable(3.0, "refused: ECONNREFUSED") == WentDown("refused: ECONNREFUSED")
    assert not b.up and b.down_since == 3.0 and b.cause == "refused: ECONNREFUSED"


def test_probes_at_growing_intervals_up_to_the_cap() -> None:
    b = Breaker(1.0, 5.0)
    trip(b, now=10.0)
    assert not b.may_probe(10.5) and b.wait(10.5) == 0.5
    starts = []
    now = 10.0
    for _ in range(6):
        now = b.probe_at
        assert b.may_probe(now)
        b.probe_started()
        assert not b.may_probe(now + 100) and b.wait(now) is None  # one probe at a time
        starts.append(now)
        b.probe_failed(now)
    gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(starts)]
    assert gaps == [2.0, 4.0, 5.0, 5.0, 5.0]
    assert b.probes == 6 and not b.up


def test_a_fixed_probe_interval() -> None:
    b = Breaker(*probe_schedule(RetryPolicy(), 30.0))
    trip(b)
    for _ in range(3):
        now = b.probe_at
        b.probe_started()
        b.probe_failed(now)
        assert b.probe_at == now + 30.0


def test_any_answer_ends_the_outage_with_how_long_and_why() -> None:
    b = Breaker(1.0, 60.0)
    trip(b, now=100.0)
    b.probe_started()
    assert b.answered(160.0) == CameBack(down_for=60.0, cause="refused", probes=1)
    assert b.up and not b.probing and b.answered(161.0) is None
    # The next outage starts over: a full streak again, probes from the first interval.
    trip(b, now=200.0)
    assert b.probe_at == 201.0 and b.probes == 0


def test_sends_from_before_the_outage_do_not_move_the_probe() -> None:
    b = Breaker(1.0, 60.0)
    trip(b, now=0.0)
    for _ in range(10):
        assert b.unreachable(0.5, "refused") is None
    assert b.probe_at == 1.0


def test_a_probe_that_was_not_made_leaves_the_next_one_due() -> None:
    b = Breaker(1.0, 60.0)
    trip(b)
    b.probe_started()
    b.probe_void()
    assert b.may_probe(1.0) and b.probes == 0


def test_probe_schedule_follows_the_retry_policy_within_bounds() -> None:
    assert probe_schedule(RetryPolicy(initial_delay=1.0, max_delay=600.0), None) == (1.0, 600.0)
    assert probe_schedule(RetryPolicy(initial_delay=0.0, max_delay=0.0), None) == (0.05, 0.05)
    assert probe_schedule(RetryPolicy(initial_delay=1.0, max_delay=86400.0), None) == (1.0,
                                                                                      3600.0)


def test_judge_counts_a_send_once_and_an_answer_wins() -> None:
    refused = REFUSED
    assert judge([None]) == ("answered", "")
    assert judge([refused, refused, refused]) == ("away", refused.reason)
    assert judge([refused, None, refused]) == ("answered", "")  # part of a batch arrived
    assert judge([refused, http_error(500)]) == ("answered", "")
    template = PermanentSinkError("template failed", "template_error")
    assert judge([template]) == (None, "")  # never left the bridge: says nothing
    assert judge([template, refused]) == ("away", refused.reason)


@given(st.lists(st.sampled_from(["answered", "away"]), max_size=60))
def test_down_only_after_trip_after_unreachable_in_a_row(outcomes: list[str]) -> None:
    b = Breaker(1.0, 60.0)
    streak = 0
    for i, outcome in enumerate(outcomes):
        if outcome == "answered":
            b.answered(float(i))
            streak = 0
            assert b.up
        else:
            was_up = b.up
            went = b.unreachable(float(i), "refused")
            streak = streak + 1 if was_up else streak
            assert (went is not None) == (was_up and streak == TRIP_AFTER)
            if went is not None:
                streak = 0
            assert b.up == (was_up and went is None)


def test_unreachable_failures_count_only_once_the_receiver_was_heard_from() -> None:
    b = Breaker(1.0, 60.0)
    # A process that just started knows nothing of its receiver: a refusal may be the
    # outage it was restarted in, so it spends no attempt, blip or not.
    assert b.up and not b.heard_from and not b.counts_unreachable
    assert b.unreachable(0.0, "refused") is None and not b.counts_unreachable
    assert b.answered(1.0) is None
    assert b.heard_from and b.counts_unreachable  # there now: a blip counts again
    trip(b, now=2.0)
    assert not b.counts_unreachable  # down: nothing counts
    b.probe_started()
    b.answered(3.0)
    assert b.counts_unreachable
