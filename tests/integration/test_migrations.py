"""Upgrades: a database written by the previous release (0.1.0, before numbered migrations),
with pending deliveries, dead letters and a sink's memory in it, is migrated in place at
start and keeps working; migrations are recorded and applied once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncpg
import pytest

from bridge.errors import StorageError
from bridge.models import Delivery, InboxBatch, Sequenced, Status
from bridge.outbox import Store, from_url
from bridge.outbox.sql import migrations, queries
from bridge.outbox.sqlite import id_of_stored
from tests.conftest import require_service
from tests.helpers import postgres

OLD = Path(__file__).parents[1] / "data" / "previous-release"
PENDING = "dlv_" + "0a" * 16
DEAD = "dlv_" + "0b" * 16
DELIVERED = "dlv_" + "0c" * 16
# 0.1.0 stored rendered payloads packed: \x01, then <len>:<key><len>:<value> per field.
PACKED = "\x01" + "4:body" + "13:{\"n\": \"x:1\"}"


def _old_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript((OLD / "sqlite.sql").read_text())
    rows = [(PENDING, "pending", None, 1), (DEAD, "dead", "HTTP 400: refused", 3),
            (DELIVERED, "delivered", None, 1)]
    for delivery_id, status, error, attempts in rows:
        conn.execute(
            "INSERT INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload, "
            "status, attempts, next_attempt_at, last_error, created_at, enqueued_at, "
            "updated_at) VALUES (?, 'hook', 'all', 'u1', 'tracking', 'b0', ?, ?, ?, 100, ?, "
            "100, 100, 100)",
            (bytes.fromhex(delivery_id[4:]), PACKED, status, attempts, error))
    conn.execute("INSERT INTO sink_state VALUES ('slack:C1', 'u1', '1700000000.0001', 100)")
    conn.commit()
    conn.close()


async def _old_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute((OLD / "postgres.sql").read_text())
        for delivery_id, status, error, attempts in [
                (PENDING, "pending", None, 1), (DEAD, "dead", "HTTP 400: refused", 3),
                (DELIVERED, "delivered", None, 1)]:
            await conn.execute(
                "INSERT INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload, "
                "status, attempts, next_attempt_at, last_error, created_at, enqueued_at, "
                "updated_at) VALUES ($1, 'hook', 'all', 'u1', 'tracking', 'b0', $2, $3, $4, "
                "100, $5, 100, 100, 100)",
                delivery_id, '{"body": "{\\"n\\": \\"x:1\\"}"}', status, attempts, error)
        await conn.execute(
            "INSERT INTO sink_state VALUES ('slack:C1', 'u1', '1700000000.0001', 100)")
    finally:
        await conn.close()


async def _check_upgraded(store: Store) -> None:
    assert await store.counts() == {"pending": 1, "delivered": 1, "dead": 1}
    [claimed] = await store.claim("hook", 10, 200.0, 30)
    assert (claimed.id, claimed.attempts) == (PENDING, 2)
    assert claimed.payload == {"body": '{"n": "x:1"}'}
    [dead] = await store.list_dead()
    assert (dead.id, dead.last_error, dead.status) == (DEAD, "HTTP 400: refused", Status.DEAD)
    assert await store.replay([DEAD], 201.0) == 1
    assert await store.recall("slack:C1", "u1") == "1700000000.0001"  # the sink's memory
    # The inbox is there and works.
    await store.append(InboxBatch("b" * 32, 300.0, 1, b'{"order": [{"uuid": "o1"}]}'))
    assert [b.id for b in await store.waiting(10)] == ["b" * 32]


def _expected() -> list[str]:
    return [f"{m.version:04d}_{m.name}" for m in migrations("sqlite")]


async def test_sqlite_file_of_the_previous_release_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    _old_sqlite(path)
    store = from_url(f"sqlite:///{path}")
    await store.open(recover=True)
    try:
        assert await store.migrate() == _expected()
        await _check_upgraded(store)
    finally:
        await store.close()
    again = from_url(f"sqlite:///{path}")
    await again.open(recover=True)
    try:
        assert await again.migrate() == []  # recorded: nothing is applied twice
        assert (await again.counts())["pending"] == 2
    finally:
        await again.close()
    conn = sqlite3.connect(path)
    recorded = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    indexes = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries'")}
    conn.close()
    assert recorded == [(m.version, m.name) for m in migrations("sqlite")]
    # 0004's per-shipment order index, narrowed by 0006 to the deliveries that hold back.
    assert "deliveries_holding" in indexes and "deliveries_by_item" not in indexes


async def test_postgres_database_of_the_previous_release_is_migrated() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as dsn:
        await _old_postgres(dsn)
        # Replicas starting together: the advisory lock lets each step be applied once.
        stores = [from_url(dsn) for _ in range(3)]
        await asyncio.gather(*(s.open(recover=True) for s in stores))
        try:
            applied = [await s.migrate() for s in stores]
            assert sorted(applied, key=len) == [[], [], [
                f"{m.version:04d}_{m.name}" for m in migrations("postgres")]]
            await _check_upgraded(stores[0])
        finally:
            for s in stores:
                await s.close()
        conn = await asyncpg.connect(dsn)
        try:
            versions = [r[0] for r in await conn.fetch(
                "SELECT version FROM schema_migrations ORDER BY version")]
            indexes = {r[0] for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'deliveries'")}
        finally:
            await conn.close()
        assert versions == [m.version for m in migrations("postgres")]
        assert "deliveries_settled" in indexes and "deliveries_by_status" not in indexes
        assert "deliveries_by_item" in indexes  # 0004: per-shipment order at a sink


PUT_STATES_0_6 = """
INSERT INTO shipment_state (kind, uuid, state, updated_at)
SELECT k.kind, k.uuid, k.state, $4::float8 FROM unnest($1::text[], $2::text[], $3::text[])
    AS k(kind, uuid, state)
