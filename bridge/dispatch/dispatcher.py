"""The dispatcher: one worker per sink claims due deliveries in bounded chunks and sends them.

Memory is bounded by the sinks' concurrency, not by the backlog: a worker claims only as many
deliveries as it has free slots. Every outcome is written back to the outbox at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

from bridge.config import BridgeConfig
from bridge.dispatch.retry import GiveUp, decide
from bridge.errors import SinkError, TransientSinkError
from bridge.metrics import Metrics
from bridge.models import Delivery
from bridge.outbox import Outbox
from bridge.redact import redact
from bridge.sinks.base import Sink

log = logging.getLogger("bridge.dispatch")

LEASE_SECONDS = 300.0  # far above any send timeout; only matters when a process dies
IDLE_POLL = 1.0  # upper bound on sleeping when idle (other writers, clock drift)
SWEEP_EVERY = 600.0


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        sinks: dict[str, Sink],
        config: BridgeConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.sinks = sinks
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._wake = {name: asyncio.Event() for name in sinks}
        self._inflight: dict[str, dict[str, asyncio.Task[None]]] = {name: {} for name in sinks}
        self._chunks: dict[str, list[str]] = {}  # in-flight task key -> its delivery ids
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False

    def wake(self, sink: str | None = None) -> None:
        """New work was stored (intake, replay): look now instead of at the next poll."""
        for name, event in self._wake.items():
            if sink is None or name == sink:
                event.set()

    async def start(self) -> None:
        self._stopping = False
        for name in self.sinks:
            self._workers.append(asyncio.create_task(self._work(name), name=f"sink:{name}"))
        self._workers.append(asyncio.create_task(self._sweep(), name="sweeper"))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let sends in flight finish for up to `grace`; leave the rest pending."""
        self._stopping = True
        self.wake()
        inflight = [t for tasks in self._inflight.values() for t in tasks.values()]
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=grace)
            unfinished = [i for tasks in self._inflight.values() for key, t in tasks.items()
                          if t in pending for i in self._chunks.get(key, [key])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if unfinished:
                await self.outbox.release(unfinished, self.clock())
                log.warning("stopped with sends unfinished; they stay pending",
                            extra={"deliveries": len(unfinished)})
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        for sink in self.sinks.values():
            try:
                await sink.close()
            except Exception:
                log.exception("closing sink failed", extra={"sink": sink.name})

    async def _work(self, name: str) -> None:
        sink = self.sinks[name]
        limit = self.config.sinks[name].concurrency
        per_task = max(1, sink.batch_size)
        wake = self._wake[name]
        inflight = self._inflight[name]
        while not self._stopping:
            wake.clear()
            free = limit - len(inflight)
            timeout: float | None = None
            if free > 0:
                try:
                    batch = await self.outbox.claim(name, free * per_task, self.clock(),
                                                    LEASE_SECONDS)
                except Exception:
                    log.exception("claiming deliveries failed", extra={"sink": name})
                    await asyncio.sleep(IDLE_POLL)
                    continue
                for start in range(0, len(batch), per_task):
                    chunk = batch[start:start + per_task]
                    task = asyncio.create_task(self._deliver(sink, chunk))
                    key = chunk[0].id
                    self._chunks[key] = [d.id for d in chunk]
                    inflight[key] = task
                    task.add_done_callback(functools.partial(self._done, name, key))
                if len(batch) == free * per_task:
                    continue  # there may be more due work: claim again when slots free up
                if len(batch) == 0:
                    timeout = await self._idle_timeout(name)
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    def _done(self, name: str, key: str, _task: asyncio.Task[None]) -> None:
        self._inflight[name].pop(key, None)
        self._chunks.pop(key, None)
        self._wake[name].set()

    async def _idle_timeout(self, name: str) -> float:
        try:
            due = await self.outbox.next_due(name)
        except Exception:
            return IDLE_POLL
        if due is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(0.01, due - self.clock()))

    async def _deliver(self, sink: Sink, chunk: list[Delivery]) -> None:
        started = time.monotonic()
        errors: list[SinkError | None]
        if len(chunk) == 1:
            errors = [await self._send_one(sink, chunk[0])]
        else:
            try:
                errors = await sink.send_many(chunk)
            except Exception as exc:
                log.exception("sink raised an unexpected error", extra={"sink": sink.name})
                errors = [TransientSinkError(f"unexpected {exc.__class__.__name__} in sink")
                          for _ in chunk]
        self.metrics.send_duration.labels(sink.name).observe(time.monotonic() - started)
        now = self.clock()
        sent = [d for d, e in zip(chunk, errors, strict=True) if e is None]
        if sent:
            await self.outbox.complete([d.id for d in sent], now)
            self.metrics.deliveries.labels(sink.name, "delivered").inc(len(sent))
            for d in sent:
                self.metrics.latency.labels(sink.name).observe(max(0.0, now - d.created_at))
            self.metrics.sink_failing.labels(sink.name).set(0)
        for d, error in zip(chunk, errors, strict=True):
            if error is not None:
                await self._failed(sink, d, error, now)

    async def _send_one(self, sink: Sink, d: Delivery) -> SinkError | None:
        try:
            await sink.send(d)
        except asyncio.CancelledError:
            raise
        except SinkError as exc:
            return exc
        except Exception as exc:
            log.exception("sink raised an unexpected error",
                          extra={"delivery_id": d.id, "sink": sink.name})
            return TransientSinkError(f"unexpected {exc.__class__.__name__} in sink")
        return None

    async def _failed(self, sink: Sink, d: Delivery, error: SinkError, now: float) -> None:
        extra = {"delivery_id": d.id, "sink": sink.name, "route": d.route,
                 "batch_id": d.batch_id, "attempt": d.attempts}
        self.metrics.sink_failing.labels(sink.name).set(1)
        error.reason = redact(error.reason)
        decision = decide(self.config.retry_for(sink.name), error, d.attempts, d.enqueued_at, now)
        if isinstance(decision, GiveUp):
            await self.outbox.dead_letter(d.id, decision.reason, now)
            self.metrics.deliveries.labels(sink.name, "dead").inc()
            self.metrics.dead_letters.labels(sink.name, error.kind).inc()
            log.warning("dead-lettered", extra={**extra, "reason": decision.reason})
        else:
            await self.outbox.retry_at(d.id, decision.at, decision.reason, now)
            self.metrics.deliveries.labels(sink.name, "retried").inc()
            self.metrics.retries.labels(sink.name).inc()
            log.info("will retry", extra={**extra, "reason": decision.reason,
                                          "retry_in": round(decision.at - now, 3)})

    async def _sweep(self) -> None:
        retention = self.config.defaults.delivered_retention
        while not self._stopping:
            try:
                removed = await self.outbox.sweep(self.clock() - retention)
                if removed:
                    log.info("swept delivered rows", extra={"removed": removed})
            except Exception:
                log.exception("sweeping the outbox failed")
            await asyncio.sleep(SWEEP_EVERY)
