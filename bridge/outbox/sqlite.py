"""SQLite outbox (WAL): the embedded default. One writer thread, group commit.

Every operation is queued to one thread that owns the connection. The thread drains the
queue, runs everything it found in ONE transaction (each operation in its own savepoint, or
as one statement, which SQLite undoes alone if it fails, so one failure cannot undo
another's work), commits once and wakes all callers: concurrent intakes share an fsync
instead of paying one each. SQLite storage is for one bridge process; several replicas
share PostgreSQL.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bridge.models import Delivery, NewDelivery, Status
from bridge.outbox.base import Outbox, StorageInUse

T = TypeVar("T")
MAX_GROUP = 256  # operations per commit; bounds how long one transaction holds the lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sink TEXT NOT NULL,
    route TEXT NOT NULL,
    item_uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    batch_id TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    group_key TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (sink, next_attempt_at, seq) WHERE status = 'pending';
-- Settled rows only (dead-letter list, sweep): a pending row pays for no entry here, which
-- keeps one index update off every intake. Pending rows are counted through deliveries_due.
-- Queries repeat `status <> 'pending'` word for word: only then does SQLite use this index.
DROP INDEX IF EXISTS deliveries_by_status;
CREATE INDEX IF NOT EXISTS deliveries_settled
    ON deliveries (status, updated_at) WHERE status <> 'pending';
CREATE INDEX IF NOT EXISTS deliveries_groups
    ON deliveries (sink, group_key, seq) WHERE status = 'pending' AND group_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS sink_state (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "id, sink, route, item_uuid, kind, batch_id, payload, status, attempts, "
    "next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until"
)


def stored_id(delivery_id: str) -> bytes | str:
    """The stored form of an id: the 16 bytes behind `dlv_<32 hex>`, other ids as they are.

    The UNIQUE index on ids is the largest cost of an insert (their order is random), and
    16-byte keys make it less than half as big and cheaper to search as 36-character text.
    """
    if len(delivery_id) == 36 and delivery_id.startswith("dlv_"):
        try:
            raw = bytes.fromhex(delivery_id[4:])
        except ValueError:
            return delivery_id
        if raw.hex() == delivery_id[4:]:  # lower-case hex only: the round trip is exact
            return raw
    return delivery_id


def id_of_stored(stored: bytes | str) -> str:
    return "dlv_" + stored.hex() if isinstance(stored, bytes) else stored


# Rows per INSERT statement. One statement for many rows releases and retakes the GIL once,
# where executemany does it for every row: with the event loop waiting for the GIL, each
# of those handovers costs a thread switch.
INSERT_ROWS = 64


@functools.lru_cache(maxsize=INSERT_ROWS)
def _insert_sql(rows: int) -> str:
    return ("INSERT OR IGNORE INTO deliveries (id, sink, route, item_uuid, kind, batch_id, "
            "payload, status, next_attempt_at, last_error, created_at, enqueued_at, "
            "updated_at, group_key) VALUES "
            + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"] * rows))


_PACKED = "\x01"  # marks a packed payload; older rows hold a JSON object


def _pack(payload: dict[str, str]) -> str:
    """`<len>:<key><len>:<value>...`: a rendered body is stored as it is, where JSON would
    escape every quote in it (and cost more than the insert)."""
    parts = [_PACKED]
    for k, v in payload.items():
        parts += (str(len(k)), ":", k, str(len(v)), ":", v)
    return "".join(parts)


def _unpack(text: str) -> dict[str, str]:
    if not text.startswith(_PACKED):
        result: dict[str, str] = json.loads(text)
        return result
    out: list[str] = []
    pos = 1
    while pos < len(text):
        colon = text.index(":", pos)
        end = colon + 1 + int(text[pos:colon])
        out.append(text[colon + 1:end])
        pos = end
    return dict(zip(out[::2], out[1::2], strict=True))


def _row(r: tuple[Any, ...]) -> Delivery:
    return Delivery(
        id=id_of_stored(r[0]), sink=r[1], route=r[2], item_uuid=r[3], kind=r[4], batch_id=r[5],
        payload=_unpack(r[6]), status=Status(r[7]), attempts=r[8], next_attempt_at=r[9],
        last_error=r[10], created_at=r[11], enqueued_at=r[12], updated_at=r[13],
        group_key=r[14], lease_until=r[15],
    )


SCHEMA_VERSION = 1


def _upgrade(conn: sqlite3.Connection) -> None:
    """Version 1 stores `dlv_` ids as 16 bytes: ids written as text before are converted,
    or lookups by id (complete, retry, replay) and the duplicate check would miss them."""
    conn.execute("BEGIN IMMEDIATE")
    rows = conn.execute("SELECT seq, id FROM deliveries WHERE typeof(id) = 'text'").fetchall()
    conn.executemany("UPDATE OR IGNORE deliveries SET id = ? WHERE seq = ?",
                     [(stored_id(i), seq) for seq, i in rows if stored_id(i) != i])
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


def insert_statements(deliveries: list[NewDelivery], now: float) -> list[tuple[str, list[Any]]]:
    """An intake's INSERTs, one flat parameter list per statement. Built on the event loop:
    the writer thread then only binds and steps, and needs the GIL (held by the loop most of
    the time under load) as briefly as possible."""
    chunks: list[tuple[str, list[Any]]] = []
    for start in range(0, len(deliveries), INSERT_ROWS):
        part = deliveries[start:start + INSERT_ROWS]
        params: list[Any] = []
        for d in part:
            params += (stored_id(d.id), d.sink, d.route, d.item_uuid, d.kind, d.batch_id,
                       _pack(d.payload),
                       Status.DEAD.value if d.error else Status.PENDING.value,
                       now + d.delay, d.error, now, now, now, d.group_key)
        chunks.append((_insert_sql(len(part)), params))
    return chunks


class _Op:
    __slots__ = ("fn", "future", "loop", "one_statement")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any],
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 one_statement: bool) -> None:
        self.fn, self.loop, self.future = fn, loop, future
        self.one_statement = one_statement


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(
    settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
) -> None:
    for future, result, error in settled:
        _settle(future, result, error)


class SqliteOutbox(Outbox):
    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.commits = 0  # how many transactions served how many operations: group commit
        self.operations = 0

    # ---- the writer thread -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        folder = os.path.dirname(self.path)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a 200 to isendu must survive a power cut, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
        if columns and "group_key" not in columns:  # a file from before digests existed
            conn.execute("ALTER TABLE deliveries ADD COLUMN group_key TEXT")
        conn.executescript(SCHEMA)
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            _upgrade(conn)
        return conn

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            ops = [first]
            stop = False
            while len(ops) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                ops.append(nxt)
            self._run_group(conn, ops)
            if stop:
                break
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                if op.one_statement:
                    # A statement that fails undoes its own changes, so it needs no
                    # savepoint: two statements less, each a wait for the GIL on this
                    # thread while the event loop holds it (~15% more intakes/s).
                    before = conn.total_changes
                    try:
                        results.append((op.fn(conn), None))
                    except Exception as exc:
                        # Unless SQLite undid the whole transaction (full disk, I/O error)
                        # or kept part of the statement (a RAISE(FAIL) trigger): then the
                        # group fails as a whole, and nobody is told a half was stored.
                        if not conn.in_transaction or conn.total_changes != before:
                            raise
                        results.append((None, exc))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op.fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((None, exc))
            conn.execute("COMMIT")
            self.commits += 1
            self.operations += len(ops)
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [(None, exc) for _ in ops]
        # One wake-up per event loop for the whole group, not one per operation: each
        # call_soon_threadsafe writes to the loop's self-pipe and costs the loop a turn.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any,
                                                            BaseException | None]]] = {}
        for op, (result, error) in zip(ops, results, strict=True):
            by_loop.setdefault(op.loop, []).append((op.future, result, error))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *,
                    one_statement: bool = False) -> T:
        """Run `fn` on the writer thread in the next group's transaction. `one_statement`:
        `fn` runs exactly one statement and nothing else that can fail after it."""
        if self._thread is None:
            raise RuntimeError("outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, loop, future, one_statement))
        return await future

    # ---- the interface -----------------------------------------------------------------

    async def open(self, *, recover: bool = False) -> None:
        if self._thread is not None:
            return
        if recover:
            self._lock_exclusively()
        conn = await asyncio.to_thread(self._connect)
        self._thread = threading.Thread(target=self._serve, args=(conn,), name="outbox-sqlite",
                                        daemon=True)
        self._thread.start()
        if recover:
            # We hold the lock, so any lease left is from a process of ours that died
            # mid-send: its deliveries are due again now (at-least-once).
            await self._call(lambda c: c.execute(
                "UPDATE deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL"))

    def _lock_exclusively(self) -> None:
        """One serving process per SQLite file: a second would double-send leased work."""
        folder = os.path.dirname(self.path)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageInUse(
                f"another bridge process is serving {self.path}; SQLite storage is for one "
                "process (several replicas need PostgreSQL)") from None
        self._lock_fd = fd

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        chunks = insert_statements(deliveries, now)

        def write(c: sqlite3.Connection) -> int:
            before = c.total_changes
            for sql, params in chunks:
                c.execute(sql, params)
            return c.total_changes - before

        return await self._call(write, one_statement=len(chunks) == 1)

    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        def take(c: sqlite3.Connection) -> list[Delivery]:
            rows = c.execute(
                f"UPDATE deliveries SET attempts = attempts + 1, lease_until = ?, updated_at = ? "
                f"WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = ? "
                f"AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?) "
                f"ORDER BY next_attempt_at, seq LIMIT ?) RETURNING {_COLUMNS}, seq",
                (now + lease, now, sink, now, now, limit),
            ).fetchall()
            rows.sort(key=lambda r: (r[9], r[-1]))  # RETURNING order is unspecified
            return [_row(r) for r in rows]

        return await self._call(take)

    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        def take(c: sqlite3.Connection) -> list[Delivery]:
            rows = c.execute(
                f"UPDATE deliveries SET attempts = attempts + 1, lease_until = ?, updated_at = ? "
                f"WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = ? "
                f"AND group_key = ? AND (lease_until IS NULL OR lease_until <= ?) "
                f"ORDER BY seq LIMIT ?) RETURNING {_COLUMNS}, seq",
                (now + lease, now, sink, group_key, now, limit),
            ).fetchall()
            rows.sort(key=lambda r: r[-1])
            return [_row(r) for r in rows]

        return await self._call(take)

    async def complete(self, ids: list[str], now: float) -> None:
        await self._call(lambda c: c.executemany(
            "UPDATE deliveries SET status = 'delivered', lease_until = NULL, last_error = NULL, "
            "updated_at = ? WHERE id = ?", [(now, stored_id(i)) for i in ids]))

    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        await self._call(lambda c: c.execute(
            "UPDATE deliveries SET next_attempt_at = ?, last_error = ?, lease_until = NULL, "
            "updated_at = ?, attempts = MAX(attempts - ?, 0) WHERE id = ? AND status = 'pending'",
            (when, error, now, 1 if refund else 0, stored_id(delivery_id))))

    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None:
        await self._call(lambda c: c.execute(
            "UPDATE deliveries SET status = 'dead', last_error = ?, lease_until = NULL, "
            "updated_at = ? WHERE id = ?", (reason, now, stored_id(delivery_id))))

    async def release(self, claimed: list[Delivery], now: float) -> None:
        await self._call(lambda c: c.executemany(
            "UPDATE deliveries SET attempts = MAX(attempts - 1, 0), lease_until = NULL "
            "WHERE id = ? AND status = 'pending' AND lease_until = ?",
            [(stored_id(d.id), d.lease_until) for d in claimed]))

    async def next_due(self, sink: str) -> float | None:
        def read(c: sqlite3.Connection) -> float | None:
            row = c.execute(
                "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, 0))) FROM deliveries "
                "WHERE status = 'pending' AND sink = ?", (sink,)).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._call(read)

    async def get(self, delivery_id: str) -> Delivery | None:
        def read(c: sqlite3.Connection) -> Delivery | None:
            row = c.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?",
                            (stored_id(delivery_id),)).fetchone()
            return _row(row) if row else None

        return await self._call(read)

    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        return await self._call(lambda c: [_row(r) for r in c.execute(
            f"SELECT {_COLUMNS} FROM deliveries WHERE status = 'dead' AND status <> 'pending' "
            f"ORDER BY updated_at DESC, seq DESC LIMIT ?", (limit,)).fetchall()])

    async def replay(self, ids: list[str] | None, now: float) -> int:
        sql = ("UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?, "
               "enqueued_at = ?, lease_until = NULL, updated_at = ? "
               "WHERE status = 'dead' AND status <> 'pending'")

        def write(c: sqlite3.Connection) -> int:
            before = c.total_changes
            if ids is None:
                c.execute(sql, (now, now, now))
            else:
                c.executemany(sql + " AND id = ?", [(now, now, now, stored_id(i)) for i in ids])
            return c.total_changes - before

        return await self._call(write)

    async def sweep(self, delivered_before: float) -> int:
        return await self._call(lambda c: c.execute(
            "DELETE FROM deliveries WHERE status = 'delivered' AND status <> 'pending' "
            "AND updated_at < ?",
            (delivered_before,)).rowcount)

    async def counts(self) -> dict[str, int]:
        def read(c: sqlite3.Connection) -> dict[str, int]:
            out = {s.value: 0 for s in Status}
            for status, n in c.execute("SELECT status, COUNT(*) FROM deliveries "
                                       "WHERE status <> 'pending' GROUP BY status"):
                out[status] = n
            out["pending"] = c.execute(
                "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
            return out

        return await self._call(read)

    async def forget_state(self, updated_before: float) -> int:
        return await self._call(lambda c: c.execute(
            "DELETE FROM sink_state WHERE updated_at < ?", (updated_before,)).rowcount)

    async def get_state(self, scope: str, key: str) -> str | None:
        def read(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT value FROM sink_state WHERE scope = ? AND key = ?",
                            (scope, key)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(read)

    async def put_state(self, scope: str, key: str, value: str, now: float) -> None:
        await self._call(lambda c: c.execute(
            "INSERT INTO sink_state (scope, key, value, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at", (scope, key, value, now)))

    async def ping(self) -> None:
        # A real write (rolled back by nobody; it changes nothing) proves the file is writable.
        await self._call(lambda c: c.execute("CREATE TABLE IF NOT EXISTS ping (x)")
                         and c.execute("DELETE FROM ping"))