ON CONFLICT (kind, uuid) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at
"""


async def test_postgres_states_of_release_0_6_are_kept_and_updated_in_place() -> None:
    """0007 on a database the release before it left: its shipment states, pending
    deliveries and dead letters kept; the states then forgotten by the day and the second,
    and written again on the same day as HOT updates (no new index entries)."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    q, day = queries("postgres"), 86400.0
    async with postgres.fresh_database() as dsn:
        await _old_postgres(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(q["create_migrations_table"])
            for step in migrations("postgres")[:6]:  # as that release applied them
                await conn.execute(step.sql)
                await conn.execute(q["record_migration"], step.version, step.name, 100.0)
            await conn.executemany(
                "INSERT INTO shipment_state (kind, uuid, state, updated_at)"
                " VALUES ($1, $2, $3, $4)",
                [("tracking", "old", '{"n": 0}', 9 * day),
                 ("tracking", "t1", '{"n": 1}', 10 * day),
                 ("order", "o1", '{"n": 2}', 10 * day + 60)])
            store = from_url(dsn)
            await store.open()
            try:
                assert store.migrated == [  # type: ignore[attr-defined]
                    "0007_shipment_state_day", "0008_window_order"]
                await _check_upgraded(store)
                assert await store.states([("tracking", "t1"), ("order", "o1")]) == {
                    ("tracking", "t1"): '{"n": 1}', ("order", "o1"): '{"n": 2}'}
                assert await store.forget_states(10 * day + 30) == 2  # old, and t1
            finally:
                await store.close()
            async with conn.transaction():
                for n in range(3):
                    await conn.execute(q["put_states"], ["order"], ["o1"], [f'{{"n": {n}}}'],
                                       10 * day + 120 + n)
                updated, hot = await conn.fetchrow(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
                    " WHERE relname = 'shipment_state'")
            assert (updated, hot) == (3, 3)
            # A replica of the release before (a rolling upgrade, a rollback) still writes
            # states with its own statement: the day is generated, not a column it lacks.
            await conn.execute(PUT_STATES_0_6, ["tracking"], ["new"], ['{"n": 9}'], 20 * day)
            assert await conn.fetchval("SELECT updated_day FROM shipment_state"
                                       " WHERE uuid = 'new'") == 20
        finally:
            await conn.close()


async def test_sqlite_and_postgres_have_the_same_steps() -> None:
    assert [(m.version, m.name) for m in migrations("sqlite")] == [
        (m.version, m.name) for m in migrations("postgres")]


async def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    store = from_url(f"sqlite:///{path}")
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match=r"migrated by a newer bridge.*0999"):
        await from_url(f"sqlite:///{path}").open()


# ---- 0005: from the release that kept shipment states WITHOUT ROWID ------------------------

async def _pending_uuids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT DISTINCT item_uuid FROM deliveries WHERE status = 'pending' AND sink = 'hook'")]
    finally:
        conn.close()


RELEASE_04 = Path(__file__).parents[1] / "data" / "release-0.4" / "sqlite.sql"  # make.py


