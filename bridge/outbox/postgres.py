"""PostgreSQL store: several `bridge serve` replicas share one database.

Every replica accepts batches into the inbox. One sequencer runs at a time: it holds a
session advisory lock on a connection of its own and settles batches on that connection,
so a replica that dies (its connection ends) loses the lock and its unfinished transaction
together, and another replica takes over at its next try. A replica that is frozen, or cut
off from the database while the server still sees its session open, stops its heartbeat:
after SEQUENCER_SILENT_FOR the replica asking for the lock ends that session (the same
fence as a death) and takes over. NOTIFY wakes the sequencer when a
batch is appended, and every replica's dispatcher when deliveries are stored; polling stays
as the fallback.

Replicas claim deliveries with `FOR UPDATE SKIP LOCKED`, so no delivery is handed to two of
them at once, and every claim is a lease: a replica that dies mid-send loses its leases when
they run out, and another replica sends those deliveries again (at-least-once). Leases are
shorter here than with SQLite because nobody can release them at start: other replicas may
be alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

from bridge.errors import StorageError, StorageFull, StorageUnwritable
from bridge.models import (
    BatchInfo,
    BatchStatus,
    Delivery,
    Failed,
    InboxBatch,
    NewDelivery,
    Outcome,
    Status,
)
from bridge.outbox.base import POSTGRES_LEASE_SECONDS, Store
from bridge.outbox.migrate import plan
from bridge.outbox.sql import queries

log = logging.getLogger("bridge.storage")
Q = queries("postgres")
MIGRATION_LOCK = 0x6272696467  # "bridg"
SEQUENCER_LOCK = 0x6272696468
# The sequencer's holder runs a statement on its session at least this often (seconds); a
# holder not heard from for SEQUENCER_SILENT_FOR (its replica frozen, or cut off with its
# session still open on the server's side, which TCP keepalives notice only after hours) has
# its session ended by the replica that wants the lock. Ending it is a fence: the holder
# settles on that very session, so nothing of it can commit afterwards.
SEQUENCER_HEARTBEAT = 2.0
SEQUENCER_SILENT_FOR = 10.0
# Leases, retry times and windows are read on each replica's own clock. A replica whose
# clock runs ahead takes other replicas' leases for run out that early, and a send still in
# flight (cut off at 2/3 of its lease, 40 s) is made twice once that is over 20 s: off by
# more than CLOCK_OFF_WARN from the server's, it is said (at start, then every CLOCK_CHECK).
CLOCK_OFF_WARN = 5.0
CLOCK_CHECK = 300.0
RELISTEN_AFTER = 2.0  # seconds before a lost listening connection is opened again
RELISTEN_AT_MOST = 30.0  # seconds between later tries while it cannot be


def _row(r: asyncpg.Record) -> Delivery:
    return Delivery(
        id=r["id"], sink=r["sink"], route=r["route"], item_uuid=r["item_uuid"], kind=r["kind"],
        batch_id=r["batch_id"], payload=orjson.loads(r["payload"]), status=Status(r["status"]),
        attempts=r["attempts"], next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
        created_at=r["created_at"], enqueued_at=r["enqueued_at"], updated_at=r["updated_at"],
        group_key=r["group_key"], lease_until=r["lease_until"], seq=r.get("seq", 0),
    )


def _info(r: asyncpg.Record) -> BatchInfo:
    return BatchInfo(id=r["id"], received_at=r["received_at"], items=r["items"],
                     status=BatchStatus(r["status"]), deliveries=r["deliveries"],
                     duplicates=r["duplicates"], error=r["error"],
                     sequenced_at=r["sequenced_at"])


def _count(status: str) -> int:
    """The row count of an `UPDATE 3` / `DELETE 0` status."""
    return int(status.split()[-1])


class PostgresStore(Store):
    lease_seconds = POSTGRES_LEASE_SECONDS

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.clock = clock  # this replica's, as the dispatcher and the sequencer read it
        self.clock_offset: float | None = None  # the server's clock minus ours, seconds
        self._clock_checked = -CLOCK_CHECK
        self._sizes = (min_size, max_size)
        self._pool: asyncpg.Pool | None = None
        self._sequencer: asyncpg.Connection | None = None  # holds SEQUENCER_LOCK
        self._beating: asyncio.Task[None] | None = None  # its heartbeat (_heartbeat)
        self._session_use = asyncio.Lock()  # the heartbeat or a settle, one at a time
        self.silent_for = SEQUENCER_SILENT_FOR
        self._cannot_end: int | None = None  # the silent holder's pid we may not end (said once)
        self._listener: asyncpg.Connection | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._callbacks: tuple[Callable[[], None], Callable[[], None]] | None = None
        self.migrated: list[str] = []

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("storage is not open")
        return self._pool

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc.__class__.__name__}: "
                               f"{_safe(str(exc), self.dsn)}") from None

    async def open(self, *, recover: bool = False) -> None:
        if self._pool is not None:
            return
        quiet_pool_reconnects()
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._sizes[0], max_size=self._sizes[1], timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            # The DSN may hold a password: describe the failure, never the DSN.
            raise StorageError(f"cannot connect to PostgreSQL: {exc.__class__.__name__}: "
                               f"{_safe(str(exc), self.dsn)}") from None
        self.migrated = await self._apply_migrations()
        async with self.pool.acquire() as conn:
            await self._check_clock(conn)

    async def _check_clock(self, conn: asyncpg.Connection) -> None:
        """How far this replica's clock is off the server's, said when it is too far."""
        self._clock_checked = time.monotonic()
        before = self.clock()
        server = await conn.fetchval(Q["server_time"])
        after = self.clock()
        offset = float(server) - (before + after) / 2
        was, self.clock_offset = self.clock_offset, offset
        if abs(offset) > CLOCK_OFF_WARN:
            if was is None or abs(was) <= CLOCK_OFF_WARN or abs(offset - was) > CLOCK_OFF_WARN:
                log.warning(
                    "this replica's clock is off the PostgreSQL server's: replicas read each "
                    "other's leases on their own clocks, and one more than 20 s ahead sends "
                    "deliveries still in flight on another replica again; set the clocks "
                    "right (NTP)", extra={"ahead_s": round(-offset, 1)})
        elif was is not None and abs(was) > CLOCK_OFF_WARN:
            log.info("this replica's clock agrees with the PostgreSQL server's again",
                     extra={"ahead_s": round(-offset, 1)})

    async def _apply_migrations(self) -> list[str]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q["migration_lock"], MIGRATION_LOCK)
            await conn.execute(Q["create_migrations_table"])
            applied = {r["version"] for r in await conn.fetch(Q["applied_migrations"])}
            done = []
            for step in plan("postgres", applied):
                await conn.execute(step.sql)
                await conn.execute(Q["record_migration"], step.version, step.name, time.time())
                done.append(f"{step.version:04d}_{step.name}")
            return done

    async def migrate(self) -> list[str]:
        await self.open()
        return self.migrated

    async def close(self) -> None:
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        await self.release_sequencer()
        if self._listener is not None and not self._listener.is_closed():
            with contextlib.suppress(Exception):
                await self._listener.close()
        self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        try:
            async with self.pool.acquire() as conn:
                if await conn.fetchval(Q["is_standby"]):
                    raise StorageUnwritable("PostgreSQL is a read-only standby")
                async with conn.transaction():
                    await conn.execute(Q["ping"])
        except Exception as exc:
            if (unwritable := _unwritable(exc)) is None:
                raise
            raise unwritable from None  # asyncpg's own text may name the server's address

    # ---- notifications -----------------------------------------------------------------

    async def subscribe(self, on_batches: Callable[[], None],
                        on_deliveries: Callable[[], None]) -> None:
        self._callbacks = (on_batches, on_deliveries)
        if not await self._listen():
            self._schedule_relisten(warned=True)

    async def _listen(self, quiet: bool = False) -> bool:
        """Open the listening connection; False (said once, unless `quiet`) if it cannot."""
        assert self._callbacks is not None
        on_batches, on_deliveries = self._callbacks
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._connect()
            await conn.add_listener("bridge_inbox", lambda *_: on_batches())
            await conn.add_listener("bridge_deliveries", lambda *_: on_deliveries())
        except Exception as exc:  # polling covers for it meanwhile
            if conn is not None:  # connected, then lost before listening: not kept open
                with contextlib.suppress(Exception):
                    await conn.close()
            if not quiet:
                log.warning("cannot listen for notifications; polling until it can",
                            extra={"error": str(exc) if isinstance(exc, StorageError)
                                   else _unwritable_reason(exc)})  # StorageError: DSN masked
            return False
        conn.add_termination_listener(lambda _c: self._schedule_relisten())
        self._listener = conn
        return True

    def _schedule_relisten(self, warned: bool = False) -> None:
        if self._pool is None or (self._relisten is not None and not self._relisten.done()):
            return

        async def again() -> None:
            # Until it works: a server away for longer than one try (a restart, a failover)
            # must not leave this replica polling for good. One warning for the outage.
            wait, tries = RELISTEN_AFTER, 0
            while self._pool is not None:
                await asyncio.sleep(wait)
                if self._pool is None:  # closed meanwhile: no connection for nobody
                    return
                if await self._listen(quiet=warned or tries > 0):
                    if tries or warned:
                        log.info("listening for notifications again", extra={"tries": tries + 1})
                    return
                tries, wait = tries + 1, min(wait * 2, RELISTEN_AT_MOST)

        self._relisten = asyncio.get_running_loop().create_task(again())

    # ---- outbox ------------------------------------------------------------------------

    @staticmethod
    def _insert_args(deliveries: list[NewDelivery], now: float) -> list[Any]:
        cols: list[list[Any]] = [[] for _ in range(11)]
        for d in deliveries:
            values = (d.id, d.sink, d.route, d.item_uuid, d.kind, d.batch_id,
                      _payload_text(d),
                      Status.DEAD.value if d.error else Status.PENDING.value,
                      now + d.delay, d.error, d.group_key)
            for col, value in zip(cols, values, strict=True):
                col.append(value)
        return [*cols, now]

    @staticmethod
    def _revive_args(deliveries: list[NewDelivery], now: float) -> list[Any]:
        """queries.sql revive_unrendered's arrays: a rerouted batch's deliveries that
        rendered."""
        rendered = [d for d in deliveries if d.error is None]
        return [[d.id for d in rendered],
                [_payload_text(d) for d in rendered],
                [now + d.delay for d in rendered], [d.group_key for d in rendered], now]

    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        if not deliveries:
            return 0
        rows = await self.pool.fetch(Q["insert_deliveries"], *self._insert_args(deliveries, now))
        if rows:
            await self.pool.execute(Q["notify_deliveries"])
        return len(rows)

    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        rows = await self.pool.fetch(Q["claim"], now + lease, now, sink, limit)
        return [_row(r) for r in sorted(rows, key=lambda r: (r["next_attempt_at"], r["seq"]))]

    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        rows = await self.pool.fetch(Q["claim_group"], now + lease, now, sink, group_key, limit)
        return [_row(r) for r in sorted(rows, key=lambda r: r["seq"])]

    async def complete(self, ids: list[str], now: float) -> None:
        await self.pool.execute(Q["complete"], now, ids)

    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        await self.pool.execute(Q["retry_at"], when, error, now, 1 if refund else 0, delivery_id)

    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None:
        await self.pool.execute(Q["dead_letter"], reason, now, delivery_id)

    async def release(self, claimed: list[Delivery], now: float) -> None:
        await self.pool.execute(Q["release"], [d.id for d in claimed],
                                [d.lease_until for d in claimed])

    async def next_due(self, sink: str) -> float | None:
        value = await self.pool.fetchval(Q["next_due"], sink)
        return None if value is None else float(value)

    async def get(self, delivery_id: str) -> Delivery | None:
        row = await self.pool.fetchrow(Q["get_delivery"], delivery_id)
        return _row(row) if row else None

    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        return [_row(r) for r in await self.pool.fetch(Q["list_dead"], limit)]

    async def replay(self, ids: list[str] | None, now: float) -> int:
        if ids is None:
            return _count(await self.pool.execute(Q["replay_all"], now))
        return _count(await self.pool.execute(Q["replay_ids"], now, ids))

    async def sweep(self, delivered_before: float) -> int:
        return _count(await self.pool.execute(Q["sweep_delivered"], delivered_before))

    async def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for row in await self.pool.fetch(Q["count_by_status"]):
            out[row["status"]] = row["n"]
        return out

    async def pending_by_sink(self) -> dict[str, int]:
        return {r["sink"]: r["n"] for r in await self.pool.fetch(Q["pending_by_sink"])}

    # ---- a sink's memory ---------------------------------------------------------------

    async def recall(self, scope: str, key: str) -> str | None:
        value = await self.pool.fetchval(Q["recall"], scope, key)
        return None if value is None else str(value)

    async def remember(self, scope: str, key: str, value: str, now: float) -> None:
        await self.pool.execute(Q["remember"], scope, key, value, now)

    async def forget_memories(self, updated_before: float) -> int:
        return _count(await self.pool.execute(Q["forget_memories"], updated_before))

    # ---- inbox -------------------------------------------------------------------------

    async def append(self, batch: InboxBatch) -> None:
        try:
            await self.pool.execute(Q["append_batch"], batch.id, batch.received_at,
                                    batch.items, batch.body)
        except Exception as exc:
            if (unwritable := _unwritable(exc)) is None:
                raise
            raise unwritable from None  # asyncpg's own text may name the server's address

    async def waiting(self, limit: int) -> list[InboxBatch]:
        rows = await self.pool.fetch(Q["waiting_batches"], limit)
        return [InboxBatch(id=r["id"], received_at=r["received_at"], items=r["items"],
                           body=bytes(r["body"]), rerouted=r["rerouted"]) for r in rows]

    async def acquire_sequencer(self) -> bool:
        conn = self._sequencer
        if conn is not None and not conn.is_closed():
            return True
        await self.release_sequencer()  # its heartbeat too
        try:
            conn = await self._connect()
        except StorageError:
            return False
        try:
            if time.monotonic() - self._clock_checked >= CLOCK_CHECK:
                await self._check_clock(conn)
            if await conn.fetchval(Q["try_sequencer_lock"], SEQUENCER_LOCK) or (
                    await self._end_silent_holder(conn) and await self._lock_when_gone(conn)):
                self._sequencer = conn
                self._beating = asyncio.create_task(self._heartbeat(conn),
                                                    name="sequencer-heartbeat")
                self.sequencer_term += 1
                return True
        except Exception:
            log.exception("asking for the sequencer's lock failed")
        await conn.close()
        return False

    async def _heartbeat(self, conn: asyncpg.Connection) -> None:
        """While the lock is held: a statement on its session every SEQUENCER_HEARTBEAT,
        whatever the sequencer is busy with (routing a large take touches no storage for
        seconds), between settles (which use the session too)."""
        while not conn.is_closed():
            await asyncio.sleep(SEQUENCER_HEARTBEAT)
            try:
                async with self._session_use:
                    if conn.is_closed():
                        return
                    if time.monotonic() - self._clock_checked >= CLOCK_CHECK:
                        await self._check_clock(conn)
                    else:
                        await conn.fetchval(Q["sequencer_heartbeat"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the sequencer's session was lost; asking for the lock again",
                            extra={"error": _unwritable_reason(exc)})
                with contextlib.suppress(Exception):
                    await conn.close()  # the sequencer's next turn asks again
                return

    async def _end_silent_holder(self, conn: asyncpg.Connection) -> bool:
        """End the session holding the lock (in this database) if it has been silent for
        `silent_for`."""
        holder = await conn.fetchrow(Q["sequencer_holder"], SEQUENCER_LOCK)
        if holder is None:
            return False  # let go meanwhile: the next try takes it
        pid, quiet = holder["pid"], holder["silent_for"]
        if quiet is None:  # its activity is hidden from this role
            self._say_once(pid, "the sequencer's holder cannot be seen from this replica's "
                           "role, so a frozen one would not be noticed (the role needs "
                           "pg_read_all_stats, or to be the holder's)", pid=pid)
            return False
        if quiet < self.silent_for:
            return False
        try:
            ended = bool(await conn.fetchval(Q["end_session"], pid))
        except asyncpg.InsufficientPrivilegeError:
            self._say_once(pid, "the sequencer's holder is silent, and this replica may not "
                           "end its session (it needs the holder's role or "
                           "pg_signal_backend); sequencing waits for it", pid=pid,
                           silent_s=round(quiet, 1))
            return False
        if ended:
            log.warning("the sequencer's holder was silent; its session was ended and this "
                        "replica takes over", extra={"pid": pid, "silent_s": round(quiet, 1)})
        return ended

    async def _lock_when_gone(self, conn: asyncpg.Connection) -> bool:
        """The lock, once the ended session is gone (it goes within milliseconds)."""
        for _ in range(50):
            if await conn.fetchval(Q["try_sequencer_lock"], SEQUENCER_LOCK):
                return True
            await asyncio.sleep(0.1)
        return False

    def _say_once(self, holder: int, message: str, **extra: object) -> None:
        """Warn of `holder` (a pid) once, not at every try for the lock."""
        if self._cannot_end != holder:
            self._cannot_end = holder
            log.warning(message, extra=extra)

    async def release_sequencer(self) -> None:
        conn, self._sequencer = self._sequencer, None
        beating, self._beating = self._beating, None
        if beating is not None:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close()  # ending the session releases the lock

    async def settle(self, outcomes: list[Outcome], now: float) -> list[int | None]:
        conn = self._sequencer
        if conn is None or conn.is_closed():
            raise StorageError("this replica does not hold the sequencer's lock")
        results: list[int | None] = []
        states: dict[tuple[str, str], str] = {}  # of the batches marked, the last wins
        try:
            async with self._session_use, conn.transaction():
                for outcome in outcomes:
                    if isinstance(outcome, Failed):
                        await conn.execute(Q["mark_failed"], outcome.reason, now,
                                           outcome.batch_id)
                        results.append(None)
                        continue
                    row = await conn.fetchrow(
                        Q["settle_batch"], *self._insert_args(outcome.deliveries, now),
                        outcome.batch_id, outcome.summary)
                    if not row["marked"]:  # no longer waiting (settled already)
                        results.append(None)
                        continue
                    new = int(row["new"])
                    if outcome.rerouted:
                        new += _count(await conn.execute(
                            Q["revive_unrendered"], *self._revive_args(outcome.deliveries, now)))
                    await conn.execute(Q["count_sequenced"], new, len(outcome.deliveries) - new,
                                       outcome.batch_id)
                    states.update(outcome.states)
                    results.append(new)
                # Once for the whole settle, as on SQLite: one round trip, not one per batch
                # (~0.1 ms of the bridge's and the server's CPU each), and a shipment in
                # several of its batches written once. A dict: each key once, as one
                # statement needs.
                if states:
                    keys = list(states)
                    await conn.execute(Q["put_states"], [k for k, _ in keys],
                                       [u for _, u in keys], list(states.values()), now)
                if any(results):
                    await conn.execute(Q["notify_deliveries"])
        except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.InterfaceError):
            # The lock went with the connection: another replica may sequence now.
            await self.release_sequencer()
            raise
        return results

    async def batches(self, limit: int) -> list[BatchInfo]:
        return [_info(r) for r in await self.pool.fetch(Q["list_batches"], limit)]

    async def batch(self, batch_id: str) -> BatchInfo | None:
        r = await self.pool.fetchrow(Q["get_batch"], batch_id)
        if r is None:
            return None
        info = _info(r)
        info.summary, info.body = r["summary"], bytes(r["body"])
        return info

    async def reroute(self, ids: list[str] | None, since: float | None) -> int:
        count = 0
        async with self.pool.acquire() as conn, conn.transaction():
            if ids is not None:
                count += _count(await conn.execute(Q["reroute_ids"], ids))
            if since is not None:
                count += _count(await conn.execute(Q["reroute_since"], since))
            if count:
                await conn.execute(Q["notify_inbox"])
        return count

    async def inbox_depth(self) -> tuple[int, float | None, int]:
        row = await self.pool.fetchrow(Q["count_waiting"])
        failed = await self.pool.fetchval(Q["count_failed"])
        return int(row["n"]), row["oldest"], int(failed)

    async def sweep_batches(self, sequenced_before: float) -> int:
        return _count(await self.pool.execute(Q["sweep_batches"], sequenced_before))


    # ---- shipment state ----------------------------------------------------------------

    async def states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        if not keys:
            return {}
        rows = await self.pool.fetch(Q["get_states"], [k for k, _ in keys], [u for _, u in keys])
        return {(r["kind"], r["uuid"]): r["state"] for r in rows}

    async def forget_states(self, updated_before: float) -> int:
        return _count(await self.pool.execute(Q["forget_states"], updated_before))


# Why PostgreSQL cannot take a write now, by what asyncpg raised: said without the server's
# own text, which can name hosts, ports and files (the reason is the intake's 503).
_OUT_OF_REACH: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.exceptions.ConnectionDoesNotExistError, "the connection was lost"),
    (asyncpg.exceptions.CannotConnectNowError, "the server is starting or stopping"),
    (asyncpg.exceptions.AdminShutdownError, "the server is shutting down"),
    (asyncpg.exceptions.CrashShutdownError, "the server is recovering from a crash"),
    (asyncpg.exceptions.ReadOnlySQLTransactionError, "the server is read-only (a standby?)"),
    (asyncpg.exceptions.TooManyConnectionsError, "too many connections"),
    (asyncpg.exceptions.ConnectionFailureError, "the connection failed"),
    (asyncpg.exceptions.ClientCannotConnectError, "the connection failed"),
    (ssl.SSLError, "its TLS handshake failed (check the certificate and sslmode)"),
    (socket.gaierror, "its host name cannot be resolved"),
    (TimeoutError, "no answer in time"),
)
# Connection errors an OSError may carry, said in the errno's words (its own text names the
# address); any other OSError is "the connection failed".
_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                             errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
# Lost while a statement was out: the server may have committed it before the answer.
_MID_STATEMENT = (asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionResetError,
                  BrokenPipeError, TimeoutError)


def _unwritable(exc: Exception) -> StorageUnwritable | None:
    """What the intake answers 503 (and /readyz reports) for a server out of reach or out
    of room; None for anything else (a bug, a constraint, a protocol violation), which stays
    as it was."""
    if isinstance(exc, StorageUnwritable):
        return exc
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return StorageFull("storage is full (PostgreSQL: no space left on its disk)")
    why = _out_of_reach(exc)
    if why is None:
        return None
    return StorageUnwritable(f"PostgreSQL cannot take writes now ({why})",
                             uncertain=isinstance(exc, _MID_STATEMENT))


def _unwritable_reason(exc: BaseException) -> str:
    """Why a connection failed, in our words where they apply (the server's text can name
    hosts and ports), else the exception's class."""
    return _out_of_reach(exc) or exc.__class__.__name__


