"""A SQLite outbox written by an earlier bridge (text ids, JSON payloads) keeps working."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from bridge.models import NewDelivery, Status
from bridge.outbox.sqlite import SqliteStore

OLD_ID = "dlv_" + "0123456789abcdef" * 2


def _old_file(path: Path) -> None:
    """The shape of a file from before schema version 1 (text ids, JSON payloads), made
    with the schema of the previous release."""
    conn = sqlite3.connect(path)
    conn.executescript(
        (Path(__file__).parents[1] / "data" / "previous-release" / "sqlite.sql").read_text())
    for n, status in enumerate(["pending", "dead"]):
        conn.execute(
            "INSERT INTO deliveries (id, sink, route, item_uuid, kind, payload, status, "
            "attempts, next_attempt_at, created_at, enqueued_at, updated_at) "
            "VALUES (?, 's', 'r', 'u', 'tracking', ?, ?, 0, 0, 0, 0, 0)",
            (OLD_ID[:-1] + str(n), json.dumps({"body": '{"a": "x:1"}'}), status))
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()


async def test_text_ids_and_json_payloads_from_before_still_work(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    _old_file(path)
    box = SqliteStore(str(path))
    await box.open(recover=True)
    try:
        pending_id, dead_id = OLD_ID[:-1] + "0", OLD_ID[:-1] + "1"
        [claimed] = await box.claim("s", 5, 1.0, 300)
        assert claimed.id == pending_id and claimed.payload == {"body": '{"a": "x:1"}'}
        # The same item arriving again is recognised, not stored twice.
        again = NewDelivery(id=pending_id, sink="s", route="r", item_uuid="u", kind="tracking",
                            payload={"body": "{}"}, batch_id="b")
        assert await box.enqueue([again], 2.0) == 0
        await box.complete([pending_id], 3.0)
        row = await box.get(pending_id)
        assert row is not None and row.status is Status.DELIVERED
        assert await box.replay([dead_id], 4.0) == 1
        assert await box.counts() == {"pending": 1, "delivered": 1, "dead": 0}
    finally:
        await box.close()
