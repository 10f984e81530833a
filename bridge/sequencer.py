"""The sequencer: accepted batches, one after the other in acceptance order, become
deliveries.

Each batch is parsed again from the inbox, every item is routed and rendered with the rules
in force (the same code `bridge dry-run` runs), and the batch is settled in ONE transaction:
its deliveries stored, its row marked sequenced. A crash anywhere leaves the batch waiting,
and it is sequenced again from the start: never half of it, and never twice (delivery ids
are stable, so what was stored already is skipped). A batch whose routing raises is marked
failed with the reason and never holds up the batches behind it.

It shares the event loop with the intake and the verification answers, and gives way to
them: it yields after every few milliseconds of routing (after an item, so one item whose
templates take longer holds the loop that long), so a request waits for at most that much.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from bridge.errors import PayloadError
from bridge.metrics import Metrics
from bridge.models import Batch, Failed, InboxBatch, Item, NewDelivery, Outcome, Sequenced
from bridge.outbox.base import Inbox
from bridge.parse import Verification, parse_request
from bridge.pressure import Pressure
from bridge.redact import redact
from bridge.routing.router import Router

log = logging.getLogger("bridge.sequencer")

TAKE = 256  # batches read from the inbox at once (each read waits behind the commits)
SETTLE_ROWS = 512  # deliveries per transaction, at most about (one batch may be more)
YIELD_AFTER = 0.005  # seconds of routing between two turns given to requests, when idle
# While requests wait for a saturated loop (bridge/pressure.py): a turn after every item
# (asyncio runs ready callbacks in order, so a sequencer taking 5 ms per turn would get most
# of the loop), and after each batch a pause twice as long as routing it took.
YIELD_AFTER_BUSY = 0.0
BUSY_PAUSE_RATIO = 2.0
IDLE_POLL = 1.0  # seconds: the fallback when no wake-up comes (another process appended)
LOCK_POLL = 1.0  # seconds between tries for the sequencer's lock (replicas)
RETRY_AFTER_FAILURE = 1.0
SWEEP_EVERY = 600.0


@dataclass(slots=True)
class ItemPlan:
    """What routing makes of one item: the routes it matched and their deliveries."""

    item: Item
    routes: list[str]
    deliveries: list[NewDelivery]


def plan_item(router: Router, item: Item, batch: Batch) -> ItemPlan:
    deliveries = router.route_item(item, batch)
    routes = list(dict.fromkeys(d.route for d in deliveries))
    return ItemPlan(item, routes or [r.name for r in router.matching(item)], deliveries)


def received_iso(ts: float) -> str:
    """`received_at` as templates show it: ISO 8601 UTC with milliseconds and a Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def parse_stored(row: InboxBatch) -> Batch:
    """An inbox row back into its batch (it was validated before it was stored)."""
    parsed = parse_request(row.body, received_at=received_iso(row.received_at),
                           batch_id=row.id)
    if isinstance(parsed, Verification):  # cannot be stored; says so if it ever were
        raise PayloadError("a verification request was stored as a batch")
    return parsed


def summary_of(plans: list[ItemPlan]) -> str:
    return orjson.dumps([
        {"kind": p.item.kind, "uuid": p.item.uuid, "routes": p.routes,
         "deliveries": [d.id for d in p.deliveries]} for p in plans]).decode()


