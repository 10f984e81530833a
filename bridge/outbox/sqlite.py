"""SQLite store (WAL): the embedded default. One writer thread, group commit.

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
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bridge.errors import StorageError, StorageFileGone, StorageFull, StorageInUse
from bridge.models import (
    COALESCED,
    BatchInfo,
    BatchStatus,
    Delivery,
    Failed,
    InboxBatch,
    NewDelivery,
    Outcome,
    Sequenced,
    Status,
)
from bridge.outbox.base import Store
from bridge.outbox.migrate import plan
from bridge.outbox.sql import queries

log = logging.getLogger("bridge.storage")

T = TypeVar("T")
MAX_GROUP = 256  # operations per commit; bounds how long one transaction holds the lock
# Seconds the clock may go back before pending deliveries are moved back with it (less is
# waited out: new deliveries are stored as of the last ones).
CLOCK_STEP = 60.0
Q = queries("sqlite")

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


@functools.lru_cache(maxsize=4 * INSERT_ROWS)  # every size of its four queries
def _rows_sql(query: str, rows: int) -> str:
    """The named query, its one VALUES group repeated for `rows` rows."""
    head, values = Q[query].split("VALUES")
    group, _, tail = values.strip().partition(")")
    return head + "VALUES " + ",".join([group + ")"] * rows) + tail


def _move_back(c: sqlite3.Connection, now: float) -> tuple[float, int]:
    """queries.sql clock_went_back, by how far the newest delivery was stored ahead of `now`
    (nothing when it was not: done already, by this process or another)."""
    newest = c.execute(Q["last_stored"]).fetchone()
    step = (newest[0] - now) if newest else 0.0
    if step <= CLOCK_STEP:
        return 0.0, 0
    before = c.total_changes
    c.execute(Q["clock_went_back"], {"step": step, "now": now})
    return step, c.total_changes - before


def _read_states(sql: str, params: list[str], c: sqlite3.Connection) -> list[Any]:
    return c.execute(sql, params).fetchall()


def _insert_sql(rows: int) -> str:
    return _rows_sql("insert_deliveries", rows)


def state_statements(states: dict[tuple[str, str], str], now: float
                     ) -> list[tuple[str, list[Any]]]:
    """The statements that write a settle's shipment states, INSERT_ROWS rows each: every
    part updated, then inserted (queries.sql, update_states)."""
    rows = [(kind, uuid, state, now) for (kind, uuid), state in states.items()]
    out = []
    for start in range(0, len(rows), INSERT_ROWS):
        part = rows[start:start + INSERT_ROWS]
        params = [v for row in part for v in row]
        out.append((_rows_sql("update_states", len(part)), params))
        out.append((_rows_sql("insert_states", len(part)), params))
    return out


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
        group_key=r[14], lease_until=r[15], seq=r[16] if len(r) > 16 else 0,
    )


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
                       now + d.delay, d.error, now, now, now, d.group_key,
                       # Not due yet and outside a digest, or in a coalescing window
                       # (it holds once closed): later ones of its item may have to wait.
                       1 if (d.delay > 0 if d.group_key is None
                             else d.group_key.startswith(COALESCED)) else None)
        chunks.append((_insert_sql(len(part)), params))
    return chunks


def revive_params(deliveries: list[NewDelivery], now: float) -> list[dict[str, Any]]:
    """queries.sql revive_unrendered's parameters: a rerouted batch's deliveries that
    rendered."""
    return [{"id": stored_id(d.id), "payload": _pack(d.payload), "due": now + d.delay,
             "now": now, "group_key": d.group_key} for d in deliveries if d.error is None]


class _Op:
    __slots__ = ("fn", "future", "grows", "loop", "one_statement", "urgent", "weight")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any],
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 one_statement: bool, urgent: bool, weight: int, grows: bool) -> None:
        self.fn, self.loop, self.future = fn, loop, future
        self.one_statement, self.urgent, self.weight = one_statement, urgent, weight
        self.grows = grows


def _take_group(queued: list[_Op]) -> tuple[list[_Op], list[_Op]]:
    """(this group, what waits for the next): every intake first, then the other work in
    order, the first always and more while it stays under NORMAL_WEIGHT rows."""
    group = [op for op in queued if op.urgent]
    rest = [op for op in queued if not op.urgent]
    weight, taken = 0, 0
    for op in rest:
        if taken and (weight + op.weight > NORMAL_WEIGHT or len(group) >= MAX_GROUP):
            break
        group.append(op)
        weight += op.weight
        taken += 1
    return group, rest[taken:]


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None
                   ) -> None:
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
        _settle_future(future, result, error)


def _adopt_unversioned(conn: sqlite3.Connection) -> None:
    """Before 0001: a file from before digests lacks group_key (0001's index needs it)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
    if columns and "group_key" not in columns:
        conn.execute("ALTER TABLE deliveries ADD COLUMN group_key TEXT")


def _convert_text_ids(conn: sqlite3.Connection) -> None:
    """After 0001: `dlv_` ids are stored as 16 bytes; ids that files from before stored as
    text are converted, or lookups by id and the duplicate check would miss them."""
    rows = conn.execute("SELECT seq, id FROM deliveries WHERE typeof(id) = 'text'").fetchall()
    conn.executemany("UPDATE OR IGNORE deliveries SET id = ? WHERE seq = ?",
                     [(stored_id(i), seq) for seq, i in rows if stored_id(i) != i])


# Python steps around a migration's SQL, for what SQL alone cannot say.
BEFORE = {1: _adopt_unversioned}
AFTER = {1: _convert_text_ids}


def apply_migrations(conn: sqlite3.Connection, now: float) -> list[str]:
    """Each pending step in a transaction of its own, recorded with it."""
    conn.execute(Q["create_migrations_table"])
    applied = {row[0] for row in conn.execute(Q["applied_migrations"])}
    done = []
    for step in plan("sqlite", applied):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if step.version in BEFORE:
                BEFORE[step.version](conn)
            for statement in _statements(step.sql):
                conn.execute(statement)
            if step.version in AFTER:
                AFTER[step.version](conn)
            conn.execute(Q["record_migration"], (step.version, step.name, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(f"{step.version:04d}_{step.name}")
    return done


def _statements(script: str) -> list[str]:
    """A migration's statements (executescript would COMMIT on its own)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


def _info(r: tuple[Any, ...]) -> BatchInfo:
    return BatchInfo(id=r[0], received_at=r[1], items=r[2], status=BatchStatus(r[3]),
                     deliveries=r[4], duplicates=r[5], error=r[6], sequenced_at=r[7])


# A group's sequencing work after its intakes, at most this many rows of it (one settle
# always goes): an intake then waits behind a few milliseconds of it, never a whole backlog.
NORMAL_WEIGHT = 512


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.commits = 0  # how many transactions served how many operations: group commit
        self.operations = 0
        self.migrated: list[str] = []
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._gone: StorageFileGone | None = None  # that file is no longer at self.path
        # Set when a write failed for want of room; cleared by the commit of one that needed
        # room (a batch, a settle, /readyz's probe). Updates in place may still succeed.
        self._full: StorageFull | None = None
        # When the last deliveries were stored. Stored ones are due in seq order, whatever
        # the clock does (an NTP step back): the claim's per-shipment order relies on it.
        self._stored_at = 0.0

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
        st = os.stat(self.path)
        self._file = (st.st_dev, st.st_ino)
        self.migrated = apply_migrations(conn, time.time())
        newest = conn.execute(Q["last_stored"]).fetchone()
        self._stored_at = newest[0] if newest else 0.0
        return conn

    def _check_file(self) -> StorageFileGone | None:
        """Whether the file open is still the one at self.path. A deleted or replaced file
        stays open and writable, unlinked: a batch committed to it is answered 200 and lost
        at the next start. Once gone, it stays gone (another file at the path is not ours)."""
        if self._gone is None:
            try:
                st = os.stat(self.path)
                now: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:  # gone, or its folder replaced or closed to us: not our file
                now = None
            if now != self._file:
                self._gone = StorageFileGone("the SQLite storage file was deleted or replaced "
                                             "while the bridge had it open")
                log.error("storage file deleted or replaced while open; no batch is "
                          "accepted until the bridge is restarted, which opens the file at "
                          "its path (what only the old file held is lost with it)",
                          extra={"path": self.path})
        return self._gone

    def _failure(self, exc: Exception) -> Exception:
        """What an operation's caller is told: a full disk (or max_page_count) as StorageFull,
        which the intake answers 503 and /readyz reports until room is made."""
        if (isinstance(exc, sqlite3.OperationalError)
                and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL):
            full = StorageFull(f"storage is full (SQLite: {exc})")
            full.__cause__ = exc
            self._full = full
            return full
        return exc

    async def _storing_at(self, now: float) -> float:
        """When deliveries stored `now` are stored: no earlier than the last ones (the
        claim's per-shipment order relies on it, an NTP step back included). A clock gone
        back further than CLOCK_STEP (a host that booted with its clock in the future, a VM
        restored) would make everything stored from now on wait until the clock is back
        there, however long: what is pending is moved back by the step instead, in order."""
        if self._stored_at - now > CLOCK_STEP:
            before, self._stored_at = self._stored_at, now  # a concurrent store: no 2nd look
            try:
                step, moved = await self._call(lambda c: _move_back(c, now))
            except BaseException:
                self._stored_at = max(self._stored_at, before)  # looked at again next time
                raise
            if moved:
                log.warning("the clock went back; deliveries stored while it was ahead moved "
                            "back with it",
                            extra={"seconds": round(step, 3), "deliveries": moved})
        self._stored_at = max(self._stored_at, now)
        return self._stored_at

    def _serve(self, conn: sqlite3.Connection) -> None:
        held: list[_Op] = []  # sequencing work left for the next group
        while True:
            if not held:
                first = self._queue.get()
                if first is None:
                    break
                held.append(first)
            stop = False
            while len(held) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                held.append(nxt)
            group, held = _take_group(held)
            self._run_group(conn, group)
            if stop:
                for op in held:  # close() waits for nothing queued after its stop
                    self._run_group(conn, [op])
                break
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        if self._gone is not None:
            # No intake is stored in a file nobody will open again. The rest goes on in it:
            # deliveries already accepted are still sent from it until the restart.
            refused = [op for op in ops if op.urgent]
            ops = [op for op in ops if not op.urgent]
            for op in refused:
                op.loop.call_soon_threadsafe(_settle_future, op.future, None, self._gone)
            if not ops:
                return
        intakes = any(op.urgent for op in ops)
        # The first operation of several statements (a settle, most often) runs first and
        # without a savepoint: should it fail, the transaction is begun again, as nothing
        # else is in it yet. A savepoint copies every page its operation changes to the
        # statement journal, which cost a settle of large rows a third of its time.
        lead = next((op for op in ops if not op.one_statement), None)
        if lead is not None:
            ops = [lead] + [op for op in ops if op is not lead]
        results: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if lead is not None:
                try:
                    results.append((lead.fn(conn), None))
                except Exception as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    results.append((None, self._failure(exc)))
            for op in ops[len(results):]:
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
                        results.append((None, self._failure(exc)))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op.fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((None, self._failure(exc)))
            # Checked last of all, once per group with intakes (one stat, the group's fsync
            # costs far more): a file gone before this commit takes none of them.
            if intakes and (gone := self._check_file()) is not None:
                raise gone
            conn.execute("COMMIT")
            self.commits += 1
            self.operations += len(ops)
            if self._full is not None and any(
                    op.grows and error is None for op, (_, error) in zip(ops, results,
                                                                       strict=True)):
                self._full = None
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if exc is self._gone:  # found just now: the others again, without the intakes
                self._run_group(conn, ops)
                return
            failure = self._failure(exc)
            results = [(None, failure) for _ in ops]
        # One wake-up per event loop for the whole group, not one per operation: each
        # call_soon_threadsafe writes to the loop's self-pipe and costs the loop a turn.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any,
                                                            BaseException | None]]] = {}
        for op, (result, error) in zip(ops, results, strict=True):
            by_loop.setdefault(op.loop, []).append((op.future, result, error))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *,
                    one_statement: bool = False, urgent: bool = False, weight: int = 1,
                    grows: bool = False) -> T:
        """Run `fn` on the writer thread in the next group's transaction. `one_statement`:
        `fn` runs exactly one statement and nothing else that can fail after it. `urgent`
        (intake): ahead of everything else queued. `weight`: rows it writes, roughly.
        `grows`: it adds rows, so its commit shows there is room again after a full disk."""
        if self._thread is None:
            raise StorageError("storage is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, loop, future, one_statement, urgent, weight, grows))
        return await future

    # ---- the store ---------------------------------------------------------------------

    async def open(self, *, recover: bool = False) -> None:
        if self._thread is not None:
            return
        if recover:
            self._lock_exclusively()
        try:
            conn = await asyncio.to_thread(self._connect)
        except BaseException:
            self._unlock()
            raise
        self._thread = threading.Thread(target=self._serve, args=(conn,), name="store-sqlite",
                                        daemon=True)
        self._thread.start()
        if recover:
            # We hold the lock, so any lease left is from a process of ours that died
            # mid-send: its deliveries are due again now (at-least-once).
            await self._call(lambda c: c.execute(Q["release_every_lease"]))

    async def migrate(self) -> list[str]:
        await self.open()
        return self.migrated

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

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)
        self._unlock()

    async def ping(self) -> None:
        def ping(c: sqlite3.Connection) -> None:
            if (gone := self._check_file()) is not None:
                raise gone
            # A real write (it changes nothing) proves the file is writable.
            c.execute(Q["ping_create"])
            c.execute(Q["ping_delete"])

        if self._full is not None:
            # After a full disk, only a write that needs room proves there is some again;
            # it is what ends the full state when no batch comes (a balancer sends none to
            # a bridge that is not ready).
            await self._call(lambda c: c.execute(Q["ping_create"]) and c.execute(
                Q["ping_room"]), grows=True)
            await self._call(lambda c: c.execute(Q["ping_delete"]), one_statement=True)
        await self._call(ping)
        if (full := self._full) is not None:  # a write failed for room since
            raise full

    # ---- outbox ------------------------------------------------------------------------

    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        chunks = insert_statements(deliveries, await self._storing_at(now))

        def write(c: sqlite3.Connection) -> int:
            before = c.total_changes
            for sql, params in chunks:
                c.execute(sql, params)
            return c.total_changes - before

        # Not used by `bridge serve` (the sequencer stores through settle). Beside a settle
        # in one writer group, a one-statement enqueue queued first would run after it (the
        # group's first operation of several statements leads) with the earlier storing
        # time and the later seq, which per-shipment order assumes never happens.
        return await self._call(write, one_statement=len(chunks) == 1,
                                weight=len(deliveries), grows=True)

    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        def take(c: sqlite3.Connection) -> list[Delivery]:
            rows = c.execute(Q["claim"], {"lease_until": now + lease, "now": now, "sink": sink,
                                          "limit": limit}).fetchall()
            rows.sort(key=lambda r: (r[9], r[-1]))  # RETURNING order is unspecified
            return [_row(r) for r in rows]

        return await self._call(take)

    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        def take(c: sqlite3.Connection) -> list[Delivery]:
            rows = c.execute(Q["claim_group"], {
                "lease_until": now + lease, "now": now, "sink": sink, "group_key": group_key,
                "limit": limit}).fetchall()
            rows.sort(key=lambda r: r[-1])
            return [_row(r) for r in rows]

        return await self._call(take)

    async def complete(self, ids: list[str], now: float) -> None:
        await self._call(lambda c: c.executemany(
            Q["complete"], [(now, stored_id(i)) for i in ids]), weight=len(ids))

    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        await self._call(lambda c: c.execute(Q["retry_at"], {
            "when": when, "error": error, "now": now, "refund": 1 if refund else 0,
            "id": stored_id(delivery_id)}))

    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None:
        await self._call(lambda c: c.execute(
            Q["dead_letter"], (reason, now, stored_id(delivery_id))))

    async def release(self, claimed: list[Delivery], now: float) -> None:
        await self._call(lambda c: c.executemany(
            Q["release"], [(stored_id(d.id), d.lease_until) for d in claimed]))

    async def next_due(self, sink: str) -> float | None:
        def read(c: sqlite3.Connection) -> float | None:
            row = c.execute(Q["next_due"], {"sink": sink}).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._call(read)

    async def get(self, delivery_id: str) -> Delivery | None:
        def read(c: sqlite3.Connection) -> Delivery | None:
            row = c.execute(Q["get_delivery"], (stored_id(delivery_id),)).fetchone()
            return _row(row) if row else None

        return await self._call(read)

    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        return await self._call(lambda c: [
            _row(r) for r in c.execute(Q["list_dead"], (limit,)).fetchall()])

    async def replay(self, ids: list[str] | None, now: float) -> int:
        # Stored again, so due no earlier than what was stored before it (_storing_at).
        at = await self._storing_at(now)

        def write(c: sqlite3.Connection) -> int:
            before = c.total_changes
            if ids is None:
                c.execute(Q["replay_all"], {"now": at})
            else:
                c.executemany(Q["replay_one"], [{"now": at, "id": stored_id(i)} for i in ids])
            return c.total_changes - before

        return await self._call(write)

    async def sweep(self, delivered_before: float) -> int:
        return await self._call(
            lambda c: c.execute(Q["sweep_delivered"], (delivered_before,)).rowcount)

    async def counts(self) -> dict[str, int]:
        def read(c: sqlite3.Connection) -> dict[str, int]:
            out = {s.value: 0 for s in Status}
            for status, n in c.execute(Q["count_settled"]):
                out[status] = n
            out["pending"] = c.execute(Q["count_pending"]).fetchone()[0]
            return out

        return await self._call(read)

    async def pending_by_sink(self) -> dict[str, int]:
        return await self._call(
            lambda c: {sink: n for sink, n in c.execute(Q["pending_by_sink"])})

    # ---- a sink's memory ---------------------------------------------------------------

    async def recall(self, scope: str, key: str) -> str | None:
        def read(c: sqlite3.Connection) -> str | None:
            row = c.execute(Q["recall"], (scope, key)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(read)

    async def remember(self, scope: str, key: str, value: str, now: float) -> None:
        await self._call(lambda c: c.execute(Q["remember"], (scope, key, value, now)))

    async def forget_memories(self, updated_before: float) -> int:
        return await self._call(
            lambda c: c.execute(Q["forget_memories"], (updated_before,)).rowcount)

    # ---- inbox -------------------------------------------------------------------------

    async def append(self, batch: InboxBatch) -> None:
        params = (batch.id, batch.received_at, batch.items, batch.body)
        await self._call(lambda c: c.execute(Q["append_batch"], params),
                         one_statement=True, urgent=True, grows=True)

    async def waiting(self, limit: int) -> list[InboxBatch]:
        return await self._call(lambda c: [
            InboxBatch(id=r[0], received_at=r[1], items=r[2], body=bytes(r[3]),
                       rerouted=bool(r[4]))
            for r in c.execute(Q["waiting_batches"], (limit,))])

    async def settle(self, outcomes: list[Outcome], now: float) -> list[int | None]:
        # Parameters built here, on the event loop: the writer only binds and steps.
        at = await self._storing_at(now)
        prepared = [(o, None if isinstance(o, Failed) else insert_statements(o.deliveries, at))
                    for o in outcomes]
        revived = {o.batch_id: revive_params(o.deliveries, at) for o in outcomes
                   if isinstance(o, Sequenced) and o.rerouted}

        def write(c: sqlite3.Connection) -> list[int | None]:
            out: list[int | None] = []
            states: dict[tuple[str, str], str] = {}  # of the batches marked, the last wins
            for outcome, chunks in prepared:
                if chunks is None:
                    assert isinstance(outcome, Failed)
                    c.execute(Q["mark_failed"], {"error": outcome.reason, "now": now,
                                                 "id": outcome.batch_id})
                    out.append(None)
                    continue
                assert not isinstance(outcome, Failed)
                # A batch no longer waiting (settled already) stores nothing. Asked first,
                # as nothing else writes while this transaction is open: no savepoint per
                # batch to undo its deliveries (a savepoint copies every page it changes
                # to the statement journal), and the row (with its body) written once.
                if c.execute(Q["is_waiting"], (outcome.batch_id,)).fetchone() is None:
                    out.append(None)
                    continue
                before = c.total_changes
                for sql, params in chunks:
                    c.execute(sql, params)
                if outcome.batch_id in revived:
                    c.executemany(Q["revive_unrendered"], revived[outcome.batch_id])
                new = c.total_changes - before
                c.execute(Q["mark_sequenced"], {
                    "deliveries": new, "duplicates": len(outcome.deliveries) - new,
                    "summary": outcome.summary, "now": now, "id": outcome.batch_id})
                states.update(outcome.states)
                out.append(new)
            # Once for the whole settle: a shipment in several of its batches is written
            # once, and many rows go in one statement (one GIL handover, not one per row).
            for sql, params in state_statements(states, now):
                c.execute(sql, params)
            return out

        weight = sum(len(o.deliveries) for o in outcomes if not isinstance(o, Failed))
        return await self._call(write, weight=weight, grows=True)

    async def batches(self, limit: int) -> list[BatchInfo]:
        return await self._call(
            lambda c: [_info(r) for r in c.execute(Q["list_batches"], (limit,))])

    async def batch(self, batch_id: str) -> BatchInfo | None:
        def read(c: sqlite3.Connection) -> BatchInfo | None:
            r = c.execute(Q["get_batch"], (batch_id,)).fetchone()
            if r is None:
                return None
            info = _info(r)
            info.summary, info.body = r[8], bytes(r[9])
            return info

        return await self._call(read)

    async def reroute(self, ids: list[str] | None, since: float | None) -> int:
        def write(c: sqlite3.Connection) -> int:
            before = c.total_changes
            if ids is not None:
                c.executemany(Q["reroute_one"], [(i,) for i in ids])
            if since is not None:
                c.execute(Q["reroute_since"], (since,))
            return c.total_changes - before

        return await self._call(write)

    async def inbox_depth(self) -> tuple[int, float | None, int]:
        def read(c: sqlite3.Connection) -> tuple[int, float | None, int]:
            waiting, oldest = c.execute(Q["count_waiting"]).fetchone()
            failed = c.execute(Q["count_failed"]).fetchone()[0]
            return int(waiting), oldest, int(failed)

        return await self._call(read)

    async def sweep_batches(self, sequenced_before: float) -> int:
        return await self._call(
            lambda c: c.execute(Q["sweep_batches"], (sequenced_before,)).rowcount)


    # ---- shipment state ----------------------------------------------------------------

    async def states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        asked = list(dict.fromkeys(keys))
        out: dict[tuple[str, str], str] = {}
        # A take's keys (thousands) in parts, each an operation of its own: intakes queued
        # meanwhile go between two parts instead of waiting for the whole read.
        for start in range(0, len(asked), INSERT_ROWS):
            part = asked[start:start + INSERT_ROWS]
            rows = await self._call(functools.partial(
                _read_states, _rows_sql("get_states", len(part)),
                [v for key in part for v in key]), weight=len(part))
            out.update({(r[0], r[1]): str(r[2]) for r in rows})
        return out

    async def forget_states(self, updated_before: float) -> int:
        return await self._call(
            lambda c: c.execute(Q["forget_states"], (updated_before,)).rowcount)
