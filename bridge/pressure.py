"""Whether requests are waiting for the event loop. The stages after the 200 give way while
they are: verification first, intake second, sequencing third, sending last.

All share one event loop, which runs ready callbacks in order, so a stage that does not hold
back takes its share of a saturated loop whatever it is worth. But holding back whenever a
request is in flight would throttle sending for good under a steady trickle of batches
(each request spends most of its time waiting for its commit, not on the loop): so the
stages hold back only in a burst (many requests in flight at once), or while requests are in
flight AND the loop is late, i.e. saturated.

A request counts in flight once its body has arrived (bridge/http/app.py `answer`), not while
its body is still coming: such a request needs nothing of the loop, and anyone who reaches
the port could keep a burst's worth of them open, holding sending to one delivery at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

TICK = 0.01  # seconds between two looks at how late the loop runs
# A tick this much late means callbacks are queueing: the loop is saturated. More than the
# sequencer's own 5 ms slices, which must not make it hold back for itself.
LATE = 0.02
# This many requests in flight at once is a burst: isendu's steady feed is a request or a
# few at a time, each waiting mostly for its commit.
BURST = 8


class Pressure:
    __slots__ = ("_on_idle", "_watcher", "behind", "in_flight", "late", "waiting_for_idle")

    def __init__(self) -> None:
        self.in_flight = 0  # requests being served whose body has arrived
        self.late = 0.0  # how late the last tick ran
        # The sequencer took a full take from the inbox: more batches wait. Sending holds
        # back then too, so that what was accepted becomes deliveries before more is sent.
        self.behind = False
        self.waiting_for_idle = False  # set by a stage that held back; cleared when told
        self._on_idle: list[Callable[[], None]] = []
        self._watcher: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A burst of requests, or requests in flight on a saturated loop: later stages
        hold back."""
        return self.in_flight >= BURST or (self.in_flight > 0 and self.late > LATE)

    @property
    def sending_holds_back(self) -> bool:
        return self.behind or self.busy

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` when a stage held back and the last request in flight is done."""
        self._on_idle.append(callback)

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(),
                                                                   name="pressure")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK)
            self.late = max(0.0, time.monotonic() - before - TICK)

    def __enter__(self) -> None:
        self.in_flight += 1

    def __exit__(self, *_: object) -> None:
        self.in_flight -= 1
        if not self.in_flight and self.waiting_for_idle:
            self.waiting_for_idle = False
            for callback in self._on_idle:
                callback()
