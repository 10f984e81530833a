"""The sequencer: accepted batches, one after the other in acceptance order, become
deliveries.

Each batch is parsed again from the inbox, every item is routed and rendered with the rules
in force (the same code `bridge dry-run` runs), and the batch is settled in ONE transaction:
its deliveries stored, its row marked sequenced. A crash anywhere leaves the batch waiting,
and it is sequenced again from the start: never half of it, and never twice (delivery ids
are stable, so what was stored already is skipped). A batch whose routing raises is marked
failed with the reason and never holds up the batches behind it.

Each item is first compared with what is known of its shipment (bridge/state.py): a repeat
or a stale snapshot is skipped by the routes that say so, and the states a batch changes are
written in the batch's own transaction. The states are kept in memory between batches, and
dropped whenever memory may be ahead of storage (a write failed, another replica sequenced).

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

from bridge.config import StateConfig
from bridge.errors import PayloadError
from bridge.logs import log_failure
from bridge.metrics import Metrics
from bridge.models import (
    COALESCED,
    Batch,
    Failed,
    InboxBatch,
    Item,
    NewDelivery,
    Outcome,
    Sequenced,
)
from bridge.outbox.base import Inbox, ShipmentStates
from bridge.parse import Verification, parse_request
from bridge.pressure import Pressure
from bridge.redact import redact
from bridge.routing.conditions import compile_path
from bridge.routing.router import Router
from bridge.state import Holder, Observation, StateBook

log = logging.getLogger("bridge.sequencer")

TAKE = 256  # batches read from the inbox at once (each read waits behind the commits)
# Deliveries per transaction, at most about (one batch may be more), while requests are in
# flight: a request's commit waits for the settle the writer is in, so settles stay short.
SETTLE_ROWS = 512
# ... and while none is (catching up after a burst or a restart). A commit writes each page
# it changed once, and most of a settle's pages are random ones (the delivery id index, the
# shipment states) that the next settle writes again: larger settles write fewer of them a
# batch (benchmarks/README.md, 2026-12-08). A request that arrives meanwhile waits for that
# one settle.
SETTLE_ROWS_IDLE = 2048
SETTLE_IDLE_FOR = 0.1  # seconds of routing at most before a settle past SETTLE_ROWS goes
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
STATES_IN_MEMORY = 20_000  # shipments whose state stays loaded between takes


@dataclass(slots=True)
class ItemPlan:
    """What routing makes of one item: the routes it matched and their deliveries."""

    item: Item
    routes: list[str]  # matched
    deliveries: list[NewDelivery]
    skipped: dict[str, str]  # route -> "repeat" | "stale"
    verdict: str | None  # Observation.verdict; None where no state is kept


def plan_item(router: Router, item: Item, batch: Batch, seen: Observation | None = None,
              replay: bool = False, hold: Holder | None = None) -> ItemPlan:
    routed = router.route_item(item, batch, seen, replay, hold)
    return ItemPlan(item, routed.routes, routed.deliveries, routed.skipped,
                    seen.verdict if seen is not None else None)


def state_book(config: StateConfig) -> StateBook | None:
    """The shipment states as `state:` in the config asks (None: `enabled: false`)."""
    if not config.enabled:
        return None
    if config.order_version_path is None:
        return StateBook()
    find = compile_path(config.order_version_path)

    def version_of(data: dict[str, object]) -> object:
        found = find(data)
        return found[0] if found else None

    return StateBook(version_of)


@dataclass(slots=True)
class StateKeeping:
    """Where the sequencer keeps shipment states: in `store`, loaded into `book`."""

    store: ShipmentStates
    book: StateBook
    retention: float  # seconds without change before a state is forgotten


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


def _due_at_close(deliveries: list[NewDelivery], lag: float) -> None:
    """A coalescing window closes at a time of the sequencer's clock, reckoned when its
    change was routed; the outbox counts a delivery's wait from when it is stored, `lag`
    later. Its members are due at the close itself: a window that has closed is seen so,
    and holds its shipment's later deliveries back, however far the settles lag."""
    for d in deliveries:
        if d.delay > 0 and d.group_key is not None and d.group_key.startswith(COALESCED):
            d.delay = max(0.0, d.delay - lag)


def summary_of(plans: list[ItemPlan]) -> str:
    return orjson.dumps([_summary(p) for p in plans]).decode()


def _summary(p: ItemPlan) -> dict[str, object]:
    out: dict[str, object] = {"kind": p.item.kind, "uuid": p.item.uuid, "routes": p.routes,
                              "deliveries": [d.id for d in p.deliveries]}
    if p.verdict is not None:
        out["verdict"] = p.verdict
    if p.skipped:
        out["skipped"] = p.skipped
    return out


