"""An in-memory store: same contract, no durability. For tests and `memory://` trials."""

from __future__ import annotations

from dataclasses import replace

from bridge.models import (
    COALESCED,
    BatchInfo,
    BatchStatus,
    Delivery,
    Failed,
    InboxBatch,
    NewDelivery,
    Outcome,
    Status,
)
from bridge.outbox.base import Store


class MemoryStore(Store):
    def __init__(self) -> None:
        self._rows: dict[str, Delivery] = {}
        self._seq: dict[str, int] = {}
        self._lease: dict[str, float] = {}
        self._memory: dict[tuple[str, str], tuple[str, float]] = {}
        self._inbox: dict[str, tuple[InboxBatch, BatchInfo]] = {}  # in acceptance order
        self._states: dict[tuple[str, str], tuple[str, float]] = {}

    async def open(self, *, recover: bool = False) -> None:
        if recover:
            self._lease.clear()

    async def close(self) -> None:
        pass

    async def migrate(self) -> list[str]:
        return []

    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        new = 0
        for d in deliveries:
            if d.id in self._rows:
                continue
            self._rows[d.id] = Delivery(
                id=d.id, sink=d.sink, route=d.route, item_uuid=d.item_uuid, kind=d.kind,
                payload=dict(d.payload), status=Status.DEAD if d.error else Status.PENDING,
                attempts=0, next_attempt_at=now + d.delay, created_at=now, updated_at=now,
                enqueued_at=now, last_error=d.error, batch_id=d.batch_id,
                group_key=d.group_key, seq=len(self._seq),
            )
            self._seq[d.id] = len(self._seq)
            new += 1
        return new

    def _unblocked(self, sink: str, now: float | None = None) -> list[Delivery]:
        """The pending deliveries of `sink` that nothing holds back at `now` (None: each at
        the time it falls due), as the SQL engines' claim: each item's earliest one outside
        digests, a coalescing window placed at its last member (which stands for it) and
        holding back later ones from its close on; and every digest member."""
        by_item: dict[str, list[Delivery]] = {}
        last: dict[str, Delivery] = {}  # each coalescing window's last member
        members = []
        for r in self._rows.values():
            if r.sink != sink or r.status is not Status.PENDING:
                continue
            if r.group_key is None or r.group_key.startswith(COALESCED):
                by_item.setdefault(r.item_uuid, []).append(r)
                known = last.get(r.group_key) if r.group_key is not None else None
                if r.group_key is not None and (
                        known is None or self._seq[r.id] > self._seq[known.id]):
                    last[r.group_key] = r
            else:
                members.append(r)
        out = []
        for rows in by_item.values():
            rows.sort(key=lambda r: self._seq[r.id])
            for n, r in enumerate(rows):
                at = r.next_attempt_at if now is None else now
                if r.group_key is not None and (last[r.group_key] is not r or any(
                        o.group_key == r.group_key and self._lease.get(o.id, 0.0) > at
                        for o in rows if o is not r)):
                    continue  # its window's last member stands for it, once none is sent
                if not any(self._holds(h, r, at, last) for h in rows[:n]):
                    out.append(r)
        return [*out, *members]

    def _holds(self, h: Delivery, r: Delivery, at: float, last: dict[str, Delivery]) -> bool:
        """Whether `h`, earlier than `r` in its item's order, holds `r` back at `at`."""
        if h.group_key is None:
            return True
        if h.group_key == r.group_key or last[h.group_key] is not h:
            return False
        # Its window has closed: its last member is due, or a member was claimed or tried.
        return h.next_attempt_at <= at or any(
            o.group_key == h.group_key and o.status is Status.PENDING
            and (o.id in self._lease or o.last_error is not None)
            for o in self._rows.values() if o.sink == h.sink)

    def _due(self, sink: str, now: float) -> list[Delivery]:
        rows = [r for r in self._unblocked(sink, now)
                if r.next_attempt_at <= now and self._lease.get(r.id, 0.0) <= now]
        rows.sort(key=lambda r: (r.next_attempt_at, self._seq[r.id]))
        return rows

    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        out = []
        for row in self._due(sink, now)[:limit]:
            row.attempts += 1
            row.updated_at = now
            self._lease[row.id] = now + lease
            out.append(replace(row, payload=dict(row.payload), lease_until=now + lease))
        return out

    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        rows = [
            r for r in self._rows.values()
            if r.sink == sink and r.group_key == group_key and r.status is Status.PENDING
            and self._lease.get(r.id, 0.0) <= now
        ]
        rows.sort(key=lambda r: self._seq[r.id])
        out = []
        for row in rows[:limit]:
            row.attempts += 1
            row.updated_at = now
            self._lease[row.id] = now + lease
            out.append(replace(row, payload=dict(row.payload), lease_until=now + lease))
        return out

    def _finish(self, delivery_id: str, now: float, **changes: object) -> None:
        row = self._rows.get(delivery_id)
        if row is None:
            return
        for key, value in changes.items():
            setattr(row, key, value)
        row.updated_at = now
        self._lease.pop(delivery_id, None)

    async def complete(self, ids: list[str], now: float) -> None:
        for delivery_id in ids:
            self._finish(delivery_id, now, status=Status.DELIVERED, last_error=None)

    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        row = self._rows.get(delivery_id)
        if row is None or row.status is not Status.PENDING:
            return
        attempts = max(0, row.attempts - 1) if refund else row.attempts
        self._finish(delivery_id, now, next_attempt_at=when, last_error=error, attempts=attempts)

    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None:
        self._finish(delivery_id, now, status=Status.DEAD, last_error=reason)

    async def release(self, claimed: list[Delivery], now: float) -> None:
        for d in claimed:
            row = self._rows.get(d.id)
            if (row is not None and row.status is Status.PENDING
                    and d.id in self._lease and self._lease[d.id] == d.lease_until):
                row.attempts = max(0, row.attempts - 1)
                self._lease.pop(d.id, None)

    async def next_due(self, sink: str) -> float | None:
        # As the SQL engines answer it: unleased ones by when they are due, and every lease.
        times = [r.next_attempt_at for r in self._unblocked(sink)
                 if self._lease.get(r.id, 0.0) <= r.next_attempt_at]
        times += [lease for r in self._rows.values()
                  if r.sink == sink and r.status is Status.PENDING
                  and (lease := self._lease.get(r.id, 0.0)) > r.next_attempt_at]
        return min(times) if times else None

    async def get(self, delivery_id: str) -> Delivery | None:
        row = self._rows.get(delivery_id)
        return replace(row, lease_until=self._lease.get(delivery_id)) if row else None

    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        dead = [r for r in self._rows.values() if r.status is Status.DEAD]
        dead.sort(key=lambda r: (r.updated_at, self._seq[r.id]), reverse=True)
        return [replace(r) for r in dead[:limit]]

    async def replay(self, ids: list[str] | None, now: float) -> int:
        targets = self._rows.keys() if ids is None else [i for i in ids if i in self._rows]
        count = 0
        for delivery_id in list(targets):
            row = self._rows[delivery_id]
            if row.status is Status.DEAD and row.payload:  # nothing rendered: nothing to send
                row.status, row.attempts, row.next_attempt_at = Status.PENDING, 0, now
                row.updated_at = row.enqueued_at = now
                count += 1
        return count

    def _revive(self, deliveries: list[NewDelivery], now: float) -> int:
        """A rerouted batch's deliveries stored dead because their template failed take
        their new rendering (see queries.sql revive_unrendered)."""
        count = 0
        for d in deliveries:
            row = self._rows.get(d.id)
            if d.error is None and row is not None and row.status is Status.DEAD \
                    and not row.payload:
                row.payload, row.status, row.attempts = d.payload, Status.PENDING, 0
                row.next_attempt_at, row.group_key = now + d.delay, d.group_key
                row.updated_at = row.enqueued_at = now
                row.last_error = row.lease_until = None
                count += 1
        return count

    async def sweep(self, delivered_before: float) -> int:
        old = [
            i for i, r in self._rows.items()
            if r.status is Status.DELIVERED and r.updated_at < delivered_before
        ]
        for delivery_id in old:
            del self._rows[delivery_id]
        return len(old)

    async def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for row in self._rows.values():
            out[row.status.value] += 1
        return out

    async def pending_by_sink(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self._rows.values():
            if row.status is Status.PENDING:
                out[row.sink] = out.get(row.sink, 0) + 1
        return out

    async def forget_memories(self, updated_before: float) -> int:
        old = [k for k, (_, at) in self._memory.items() if at < updated_before]
        for k in old:
            del self._memory[k]
        return len(old)

    async def recall(self, scope: str, key: str) -> str | None:
        entry = self._memory.get((scope, key))
        return None if entry is None else entry[0]

    async def remember(self, scope: str, key: str, value: str, now: float) -> None:
        self._memory[(scope, key)] = (value, now)

    async def ping(self) -> None:
        pass

    # ---- inbox -------------------------------------------------------------------------

    async def append(self, batch: InboxBatch) -> None:
        if batch.id in self._inbox:
            raise ValueError(f"batch {batch.id} is stored already")
        self._inbox[batch.id] = (batch, BatchInfo(
            id=batch.id, received_at=batch.received_at, items=batch.items,
            status=BatchStatus.WAITING))

    async def waiting(self, limit: int) -> list[InboxBatch]:
        out = [replace(b, rerouted=info.summary is not None)
               for b, info in self._inbox.values() if info.status is BatchStatus.WAITING]
        return out[:limit]

    async def settle(self, outcomes: list[Outcome], now: float) -> list[int | None]:
        results: list[int | None] = []
        for outcome in outcomes:
            entry = self._inbox.get(outcome.batch_id)
            if entry is None or entry[1].status is not BatchStatus.WAITING:
                results.append(None)
                continue
            info = entry[1]
            info.sequenced_at = now
            if isinstance(outcome, Failed):
                info.status, info.error, info.summary = BatchStatus.FAILED, outcome.reason, None
                results.append(None)
                continue
            new = await self.enqueue(outcome.deliveries, now)
            if outcome.rerouted:
                new += self._revive(outcome.deliveries, now)
            for key, state in outcome.states.items():
                self._states[key] = (state, now)
            info.status, info.error, info.summary = BatchStatus.SEQUENCED, None, outcome.summary
            info.deliveries, info.duplicates = new, len(outcome.deliveries) - new
            results.append(new)
        return results

    async def batches(self, limit: int) -> list[BatchInfo]:
        newest = list(self._inbox.values())[::-1][:limit]
        return [replace(info, summary=None, body=None) for _, info in newest]

    async def batch(self, batch_id: str) -> BatchInfo | None:
        entry = self._inbox.get(batch_id)
        return None if entry is None else replace(entry[1], body=entry[0].body)

    async def reroute(self, ids: list[str] | None, since: float | None) -> int:
        count = 0
        for batch_id, (batch, info) in self._inbox.items():
            chosen = (ids is not None and batch_id in ids) or (
                since is not None and batch.received_at >= since)
            if chosen and info.status is not BatchStatus.WAITING:
                info.status, info.error = BatchStatus.WAITING, None
                count += 1
        return count

    async def inbox_depth(self) -> tuple[int, float | None, int]:
        waiting = [b.received_at for b, i in self._inbox.values()
                   if i.status is BatchStatus.WAITING]
        failed = sum(1 for _, i in self._inbox.values() if i.status is BatchStatus.FAILED)
        return len(waiting), min(waiting, default=None), failed

    async def sweep_batches(self, sequenced_before: float) -> int:
        needed = {r.batch_id for r in self._rows.values()  # by a letter with nothing rendered
                  if r.status is Status.DEAD and not r.payload}
        old = [k for k, (_, i) in self._inbox.items() if i.status is BatchStatus.SEQUENCED
               and i.sequenced_at is not None and i.sequenced_at < sequenced_before
               and k not in needed]
        for k in old:
            del self._inbox[k]
        return len(old)

    # ---- shipment state ----------------------------------------------------------------

    async def states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return {k: self._states[k][0] for k in keys if k in self._states}

    async def forget_states(self, updated_before: float) -> int:
        old = [k for k, (_, at) in self._states.items() if at < updated_before]
        for k in old:
            del self._states[k]
        return len(old)
