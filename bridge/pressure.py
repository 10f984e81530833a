"""Requests being served right now. The stages after the 200 give way while there are any:
verification first, intake second, sequencing third, sending last. All share one event loop,
which runs ready callbacks in order, so a stage that does not hold back takes its share of a
saturated loop whatever it is worth."""

from __future__ import annotations

from collections.abc import Callable


class Pressure:
    __slots__ = ("_on_idle", "in_flight", "waiting_for_idle")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting_for_idle = False  # set by a stage that held back; cleared when told
        self._on_idle: list[Callable[[], None]] = []

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the last request in flight is done and a stage held back."""
        self._on_idle.append(callback)

    def __enter__(self) -> None:
        self.in_flight += 1

    def __exit__(self, *_: object) -> None:
        self.in_flight -= 1
        if not self.in_flight and self.waiting_for_idle:
            self.waiting_for_idle = False
            for callback in self._on_idle:
                callback()
