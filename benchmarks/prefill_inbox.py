"""Fill a SQLite inbox with accepted batches, as if `bridge serve` had taken them and
stopped before sequencing any (an outage of the sequencer, a restart after a burst).

    PYTHONPATH=<bridge src> python benchmarks/prefill_inbox.py DB --batches 100000

Every batch goes in through the bridge's own `Store.append` (the call the intake makes
before its 200), with a body from BatchFactory (unique, realistic items) and `received_at`
spread over the last `--span` seconds, oldest first. Appends run `--parallel` at a time so
the SQLite writer groups them into shared commits, as it does under load. Prints one JSON
object: batches, seconds, the file's size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import BatchFactory


async def fill(args: argparse.Namespace, db: Path) -> dict[str, Any]:
    # The bridge under test: whatever `bridge` PYTHONPATH (or the venv) points at.
    from bridge.models import InboxBatch
    from bridge.outbox import from_url

    store = from_url(f"sqlite:///{db}")
    await store.open()
    factory = BatchFactory(prefix=args.prefix, items=args.items)
    now = time.time()
    step = args.span / max(1, args.batches)
    started = time.monotonic()
    try:
        for first in range(0, args.batches, args.parallel):
            await asyncio.gather(*(
                store.append(InboxBatch(os.urandom(16).hex(),
                                        now - args.span + n * step, args.items,
                                        factory.body(n)))
                for n in range(first, min(first + args.parallel, args.batches))))
    finally:
        await store.close()
    return {"batches": args.batches, "items_per_batch": args.items,
            "seconds": round(time.monotonic() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("db", help="the SQLite file (created, or added to)")
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10, help="items per batch")
    parser.add_argument("--span", type=float, default=1800.0,
                        help="seconds the batches' received_at spread over (ending now)")
    parser.add_argument("--parallel", type=int, default=256, help="appends in flight")
    parser.add_argument("--prefix", type=int, default=70, help="makes the bodies unique")
    args = parser.parse_args()
    db = Path(args.db).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(fill(args, db))
    result["db_mb"] = round(db.stat().st_size / 2**20, 1)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
