"""Two `bridge serve` replicas on one PostgreSQL at low load: how long from a batch's
acceptance to its deliveries at the sink, with the sequencer on one replica and the
dispatchers on both woken by LISTEN/NOTIFY (polling every second is only the fallback).

    .venv/bin/python benchmarks/replica_latency.py [--batches 40] [--interval 0.5]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Batches of one tracking item go one at a time, alternately to each replica, `--interval`
seconds apart (a quiet shop's feed). The counting sink times each delivery from the
batch's `received_at` (set at intake) to its arrival: e2e p50/p90/p99/max. Target: within
100 ms. Creates and drops a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import asyncpg
from common import (
    HOST,
    PYTHON,
    SINK_SERVER,
    WEBHOOK_PATH,
    BatchFactory,
    bridge_config,
    children_in,
    free_port,
    http_json,
    run_main,
    start_bridge,
    wait_ready,
    work_dir,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    return p.parse_args()


async def _db(admin: str, name: str, create: bool) -> None:
    conn = await asyncpg.connect(admin)
    try:
        if create:
            await conn.execute(f'CREATE DATABASE "{name}"')
        else:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def main() -> int:
    args = parse_args()
    name = f"bridge_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_db(args.pg, name, True))
    dsn = args.pg.rsplit("/", 1)[0] + f"/{name}"
    try:
        with work_dir(args.keep, None) as workdir, children_in(workdir) as kids:
            sink_port = free_port()
            sink = kids.start("sink", [PYTHON, SINK_SERVER, "--port", str(sink_port)])
            sink_url = f"http://{HOST}:{sink_port}"
            wait_ready(sink_url + "/healthz", sink)
            bases = []
            for n in range(2):
                text = bridge_config(free_port(), sink_url + "/hook", dsn)
                _, base = start_bridge(kids, f"replica-{n}", text, "WARNING")
                bases.append(base)
            time.sleep(2.0)  # both idle: the dispatchers are waiting, not polling busily
            factory = BatchFactory(prefix=5, items=1)
            t0 = time.time()
            for i in range(args.batches):
                http_json(bases[i % 2] + WEBHOOK_PATH, data=factory.body(i))
                time.sleep(args.interval)
            time.sleep(2.0)
            stats: dict[str, Any] = http_json(sink_url + f"/stats?t0={t0}&t1=1e12")
    finally:
        asyncio.run(_db(args.pg, name, False))
    print(json.dumps({"batches": args.batches, "interval": args.interval,
                      "deliveries": stats["count"], "e2e": stats["e2e"]}))
    return 0


if __name__ == "__main__":
    run_main(main)
    sys.exit(0)
