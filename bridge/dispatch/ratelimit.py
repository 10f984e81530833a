"""A token bucket per sink: no sink sends faster than its limit, restart or not.

Tokens are taken when deliveries are claimed from the outbox, so throttled work simply stays
there (memory does not grow with the backlog).

A process does not know what the one before it sent just before it stopped, so the
dispatcher's buckets start empty (`tokens=0`): the first send goes 1/rate seconds after start,
and the sends of the old and the new process together still keep to (rate, burst). A bucket
that started full would allow `burst` more at once, twice the limit across a quick restart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        tokens: float | None = None,
    ) -> None:
        """`tokens`: the level to start at; None means full (`burst`)."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if tokens is not None and not 0 <= tokens <= burst:
            raise ValueError("tokens must be between 0 and burst")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst) if tokens is None else float(tokens)
        self._stamp = clock()
        self._paused_until = 0.0

    def _refill(self) -> float:
        now = self.clock()
        if now < self._paused_until:
            self._stamp = now
            return now
        start = max(self._stamp, self._paused_until)
        self._tokens = min(float(self.burst), self._tokens + (now - start) * self.rate)
        self._stamp = now
        return now

    def take(self, wanted: int) -> int:
        """Take up to `wanted` whole tokens; returns how many were taken (maybe 0)."""
        now = self._refill()
        if now < self._paused_until:
            return 0
        granted = min(wanted, math.floor(self._tokens + 1e-9))
        self._tokens -= granted
        return max(0, granted)

    def give_back(self, count: int) -> None:
        """Return tokens taken for work that turned out not to be there."""
        self._tokens = min(float(self.burst), self._tokens + count)

    def wait_time(self) -> float:
        """Seconds until at least one token is available."""
        now = self._refill()
        if now < self._paused_until:
            return self._paused_until - now
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def pause(self, seconds: float) -> None:
        """The receiver said "slow down" (429 + Retry-After): nothing goes out until then,
        and the bucket restarts empty so the first send after the pause is not a burst."""
        self._refill()
        self._paused_until = max(self._paused_until, self.clock() + seconds)
        self._tokens = 0.0
