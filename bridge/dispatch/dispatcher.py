"""The dispatcher: one worker per sink claims due deliveries in bounded chunks and sends them.

Memory is bounded by the sinks' concurrency, not by the backlog: a worker claims only as many
deliveries as it has free slots. Every outcome is written back to the outbox at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable

from bridge.config import BridgeConfig
from bridge.config_types import format_duration
from bridge.dispatch.breaker import Breaker, CameBack, WentDown, judge, probe_schedule
from bridge.dispatch.ratelimit import TokenBucket
from bridge.dispatch.retry import GiveUp, decide, sink_quiet_period
from bridge.errors import SinkError, TransientSinkError, says_unreachable
from bridge.logs import log_failure
from bridge.metrics import Metrics
from bridge.models import COALESCED, Delivery
from bridge.outbox import Outbox, SinkMemory
from bridge.outbox.base import LEASE_SHARE
from bridge.pressure import Pressure
from bridge.redact import redact
from bridge.sinks.base import Sink

log = logging.getLogger("bridge.dispatch")

COALESCED_MOST = 500  # deliveries of one coalescing window claimed for its one send
IDLE_POLL = 1.0  # upper bound on sleeping when idle (other writers, clock drift)
SWEEP_EVERY = 600.0
# Claimed ahead: what a sink sends in this long, so that its slots never wait for the claim
# that refills them (a round trip to storage behind other commits, fsync included)...
REFILL_HORIZON = 0.05
MAX_AHEAD_PER_SLOT = 6  # ...but at most this many per slot: memory, and other replicas' share


def claim_ahead(limit: int, send_seconds: float | None) -> int:
    """Deliveries to hold claimed beyond a sink's `limit` slots: one per slot, or as many as
    its recent sends say it gets through in REFILL_HORIZON, up to MAX_AHEAD_PER_SLOT each."""
    if not send_seconds or send_seconds <= 0:
        return limit
    per_slot = min(MAX_AHEAD_PER_SLOT, max(1, round(REFILL_HORIZON / send_seconds)))
    return limit * per_slot


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        sinks: dict[str, Sink],
        config: BridgeConfig,
        metrics: Metrics,
        memory: SinkMemory | None = None,
        clock: Callable[[], float] = time.time,
        pressure: Pressure | None = None,
    ) -> None:
        # While requests wait for a saturated loop, or the sequencer is behind, a sink sends
        # one at a time, claiming nothing ahead: sending is the last stage to get the event
        # loop (bridge/pressure.py).
        self.pressure = pressure or Pressure()
        self.pressure.on_idle(self.wake)
        self.outbox = outbox
        self.memory = memory  # swept of what sinks have not written for state_retention
        self.sinks = sinks
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._wake = {name: asyncio.Event() for name in sinks}
        self._claimed_at: dict[str, float] = {}  # the `now` of each sink's last claim
        self._inflight: dict[str, dict[str, asyncio.Task[None]]] = {name: {} for name in sinks}
        # Claimed, not yet started (with when they were claimed): at most a slot's worth each.
        self._ready: dict[str, collections.deque[tuple[float, list[Delivery]]]] = {
            name: collections.deque() for name in sinks}
        self._max_wait: dict[str, float] = {}  # seconds a claimed chunk may wait in _ready
        self._send_seconds: dict[str, float] = {}  # a single send's duration, smoothed
        self._chunks: dict[str, list[Delivery]] = {}  # in-flight task key -> its deliveries
        self._buckets: dict[str, TokenBucket] = {}
        for name, sink in sinks.items():
            limit = sink.rate_limit()
            if limit is not None:
                # Empty, not full: what the previous process sent just before it stopped is
                # unknown, and a full bucket would add `burst` to it (see ratelimit.py).
                rate, burst = limit
                self._buckets[name] = TokenBucket(rate, burst, tokens=0.0)
        self._breakers = {
            name: Breaker(*probe_schedule(config.retry_for(name),
                                          config.sinks[name].probe_interval))
            for name in sinks}
        self._group_max = {
            f"{route.name}>{sink}": route.group.max_items
            for route in config.routes if route.group is not None for sink in route.to
        }
        self._workers: list[asyncio.Task[None]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        # Sent, not yet marked delivered, as (sink, delivery id): written in bulk by
        # _write_completions, so a send's slot is free as soon as the receiver answered, not
        # after another commit. A crash before the write sends these again (at-least-once),
        # never loses them.
        self._completed: list[tuple[str, str]] = []
        self._completions_due = asyncio.Event()
        self._completion_writer: asyncio.Task[None] | None = None
        self._closing = False

    def wake(self, sink: str | None = None) -> None:
        """New work was stored (intake, replay): look now instead of at the next poll."""
        for name, event in self._wake.items():
            if sink is None or name == sink:
                event.set()

    def sinks_down(self) -> dict[str, dict[str, object]]:
        """The sinks this process holds back because their receivers are away (/readyz)."""
        now = time.monotonic()
        return {name: {"down_for": round(now - b.down_since, 1), "cause": b.cause,
                       "probes": b.probes}
                for name, b in self._breakers.items() if b.down_since is not None}

    async def start(self) -> None:
        self._stopping = self._closing = False
        await self._say_stranded()
        for name in self.sinks:
            self._workers.append(asyncio.create_task(self._work(name), name=f"sink:{name}"))
        self._sweeper = asyncio.create_task(self._sweep(), name="sweeper")
        self._completion_writer = asyncio.create_task(self._write_completions(),
                                                      name="completions")

    async def _say_stranded(self) -> None:
        """Deliveries of a sink the config no longer names (renamed, removed) are never
        claimed: said at start, with how to send them, rather than left unseen."""
        try:
            pending = await self.outbox.pending_by_sink()
        except Exception as exc:
            log_failure(log, "counting pending deliveries per sink failed", exc)
            return
        for sink, n in sorted(pending.items()):
            if sink not in self.sinks:
                log.warning(
                    "deliveries pending for a sink the config does not name; none is sent "
                    "until a sink of that name is configured again",
                    extra={"sink": sink, "pending": n, "sinks": sorted(self.sinks)})

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let sends in flight finish for up to `grace`; leave the rest pending."""
        self._stopping = True
        self.wake()
        # Workers first, so that none starts a send after the in-flight ones are counted. They
        # end by themselves at their next turn: one cancelled inside a claim would leave the
        # rows it claimed leased by nobody until the lease runs out.
        if self._sweeper is not None:
            self._sweeper.cancel()  # a sweep cut off is simply done again next time
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        _, stuck = await asyncio.wait(self._workers, timeout=5.0) if self._workers else ((), ())
        for worker in stuck:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        inflight = [t for tasks in self._inflight.values() for t in tasks.values()]
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=grace)
            unfinished = [d for tasks in self._inflight.values() for key, t in tasks.items()
                          if t in pending for d in self._chunks.get(key, [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if unfinished:
                await self.outbox.release(unfinished, self.clock())
                log.warning("stopped with sends unfinished; they stay pending",
                            extra={"deliveries": len(unfinished)})
        never_started = [d for ready in self._ready.values() for _, chunk in ready
                         for d in chunk]
        for ready in self._ready.values():
            ready.clear()
        if never_started:
            await self.outbox.release(never_started, self.clock())
        if self._completion_writer is not None:
            # Not cancelled: a write cut off halfway would leave sent deliveries to be resent.
            self._closing = True
            self._completions_due.set()
            await asyncio.wait([self._completion_writer], timeout=grace)
            if self._completed or not self._completion_writer.done():
                log.warning("could not mark every sent delivery delivered; those will be "
                            "sent again", extra={"deliveries": len(self._completed)})
            self._completion_writer = None
        for sink in self.sinks.values():
            try:
                await sink.close()
            except Exception:
                log.exception("closing sink failed", extra={"sink": sink.name})

    async def _work(self, name: str) -> None:
        sink = self.sinks[name]
        limit = self.config.sinks[name].concurrency
        per_task = max(1, sink.batch_size)
        bucket = self._buckets.get(name)
        # Unthrottled one-at-a-time sinks claim ahead (claim_ahead), so a freed slot starts
        # its next send at once instead of after a claim's round trip to storage. A fast one
        # claims again only once a third of that is left: fewer, bigger claims, each a commit.
        # (A throttled sink must not take tokens ahead; a batching one claims big chunks.)
        # A claim waits at most until its lease has left room for a whole send (a few of the
        # sink's timeouts: Slack may post and then update); where none is left, no claim ahead.
        send_budget = 3 * float(getattr(self.config.sinks[name], "timeout", 30.0))
        max_wait = self.outbox.lease_seconds - send_budget
        may_claim_ahead = bucket is None and per_task == 1 and max_wait > 0
        # Without claiming ahead, a chunk starts in the turn that claimed it: no wait to bound.
        self._max_wait[name] = max_wait if may_claim_ahead else math.inf
        wake = self._wake[name]
        inflight = self._inflight[name]
        ready = self._ready[name]
        breaker = self._breakers[name]
        while not self._stopping:
            wake.clear()
            timeout: float | None = None
            paused = sink.paused_until - time.monotonic()
            if not breaker.up:
                timeout = await self._while_down(sink, breaker, bucket, limit, per_task)
            else:
                slots = limit
                if self.pressure.sending_holds_back:
                    slots = 1
                    self.pressure.waiting_for_idle = True
                if paused <= 0:
                    await self._start_ready(sink, slots)
                ahead = (claim_ahead(limit, self._send_seconds.get(name))
                         if may_claim_ahead and slots == limit else 0)
                refill_at = ahead // 3 if ahead > limit else ahead
                want = (slots + ahead - len(inflight) - len(ready)) * per_task
                if paused > 0:
                    timeout = paused
                    if ready and time.monotonic() + paused - ready[0][0] > self._max_wait[name]:
                        # Held through the pause they would outwait their lease's room (and
                        # another replica might take them): give them back while it is ours.
                        await self._give_back(sink, [d for _, chunk in ready for d in chunk])
                        ready.clear()
                elif want > 0 and len(ready) <= refill_at:
                    granted = bucket.take(want) if bucket else want
                    if granted == 0 and bucket is not None:
                        timeout = bucket.wait_time()
                    else:
                        claimed = await self._claim(name, granted)
                        if bucket is not None and len(claimed) < granted:
                            bucket.give_back(granted - len(claimed))
                        now = time.monotonic()
                        ready.extend((now, chunk)
                                     for chunk in await self._chunk(sink, claimed, per_task))
                        await self._start_ready(sink, slots)
                        if claimed and len(claimed) == granted:
                            continue  # there may be more due work: claim again at once
                        if not claimed:
                            timeout = await self._idle_timeout(name)
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def _start_ready(self, sink: Sink, limit: int) -> None:
        """Start claimed chunks while slots are free; give back any claimed so long ago that
        its lease could run out mid-send (another replica might then send it too)."""
        ready, inflight = self._ready[sink.name], self._inflight[sink.name]
        stale: list[Delivery] = []
        max_wait = self._max_wait.get(sink.name, math.inf)
        while ready and len(inflight) < limit and not self._stopping:
            claimed_at, chunk = ready.popleft()
            if time.monotonic() - claimed_at > max_wait:
                stale += chunk
            else:
                self._spawn(sink, chunk)
        if stale:
            await self._give_back(sink, stale)

    async def _give_back(self, sink: Sink, claimed: list[Delivery]) -> None:
        try:
            await self.outbox.release(claimed, self.clock())
        except Exception as exc:  # their leases run out instead; they are claimed again then
            log_failure(log, "giving back claims failed", exc, {"sink": sink.name})

    async def _claim(self, name: str, count: int) -> list[Delivery]:
        now = self._claimed_at[name] = self.clock()
        try:
            return await self.outbox.claim(name, count, now, self.outbox.lease_seconds)
        except Exception as exc:
            log_failure(log, "claiming deliveries failed", exc, {"sink": name})
            await asyncio.sleep(IDLE_POLL)
            return []

    async def _chunk(self, sink: Sink, claimed: list[Delivery], per_task: int
                     ) -> list[list[Delivery]]:
        """Single deliveries in chunks of `per_task`; digest groups completed and kept whole."""
        plain = [d for d in claimed if d.group_key is None]
        chunks = [plain[i:i + per_task] for i in range(0, len(plain), per_task)]
        groups: dict[str, list[Delivery]] = {}
        for d in claimed:
            if d.group_key is not None:
                groups.setdefault(d.group_key, []).append(d)
        for key, members in groups.items():
            # A coalescing window goes out whole, as one message: its last delivery.
            most = COALESCED_MOST if key.startswith(COALESCED) else self._group_max.get(key, 20)
            if len(members) < most:
                try:
                    members += await self.outbox.claim_group(
                        sink.name, key, most - len(members), self.clock(),
                        self.outbox.lease_seconds)
                except Exception as exc:
                    log_failure(log, "claiming a digest group failed", exc, {"sink": sink.name})
            chunks += [members[i:i + most] for i in range(0, len(members), most)]
        return chunks

    async def _while_down(self, sink: Sink, breaker: Breaker, bucket: TokenBucket | None,
                          limit: int, per_task: int) -> float | None:
        """A turn of a down sink's worker: give back what was claimed ahead before it went
        down (attempts undone), and start the one probe send when it is due. Returns how
        long to wait before looking again; None: until woken (a send in flight ends)."""
        ready = self._ready[sink.name]
        if ready:
            await self._give_back(sink, [d for _, chunk in ready for d in chunk])
            ready.clear()
        now = time.monotonic()
        paused = sink.paused_until - now
        if paused > 0:
            return paused
        if not breaker.may_probe(now):
            return breaker.wait(now)
        if len(self._inflight[sink.name]) >= limit:
            return None  # sends from before the outage still hold every slot
        if bucket is not None and bucket.take(1) == 0:
            return bucket.wait_time()
        claimed = await self._claim(sink.name, 1)  # the oldest due delivery
        if not claimed:
            if bucket is not None:
                bucket.give_back(1)
            return await self._idle_timeout(sink.name)
        breaker.probe_started()
        # One delivery; if it belongs to a digest group, the group comes with it (one send).
        for chunk in await self._chunk(sink, claimed, per_task):
            self._spawn(sink, chunk, probe=True)
        return None

    def _spawn(self, sink: Sink, chunk: list[Delivery], probe: bool = False) -> None:
        task = asyncio.create_task(self._deliver(sink, chunk, probe))
        key = chunk[0].id
        self._chunks[key] = chunk
        self._inflight[sink.name][key] = task
        task.add_done_callback(functools.partial(self._done, sink.name, key))

    def _done(self, name: str, key: str, _task: asyncio.Task[None]) -> None:
        self._inflight[name].pop(key, None)
        self._chunks.pop(key, None)
        self._wake[name].set()

    async def _idle_timeout(self, name: str) -> float:
        """How long to wait after a claim that found nothing."""
        try:
            due = await self.outbox.next_due(name)
        except Exception:
            return IDLE_POLL
        if due is None:
            return IDLE_POLL
        if due <= self._claimed_at.get(name, due):
            # Due already when the claim took nothing: a lease run out on a delivery that a
            # window closed since holds back (next_due leaves leases unchecked, see
            # queries.sql), or another replica was quicker. The poll looks again; a wake-up
            # (a delivery stored or settled) comes sooner.
            return IDLE_POLL
        return min(IDLE_POLL, max(0.01, due - self.clock()))

    async def _deliver(self, sink: Sink, chunk: list[Delivery], probe: bool = False) -> None:
        started = time.monotonic()
        errors: list[SinkError | None]
        if chunk[0].group_key is not None:
            try:
                digest = self._digest(sink, chunk)
            except Exception as exc:  # a bug in a digest renderer must not strand the group
                log.exception("building a digest failed", extra={"sink": sink.name})
                failure: SinkError | None = TransientSinkError(
                    f"unexpected {exc.__class__.__name__} building a digest")
            else:
                failure = await self._send_one(sink, digest)
            errors = [failure] * len(chunk)
        elif len(chunk) == 1:
            errors = [await self._send_one(sink, chunk[0])]
            if errors[0] is None:  # a refused connection or a 429 is quick, not a fast sink
                took, before = time.monotonic() - started, self._send_seconds.get(sink.name)
                self._send_seconds[sink.name] = (took if before is None
                                                 else before + (took - before) / 8)
        else:
            try:
                errors = await sink.send_many(chunk)
            except Exception as exc:
                log.exception("sink raised an unexpected error", extra={"sink": sink.name})
                errors = [TransientSinkError(f"unexpected {exc.__class__.__name__} in sink")
                          for _ in chunk]
        metrics = self.metrics.sends_of(sink.name)
        metrics.send_duration.observe(time.monotonic() - started)
        now = self.clock()
        sent = [d for d, e in zip(chunk, errors, strict=True) if e is None]
        if sent:
            self._completed.extend((sink.name, d.id) for d in sent)
            self._completions_due.set()
            metrics.delivered.inc(len(sent))
            for d in sent:
                metrics.latency.observe(max(0.0, now - d.created_at))
            metrics.failing.set(0)
        breaker = self._breakers[sink.name]
        if sent and breaker.up:  # the usual case, without a coroutine per send
            breaker.answered(time.monotonic())
        else:
            await self._judge(sink, errors, probe)
        counts_unreachable = breaker.counts_unreachable
        for d, error in zip(chunk, errors, strict=True):
            if error is not None:
                # Down, or not heard from since the start, a delivery failing with the rest
                # of its sink spends no attempt.
                counted = counts_unreachable or not says_unreachable(error)
                await self._failed(sink, d, error, now, counted=counted)

    @staticmethod
    def _digest(sink: Sink, members: list[Delivery]) -> Delivery:
        """One synthetic delivery standing for a digest group; its id is stable for the set.
        A coalescing window's stands for itself: its last delivery, rendered with every
        step the window's changes brought."""
        first = members[0]
        if first.group_key is not None and first.group_key.startswith(COALESCED):
            return max(members, key=lambda d: d.seq)
        ids = sorted(d.id for d in members)
        return dataclasses.replace(
            first,
            id="dgst_" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:32],
            payload=sink.render_digest(first.route, members),
            item_uuid=",".join(dict.fromkeys(d.item_uuid for d in members)),
        )

    async def _send_one(self, sink: Sink, d: Delivery) -> SinkError | None:
        # The whole send, every call it makes (a Slack reply and the edit of its thread's
        # first message, a digest's mails), ends within its claim's lease: past it, another
        # replica (or this one) would take the delivery for lost and send it again.
        deadline = self.outbox.lease_seconds * LEASE_SHARE
        try:
            async with asyncio.timeout(deadline):
                await sink.send(d)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return TransientSinkError(
                f"the send did not end within {format_duration(deadline)}, two thirds of the "
                f"{format_duration(self.outbox.lease_seconds)} its claim is leased for",
                "timeout")
        except SinkError as exc:
            return exc
        except Exception as exc:
            log.exception("sink raised an unexpected error",
                          extra={"delivery_id": d.id, "sink": sink.name})
            return TransientSinkError(f"unexpected {exc.__class__.__name__} in sink")
        return None

    async def _judge(self, sink: Sink, errors: list[SinkError | None], probe: bool) -> None:
        """Tell the sink's breaker what this send said about its receiver; log and count
        when that takes the sink down or brings it back."""
        breaker = self._breakers[sink.name]
        verdict, cause = judge(errors)
        now = time.monotonic()
        if verdict == "answered":
            if (back := breaker.answered(now)) is not None:
                await self._came_back(sink, back)
        elif verdict == "away":
            if (down := breaker.unreachable(now, redact(cause))) is not None:
                self._went_down(sink, down, breaker)
            if probe:
                breaker.probe_failed(now)
                log.debug("probe failed; the sink stays down",
                          extra={"sink": sink.name, "cause": redact(cause),
                                 "next_probe_in": round(breaker.probe_at - now, 3)})
            if down is not None or probe:
                try:
                    await sink.drop_connections()
                except Exception:
                    log.exception("dropping a down sink's connections failed",
                                  extra={"sink": sink.name})
        elif probe:
            breaker.probe_void()

    def _went_down(self, sink: Sink, down: WentDown, breaker: Breaker) -> None:
        self.metrics.sink_up.labels(sink.name).set(0)
        log.warning("sink down: its deliveries wait in storage, their attempts not counted; "
                    "one probe at a time until it answers",
                    extra={"sink": sink.name, "cause": down.cause,
                           "first_probe_in": round(breaker.probe_at - time.monotonic(), 3)})

    async def _came_back(self, sink: Sink, back: CameBack) -> None:
        self.metrics.sink_up.labels(sink.name).set(1)
        self.wake(sink.name)
        try:
            # The outbox counts by status only: every sink's pending deliveries, exact when
            # this sink is the one with a backlog (see docs/config.md).
            pending: int | None = (await self.outbox.counts()).get("pending", 0)
        except Exception:
            pending = None
        log.info("sink back up", extra={"sink": sink.name, "down_for": round(back.down_for, 1),
                                        "cause": back.cause, "probes": back.probes,
                                        "pending_all_sinks": pending})

    async def _failed(self, sink: Sink, d: Delivery, error: SinkError, now: float,
                      *, counted: bool = True) -> None:
        extra = {"delivery_id": d.id, "sink": sink.name, "route": d.route,
                 "batch_id": d.batch_id, "attempt": d.attempts}
        if isinstance(error, TransientSinkError) or error.kind == "auth_error":
            # The receiver is away or refuses our credentials. One item it refuses (a bad
            # topic, an invalid payload) says nothing about the sink as a whole.
            self.metrics.sink_failing.labels(sink.name).set(1)
        error.reason = redact(error.reason)
        rate_limited = isinstance(error, TransientSinkError) and error.kind == "rate_limited"
        policy = self.config.retry_for(sink.name)
        if rate_limited:
            # The whole sink waits, not just this delivery: its siblings would hit 429 too.
            hint = error.retry_after if isinstance(error, TransientSinkError) else None
            quiet = sink_quiet_period(hint)
            sink.pause_for(quiet)
            if sink.name in self._buckets:
                self._buckets[sink.name].pause(quiet)
        decision = decide(policy, error, d.attempts, d.enqueued_at, now, counted=counted)
        if isinstance(decision, GiveUp):
            await self.outbox.dead_letter(d.id, decision.reason, now)
            self.metrics.deliveries.labels(sink.name, "dead").inc()
            self.metrics.dead_letters.labels(sink.name, error.kind).inc()
            log.warning("dead-lettered", extra={**extra, "reason": decision.reason})
        else:
            refund = rate_limited or not counted  # a 429 is the receiver's pace, not a failure
            await self.outbox.retry_at(d.id, decision.at, decision.reason, now, refund=refund)
            self.metrics.deliveries.labels(sink.name, "retried").inc()
            self.metrics.retries.labels(sink.name).inc()
            # Down, the sink's one line said it all; a line per delivery would flood the log.
            log.log(logging.INFO if counted else logging.DEBUG, "will retry",
                    extra={**extra, "reason": decision.reason,
                           "retry_in": round(decision.at - now, 3), "counted": not refund})

    async def _write_completions(self) -> None:
        while True:
            await self._completions_due.wait()
            self._completions_due.clear()
            written = await self._flush_completions()
            if self._closing:  # set by stop() once no send is in flight any more
                if written and self._completed:
                    await self._flush_completions()
                return
            if not written:
                await asyncio.sleep(IDLE_POLL)  # storage refused: keep them, try again
                self._completions_due.set()

    async def _flush_completions(self) -> bool:
        """Mark everything sent so far delivered, in one operation; False if that failed.

        Then wake the sinks they were sent to: a shipment's next delivery to a sink waits in
        storage until the one before it is marked delivered (Outbox.claim), and should go
        out now, not at the idle poll."""
        if not self._completed:
            return True
        done, self._completed = self._completed, []
        try:
            await self.outbox.complete([delivery_id for _, delivery_id in done], self.clock())
        except Exception as exc:
            log_failure(log, "marking deliveries delivered failed; will try again", exc,
                        {"deliveries": len(done)})
            self._completed[:0] = done
            return False
        for name in {name for name, _ in done}:
            self._wake[name].set()
        return True

    async def _sweep(self) -> None:
        defaults = self.config.defaults
        while not self._stopping:
            try:
                removed = await self.outbox.sweep(self.clock() - defaults.delivered_retention)
                forgotten = 0 if self.memory is None else await self.memory.forget_memories(
                    self.clock() - defaults.state_retention)
                if removed or forgotten:
                    log.info("swept the outbox", extra={"delivered_rows": removed,
                                                        "sink_memory_entries": forgotten})
            except Exception as exc:
                log_failure(log, "sweeping the outbox failed", exc)
            await asyncio.sleep(SWEEP_EVERY)