async def test_sqlite_file_of_release_0_4_is_migrated_with_its_states_and_retries(
    tmp_path: Path
) -> None:
    path = tmp_path / "bridge.db"
    conn = sqlite3.connect(path)
    conn.executescript(RELEASE_04.read_text())
    states = sorted(conn.execute("SELECT kind, uuid, state, updated_at FROM shipment_state"))
    pending = sorted(r[0] for r in conn.execute(
        "SELECT id FROM deliveries WHERE status = 'pending'"))
    [(dead_id,)] = conn.execute("SELECT id FROM deliveries WHERE status = 'dead'").fetchall()
    # One shipment's first delivery failed once and waits for its retry, as a previous
    # release leaves it: its later ones must still wait after the upgrade (0006).
    (waiting_uuid, first_seq), = conn.execute(
        "SELECT item_uuid, MIN(seq) FROM deliveries WHERE status = 'pending' AND sink = 'hook'"
        " GROUP BY item_uuid HAVING COUNT(*) > 1 ORDER BY item_uuid LIMIT 1").fetchall()
    conn.execute("UPDATE deliveries SET attempts = 1, next_attempt_at = ?, last_error = 'HTTP 500'"
                 " WHERE seq = ?", (time.time() + 3600, first_seq))
    # Another's first delivery was a dead letter replayed by that release and not yet sent
    # again: due later than its shipment's later ones, and still first after the upgrade.
    (replayed_uuid, replayed_seq, replayed_id), = conn.execute(
        "SELECT item_uuid, MIN(seq), id FROM deliveries WHERE status = 'pending'"
        " AND sink = 'hook' GROUP BY item_uuid HAVING COUNT(*) > 1 ORDER BY item_uuid"
        " LIMIT 1 OFFSET 1").fetchall()
    conn.execute("UPDATE deliveries SET next_attempt_at = ?, enqueued_at = ? WHERE seq = ?",
                 (time.time() + 10, time.time() + 10, replayed_seq))
    conn.commit()
    conn.close()
    assert len(states) == 36 and len(pending) == 74

    store = from_url(f"sqlite:///{path}")
    await store.open()
    try:
        assert store.migrated == [  # type: ignore[attr-defined]
            "0005_shipment_state_layout", "0006_holding_deliveries", "0007_shipment_state_day",
            "0008_window_order"]
        keys = [(k, u) for k, u, _, _ in states]
        assert await store.states(keys) == {(k, u): s for k, u, s, _ in states}
        assert await store.counts() == {"pending": 74, "delivered": 1, "dead": 1}
        [dead] = await store.list_dead()
        assert (dead.id, dead.last_error) == (id_of_stored(dead_id), "HTTP 400: refused")
        claimed, later = [], time.time() + 60
        while taken := await store.claim("hook", 1, later, 30):  # one at a time, oldest first
            claimed += taken
        # Per-shipment order still holds: one delivery per item uuid at a time, and none of
        # the shipment whose first delivery waits for its retry.
        assert len({d.item_uuid for d in claimed}) == len(claimed) > 0
        assert waiting_uuid not in {d.item_uuid for d in claimed}
        assert [d.id for d in claimed if d.item_uuid == replayed_uuid] == [
            id_of_stored(replayed_id)]
        assert len(claimed) == len({u for u in (await _pending_uuids(path))}) - 1
        assert await store.recall("slack:C1", "u1") == "1700000000.0001"
        # States are written and swept as before, in the new table.
        await store.append(InboxBatch("b" * 32, time.time(), 1, b'{"order": [{"uuid": "o"}]}'))
        await store.settle([Sequenced("b" * 32, [], "[]", {("order", "o-new"): '{"x": 1}'})],
                           time.time())
        assert await store.states([("order", "o-new")]) == {("order", "o-new"): '{"x": 1}'}
        assert await store.forget_states(min(s[3] for s in states) + 1e-3) >= 1
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    [(sql,)] = conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'shipment_state'").fetchall()
    kept = conn.execute("SELECT COUNT(*) FROM shipment_state").fetchone()[0]
    conn.close()
    assert "WITHOUT ROWID" not in sql.upper() and "id INTEGER PRIMARY KEY" in sql
    assert 0 < kept <= 36  # the swept ones gone, the new one there


# ---- 0008: from the release whose coalescing windows neither waited nor held back --------

RELEASE_07 = Path(__file__).parents[1] / "data" / "release-0.7" / "sqlite.sql"  # make.py