class Sequencer:
    def __init__(self, inbox: Inbox, router: Router, metrics: Metrics,
                 on_deliveries: Callable[[], None], inbox_retention: float,
                 pressure: Pressure | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.inbox = inbox
        self.router = router
        self.metrics = metrics
        self.on_deliveries = on_deliveries
        self.retention = inbox_retention
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._swept_at = 0.0
        self.pressure = pressure or Pressure()
        self._idle = asyncio.Event()  # the last request in flight is done
        self.pressure.on_idle(self._idle.set)

    def wake(self) -> None:
        """A batch was appended (or rerouted): look now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="sequencer")

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the settle in flight (a batch cut off is simply sequenced again later)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            _, pending = await asyncio.wait([self._task], timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.pressure.behind = False
        with contextlib.suppress(Exception):
            await self.inbox.release_sequencer()
        self.metrics.sequencer_active.set(0)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                if not await self.inbox.acquire_sequencer():
                    self.metrics.sequencer_active.set(0)
                    await self._sleep(LOCK_POLL)
                    continue
                self.metrics.sequencer_active.set(1)
                taken = await self.inbox.waiting(TAKE)
                was_behind, self.pressure.behind = self.pressure.behind, len(taken) == TAKE
                if was_behind and not self.pressure.behind:
                    self.on_deliveries()  # caught up: sending goes back to full speed
            except Exception:
                log.exception("reading the inbox failed; trying again")
                await self._sleep(RETRY_AFTER_FAILURE)
                continue
            if taken:
                await self.sequence(taken)
            await self._sweep()  # at most every SWEEP_EVERY, busy or not
            if not taken:
                await self._sleep(IDLE_POLL)

    async def _give_way(self, seconds: float) -> None:
        """Pause for `seconds`, or until no request is in flight any more."""
        self._idle.clear()
        self.pressure.waiting_for_idle = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def sequence(self, taken: list[InboxBatch]) -> None:
        """Route `taken` and settle it in transactions of about SETTLE_ROWS deliveries; the
        next transaction's routing overlaps the previous one's commit."""
        outcomes: list[Outcome] = []
        rows: list[InboxBatch] = []
        pending: asyncio.Task[bool] | None = None
        weight = 0
        for row in taken:
            started = time.perf_counter()
            outcome = await self._route(row)
            if self.pressure.busy:  # requests first: hold back for a while
                await self._give_way((time.perf_counter() - started) * BUSY_PAUSE_RATIO)
            outcomes.append(outcome)
            rows.append(row)
            weight += len(outcome.deliveries) if isinstance(outcome, Sequenced) else 1
            if weight >= SETTLE_ROWS:
                if pending is not None and not await pending:
                    return
                pending = asyncio.create_task(self._settle(rows, outcomes))
                outcomes, rows, weight = [], [], 0
        if pending is not None and not await pending:
            return
        if outcomes:
            await self._settle(rows, outcomes)

    async def _route(self, row: InboxBatch) -> Outcome:
        try:
            batch = parse_stored(row)
            plans = []
            turn = time.perf_counter()
            for item in batch.items:
                plans.append(plan_item(self.router, item, batch))
                slice_ = YIELD_AFTER_BUSY if self.pressure.busy else YIELD_AFTER
                if time.perf_counter() - turn > slice_:
                    await asyncio.sleep(0)  # requests first
                    turn = time.perf_counter()
            await asyncio.sleep(0)
            deliveries = [d for p in plans for d in p.deliveries]
            return Sequenced(row.id, deliveries, summary_of(plans))
        except Exception as exc:
            # A poison batch: odd data the router cannot take. It fails alone, with the
            # reason, and `bridge batches reroute` takes it again after a fix.
            reason = redact(f"{exc.__class__.__name__}: {exc}")[:500]
            log.error("batch failed to route; marked failed", exc_info=True,
                      extra={"batch_id": row.id, "reason": reason})
            return Failed(row.id, reason)

    async def _settle(self, rows: list[InboxBatch], outcomes: list[Outcome]) -> bool:
        now = self.clock()
        try:
            results = await self.inbox.settle(outcomes, now)
        except Exception:
            # Nothing of it was written: the batches stay waiting and are taken again.
            log.exception("settling batches failed; they stay waiting",
                          extra={"batches": len(outcomes)})
            await self._sleep(RETRY_AFTER_FAILURE)
            return False
        new_total = 0
        for row, outcome, new in zip(rows, outcomes, results, strict=True):
            if isinstance(outcome, Failed):
                self.metrics.batches_sequenced.labels("failed").inc()
                continue
            if new is None:  # settled elsewhere in the meantime
                continue
            new_total += new
            self.metrics.batches_sequenced.labels("sequenced").inc()
            for d in outcome.deliveries:
                if d.error:
                    self.metrics.dead_letters.labels(d.sink, "template_error").inc()
                    log.warning("template failed; delivery dead-lettered",
                                extra={"batch_id": row.id, "delivery_id": d.id,
                                       "reason": d.error})
            log.info("batch sequenced", extra={
                "batch_id": row.id, "items": row.items, "deliveries": new,
                "duplicates": len(outcome.deliveries) - new,
                "waited": round(max(0.0, now - row.received_at), 3)})
        if new_total:
            self.on_deliveries()
        return True

    async def _sweep(self) -> None:
        now = self.clock()
        if now - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = now
        try:
            removed = await self.inbox.sweep_batches(now - self.retention)
        except Exception:
            log.exception("sweeping the inbox failed")
            return
        if removed:
            log.info("swept the inbox", extra={"batches": removed})