class Sequencer:
    def __init__(self, inbox: Inbox, router: Router, metrics: Metrics,
                 on_deliveries: Callable[[], None], inbox_retention: float,
                 pressure: Pressure | None = None,
                 clock: Callable[[], float] = time.time,
                 state: StateKeeping | None = None) -> None:
        self.inbox = inbox
        self.state = state
        # Only routes that coalesce need the shipment's windows: no holder per item otherwise.
        self._coalescing = any(r.coalesce is not None for r in router.routes)
        self._term = inbox.sequencer_term
        self.router = router
        self.metrics = metrics
        self.on_deliveries = on_deliveries
        self.retention = inbox_retention
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._swept_at = 0.0
        # Per batch routed and not yet settled: its items' verdicts, for its log line, and
        # when its coalescing windows were reckoned (see _settle).
        self._verdicts: dict[str, dict[str, int]] = {}
        self._routed_at: dict[str, float] = {}
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
                if self._term != self.inbox.sequencer_term:
                    # The lock was lost and taken again: another replica may have
                    # sequenced in between, so the states in memory may be behind.
                    self._term = self.inbox.sequencer_term
                    self._forget_states()
                taken = await self.inbox.waiting(TAKE)
                was_behind, self.pressure.behind = self.pressure.behind, len(taken) == TAKE
                if was_behind and not self.pressure.behind:
                    self.on_deliveries()  # caught up: sending goes back to full speed
            except Exception as exc:
                log_failure(log, "reading the inbox failed; trying again", exc)
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
        """Route `taken` and settle it in transactions of about SETTLE_ROWS deliveries
        (SETTLE_ROWS_IDLE while no request is in flight); the next transaction's routing
        overlaps the previous one's commit."""
        parsed = []
        turn = time.perf_counter()
        for row in taken:
            parsed.append((row, self._parse(row)))
            if time.perf_counter() - turn > (YIELD_AFTER_BUSY if self.pressure.busy
                                             else YIELD_AFTER):
                # Large bodies take long to parse (256 of 1 MiB: seconds): requests, and
                # the sequencer lock's heartbeat (replicas), must not wait for all of them.
                await asyncio.sleep(0)
                turn = time.perf_counter()
        if not await self._load_states([b for _, b in parsed if isinstance(b, Batch)]):
            return
        try:
            await self._sequence(parsed)
        finally:
            self._verdicts.clear()  # of batches routed and then not settled (a failed settle)
            self._routed_at.clear()
            if self.state is not None:
                self.state.book.trim(STATES_IN_MEMORY)

    async def _sequence(self, parsed: list[tuple[InboxBatch, Batch | Failed]]) -> None:
        outcomes: list[Outcome] = []
        rows: list[InboxBatch] = []
        pending: asyncio.Task[bool] | None = None
        weight = 0
        routing = 0.0  # seconds spent routing the batches of the settle to come
        for row, batch in parsed:
            started = time.perf_counter()
            outcome = batch if isinstance(batch, Failed) else await self._route(row, batch)
            took = time.perf_counter() - started
            routing += took
            if self.pressure.busy:  # requests first: hold back for a while
                await self._give_way(took * BUSY_PAUSE_RATIO)
            outcomes.append(outcome)
            rows.append(row)
            weight += len(outcome.deliveries) if isinstance(outcome, Sequenced) else 1
            if self._settle_now(weight, routing):
                if pending is not None and not await pending:
                    self._forget_states()  # see below
                    return
                pending = asyncio.create_task(self._settle(rows, outcomes))
                outcomes, rows, weight, routing = [], [], 0, 0.0
        if pending is not None and not await pending:
            # The failed settle forgot the states while later batches were being routed:
            # those observed against an empty memory, and what they left in it is wrong.
            # Forgotten again, the states are read from storage at the next take.
            self._forget_states()
            return
        if outcomes:
            await self._settle(rows, outcomes)

    def _settle_now(self, weight: int, routing: float) -> bool:
        """Whether the batches routed since the last settle (`weight` deliveries, `routing`
        seconds) are settled now: at SETTLE_ROWS, or while no request is in flight and
        routing is quick, at SETTLE_ROWS_IDLE (slow templates would otherwise keep a large
        settle's deliveries from the dispatcher for seconds)."""
        if weight < SETTLE_ROWS:
            return False
        return (weight >= SETTLE_ROWS_IDLE or self.pressure.in_flight > 0
                or routing >= SETTLE_IDLE_FOR)

    def _parse(self, row: InboxBatch) -> Batch | Failed:
        try:
            return parse_stored(row)
        except Exception as exc:
            return self._poison(row, exc)

    def _poison(self, row: InboxBatch, exc: Exception) -> Failed:
        # A poison batch: odd data the router cannot take. It fails alone, with the
        # reason, and `bridge batches reroute` takes it again after a fix.
        reason = redact(f"{exc.__class__.__name__}: {exc}")[:500]
        log.error("batch failed to route; marked failed", exc_info=exc,
                  extra={"batch_id": row.id, "reason": reason})
        return Failed(row.id, reason)

    async def _load_states(self, batches: list[Batch]) -> bool:
        """Bring the states of every shipment in `batches` into memory (one read)."""
        if self.state is None:
            return True
        missing = self.state.book.missing([i for b in batches for i in b.items])
        if not missing:
            return True
        try:
            stored = await self.state.store.states(missing)
        except Exception as exc:
            log_failure(log, "reading shipment states failed; the batches stay waiting", exc)
            await self._sleep(RETRY_AFTER_FAILURE)
            return False
        self.state.book.load(stored, missing)
        return True

    def _forget_states(self) -> None:
        if self.state is not None:
            self.state.book.forget()

    async def _route(self, row: InboxBatch, batch: Batch) -> Outcome:
        book = self.state.book if self.state is not None else None
        routed_at = self._routed_at[row.id] = self.clock()
        try:
            plans = []
            turn = time.perf_counter()
            for item in batch.items:
                seen = hold = None
                if book is not None:
                    seen = book.observe(item, replay=row.rerouted)
                    if self._coalescing and not row.rerouted:  # a replay opens no window
                        hold = book.holder(item, routed_at)
                plans.append(plan_item(self.router, item, batch, seen, row.rerouted, hold))
                slice_ = YIELD_AFTER_BUSY if self.pressure.busy else YIELD_AFTER
                if time.perf_counter() - turn > slice_:
                    await asyncio.sleep(0)  # requests first
                    turn = time.perf_counter()
            await asyncio.sleep(0)
            deliveries = [d for p in plans for d in p.deliveries]
            states = book.take_changed() if book is not None else {}
        except Exception as exc:
            if book is not None:
                book.undo()  # what this batch observed is not kept: it failed
            return self._poison(row, exc)
        # Counted once per batch and verdict: labels() per item was ~20 us of a ~1 ms batch.
        observed: dict[tuple[str, str], int] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        for p in plans:
            if p.verdict is not None:
                key = (p.item.kind, p.verdict)
                observed[key] = observed.get(key, 0) + 1
                if p.skipped and debug:
                    log.debug("item skipped", extra={
                        "batch_id": row.id, "uuid": p.item.uuid, "verdict": p.verdict,
                        "routes": sorted(p.skipped)})
        verdicts: dict[str, int] = {}
        for (kind, verdict), n in observed.items():
            self.metrics.verdicts.labels(kind, verdict).inc(n)
            verdicts[verdict] = verdicts.get(verdict, 0) + n
        self._verdicts[row.id] = verdicts
        return Sequenced(row.id, deliveries, summary_of(plans), states, row.rerouted)

    async def _settle(self, rows: list[InboxBatch], outcomes: list[Outcome]) -> bool:
        now = self.clock()
        verdicts = [self._verdicts.pop(r.id, {}) for r in rows]
        for row, outcome in zip(rows, outcomes, strict=True):
            routed_at = self._routed_at.pop(row.id, now)
            if isinstance(outcome, Sequenced) and now > routed_at:
                _due_at_close(outcome.deliveries, now - routed_at)
        try:
            results = await self.inbox.settle(outcomes, now)
        except Exception as exc:
            # Nothing of it was written: the batches stay waiting and are taken again, and
            # the states in memory, ahead of storage now, are read again.
            self._forget_states()
            log_failure(log, "settling batches failed; they stay waiting", exc,
                        {"batches": len(outcomes)})
            await self._sleep(RETRY_AFTER_FAILURE)
            return False
        new_total = 0
        for row, outcome, new, seen in zip(rows, outcomes, results, verdicts, strict=True):
            if isinstance(outcome, Failed):
                self.metrics.batches_sequenced.labels("failed").inc()
                continue
            if new is None:  # settled elsewhere in the meantime: memory may be behind
                self._forget_states()
                continue
            new_total += new
            self.metrics.batches_sequenced.labels("sequenced").inc()
            for d in outcome.deliveries:
                if d.error:
                    self.metrics.dead_letters.labels(d.sink, "template_error").inc()
                    log.warning("template failed; delivery dead-lettered",
                                extra={"batch_id": row.id, "delivery_id": d.id,
                                       "reason": d.error})
            line = {"batch_id": row.id, "items": row.items, "deliveries": new,
                    "duplicates": len(outcome.deliveries) - new,
                    "waited": round(max(0.0, now - row.received_at), 3)}
            if self.state is not None:  # items the state found nothing new in, or older
                line |= {"repeats": seen.get("repeat", 0), "stale": seen.get("stale", 0)}
            log.info("batch sequenced", extra=line)
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
        except Exception as exc:
            log_failure(log, "sweeping the inbox failed", exc)
            return
        if removed:
            log.info("swept the inbox", extra={"batches": removed})
        if self.state is None:
            return
        try:
            forgotten = await self.state.store.forget_states(now - self.state.retention)
        except Exception as exc:
            log_failure(log, "forgetting old shipment states failed", exc)
            return
        if forgotten:
            log.info("forgot shipment states unchanged for state.retention",
                     extra={"shipments": forgotten})