async def _send_all(store: Store, sink: str, at: float) -> list[Delivery]:
    """What the dispatcher sends at `at`, every send answered: claims (a window's last
    member bringing the others) until nothing more is given."""
    sent: list[Delivery] = []
    while claimed := await store.claim(sink, 50, at, 30):
        for d in list(claimed):
            if d.group_key is not None:
                claimed += await store.claim_group(sink, d.group_key, 500, at, 30)
        sent += claimed
        await store.complete([d.id for d in claimed], at)
    return sent


def _window_in_retry(conn: sqlite3.Connection) -> tuple[str, float, list[int], list[int]]:
    """The dump's window waiting for its retry: its shipment, the retry's time, its
    members' seqs, and the seqs of that shipment's later deliveries."""
    rows = conn.execute(
        "SELECT item_uuid, next_attempt_at, seq FROM deliveries WHERE status = 'pending'"
        " AND group_key LIKE 'coalesce:%' AND last_error IS NOT NULL ORDER BY seq").fetchall()
    uuid, retry = rows[0][0], rows[0][1]
    members = [r[2] for r in rows]
    later = [r[0] for r in conn.execute(
        "SELECT seq FROM deliveries WHERE status = 'pending' AND item_uuid = ? AND seq > ?"
        " ORDER BY seq", (uuid, max(members)))]
    return uuid, retry, members, later


async def test_sqlite_file_of_release_0_7_keeps_a_window_in_retry_ahead_of_its_shipment(
    tmp_path: Path
) -> None:
    path = tmp_path / "bridge.db"
    conn = sqlite3.connect(path)
    conn.executescript(RELEASE_07.read_text())
    uuid, retry, members, later = _window_in_retry(conn)
    ids_of = dict(conn.execute("SELECT seq, id FROM deliveries"))
    conn.close()
    assert len(members) > 1 and len(later) == 2  # the next change: one each route
    store = from_url(f"sqlite:///{path}")
    await store.open()
    try:
        assert store.migrated == ["0008_window_order"]  # type: ignore[attr-defined]
        assert await store.counts() == {"pending": 86, "delivered": 1, "dead": 1}
        # Before the retry is due, every other delivery goes; the shipment's later
        # deliveries (a plain one and a closed window) wait behind the window.
        before = await _send_all(store, "hook", retry - 1)
        assert {d.item_uuid for d in before} >= {uuid}  # its earlier plain ones went
        assert not {id_of_stored(ids_of[s]) for s in members + later} & {d.id for d in before}
        held = len(members) + len(later)
        assert await store.counts() == {"pending": held, "delivered": 1 + 86 - held, "dead": 1}
        # Then the window, whole, and the later ones in their order.
        after = await _send_all(store, "hook", retry)
        assert [d.id for d in after] == [id_of_stored(ids_of[s]) for s in [
            max(members), *sorted(set(members) - {max(members)}), *later]]
    finally:
        await store.close()


async def test_postgres_window_in_retry_of_release_0_7_holds_its_shipment_back() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    q = queries("postgres")
    async with postgres.fresh_database() as dsn:
        await _old_postgres(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(q["create_migrations_table"])
            for step in migrations("postgres")[:7]:  # as that release applied them
                await conn.execute(step.sql)
                await conn.execute(q["record_migration"], step.version, step.name, 100.0)
            # As that release left them: a window of shipment w tried and waiting a day for
            # its retry, a plain delivery of w made after it, and w's next window, closed.
            window = "coalesce:held>hook>w>110.000"
            await conn.executemany(
                "INSERT INTO deliveries (id, sink, route, item_uuid, kind, payload, status,"
                " attempts, next_attempt_at, last_error, created_at, enqueued_at, updated_at,"
                " group_key) VALUES ($1, 'hook', $2, 'w', 'tracking', '{}', 'pending', $3, $4,"
                " $5, 100, 100, 100, $6)",
                [("w1", "held", 1, 86500.0, "HTTP 503: busy", window),
                 ("w2", "held", 1, 86500.0, "HTTP 503: busy", window),
                 ("w3", "all", 0, 120.0, None, None),
                 ("w4", "held", 0, 130.0, None, "coalesce:held>hook>w>130.000")])
        finally:
            await conn.close()
        store = from_url(dsn)
        await store.open()
        try:
            assert store.migrated == ["0008_window_order"]  # type: ignore[attr-defined]
            before = await _send_all(store, "hook", 86000.0)
            assert [d.id for d in before] == [PENDING]  # the other shipment's, not w's
            after = await _send_all(store, "hook", 86500.0)
            assert [d.id for d in after] == ["w2", "w1", "w3", "w4"]
        finally:
            await store.close()
