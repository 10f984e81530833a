"""Writes sqlite.sql: a SQLite database as the release before migration 0008 left it, with a
coalescing window waiting for a retry and its shipment's later deliveries behind it.

Run from a checkout of that release (commit b948bb2, schema 0001-0007), with the bridge of
that checkout on the path:

    git worktree add /tmp/release-0.7 b948bb2
    cd /tmp/release-0.7 && PYTHONPATH=$PWD /path/to/.venv/bin/python \\
        /path/to/tests/data/release-0.7/make.py /path/to/tests/data/release-0.7/sqlite.sql

The database is made the way `bridge serve` makes one: the first 10 sample batches (in
tests/data/isendu/batches.jsonl) appended to the inbox and sequenced by that release's own
sequencer with shipment state on, for two routes to one receiver that is never called: one
sending every item, one coalescing tracking changes for 1 s. Once the windows closed, that
release's claims (as its dispatcher makes them) take one window, whose send failed and waits
a day for its retry; one other delivery is dead-lettered, one delivered, the rest given back.
Then a new snapshot of the window's shipment is sequenced: its later deliveries (one of each
route) are pending behind the window. The dump is what tests/integration/test_migrations.py
upgrades.
"""

from __future__ import annotations

import asyncio
import copy
import json
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
  - name: held
    kind: tracking
    coalesce: 1s
    to: hook
"""
COALESCED = "coalesce:"


async def sequence(rt: object, bodies: list[bytes], first: int) -> None:
    from bridge.models import InboxBatch

    store = rt.store  # type: ignore[attr-defined]
    for n, body in enumerate(bodies, first):
        await store.append(InboxBatch(f"{n:032x}", time.time(), 1, body))
    await rt.sequencer.start()  # type: ignore[attr-defined]
    while (await store.inbox_depth())[0]:  # noqa: ASYNC110 (no hook to wait on)
        await asyncio.sleep(0.05)
    await rt.sequencer.stop()  # type: ignore[attr-defined]


def next_snapshot(bodies: list[bytes], uuid: str) -> bytes:
    """The shipment's last snapshot in `bodies`, one step later."""
    last = [t for b in bodies for t in json.loads(b).get("tracking", []) if t["uuid"] == uuid][-1]
    item = copy.deepcopy(last)
    step = dict(item["steps"][-1])
    step.update(timestamp="2025-11-09T09:00:00Z", status="DELIVERED",
                description="Delivered to the recipient")
    step.pop("error", None)
    item["steps"].append(step)
    item["status"], item["delivered"] = "DELIVERED", True
    return json.dumps({"tracking": [item]}).encode()


async def build(db: Path, bodies: list[bytes]) -> None:
    from bridge.config import load_config
    from bridge.runtime import build_runtime

    cfg = db.with_suffix(".yaml")
    cfg.write_text(CONFIG.format(db=db))
    rt = build_runtime(load_config(cfg).config)
    store = rt.store
    await store.open()
    await sequence(rt, bodies, 0)
    await asyncio.sleep(1.2)  # every window closed
    now = time.time()
    claimed = await store.claim("hook", 500, now, 30)
    window = next(d for d in claimed if d.group_key and d.group_key.startswith(COALESCED))
    members = [d for d in claimed if d.group_key == window.group_key]
    members += await store.claim_group("hook", window.group_key, 500, now, 30)
    for d in members:  # the window's send failed: its retry is a day away
        await store.retry_at(d.id, now + 86400, "HTTP 503: busy", now)
    others = [d for d in claimed if d.group_key is None and d.item_uuid != window.item_uuid]
    await store.dead_letter(others[0].id, "HTTP 400: refused", now)
    await store.complete([others[1].id], now)
    await store.release([d for d in claimed if d.group_key != window.group_key
                         and d.id not in (others[0].id, others[1].id)], now)
    await store.remember("slack:C1", "u1", "1700000000.0001", now)
    await sequence(rt, [next_snapshot(bodies, window.item_uuid)], len(bodies))
    await asyncio.sleep(1.2)  # its new window closed too
    await store.close()


def main() -> None:
    out = Path(sys.argv[1])
    samples = out.parents[1] / "isendu" / "batches.jsonl"
    bodies = [line.encode() for line in samples.read_text().splitlines() if line.strip()][:10]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bridge.db"
        asyncio.run(build(db, bodies))
        conn = sqlite3.connect(db)
        out.write_text("\n".join(conn.iterdump()) + "\n")
        conn.close()


if __name__ == "__main__":
    main()
