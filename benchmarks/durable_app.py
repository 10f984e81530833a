"""The durable intake's floor: a minimal aiohttp app that stores each batch as one SQLite row.

    python benchmarks/durable_app.py --port 9201 --db /tmp/floor.db

What the issue "Inbox-first intake" measured as "a durable intake can be fast": parse the
body (orjson), check that it is an object whose `order` / `tracking` are lists of objects
with a `uuid`, write the body as one row from a writer thread that commits whatever is
queued in one transaction (WAL, synchronous=FULL: an fsync per commit), and answer 200
only after that commit. A verification is answered from memory, as the bridge does.
`--row-bytes N` stores only each body's first N bytes: what the row's size costs.

Nothing else: no error answers worth the name, no limits, no metrics, no logs, no
sequencing. The bridge's intake does the same work plus all of that; the gap between the
two is the price of the rest, measured beside the bare app (intake_floor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
import threading
import time
from typing import Any

import orjson
from aiohttp import web
from common import KEY_ID, SECRET


class Writer:
    """One thread owning the connection; everything queued when it looks is one commit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.queue: queue.SimpleQueue[tuple[tuple[Any, ...], asyncio.Future[None]] | None] = (
            queue.SimpleQueue())
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    def serve(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS inbox (id TEXT PRIMARY KEY, received_at REAL,"
                     " items INTEGER, body BLOB)")
        while (first := self.queue.get()) is not None:
            group = [first]
            while True:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    return
                group.append(nxt)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO inbox VALUES (?, ?, ?, ?)", [row for row, _ in group])
            conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(_done, [future for _, future in group])

    async def append(self, row: tuple[Any, ...]) -> None:
        future = self.loop.create_future()
        self.queue.put((row, future))
        await future


DB = web.AppKey("db", Writer)
ROW_BYTES = web.AppKey("row_bytes", int)


def _done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return web.json_response({"error": "malformed JSON"}, status=400)
    if not isinstance(doc, dict):
        return web.json_response({"error": "expected an object"}, status=400)
    if "keyId" in doc and "order" not in doc and "tracking" not in doc:
        if doc["keyId"] == KEY_ID:
            return web.json_response({"response": SECRET})
        return web.json_response({"error": "unknown keyId"}, status=403)
    items = 0
    for kind in ("order", "tracking"):
        entries = doc.get(kind) or ()
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("uuid"), str) for e in entries):
            return web.json_response({"error": f"bad {kind}"}, status=400)
        items += len(entries)
    batch_id = os.urandom(16).hex()
    row_bytes = request.app[ROW_BYTES]
    await request.app[DB].append((batch_id, time.time(), items,
                                  body[:row_bytes] if row_bytes else body))
    return web.json_response({"accepted": items, "batch_id": batch_id})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--path", default="/isendu/webhook")
    parser.add_argument("--row-bytes", type=int, default=0,
                        help="store only this many bytes of each body (0: all of it)")
    args = parser.parse_args()
    app = web.Application()
    app[DB] = Writer(args.db)
    app[ROW_BYTES] = args.row_bytes

    async def start(app: web.Application) -> None:
        app[DB].start()

    app.on_startup.append(start)
    app.router.add_post(args.path, webhook)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
