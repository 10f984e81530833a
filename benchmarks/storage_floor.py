"""What SQLite alone costs for the rows the bridge stores: the floor under the intake.

    .venv/bin/python benchmarks/storage_floor.py [--batches 4000] [--group 32]

The benchmark's batches (10 items) are routed and rendered by the bridge's own router on
the benchmark's seven routes, and turned into the bridge's own INSERT statements
(`insert_statements`), all before the clock starts. Timed: only executing those
statements on a connection opened exactly as the bridge opens its outbox (WAL,
synchronous=FULL, its schema and indexes), `--group` batches per transaction (one fsync
each; the bridge's groups under saturation are smaller), in one thread, with nothing else
running in the process: no HTTP, no parsing, no routing, no event loop, no savepoints, no
hand-offs. So it is a lower bound on the storage part of the intake, not an estimate of it.

Prints one JSON object: batches/s (wall), CPU per batch (the process, which is this one
thread), rows and payload bytes per batch. intake_floor.py runs it as its `storage-alone`
variant, beside the bare app in the same round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BatchFactory, bridge_config

from bridge.config import load_config
from bridge.models import Batch
from bridge.outbox.memory import MemoryStore
from bridge.outbox.sqlite import SqliteStore, insert_statements
from bridge.parse import parse_request
from bridge.runtime import build_runtime


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batches", type=int, default=4000, help="batches written (timed)")
    p.add_argument("--warmup", type=int, default=400, help="batches written first, untimed")
    p.add_argument("--group", type=int, default=32,
                   help="batches per transaction (the load's concurrency is the most a "
                   "group commit can gather)")
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--data-dir", help="where the SQLite file lives (default: $TMPDIR)")
    p.add_argument("--prefix", type=int, default=900, help="keeps batch contents unique")
    return p.parse_args()


def statements(workdir: Path, args: argparse.Namespace) -> tuple[list[Any], int, int]:
    """Per batch, the bridge's INSERT statements; and the rows and payload bytes in all."""
    cfg = workdir / "bridge.yaml"
    cfg.write_text(bridge_config(1, "http://127.0.0.1:1/hook", workdir / "unused.db"))
    runtime = build_runtime(load_config(cfg).config, store=MemoryStore())
    factory = BatchFactory(args.prefix, items=args.items)
    out, rows, payload_bytes = [], 0, 0
    now = time.time()
    for n in range(args.warmup + args.batches):
        batch = parse_request(factory.body(n))
        assert isinstance(batch, Batch)
        deliveries = runtime.router.route_batch(batch)
        rows += len(deliveries)
        payload_bytes += sum(len(v) for d in deliveries for v in d.payload.values())
        out.append(insert_statements(deliveries, now))
    return out, rows, payload_bytes


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="storage-floor-", dir=args.data_dir) as tmp:
        workdir = Path(tmp)
        per_batch, rows, payload_bytes = statements(workdir, args)
        outbox = SqliteStore(str(workdir / "outbox.db"))
        conn = outbox._connect()  # the bridge's own pragmas, schema and indexes

        def write(batches: list[Any]) -> None:
            for start in range(0, len(batches), args.group):
                conn.execute("BEGIN IMMEDIATE")
                for chunks in batches[start:start + args.group]:
                    for sql, params in chunks:
                        conn.execute(sql, params)
                conn.execute("COMMIT")

        write(per_batch[:args.warmup])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        write(per_batch[args.warmup:])
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        stored = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        conn.close()
    total = args.warmup + args.batches
    if stored != rows:
        raise RuntimeError(f"{stored} rows stored of {rows} written: ids collided")
    json.dump({"batches_per_s": args.batches / wall,
               "cpu_us_per_batch": 1e6 * cpu / args.batches,
               "rows_per_batch": rows / total,
               "payload_bytes_per_batch": payload_bytes / total,
               "group": args.group, "batches": args.batches}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
