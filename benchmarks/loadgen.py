"""Load generators, each run in a process of its own and printing one JSON object.

    python benchmarks/loadgen.py intake URL --concurrency 32 --duration 10 [--rate R]
    python benchmarks/loadgen.py intake URL --concurrency 32 --burst 3000 --warmup 0
    python benchmarks/loadgen.py verify URL --duration 10 [--interval 0.02]
    python benchmarks/loadgen.py sinkclient URL --concurrency 8 --duration 10

`intake` posts unique, realistic isendu batches over keep-alive connections: closed loop
(each of `concurrency` workers posts, waits for the answer, posts again) or, with `--rate`,
paced at R batches/s with at most `concurrency` in flight; `--burst N` stops after N
requests (the measured window is then from the first POST to the last answer, and
`--duration` is only a safety limit). `verify` posts {"keyId": ...} on
a fresh connection every `interval` and times the answer, until `--duration` ends or
`--stop-file` exists; `samples` lists [unix start, seconds] per probe so a short burst's
window can be cut out of it. `sinkclient` is the delivery
ceiling: a bare aiohttp client posting envelope-shaped bodies the way the HTTP sink does.

Only requests started after `--warmup` count; window_start/window_end are unix seconds so
the orchestrator can line them up with what the counting sink saw.

Deliveries: a bridge from before the inbox answers each batch with the `deliveries` it
stored; one with the inbox answers before routing, so only `accepted` items come back.
`deliveries_total` counts what the answers said (0 with the inbox); `--until-deliveries`
then counts items x `--per-item` (what `bridge dry-run` says one item fans out to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import SECRET, BatchFactory, envelope_bodies, latency_summary, verification_body

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Window:
    """perf_counter() marks of the measured window, and their unix-time equivalents."""

    warmup: float
    duration: float
    start: float = field(default_factory=time.perf_counter)

    @property
    def measured_from(self) -> float:
        return self.start + self.warmup

    @property
    def end(self) -> float:
        return self.measured_from + self.duration

    def unix(self, mark: float) -> float:
        return time.time() - (time.perf_counter() - mark)


@dataclass
class Tallies:
    latencies: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    done: int = 0  # every request answered, warm-up included
    items: int = 0
    deliveries: int = 0  # new deliveries the bridge reported stored (all requests)
    duplicates: int = 0
    reported: bool = False  # an answer carried "deliveries" (a bridge before the inbox)
    first_post: float | None = None  # perf_counter() of the first request sent
    last_answer: float | None = None  # ... and of the last answer received

    def answer(self, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            return
        if isinstance(doc, dict):
            self.items += int(doc.get("accepted") or 0)
            self.reported = self.reported or "deliveries" in doc
            self.deliveries += int(doc.get("deliveries") or 0)
            self.duplicates += int(doc.get("duplicates") or 0)


async def _post_batch(session: aiohttp.ClientSession, url: str, body: bytes, win: Window,
                      t: Tallies) -> None:
    t0 = time.perf_counter()
    if t.first_post is None:
        t.first_post = t0
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
            answer = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        t.errors[exc.__class__.__name__] += 1
        return
    t1 = time.perf_counter()
    t.last_answer = t1
    t.done += 1
    t.answer(answer)
    if win.measured_from <= t0 and t1 <= win.end:
        t.latencies.append(t1 - t0)
        t.statuses[status] += 1


async def intake(args: argparse.Namespace) -> dict[str, Any]:
    factory = BatchFactory(prefix=args.prefix, items=args.items)
    t = Tallies()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        win = Window(args.warmup, args.duration)
        counter = iter(range(1 << 40))
        started = 0

        def more() -> bool:
            if args.burst and started >= args.burst:
                return False
            if args.until_deliveries and stored(t, args.per_item) >= args.until_deliveries:
                return False
            return time.perf_counter() < win.end

        def next_body() -> bytes:
            nonlocal started
            started += 1
            return factory.body(next(counter))

        async def worker() -> None:
            while more():
                await _post_batch(session, args.url, next_body(), win, t)

        async def paced() -> None:
            slots = asyncio.Semaphore(args.concurrency)
            tasks: set[asyncio.Task[None]] = set()

            def finished(task: asyncio.Task[None]) -> None:
                tasks.discard(task)
                slots.release()

            n = 0
            while more():
                delay = win.start + n / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                task = asyncio.create_task(_post_batch(session, args.url, next_body(), win, t))
                tasks.add(task)
                task.add_done_callback(finished)
                n += 1
            await asyncio.gather(*tasks)

        if args.rate:
            await paced()
        else:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        finished = time.perf_counter()
    measured = min(finished, win.end) - win.measured_from
    if args.burst and t.first_post is not None and t.last_answer is not None:
        # A burst's window: from its first POST to its last answer, nothing idle around it.
        measured = max(1e-6, t.last_answer - max(t.first_post, win.measured_from))
    ok = t.statuses.get(200, 0)
    return {
        "mode": "intake", "url": args.url, "concurrency": args.concurrency, "rate": args.rate,
        "items_per_batch": args.items, "window_start": win.unix(win.measured_from),
        "window_end": win.unix(min(finished, win.end)), "measured_seconds": measured,
        "accepted": ok, "accepted_per_s": ok / measured if measured > 0 else None,
        "statuses": {str(k): v for k, v in t.statuses.items()}, "errors": dict(t.errors),
        "ack": latency_summary(t.latencies), "requests_total": t.done,
        "items_total": t.items, "deliveries_total": t.deliveries,
        "duplicates_total": t.duplicates, "end_unix": win.unix(finished),
        "burst": args.burst, "sent_total": started,
        "deliveries_reported": t.reported,
        "first_post_unix": None if t.first_post is None else win.unix(t.first_post),
        "last_answer_unix": None if t.last_answer is None else win.unix(t.last_answer),
    }


def stored(t: Tallies, per_item: float) -> float:
    """Deliveries stored so far: as the answers said, or (inbox) items x routes per item."""
    return t.deliveries if t.reported else t.items * per_item


async def verify(args: argparse.Namespace) -> dict[str, Any]:
    """One probe at a time, on a fresh connection each, like isendu checking a URL."""
    await asyncio.sleep(args.delay)
    body = verification_body()
    latencies: list[float] = []
    samples: list[tuple[float, float]] = []
    failures: Counter[str] = Counter()
    stop_file = Path(args.stop_file) if args.stop_file else None
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=5)  # isendu's own limit
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        n = 0
        while time.perf_counter() < start + args.duration:
            if stop_file is not None and stop_file.exists():
                break
            t0 = time.perf_counter()
            t0_unix = time.time()
            try:
                async with session.post(args.url, data=body, headers=JSON_HEADERS) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status != 200 or answer.get("response") != SECRET:
                        failures[f"http_{resp.status}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures[exc.__class__.__name__] += 1
            latencies.append(time.perf_counter() - t0)
            samples.append((round(t0_unix, 4), round(latencies[-1], 6)))
            n += 1
            delay = start + n * args.interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    return {"mode": "verify", "url": args.url, "interval_ms": args.interval * 1000,
            "latency": latency_summary(latencies), "failures": dict(failures),
            "samples": samples}


async def sinkclient(args: argparse.Namespace) -> dict[str, Any]:
    """Bodies and headers as the HTTP sink sends them; connector sized like the sink's."""
    bodies = envelope_bodies(4096, args.prefix)
    t = Tallies()
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector) as session:
        win = Window(args.warmup, args.duration)
        counter = iter(range(1 << 40))

        async def worker() -> None:
            while time.perf_counter() < win.end:
                did, body = bodies[next(counter) % len(bodies)]
                headers = {"Content-Type": "application/json", "User-Agent": "isendu-bridge",
                           "webhook-id": did, "Idempotency-Key": did}
                t0 = time.perf_counter()
                try:
                    async with session.request("POST", args.url, data=body, headers=headers,
                                               timeout=timeout, allow_redirects=False) as resp:
                        await resp.text(errors="replace")
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    t.errors[exc.__class__.__name__] += 1
                    continue
                t1 = time.perf_counter()
                if win.measured_from <= t0 and t1 <= win.end:
                    t.latencies.append(t1 - t0)
                    t.statuses[status] += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    ok = t.statuses.get(200, 0)
    return {"mode": "sinkclient", "url": args.url, "concurrency": args.concurrency,
            "window_start": win.unix(win.measured_from), "window_end": win.unix(win.end),
            "sent": ok, "sent_per_s": ok / args.duration,
            "statuses": {str(k): v for k, v in t.statuses.items()}, "errors": dict(t.errors),
            "latency": latency_summary(t.latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("intake", "verify", "sinkclient"):
        p = sub.add_parser(mode)
        p.add_argument("url")
        p.add_argument("--duration", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--concurrency", type=int, default=32)
        p.add_argument("--prefix", type=int, default=1, help="makes this run's bodies unique")
        p.add_argument("--items", type=int, default=10)
        p.add_argument("--rate", type=float, default=0.0, help="batches/s (intake; 0: closed)")
        p.add_argument("--until-deliveries", type=int, default=0,
                       help="intake: stop once the bridge reports this many stored")
        p.add_argument("--per-item", type=float, default=2.0,
                       help="intake: deliveries per item when answers do not say (inbox)")
        p.add_argument("--burst", type=int, default=0,
                       help="intake: stop after this many requests (0: run --duration)")
        p.add_argument("--interval", type=float, default=0.02)
        p.add_argument("--delay", type=float, default=0.0, help="verify: wait before starting")
        p.add_argument("--stop-file", help="verify: stop once this file exists")
    args = parser.parse_args()
    fn = {"intake": intake, "verify": verify, "sinkclient": sinkclient}[args.mode]
    result = asyncio.run(fn(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
