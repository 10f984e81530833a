"""PostgreSQL outbox: several `bridge serve` replicas share one database.

Replicas claim work with `FOR UPDATE SKIP LOCKED`, so no delivery is handed to two of them at
once, and every claim is a lease: a replica that dies mid-send loses its leases when they run
out, and another replica sends those deliveries again (at-least-once). Leases are shorter here
than with SQLite because nobody can release them at start: other replicas may be alive.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from bridge.models import Delivery, NewDelivery, Status
from bridge.outbox.base import Outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sink TEXT NOT NULL,
    route TEXT NOT NULL,
    item_uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    batch_id TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    enqueued_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    group_key TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (sink, next_attempt_at, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_status ON deliveries (status, updated_at);
CREATE INDEX IF NOT EXISTS deliveries_groups
    ON deliveries (sink, group_key, seq) WHERE status = 'pending' AND group_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS sink_state (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, key)
);
"""

_COLUMNS = (
    "id, sink, route, item_uuid, kind, batch_id, payload, status, attempts, "
    "next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until"
)
# Serialises schema creation when several replicas start at once.
_SCHEMA_LOCK = 0x6272696467  # "bridg"


def _row(r: asyncpg.Record) -> Delivery:
    return Delivery(
        id=r["id"], sink=r["sink"], route=r["route"], item_uuid=r["item_uuid"], kind=r["kind"],
        batch_id=r["batch_id"], payload=json.loads(r["payload"]), status=Status(r["status"]),
        attempts=r["attempts"], next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
        created_at=r["created_at"], enqueued_at=r["enqueued_at"], updated_at=r["updated_at"],
        group_key=r["group_key"], lease_until=r["lease_until"],
    )


