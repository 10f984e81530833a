"""The token bucket, on a clock the test controls."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.config_types import parse_rate
from bridge.dispatch.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_starts_with_burst_then_refills_at_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=5.0, burst=2, clock=clock)
    assert bucket.take(10) == 2
    assert bucket.take(1) == 0
    assert abs(bucket.wait_time() - 0.2) < 1e-9
    clock.now += 0.2
    assert bucket.take(10) == 1
    clock.now += 100  # idle for long: never more than burst
    assert bucket.take(10) == 2


def test_pause_blocks_then_restarts_empty() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=5, clock=clock)
    bucket.pause(3.0)
    assert bucket.take(1) == 0 and abs(bucket.wait_time() - 3.0) < 1e-9
    clock.now += 3.0
    assert bucket.take(5) == 0  # no burst right after the receiver said "slow down"
    clock.now += 1.0
    assert bucket.take(5) == 1


def test_give_back_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=3, clock=Clock())
    assert bucket.take(3) == 3
    bucket.give_back(10)
    assert bucket.take(10) == 3


@given(steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 10)), max_size=50),
       rate=st.floats(0.5, 20), burst=st.integers(1, 5))
def test_never_more_than_burst_plus_rate_times_elapsed(
    steps: list[tuple[float, int]], rate: float, burst: int
) -> None:
    clock = Clock()
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    taken, elapsed = 0, 0.0
    for dt, want in steps:
        clock.now += dt
        elapsed += dt
        taken += bucket.take(want)
        assert taken <= burst + rate * elapsed + 1e-6


def test_rates_parse() -> None:
    assert parse_rate("1/s") == 1.0
    assert parse_rate("20/min") == 20 / 60
    assert parse_rate("100/10s") == 10.0
    assert parse_rate("off") is None