def _out_of_reach(exc: BaseException) -> str | None:
    """Why the server cannot be reached or written now, in our words; None if it is not
    that."""
    why = next((text for cls, text in _OUT_OF_REACH if isinstance(exc, cls)), None)
    if why is None and isinstance(exc, OSError):
        why = (os.strerror(exc.errno).lower() if exc.errno in _NETWORK_ERRNOS
               else "the connection failed")
    if why is None and isinstance(exc, asyncpg.InterfaceError) and re.search(
            r"connection (is|was) closed", str(exc)):
        why = "the connection was closed"
    return why


class PoolReconnects(logging.Filter):
    """asyncpg's pool, while the server is away, logs every try to reconnect its idle
    connections (1 s, 2 s ... 60 s apart) as a warning with a 40-line traceback. Each
    becomes one line with the reason in our words (the exception's text can name hosts and
    ports); our own lines already say what the outage means for batches and deliveries."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and record.getMessage().startswith("Failed to restore the pool"):
            record.msg, record.args = "PostgreSQL: reconnecting the pool failed; retrying", ()
            record.error = _unwritable_reason(exc)
            record.exc_info = record.exc_text = None
        return True


def quiet_pool_reconnects() -> None:
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, PoolReconnects) for f in pool_log.filters):
        pool_log.addFilter(PoolReconnects())


def _payload_text(d: NewDelivery) -> str:
    """A rendered payload (text by key) as JSON: orjson writes the same text as the stdlib
    here (compact, UTF-8, the same escapes) at a fraction of its cost, which was a tenth of
    the sequencer's CPU on PostgreSQL (one payload per delivery). The stdlib for anything
    orjson refuses."""
    try:
        return orjson.dumps(d.payload).decode()
    except TypeError:
        return json.dumps(d.payload, ensure_ascii=False, separators=(",", ":"))


def _safe(text: str, dsn: str) -> str:
    """asyncpg errors can quote the DSN; keep its password out."""
    if "@" in dsn and ":" in dsn.split("//", 1)[-1].split("@", 1)[0]:
        password = dsn.split("//", 1)[-1].split("@", 1)[0].split(":", 1)[1]
        if password:
            text = text.replace(password, "********")
    return text
