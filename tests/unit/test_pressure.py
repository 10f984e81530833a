"""When the stages after the 200 give way (bridge/pressure.py)."""

from __future__ import annotations

import asyncio
import time

from bridge.pressure import BURST, LATE, Pressure


def test_a_burst_of_requests_is_busy_and_a_trickle_is_not() -> None:
    p = Pressure()
    for _ in range(BURST - 1):
        p.__enter__()
    assert not p.busy  # a few requests, each waiting for its commit: nobody holds back
    p.late = LATE * 2
    assert p.busy  # ...unless the loop is saturated
    p.late = 0.0
    p.__enter__()
    assert p.busy and p.sending_holds_back
    for _ in range(BURST):
        p.__exit__(None, None, None)
    assert not p.busy and not p.sending_holds_back
    p.behind = True  # the sequencer has a full take waiting: sending holds back
    assert p.sending_holds_back and not p.busy


def test_a_stage_that_held_back_is_told_when_the_last_request_is_done() -> None:
    p = Pressure()
    told: list[str] = []
    p.on_idle(lambda: told.append("idle"))
    with p:
        pass
    assert told == []  # nobody was waiting
    with p:
        p.waiting_for_idle = True
        with p:
            pass
        assert told == []  # one still in flight
    assert told == ["idle"] and not p.waiting_for_idle


async def test_the_watcher_sees_a_blocked_loop_as_late() -> None:
    p = Pressure()
    p.start()
    try:
        await asyncio.sleep(0.05)
        assert p.late < LATE  # an idle loop is on time
        time.sleep(0.05)  # noqa: ASYNC251 - the point: hold the loop as a busy stage would
        for _ in range(3):  # the tick that was due runs first thing
            await asyncio.sleep(0)
        assert p.late > LATE
    finally:
        await p.stop()
