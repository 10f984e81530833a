"""The far end of the bridge's HTTP sink: counts POSTs and times them end to end.

    python benchmarks/sink_server.py --port 9100 [--mode ok|503|hang]

Any POST is a delivery. Its arrival time is recorded and, when the body is the HTTP sink's
default envelope, so is `arrival - received_at` (the moment the bridge parsed the batch):
the end-to-end latency. `ok` answers 200; `503` answers 503 with `Retry-After: 3600` (a
receiver that is down, so deliveries pile up); `hang` never answers.

GET /stats?t0=&t1= reports arrivals and latencies in a window (unix seconds);
POST /reset forgets everything; GET /healthz answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import re
import time
from array import array
from datetime import datetime

from aiohttp import web

RECEIVED_AT = re.compile(rb'"received_at":"([^"]+)"')


@functools.lru_cache(maxsize=4096)
def _epoch(iso: bytes) -> float:
    # Every delivery of one batch carries the same received_at: parse each value once.
    return datetime.fromisoformat(iso.decode()).timestamp()


class Tally:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.arrivals = array("d")
        self.timed_at = array("d")  # arrivals that carried received_at, with ...
        self.e2e = array("d")  # ... their end-to-end latency in seconds

    def record(self, body: bytes) -> None:
        now = time.time()
        self.arrivals.append(now)
        m = RECEIVED_AT.search(body, 0, 512)
        if m:
            self.timed_at.append(now)
            self.e2e.append(now - _epoch(m.group(1)))

    def stats(self, t0: float, t1: float) -> dict[str, object]:
        lo, hi = bisect.bisect_left(self.arrivals, t0), bisect.bisect_right(self.arrivals, t1)
        elo, ehi = bisect.bisect_left(self.timed_at, t0), bisect.bisect_right(self.timed_at, t1)
        window = sorted(self.e2e[elo:ehi])

        def pct(q: float) -> float | None:
            if not window:
                return None
            rank = max(1, -(-int(q * len(window)) // 100))
            return round(window[min(rank, len(window)) - 1] * 1000, 2)

        return {
            "total": len(self.arrivals),
            "count": hi - lo,
            "first": self.arrivals[lo] if hi > lo else None,
            "last": self.arrivals[hi - 1] if hi > lo else None,
            "last_any": self.arrivals[-1] if self.arrivals else None,
            "e2e": {"count": len(window), "p50_ms": pct(50), "p90_ms": pct(90),
                    "p99_ms": pct(99), "max_ms": round(window[-1] * 1000, 2) if window else None},
        }


def build_app(mode: str) -> web.Application:
    tally = Tally()
    forever = asyncio.Event()

    async def hook(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        tally.record(body)
        if mode == "503":
            return web.Response(status=503, text="down for maintenance",
                                headers={"Retry-After": "3600"})
        if mode == "hang":
            await forever.wait()
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        t0 = float(request.query.get("t0", "0"))
        t1 = float(request.query.get("t1", "1e12"))
        return web.json_response(tally.stats(t0, t1))

    async def reset(request: web.Request) -> web.Response:
        tally.reset()
        return web.json_response({"reset": True})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", hook)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("ok", "503", "hang"), default="ok")
    args = parser.parse_args()
    web.run_app(build_app(args.mode), host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
