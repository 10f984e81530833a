"""Writes sqlite.sql: a SQLite database as the release before migration 0005 left it.

Run from a checkout of that release (commit 4473853, schema 0001-0004), with the bridge of
that checkout on the path:

    git worktree add /tmp/release-0.4 4473853
    cd /tmp/release-0.4 && PYTHONPATH=$PWD /path/to/.venv/bin/python \\
        /path/to/tests/data/release-0.4/make.py /path/to/tests/data/release-0.4/sqlite.sql

The database is made the way `bridge serve` makes one: the first 15 sample batches (in
tests/data/isendu/batches.jsonl) appended to the inbox and sequenced by that release's own
sequencer with shipment state on, every delivery for a receiver that is never called
(pending), then one delivery dead-lettered and one delivered, and a sink's memory written.
The dump is what tests/integration/test_migrations.py upgrades.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """\
integrations:
  - key_id: k
    secret: s
storage: sqlite:///{db}
sinks:
  hook:
    type: http
    url: http://127.0.0.1:9/never-called
routes:
  - name: all
    to: hook
"""


async def build(db: Path, batches: list[bytes]) -> None:
    from bridge.config import load_config
    from bridge.models import InboxBatch
    from bridge.runtime import build_runtime

    cfg = db.with_suffix(".yaml")
    cfg.write_text(CONFIG.format(db=db))
    rt = build_runtime(load_config(cfg).config)
    await rt.store.open()
    for n, body in enumerate(batches):
        await rt.store.append(InboxBatch(f"{n:032x}", 1_765_000_000.0 + n, 1, body))
    await rt.sequencer.start()
    while (await rt.store.inbox_depth())[0]:  # noqa: ASYNC110 (no hook to wait on)
        await asyncio.sleep(0.05)
    await rt.sequencer.stop()
    now = time.time()
    claimed = await rt.store.claim("hook", 2, now, 30)
    await rt.store.dead_letter(claimed[0].id, "HTTP 400: refused", now)
    await rt.store.complete([claimed[1].id], now)
    await rt.store.remember("slack:C1", "u1", "1700000000.0001", now)
    await rt.store.close()


def main() -> None:
    out = Path(sys.argv[1])
    samples = out.parents[1] / "isendu" / "batches.jsonl"
    batches = [line.encode() for line in samples.read_text().splitlines() if line.strip()][:15]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bridge.db"
        asyncio.run(build(db, batches))
        conn = sqlite3.connect(db)
        out.write_text("\n".join(conn.iterdump()) + "\n")
        conn.close()


if __name__ == "__main__":
    main()