class PostgresOutbox(Outbox):
    lease_seconds = 60.0

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self._sizes = (min_size, max_size)
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("outbox is not open")
        return self._pool

    async def open(self, *, recover: bool = False) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._sizes[0], max_size=self._sizes[1], timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            # The DSN may hold a password: describe the failure, never the DSN.
            raise RuntimeError(f"cannot connect to PostgreSQL: {exc.__class__.__name__}: "
                               f"{_safe(str(exc), self.dsn)}") from None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        if not deliveries:
            return 0
        cols: list[list[Any]] = [[] for _ in range(11)]
        for d in deliveries:
            values = (d.id, d.sink, d.route, d.item_uuid, d.kind, d.batch_id,
                      json.dumps(d.payload, ensure_ascii=False, separators=(",", ":")),
                      Status.DEAD.value if d.error else Status.PENDING.value,
                      now + d.delay, d.error, d.group_key)
            for col, value in zip(cols, values, strict=True):
                col.append(value)
        # One statement, one transaction per intake; ON CONFLICT skips repeated items.
        rows = await self.pool.fetch(
            "INSERT INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload, status, "
            "next_attempt_at, last_error, group_key, created_at, enqueued_at, updated_at) "
            "SELECT *, $12::float8, $12::float8, $12::float8 FROM unnest($1::text[], $2::text[], "
            "$3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], "
            "$9::float8[], $10::text[], $11::text[]) ON CONFLICT (id) DO NOTHING RETURNING 1",
            *cols, now,
        )
        return len(rows)

    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        rows = await self.pool.fetch(
            f"UPDATE deliveries SET attempts = attempts + 1, lease_until = $1, updated_at = $2 "
            f"WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = $3 "
            f"AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until <= $2) "
            f"ORDER BY next_attempt_at, seq LIMIT $4 FOR UPDATE SKIP LOCKED) "
            f"RETURNING {_COLUMNS}, seq",
            now + lease, now, sink, limit,
        )
        return [_row(r) for r in sorted(rows, key=lambda r: (r["next_attempt_at"], r["seq"]))]

    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        rows = await self.pool.fetch(
            f"UPDATE deliveries SET attempts = attempts + 1, lease_until = $1, updated_at = $2 "
            f"WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = $3 "
            f"AND group_key = $4 AND (lease_until IS NULL OR lease_until <= $2) "
            f"ORDER BY seq LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}, seq",
            now + lease, now, sink, group_key, limit,
        )
        return [_row(r) for r in sorted(rows, key=lambda r: r["seq"])]

    async def complete(self, ids: list[str], now: float) -> None:
        await self.pool.execute(
            "UPDATE deliveries SET status = 'delivered', lease_until = NULL, last_error = NULL, "
            "updated_at = $1 WHERE id = ANY($2::text[])", now, ids)

    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        await self.pool.execute(
            "UPDATE deliveries SET next_attempt_at = $1, last_error = $2, lease_until = NULL, "
            "updated_at = $3, attempts = GREATEST(attempts - $4, 0) "
            "WHERE id = $5 AND status = 'pending'",
            when, error, now, 1 if refund else 0, delivery_id)

    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None:
        await self.pool.execute(
            "UPDATE deliveries SET status = 'dead', last_error = $1, lease_until = NULL, "
            "updated_at = $2 WHERE id = $3", reason, now, delivery_id)

    async def release(self, claimed: list[Delivery], now: float) -> None:
        await self.pool.execute(
            "UPDATE deliveries AS d SET attempts = GREATEST(d.attempts - 1, 0), "
            "lease_until = NULL FROM unnest($1::text[], $2::float8[]) AS c(id, lease_until) "
            "WHERE d.id = c.id AND d.status = 'pending' AND d.lease_until = c.lease_until",
            [d.id for d in claimed], [d.lease_until for d in claimed])

    async def next_due(self, sink: str) -> float | None:
        value = await self.pool.fetchval(
            "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) FROM deliveries "
            "WHERE status = 'pending' AND sink = $1", sink)
        return None if value is None else float(value)

    async def get(self, delivery_id: str) -> Delivery | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM deliveries WHERE id = $1", delivery_id)
        return _row(row) if row else None

    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM deliveries WHERE status = 'dead' "
            f"ORDER BY updated_at DESC, seq DESC LIMIT $1", limit)
        return [_row(r) for r in rows]

    async def replay(self, ids: list[str] | None, now: float) -> int:
        sql = ("UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $1, "
               "enqueued_at = $1, lease_until = NULL, updated_at = $1 WHERE status = 'dead'")
        if ids is None:
            result = await self.pool.execute(sql, now)
        else:
            result = await self.pool.execute(sql + " AND id = ANY($2::text[])", now, ids)
        return int(result.split()[-1])

    async def sweep(self, delivered_before: float) -> int:
        result = await self.pool.execute(
            "DELETE FROM deliveries WHERE status = 'delivered' AND updated_at < $1",
            delivered_before)
        return int(result.split()[-1])

    async def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for row in await self.pool.fetch(
                "SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status"):
            out[row["status"]] = row["n"]
        return out

    async def forget_state(self, updated_before: float) -> int:
        result = await self.pool.execute(
            "DELETE FROM sink_state WHERE updated_at < $1", updated_before)
        return int(result.split()[-1])

    async def get_state(self, scope: str, key: str) -> str | None:
        value = await self.pool.fetchval(
            "SELECT value FROM sink_state WHERE scope = $1 AND key = $2", scope, key)
        return None if value is None else str(value)

    async def put_state(self, scope: str, key: str, value: str, now: float) -> None:
        await self.pool.execute(
            "INSERT INTO sink_state (scope, key, value, updated_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at", scope, key, value, now)

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            if await conn.fetchval("SELECT pg_is_in_recovery()"):
                raise RuntimeError("PostgreSQL is a read-only standby")
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM deliveries LIMIT 1 FOR UPDATE SKIP LOCKED")


def _safe(text: str, dsn: str) -> str:
    """asyncpg errors can quote the DSN; keep its password out."""
    if "@" in dsn and ":" in dsn.split("//", 1)[-1].split("@", 1)[0]:
        password = dsn.split("//", 1)[-1].split("@", 1)[0].split(":", 1)[1]
        if password:
            text = text.replace(password, "********")
    return text
