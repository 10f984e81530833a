"""What claims cost with a large backlog: the outbox alone, through the bridge's own Store.

    .venv/bin/python benchmarks/claim_cost.py [--deliveries 100000] [--per-item 1]
    .venv/bin/python benchmarks/claim_cost.py --url postgresql://postgres@127.0.0.1/bench

Fills one sink's outbox with `--deliveries` pending deliveries, `--per-item` of them about
each item (random uuids; 1: each its own), through `Store.enqueue` in chunks of 1,000
(timed: what storing them costs). Then drains it as the dispatcher does: `claim(--limit)`,
then `complete` of what was claimed, until a claim finds nothing (claims timed apart from
the completes). `next_due` is timed on the full backlog and halfway through the drain.
Prints one JSON object. A SQLite file goes to a temporary folder; the PostgreSQL database
given by `--url` must exist and is EMPTIED first (its public schema dropped). Run by hand.
It measures the `bridge` package Python finds: `PYTHONPATH=<a checkout>` for another one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from typing import Any

from bridge.models import NewDelivery
from bridge.outbox import Store, from_url

SINK = "hook"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--deliveries", type=int, default=100_000)
    p.add_argument("--per-item", type=int, default=1, help="deliveries about each uuid")
    p.add_argument("--limit", type=int, default=50, help="deliveries a claim asks for")
    p.add_argument("--url", help="postgresql://... (default: a SQLite file in $TMPDIR)")
    return p.parse_args()


def deliveries(count: int, per_item: int) -> list[NewDelivery]:
    # Made in sequencer order: an item's deliveries interleaved with the others', as
    # successive batches bring each shipment's next update.
    rng = random.Random(7)
    uuids = [str(uuid.UUID(int=rng.getrandbits(128), version=4))
             for _ in range(max(1, count // per_item))]
    return [NewDelivery(id=f"dlv_{rng.getrandbits(128):032x}", sink=SINK, route="all",
                        item_uuid=uuids[n % len(uuids)],
                        kind="tracking", payload={"body": '{"status": "IN_TRANSIT"}' * 8},
                        batch_id=f"b{n // 10}") for n in range(count)]


async def emptied_postgres(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"calls": len(values), "total": round(sum(values), 3),
            "mean_ms": round(1000 * statistics.fmean(values), 3),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)], 3)}


async def measure(store: Store, args: argparse.Namespace) -> dict[str, Any]:
    rows = deliveries(args.deliveries, args.per_item)
    started = time.perf_counter()
    for i in range(0, len(rows), 1000):
        await store.enqueue(rows[i:i + 1000], 100.0)
    stored = time.perf_counter() - started

    due: list[float] = []
    for _ in range(5):
        t = time.perf_counter()
        await store.next_due(SINK)
        due.append(time.perf_counter() - t)

    claims: list[float] = []
    completes = 0.0
    now = 100.0
    claimed_total = 0
    due_halfway: list[float] = []
    while True:
        t = time.perf_counter()
        got = await store.claim(SINK, args.limit, now, 3600.0)
        claims.append(time.perf_counter() - t)
        if not got:
            break
        if claimed_total < args.deliveries // 2 <= claimed_total + len(got):
            for _ in range(5):  # half of the backlog left, this claim's share leased
                t = time.perf_counter()
                await store.next_due(SINK)
                due_halfway.append(time.perf_counter() - t)
        claimed_total += len(got)
        t = time.perf_counter()
        await store.complete([d.id for d in got], now)
        completes += time.perf_counter() - t
    assert claimed_total == args.deliveries, (claimed_total, args.deliveries)
    return {"deliveries": args.deliveries, "per_item": args.per_item, "limit": args.limit,
            "enqueue_s": round(stored, 3), "claim": summary(claims),
            "complete_s": round(completes, 3), "next_due_full": summary(due),
            "next_due_halfway": summary(due_halfway)}


async def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.url or f"sqlite:///{folder}/bench.db"
        if args.url:
            await emptied_postgres(args.url)
        store = from_url(url)
        await store.open(recover=True)
        try:
            result = await measure(store, args)
        finally:
            await store.close()
    print(json.dumps({"engine": url.split(":", 1)[0], **result}))


if __name__ == "__main__":
    asyncio.run(main())
