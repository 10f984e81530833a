"""One contract, every storage engine (inbox, outbox, a sink's memory). A new engine adds
itself to BACKENDS and must pass."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest

from bridge.errors import StorageError, StorageInUse
from bridge.models import (
    COALESCED,
    BatchStatus,
    Delivery,
    Failed,
    InboxBatch,
    NewDelivery,
    Sequenced,
    Status,
)
from bridge.outbox import Store, from_url
from bridge.outbox.postgres import SEQUENCER_LOCK, PostgresStore
from bridge.outbox.sqlite import SqliteStore
from tests.conftest import require_service
from tests.helpers import postgres
from tests.helpers.tcp_proxy import TcpProxy

StoreFactory = Callable[[], Awaitable[Store]]
BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
async def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A factory opening the backend on the same storage each time (a process restart)."""
    async with AsyncExitStack() as stack:
        if request.param == "memory":
            memory = from_url("memory://")
            url = ""
        elif request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/o.db"
        else:
            require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                            "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
            url = await stack.enter_async_context(postgres.fresh_database())

        async def make() -> Store:
            box = memory if not url else from_url(url)
            await box.open(recover=True)
            stack.push_async_callback(box.close)
            # The serving process's sequencer: settling batches is for whoever holds it.
            assert await box.acquire_sequencer()
            return box

        yield make


@pytest.fixture
async def box(reopen: StoreFactory) -> Store:
    return await reopen()


def new(i: int, sink: str = "s", error: str | None = None) -> NewDelivery:
    return NewDelivery(id=f"d{i:04d}", sink=sink, route="r", item_uuid=f"u{i}", kind="tracking",
                       payload={"body": f"payload {i}", "x": "ü"}, batch_id="b1", error=error)


async def test_pending_deliveries_are_counted_per_sink(box: Store) -> None:
    await box.enqueue([new(1, "erp"), new(2, "erp"), new(3, "chat"), new(4, "chat", "bad")],
                      100.0)  # the last one dead at once (its template failed)
    [chat] = await box.claim("chat", 10, 100.0, 30.0)
    await box.complete([chat.id], 101.0)
    assert await box.pending_by_sink() == {"erp": 2}


async def test_enqueue_stores_once_per_id(box: Store) -> None:
    assert await box.enqueue([new(1), new(2)], 100.0) == 2
    assert await box.enqueue([new(2), new(3)], 101.0) == 1  # a repeated item is not stored twice
    assert await box.counts() == {"pending": 3, "delivered": 0, "dead": 0}
    row = await box.get("d0001")
    assert row is not None
    assert row.payload == {"body": "payload 1", "x": "ü"}
    assert (row.status, row.attempts, row.created_at, row.enqueued_at) == (
        Status.PENDING, 0, 100.0, 100.0)


async def test_claim_is_oldest_first_bounded_and_counts_an_attempt(box: Store) -> None:
    await box.enqueue([new(i) for i in range(5)], 100.0)
    first = await box.claim("s", 2, 100.0, lease=30)
    assert [d.id for d in first] == ["d0000", "d0001"]
    assert all(d.attempts == 1 for d in first)
    second = await box.claim("s", 10, 100.0, lease=30)
    assert [d.id for d in second] == ["d0002", "d0003", "d0004"]  # leased ones are skipped
    assert await box.claim("s", 10, 120.0, lease=30) == []
    again = await box.claim("s", 10, 131.0, lease=30)  # leases ran out: due again
    assert [d.id for d in again] == [f"d000{i}" for i in range(5)]
    assert all(d.attempts == 2 for d in again)


async def test_claim_only_takes_its_own_sink_and_due_rows(box: Store) -> None:
    await box.enqueue([new(1, "a"), new(2, "b")], 100.0)
    assert [d.id for d in await box.claim("a", 10, 100.0, 30)] == ["d0001"]
    assert await box.claim("a", 10, 99.0, 30) == []


async def test_complete(box: Store) -> None:
    await box.enqueue([new(1), new(2)], 100.0)
    await box.claim("s", 10, 100.0, 30)
    await box.complete(["d0001", "d0002"], 101.0)
    assert await box.counts() == {"pending": 0, "delivered": 2, "dead": 0}
    assert await box.claim("s", 10, 1000.0, 30) == []


async def test_retry_at_defers_and_keeps_the_reason(box: Store) -> None:
    await box.enqueue([new(1)], 100.0)
    await box.claim("s", 1, 100.0, 30)
    await box.retry_at("d0001", 150.0, "HTTP 503", 101.0)
    assert await box.next_due("s") == 150.0
    assert await box.claim("s", 1, 149.0, 30) == []
    [row] = await box.claim("s", 1, 150.0, 30)
    assert row.attempts == 2 and row.last_error == "HTTP 503"


async def test_dead_letters_newest_first_and_replay(box: Store) -> None:
    await box.enqueue([new(1), new(2), new(3)], 100.0)
    await box.claim("s", 3, 100.0, 30)
    await box.dead_letter("d0001", "HTTP 400: bad", 101.0)
    await box.dead_letter("d0002", "HTTP 404", 102.0)
    await box.complete(["d0003"], 102.0)
    dead = await box.list_dead()
    assert [(d.id, d.last_error) for d in dead] == [
        ("d0002", "HTTP 404"), ("d0001", "HTTP 400: bad")]
    assert await box.replay(["d0001", "d0003", "nope"], 200.0) == 1  # d0003 was delivered
    row = await box.get("d0001")
    assert row is not None
    assert (row.status, row.attempts, row.enqueued_at) == (Status.PENDING, 0, 200.0)
    assert [d.id for d in await box.claim("s", 10, 200.0, 30)] == ["d0001"]
    assert await box.replay(None, 300.0) == 1  # --all: d0002
    assert await box.list_dead() == []


async def test_a_failed_render_is_stored_dead(box: Store) -> None:
    await box.enqueue([new(1, error="template failed: ZeroDivisionError")], 100.0)
    [row] = await box.list_dead()
    assert row.last_error == "template failed: ZeroDivisionError"
    assert await box.claim("s", 10, 100.0, 30) == []


async def test_release_gives_work_back_untouched(box: Store) -> None:
    await box.enqueue([new(1)], 100.0)
    claimed = await box.claim("s", 1, 100.0, 300)
    assert [d.lease_until for d in claimed] == [400.0]
    await box.release(claimed, 101.0)
    [row] = await box.claim("s", 1, 101.0, 300)
    assert row.attempts == 1


async def test_release_leaves_a_claim_made_after_the_lease_ran_out(box: Store) -> None:
    """Replica A claims, its lease runs out, replica B claims the same delivery: A giving
    it back late must not clear B's lease (a third replica would send it again)."""
    await box.enqueue([new(1), new(2)], 100.0)
    a_claim = await box.claim("s", 2, 100.0, 30)  # A's lease ends at 130
    b_claim = await box.claim("s", 1, 131.0, 300)  # B, at 131, takes d0001 until 431
    assert [d.id for d in b_claim] == ["d0001"]
    await box.release(a_claim, 132.0)  # only d0002 is still A's
    freed = await box.claim("s", 10, 133.0, 300)
    assert [d.id for d in freed] == ["d0002"]  # d0001 stays B's
    assert freed[0].attempts == 1  # A's attempt given back, this claim's counted
    row = await box.get("d0001")
    assert row is not None and row.attempts == 2 and row.lease_until == 431.0


async def test_old_sink_state_is_forgotten_and_recent_kept(box: Store) -> None:
    await box.remember("slack:C1", "old", "1.1", 100.0)
    await box.remember("slack:C1", "new", "2.2", 500.0)
    await box.remember("slack:C2", "rewritten", "3.3", 100.0)
    await box.remember("slack:C2", "rewritten", "3.4", 600.0)  # written again: young
    assert await box.forget_memories(400.0) == 1
    assert await box.recall("slack:C1", "old") is None
    assert await box.recall("slack:C1", "new") == "2.2"
    assert await box.recall("slack:C2", "rewritten") == "3.4"


async def test_sweep_forgets_only_old_delivered_rows(box: Store) -> None:
    await box.enqueue([new(1), new(2), new(3)], 100.0)
    await box.claim("s", 3, 100.0, 30)
    await box.complete(["d0001"], 100.0)
    await box.complete(["d0002"], 500.0)
    await box.dead_letter("d0003", "x", 100.0)
    assert await box.sweep(400.0) == 1
    assert await box.get("d0001") is None
    assert await box.counts() == {"pending": 0, "delivered": 1, "dead": 1}


async def test_next_due_counts_leases(box: Store) -> None:
    assert await box.next_due("s") is None
    await box.enqueue([new(1)], 100.0)
    assert await box.next_due("s") == 100.0
    await box.claim("s", 1, 100.0, 30)
    assert await box.next_due("s") == 130.0


async def test_restart_keeps_everything_and_leases_run_out(reopen: StoreFactory) -> None:
    box = await reopen()
    await box.enqueue([new(1), new(2)], 100.0)
    await box.claim("s", 2, 100.0, lease=60)  # then the process "dies" mid-send
    await box.retry_at("d0002", 100.0, "timeout", 100.0)
    await box.close()
    box2 = await reopen()
    claimed = await box2.claim("s", 10, 161.0, 30)  # at the latest when the lease ran out
    assert sorted(d.id for d in claimed) == ["d0001", "d0002"]
    assert {d.id: d.attempts for d in claimed} == {"d0001": 2, "d0002": 2}


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
async def test_single_process_backends_recover_leases_at_start(url: str, tmp_path: Path) -> None:
    """Only one process serves a SQLite file, so its leases can be released at once."""
    box = from_url(url if url == "memory://" else f"sqlite:///{tmp_path}/o.db")
    await box.open(recover=True)
    await box.enqueue([new(1)], 100.0)
    await box.claim("s", 1, 100.0, lease=3600)
    if url != "memory://":
        await box.close()
        box = from_url(f"sqlite:///{tmp_path}/o.db")
    await box.open(recover=True)
    try:
        assert [d.id for d in await box.claim("s", 1, 101.0, 30)] == ["d0001"]
    finally:
        await box.close()


async def test_concurrent_enqueues_all_land(box: Store) -> None:
    counts = await asyncio.gather(*(box.enqueue([new(i * 10 + j) for j in range(10)], 100.0)
                                    for i in range(50)))
    assert sum(counts) == 500
    assert (await box.counts())["pending"] == 500


async def test_sink_state_survives_a_restart(reopen: StoreFactory) -> None:
    box = await reopen()
    assert await box.recall("slack:C1", "shipment-1") is None
    await box.remember("slack:C1", "shipment-1", "1700000000.000100", 100.0)
    await box.remember("slack:C2", "shipment-1", "other", 100.0)
    await box.remember("slack:C1", "shipment-1", "1700000000.000200", 101.0)  # overwrite
    await box.close()
    box2 = await reopen()
    assert await box2.recall("slack:C1", "shipment-1") == "1700000000.000200"
    assert await box2.recall("slack:C2", "shipment-1") == "other"


async def test_refunded_retry_does_not_count_an_attempt(box: Store) -> None:
    await box.enqueue([new(1)], 100.0)
    await box.claim("s", 1, 100.0, 30)
    await box.retry_at("d0001", 100.0, "HTTP 429", 100.0, refund=True)
    [row] = await box.claim("s", 1, 100.0, 30)
    assert row.attempts == 1 and row.last_error == "HTTP 429"


def grouped(i: int, key: str = "g", delay: float = 30.0) -> NewDelivery:
    d = new(i)
    d.group_key, d.delay = key, delay
    return d


async def test_digest_groups_wait_and_are_claimed_together(box: Store) -> None:
    await box.enqueue([grouped(1)], 100.0)
    await box.enqueue([grouped(2), grouped(3, key="other"), new(4)], 110.0)
    assert [d.id for d in await box.claim("s", 10, 110.0, 30)] == ["d0004"]  # not yet due
    assert await box.next_due("s") == 130.0
    [first] = await box.claim("s", 10, 130.0, 30)  # the first window closed
    assert (first.id, first.group_key) == ("d0001", "g")
    rest = await box.claim_group("s", "g", 10, 130.0, 30)
    assert [d.id for d in rest] == ["d0002"]  # same group, due later, not the other group
    assert rest[0].attempts == 1
    assert await box.claim_group("s", "g", 10, 130.0, 30) == []  # all leased now
    assert [d.id for d in await box.claim_group("s", "other", 1, 130.0, 30)] == ["d0003"]


# ---- per-shipment order at a sink ---------------------------------------------------------

def about(i: int, item: str, sink: str = "s", delay: float = 0.0,
          error: str | None = None) -> NewDelivery:
    """d<i> about `item`; stored in the order of i, as the sequencer makes them."""
    d = new(i, sink, error)
    d.item_uuid, d.delay = item, delay
    return d


def ids(claimed: list[Delivery]) -> list[str]:
    return [d.id for d in claimed]


async def test_one_item_s_deliveries_are_claimed_one_at_a_time_in_order(box: Store) -> None:
    await box.enqueue([about(1, "A"), about(2, "A"), about(3, "B")], 100.0)
    await box.enqueue([about(4, "A")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 30)) == ["d0001", "d0003"]  # one per item
    assert await box.claim("s", 10, 100.0, 30) == []  # d0002 waits for d0001, in flight
    await box.complete(["d0003"], 101.0)  # another item's outcome releases nothing of A
    assert await box.claim("s", 10, 101.0, 30) == []
    assert ids(await box.claim("s", 10, 131.0, 30)) == ["d0001"]  # its lease ran out
    await box.complete(["d0001"], 133.0)
    assert ids(await box.claim("s", 10, 133.0, 30)) == ["d0002"]
    await box.release(await box.claim("s", 10, 133.0, 30), 133.0)  # nothing more, yet
    await box.complete(["d0002"], 134.0)
    assert ids(await box.claim("s", 10, 134.0, 30)) == ["d0004"]


async def test_a_clock_gone_back_does_not_put_an_item_s_later_delivery_first(
    box: Store
) -> None:
    await box.enqueue([about(1, "A")], 100.0)
    await box.enqueue([about(2, "B"), about(3, "A")], 90.0)  # an NTP step back in between
    # One at a time: d0003, stored as due at 90, must not go before d0001.
    assert ids(await box.claim("s", 1, 100.0, 30)) in (["d0001"], ["d0002"])
    claimed = ids(await box.claim("s", 1, 100.0, 30)) + ids(await box.claim("s", 1, 100.0, 30))
    assert "d0003" not in claimed


async def test_a_clock_gone_back_far_leaves_no_delivery_waiting_for_it(reopen: StoreFactory
                                                                        ) -> None:
    """Stored at 100,000, then the clock is at 1,000 (a host booted with its clock days ahead,
    then corrected): what is stored now is due now, on every engine, after a restart too;
    one item's deliveries keep their order."""
    box = await reopen()
    await box.enqueue([about(1, "A")], 100_000.0)
    await box.close()
    box = await reopen()  # a restart in between: SQLite reads when the last were stored
    await box.enqueue([about(2, "B"), about(3, "A")], 1_000.0)
    claimed = ids(await box.claim("s", 10, 1_000.0, 30))
    assert "d0002" in claimed and "d0003" not in claimed, claimed
    if "d0001" in claimed:  # moved back with the clock (SQLite): A's first goes first
        await box.complete(["d0001"], 1_001.0)
        assert ids(await box.claim("s", 10, 1_001.0, 30)) == ["d0003"]


async def test_a_clock_gone_back_far_while_running_leaves_nothing_waiting(box: Store) -> None:
    await box.enqueue([about(1, "A")], 100_000.0)
    assert await box.settle([], 1_000.0) == []  # no delivery: nothing moves, nothing fails
    await box.enqueue([about(2, "B")], 1_000.0)
    assert "d0002" in ids(await box.claim("s", 10, 1_000.0, 30))


async def test_moving_back_with_the_clock_is_done_once_and_spares_sends_in_flight(
        reopen: StoreFactory) -> None:
    """What was stored while the clock was ahead moves back once: a settle that stores
    nothing finds the step, a restart after it finds nothing more to move, and a delivery
    stored before the clock ran ahead and claimed since keeps its lease (not sent twice)."""
    box = await reopen()
    await box.enqueue([about(1, "A")], 500.0)  # before the clock ran ahead
    await box.enqueue([about(2, "B")], 100_000.0)  # while it was ahead
    [first] = await box.claim("s", 1, 1_000.0, 300.0)  # the clock is right again
    assert first.id == "d0001"
    assert await box.settle([], 1_000.0) == []
    # SQLite moves d0002 back to 1,000; memory and PostgreSQL store as of the clock, and
    # leave it due at 100,000. None hands out d0001 again while its send is in flight.
    moves = isinstance(box, SqliteStore)
    assert ids(await box.claim("s", 10, 1_001.0, 300.0)) == (["d0002"] if moves else [])
    await box.close()
    box = await reopen()
    await box.enqueue([about(3, "C")], 1_002.0)
    moved = await box.get("d0002")
    assert moved is not None  # moved once, not again at the restart:
    assert moved.enqueued_at == (1_000.0 if moves else 100_000.0)


async def test_a_replay_after_the_clock_went_back_does_not_pass_an_earlier_delivery(
    box: Store
) -> None:
    await box.enqueue([about(1, "X")], 200.0)
    await box.enqueue([about(2, "A")], 150.0)  # the clock stepped back
    await box.enqueue([about(3, "A", error="template failed: x")], 150.0)  # stored dead
    assert await box.replay(["d0003"], 150.0) == 1
    claimed = ids(await box.claim("s", 10, 150.0, 30)) + ids(await box.claim("s", 10, 200.0, 30))
    assert "d0003" not in claimed  # d0002 first, then d0003 once it is settled
    await box.complete(["d0002"], 201.0)
    assert ids(await box.claim("s", 10, 201.0, 30)) == ["d0003"]


async def test_a_claim_is_full_when_items_have_several_deliveries_due(box: Store) -> None:
    # A shipment's deliveries stored together (two routes, or two snapshots in one batch):
    # the dispatcher claims again at once only after a full claim.
    await box.enqueue([about(2 * k + j, f"u{k:03d}") for k in range(200) for j in range(2)],
                      100.0)
    claims = [await box.claim("s", 50, 100.0, 30) for _ in range(4)]
    assert [len(c) for c in claims] == [50, 50, 50, 50]
    assert len({d.item_uuid for c in claims for d in c}) == 200  # one each, the first ones
    assert all(int(d.id[1:]) % 2 == 0 for c in claims for d in c)


async def test_a_retry_holds_back_its_own_item_at_its_own_sink_only(box: Store) -> None:
    await box.enqueue([about(1, "A"), about(2, "A"), about(3, "B"), about(4, "B"),
                       about(5, "A", sink="t")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 30)) == ["d0001", "d0003"]
    await box.retry_at("d0001", 150.0, "HTTP 500", 101.0)
    await box.complete(["d0003"], 101.0)
    # d0002 is due and d0001 unleased, but d0001 goes first, at 150. B flows meanwhile,
    # and so does A at another sink.
    assert ids(await box.claim("s", 10, 110.0, 30)) == ["d0004"]
    await box.complete(["d0004"], 111.0)
    assert ids(await box.claim("t", 10, 111.0, 30)) == ["d0005"]
    assert await box.claim("s", 10, 149.0, 30) == []
    assert ids(await box.claim("s", 10, 150.0, 30)) == ["d0001"]
    await box.complete(["d0001"], 151.0)
    assert ids(await box.claim("s", 10, 151.0, 30)) == ["d0002"]


async def test_a_delivery_not_yet_due_holds_back_the_later_ones(box: Store) -> None:
    await box.enqueue([about(1, "A", delay=30.0), about(2, "A"), about(3, "B")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 300)) == ["d0003"]
    assert await box.claim("s", 10, 129.0, 300) == []
    assert ids(await box.claim("s", 10, 130.0, 300)) == ["d0001"]


async def test_dead_letters_hold_nothing_back_and_a_replay_takes_its_place(
    box: Store
) -> None:
    await box.enqueue([about(1, "A", error="template failed: x"), about(2, "A"),
                       about(3, "A")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 30)) == ["d0002"]  # d0001 was stored dead
    await box.dead_letter("d0002", "HTTP 400", 101.0)
    assert ids(await box.claim("s", 10, 101.0, 30)) == ["d0003"]
    await box.enqueue([about(4, "A")], 102.0)
    assert await box.replay(["d0002"], 103.0) == 1
    # d0003 is in flight already; d0004 waits for both.
    assert ids(await box.claim("s", 10, 103.0, 30)) == ["d0002"]
    await box.complete(["d0002", "d0003"], 104.0)
    assert ids(await box.claim("s", 10, 104.0, 30)) == ["d0004"]


async def test_digest_members_neither_wait_nor_hold_back(box: Store) -> None:
    member = about(1, "A", delay=30.0)
    member.group_key = "g"  # A's update waiting for its digest's window to close
    await box.enqueue([member, about(2, "A"), about(3, "A")], 100.0)
    # d0002 (an update whose step failed skips the digest) goes at once; d0003 waits for it.
    assert ids(await box.claim("s", 10, 100.0, 300)) == ["d0002"]
    assert await box.next_due("s") == 130.0
    assert ids(await box.claim("s", 10, 130.0, 300)) == ["d0001"]  # d0002 still in flight


def window(i: int, item: str, until: float, stored: float, sink: str = "s") -> NewDelivery:
    """d<i>: a change of `item` held in its coalescing window until `until` (the router's
    group key), stored at `stored`."""
    d = about(i, item, sink, delay=until - stored)
    d.group_key = f"{COALESCED}r>{sink}>{item}>{until:.3f}"
    return d


async def claim_window(box: Store, now: float) -> list[str]:
    """A claim as the dispatcher makes it: a window's last member brings the others."""
    claimed = await box.claim("s", 10, now, 300)
    for d in list(claimed):
        if d.group_key is not None:
            claimed += await box.claim_group("s", d.group_key, 500, now, 300)
    return sorted(ids(claimed))


async def test_a_window_waits_for_an_earlier_delivery_of_its_shipment_in_retry(
    box: Store
) -> None:
    await box.enqueue([about(1, "A")], 100.0)
    await box.enqueue([window(2, "A", 110.0, 100.0), about(3, "B")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 300)) == ["d0001", "d0003"]
    await box.retry_at("d0001", 150.0, "HTTP 500", 101.0)
    assert await box.claim("s", 10, 110.0, 300) == []  # the window closed: d0001 first
    assert await box.next_due("s") == 150.0
    assert ids(await box.claim("s", 10, 150.0, 300)) == ["d0001"]
    await box.complete(["d0001"], 151.0)
    assert ids(await box.claim("s", 10, 151.0, 300)) == ["d0002"]


async def test_a_window_in_retry_holds_back_later_deliveries_and_windows_of_its_shipment(
    box: Store
) -> None:
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    await box.enqueue([window(2, "A", 110.0, 105.0)], 105.0)
    assert await box.claim("s", 10, 109.0, 300) == []
    assert await claim_window(box, 110.0) == ["d0001", "d0002"]  # one message: d0002's
    for d in ("d0001", "d0002"):
        await box.retry_at(d, 200.0, "HTTP 503", 111.0)
    await box.enqueue([about(3, "A"), window(4, "A", 130.0, 120.0), about(5, "B")], 120.0)
    # A's next update and its next window wait for the first window's retry; B flows.
    assert ids(await box.claim("s", 10, 130.0, 300)) == ["d0005"]
    assert await box.next_due("s") == 200.0
    assert await claim_window(box, 200.0) == ["d0001", "d0002"]
    await box.complete(["d0001", "d0002"], 201.0)
    assert ids(await box.claim("s", 10, 201.0, 300)) == ["d0003"]
    assert await box.claim("s", 10, 201.0, 300) == []
    await box.complete(["d0003"], 202.0)
    assert ids(await box.claim("s", 10, 202.0, 300)) == ["d0004"]


async def test_a_window_goes_after_what_was_made_while_it_was_open(box: Store) -> None:
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    await box.enqueue([about(2, "A")], 101.0)  # another route's, while the window is open
    await box.enqueue([window(3, "A", 110.0, 102.0)], 102.0)
    assert ids(await box.claim("s", 10, 102.0, 300)) == ["d0002"]  # not held by the window
    await box.retry_at("d0002", 150.0, "HTTP 500", 103.0)
    # The window's message is d0003's: it waits for d0002, made before it.
    assert await box.claim("s", 10, 110.0, 300) == []
    assert await box.next_due("s") == 150.0
    assert ids(await box.claim("s", 10, 150.0, 300)) == ["d0002"]
    await box.complete(["d0002"], 151.0)
    assert await claim_window(box, 151.0) == ["d0001", "d0003"]


async def test_a_replay_inside_a_window_in_retry_goes_first_and_nothing_deadlocks(
    box: Store
) -> None:
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    await box.enqueue([about(2, "A")], 101.0)
    await box.enqueue([window(3, "A", 110.0, 102.0)], 102.0)
    assert ids(await box.claim("s", 10, 102.0, 300)) == ["d0002"]
    await box.dead_letter("d0002", "HTTP 400", 103.0)
    assert await claim_window(box, 110.0) == ["d0001", "d0003"]
    for d in ("d0001", "d0003"):
        await box.retry_at(d, 150.0, "HTTP 503", 111.0)
    assert await box.replay(["d0002"], 120.0) == 1
    # d0002 was made before the window's last change: it goes first, the window waits.
    assert ids(await box.claim("s", 10, 120.0, 300)) == ["d0002"]
    assert await box.claim("s", 10, 150.0, 300) == []
    await box.complete(["d0002"], 151.0)
    assert await claim_window(box, 151.0) == ["d0001", "d0003"]


async def test_an_open_window_holds_nothing_back(box: Store) -> None:
    await box.enqueue([window(1, "A", 110.0, 100.0), about(2, "A")], 100.0)
    assert ids(await box.claim("s", 10, 100.0, 300)) == ["d0002"]
    await box.retry_at("d0002", 105.0, "HTTP 500", 100.5)
    assert await box.next_due("s") == 105.0
    assert ids(await box.claim("s", 10, 105.0, 300)) == ["d0002"]


async def test_a_closed_window_goes_before_later_deliveries_due_before_it(box: Store) -> None:
    """The window (d0001) closed at 110, never tried; d0002..d0005, its shipment's later
    changes on another route, fell due before it while it was open. A claim of one takes
    the window first, however many fell due before it."""
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    for i in range(2, 6):
        await box.enqueue([about(i, "A")], 100.0 + i)
    assert ids(await box.claim("s", 1, 120.0, 30)) == ["d0001"]


async def test_a_window_claimed_and_lost_mid_send_is_taken_again_whole(box: Store) -> None:
    """Its last member by claim, the rest by claim_group moments later, then the replica
    dies: the window goes again once every member's lease has run out, as one message."""
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    last = window(2, "A", 110.0, 105.0)
    await box.enqueue([last], 105.0)
    assert ids(await box.claim("s", 10, 110.0, 30)) == ["d0002"]  # lease until 140
    assert ids(await box.claim_group("s", last.group_key or "", 500, 110.004, 30)) == [
        "d0001"]  # lease until 140.004
    assert await claim_window(box, 140.001) == []  # not the last member alone
    assert await claim_window(box, 140.005) == ["d0001", "d0002"]


async def test_a_change_stored_after_its_window_was_claimed_waits_for_that_send(
    box: Store
) -> None:
    """The sequencer behind: a change routed before its window closed is stored after the
    window was claimed. It is the window's last member now, and waits for the send in
    flight (then goes as a message of its own, or with the window if that send failed)."""
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    assert ids(await box.claim("s", 10, 110.0, 30)) == ["d0001"]
    await box.enqueue([window(2, "A", 110.0, 109.5)], 110.5)  # due at 111
    assert await box.claim("s", 10, 111.0, 30) == []
    await box.retry_at("d0001", 120.0, "HTTP 503", 112.0)
    # That send failed: the window goes again whole, as its last change's message (due).
    assert await claim_window(box, 113.0) == ["d0001", "d0002"]


async def test_a_window_in_flight_holds_its_shipment_s_later_deliveries(box: Store) -> None:
    """The window (closed at 110) is claimed; a change that joined it before the close is
    stored later, beside a later delivery of the shipment at the sink. While the window's
    send is in flight the window is closed, whatever its newest member's due time says (a
    sequencer before 1cdb63b's follow-up stored it due later): neither goes beside it."""
    await box.enqueue([window(1, "A", 110.0, 100.0)], 100.0)
    assert ids(await box.claim("s", 10, 110.0, 30)) == ["d0001"]
    late = window(2, "A", 110.0, 110.5)
    late.delay = 0.5  # due at 111
    await box.enqueue([late, about(3, "A")], 110.5)
    assert await box.claim("s", 10, 110.6, 30) == []
    await box.complete(["d0001"], 110.7)
    assert ids(await box.claim("s", 10, 111.0, 30)) == ["d0002"]
    await box.complete(["d0002"], 111.1)
    assert ids(await box.claim("s", 10, 111.2, 30)) == ["d0003"]


async def test_next_due_ignores_deliveries_held_back(box: Store) -> None:
    await box.enqueue([about(1, "A"), about(2, "A")], 100.0)
    await box.claim("s", 10, 100.0, 30)
    assert await box.next_due("s") == 130.0  # d0001's lease; d0002 is due but held back
    await box.retry_at("d0001", 150.0, "HTTP 500", 101.0)
    assert await box.next_due("s") == 150.0
    await box.enqueue([about(3, "B", delay=40.0)], 101.0)
    assert await box.next_due("s") == 141.0
    await box.dead_letter("d0001", "gave up", 102.0)
    assert await box.next_due("s") == 100.0  # d0002 is first now, due since 100


async def test_ping(box: Store) -> None:
    await box.ping()


async def test_postgres_replicas_never_claim_the_same_delivery() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        replicas = [from_url(url) for _ in range(3)]
        for box in replicas:
            await box.open(recover=True)
        try:
            await replicas[0].enqueue([new(i) for i in range(600)], 100.0)

            async def drain(box: Store) -> list[str]:
                got: list[str] = []
                while batch := await box.claim("s", 7, 100.0, 300):
                    got += [d.id for d in batch]
                return got

            results = await asyncio.gather(*(drain(b) for b in replicas for _ in range(3)))
            claimed = [i for r in results for i in r]
            assert len(claimed) == 600 and len(set(claimed)) == 600  # each exactly once
            assert sum(1 for r in results if r) > 1  # the work really was shared
        finally:
            for box in replicas:
                await box.close()


async def test_postgres_a_replica_cannot_take_what_another_holds_back() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        first, second = from_url(url), from_url(url)
        for box in (first, second):
            await box.open(recover=True)
        try:
            await first.enqueue([about(1, "A"), about(2, "A"), about(3, "B"), about(4, "B"),
                                 about(5, "B")], 100.0)
            assert ids(await first.claim("s", 1, 100.0, 30)) == ["d0001"]
            assert ids(await second.claim("s", 10, 100.0, 30)) == ["d0003"]  # not d0002
            await second.complete(["d0003"], 101.0)
            # A claim of d0004 not committed yet holds its row locked: the other replica
            # skips it, and does not take d0005 either (d0004 is still pending).
            conn = await asyncpg.connect(url)
            try:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM deliveries WHERE id = 'd0004' FOR UPDATE")
                    assert await first.claim("s", 10, 101.0, 30) == []
            finally:
                await conn.close()
            assert ids(await first.claim("s", 10, 101.0, 30)) == ["d0004"]
        finally:
            for box in (first, second):
                await box.close()


async def test_postgres_replicas_never_hold_two_deliveries_of_one_item() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        replicas = [from_url(url) for _ in range(2)]
        for box in replicas:
            await box.open(recover=True)
        try:
            total = 300
            await replicas[0].enqueue([about(n, f"u{n % 15}") for n in range(total)], 100.0)
            held: dict[str, str] = {}  # item -> the delivery of it claimed and not settled
            sent: dict[str, list[str]] = {}
            shares = [0, 0]

            async def work(r: int) -> None:
                while sum(map(len, sent.values())) < total:
                    claimed = await replicas[r].claim("s", 5, 100.0, 300)
                    for d in claimed:
                        assert d.item_uuid not in held, (d.id, held[d.item_uuid])
                        held[d.item_uuid] = d.id
                    await asyncio.sleep(0.001 if claimed else 0.005)  # sending
                    for d in claimed:  # settled: first forgotten here, then in storage
                        del held[d.item_uuid]
                        sent.setdefault(d.item_uuid, []).append(d.id)
                    shares[r] += len(claimed)
                    if claimed:
                        await replicas[r].complete(ids(claimed), 100.0)

            await asyncio.wait_for(asyncio.gather(*(work(r) for r in (0, 1) for _ in range(3))),
                                   60)
            assert sum(map(len, sent.values())) == total
            assert all(got == sorted(got) for got in sent.values())  # d<n>: in order made
            assert min(shares) > 0  # both replicas did take part
        finally:
            for box in replicas:
                await box.close()


async def test_sqlite_refuses_a_second_serving_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    first = from_url(url)
    await first.open(recover=True)
    try:
        with pytest.raises(StorageInUse, match="another bridge process is serving"):
            await from_url(url).open(recover=True)
        reader = from_url(url)  # CLI commands (dlq) open without taking ownership
        await reader.open()
        assert await reader.counts() == {"pending": 0, "delivered": 0, "dead": 0}
        await reader.close()
    finally:
        await first.close()


async def test_sqlite_concurrent_intakes_share_commits(tmp_path: Path) -> None:
    from bridge.outbox.sqlite import SqliteStore

    box = SqliteStore(str(tmp_path / "o.db"))
    await box.open(recover=True)
    try:
        before = box.commits
        await asyncio.gather(*(box.enqueue([new(i)], 100.0) for i in range(200)))
        commits = box.commits - before
        assert (await box.counts())["pending"] == 200
        assert commits < 100, f"200 intakes took {commits} commits: no grouping"
    finally:
        await box.close()


async def test_concurrent_intakes_each_count_their_own_new_rows(box: Store) -> None:
    assert await box.enqueue([new(1)], 100.0) == 1
    results = await asyncio.gather(
        box.enqueue([new(10), new(11)], 101.0),
        box.enqueue([new(11), new(12)], 101.0),  # shares d0011 with the intake before
        box.enqueue([new(1), new(13)], 101.0),   # repeats a stored delivery
        box.enqueue([new(20 + i) for i in range(5)], 101.0),
    )
    assert results[2] == 1 and results[3] == 5
    assert sorted(results[:2]) == [1, 2]  # d0011 is new for exactly one of them
    assert (await box.counts())["pending"] == 1 + 3 + 1 + 5


async def test_sqlite_intakes_of_one_commit_insert_together(tmp_path: Path) -> None:
    """Intakes queued behind a locked database run in one group (one commit), each in a
    savepoint of its own, with more rows than one INSERT takes; counts stay exact."""
    import sqlite3

    from bridge.outbox.sqlite import INSERT_ROWS, SqliteStore

    box = SqliteStore(str(tmp_path / "o.db"))
    await box.open(recover=True)
    locker = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    try:
        await box.enqueue([new(9000)], 100.0)

        async def one_group(*intakes: list[NewDelivery]) -> tuple[list[int], int]:
            locker.execute("BEGIN EXCLUSIVE")
            first = asyncio.create_task(box.enqueue([new(9999)], 100.0))  # waits in BEGIN
            await asyncio.sleep(0.1)
            rest = [asyncio.create_task(box.enqueue(i, 100.0)) for i in intakes]
            await asyncio.sleep(0.1)
            before = box.commits
            locker.execute("ROLLBACK")
            await first
            counts = [await t for t in rest]
            return counts, box.commits - before

        big = INSERT_ROWS // 2 + 10  # three of these need two statements
        counts, commits = await one_group(*([new(i + k * big) for i in range(big)]
                                            for k in range(3)))
        assert counts == [big] * 3
        assert commits == 2  # the one waiting in BEGIN, then the three together
        repeat = [new(1), new(9000)]  # d0001 is stored above; d9000 since the start
        counts, commits = await one_group([new(5000), new(5001)], repeat, [new(5001)])
        assert counts == [2, 0, 0] and commits == 2
        total = 1 + 1 + 3 * big + 2
        assert (await box.counts())["pending"] == total
        stored = await box.get(f"d{big + 3:04d}")
        assert stored is not None and stored.payload == new(big + 3).payload
    finally:
        locker.close()
        await box.close()


async def test_sqlite_a_failed_intake_in_a_group_leaves_the_others(tmp_path: Path) -> None:
    """An intake of one INSERT runs without a savepoint: when SQLite aborts that statement,
    none of its rows stay and the group's other intakes commit; when SQLite rolls back the
    whole transaction, or keeps part of the failed statement, every intake of the group
    fails (none is told it was stored, nothing half-stored is committed)."""
    import sqlite3

    from bridge.outbox.sqlite import SqliteStore

    box = SqliteStore(str(tmp_path / "o.db"))
    await box.open(recover=True)
    locker = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    locker.execute("CREATE TRIGGER abort_boom BEFORE INSERT ON deliveries "
                   "WHEN NEW.route = 'abort' BEGIN SELECT RAISE(ABORT, 'refused row'); END")
    locker.execute("CREATE TRIGGER rollback_boom BEFORE INSERT ON deliveries "
                   "WHEN NEW.route = 'rollback' BEGIN SELECT RAISE(ROLLBACK, 'gone'); END")
    # FAIL keeps the rows its statement wrote before it: a half intake, never to be committed.
    locker.execute("CREATE TRIGGER fail_boom BEFORE INSERT ON deliveries "
                   "WHEN NEW.route = 'fail' BEGIN SELECT RAISE(FAIL, 'half'); END")

    def routed(i: int, route: str) -> NewDelivery:
        d = new(i)
        d.route = route
        return d

    blockers = iter(range(9000, 9100))

    async def one_group(*intakes: list[NewDelivery]) -> tuple[list[int | BaseException], int]:
        locker.execute("BEGIN EXCLUSIVE")
        blocker = asyncio.create_task(box.enqueue([new(next(blockers))], 100.0))
        await asyncio.sleep(0.1)  # the writer waits in BEGIN with the blocker alone
        tasks = [asyncio.create_task(box.enqueue(i, 100.0)) for i in intakes]
        await asyncio.sleep(0.1)
        before = box.commits
        locker.execute("ROLLBACK")
        await blocker
        results = list(await asyncio.gather(*tasks, return_exceptions=True))
        return results, box.commits - before

    try:
        (ok, failed, after), commits = await one_group(
            [new(1), new(2)], [new(3), routed(4, "abort")], [new(5)])
        assert commits == 2  # the blocker's, then one for the three intakes
        assert (ok, after) == (2, 1)
        assert isinstance(failed, sqlite3.IntegrityError) and "refused row" in str(failed)
        assert await box.get("d0003") is None  # the aborted statement's first row went too
        assert (await box.counts())["pending"] == 3 + 1  # and the blocker's

        (first, doomed, last), commits = await one_group(
            [new(11)], [routed(12, "rollback")], [new(13)])
        assert commits == 1  # the blocker's only
        assert all(isinstance(r, sqlite3.Error) for r in (first, doomed, last))
        assert [await box.get(f"d00{i}") for i in (11, 12, 13)] == [None, None, None]
        assert await box.enqueue([new(11), new(13)], 101.0) == 2  # the writer carries on
        assert (await box.counts())["pending"] == 4 + 1 + 2

        (first, halved, last), commits = await one_group(
            [new(21)], [new(22), new(23), routed(24, "fail")], [new(25)])
        assert commits == 1  # the blocker's only
        assert all(isinstance(r, sqlite3.Error) for r in (first, halved, last))
        assert [await box.get(f"d00{i}") for i in range(21, 26)] == [None] * 5
        assert (await box.counts())["pending"] == 7 + 1
    finally:
        locker.close()
        await box.close()


async def test_sqlite_a_failed_settle_in_a_group_leaves_the_others(tmp_path: Path) -> None:
    """A settle runs first in its group and without a savepoint (batch_cost: a savepoint
    copies every page it changes): when it fails half-way, the transaction is begun again,
    so none of it stays (no deliveries, no states, its batches still waiting), and the
    intakes grouped with it are stored."""
    import sqlite3

    from bridge.outbox.sqlite import SqliteStore

    box = SqliteStore(str(tmp_path / "o.db"))
    await box.open(recover=True)
    locker = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    locker.execute("CREATE TRIGGER fail_boom BEFORE INSERT ON deliveries "
                   "WHEN NEW.route = 'fail' BEGIN SELECT RAISE(FAIL, 'half'); END")
    failing = new(2)
    failing.route = "fail"
    try:
        for n in (1, 2):
            await box.append(batch(n))
        locker.execute("BEGIN EXCLUSIVE")
        blocker = asyncio.create_task(box.enqueue([new(9000)], 100.0))
        await asyncio.sleep(0.1)  # the writer waits in BEGIN with the blocker alone
        settle = asyncio.create_task(box.settle([
            Sequenced(batch(1).id, [new(1)], "[]", {("order", "o1"): '{"n": 1}'}),
            Sequenced(batch(2).id, [new(3), failing], "[]", {("order", "o2"): '{"n": 2}'}),
        ], 100.0))
        await asyncio.sleep(0.05)
        intake = asyncio.create_task(box.append(batch(3)))  # urgent: queued first
        await asyncio.sleep(0.1)
        before = box.commits
        locker.execute("ROLLBACK")
        await blocker
        with pytest.raises(sqlite3.IntegrityError, match="half"):
            await settle
        await intake
        assert box.commits - before == 2  # the blocker, then settle and intake in one group
        assert [b.id for b in await box.waiting(10)] == [batch(n).id for n in (1, 2, 3)]
        assert [await box.get(f"d000{i}") for i in (1, 3)] == [None, None]
        assert await box.states([("order", "o1"), ("order", "o2")]) == {}
        # The writer carries on: the same settle without the failing row goes through.
        assert await box.settle([
            Sequenced(batch(1).id, [new(1)], "[]", {("order", "o1"): '{"n": 1}'}),
            Sequenced(batch(2).id, [new(3)], "[]", {("order", "o2"): '{"n": 2}'}),
        ], 101.0) == [1, 1]
        assert await box.states([("order", "o1"), ("order", "o2")]) == {
            ("order", "o1"): '{"n": 1}', ("order", "o2"): '{"n": 2}'}
    finally:
        locker.close()
        await box.close()


async def test_sqlite_is_wal_and_creates_its_folder(tmp_path: Path) -> None:
    import sqlite3

    box = from_url(f"sqlite:///{tmp_path}/sub/dir/o.db")  # folders are created
    await box.open(recover=True)
    await box.close()
    conn = sqlite3.connect(tmp_path / "sub" / "dir" / "o.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# ---- inbox ---------------------------------------------------------------------------------

def batch(n: int, at: float = 100.0, items: int = 1) -> InboxBatch:
    return InboxBatch(id=f"b{n:031d}", received_at=at, items=items,
                      body=b'{"order": [{"uuid": "o%d"}]}' % n)


async def test_a_rerouted_batch_renders_again_only_what_its_template_failed(
        box: Store) -> None:
    # What the router stores when a template fails: dead, nothing rendered.
    unrendered = dataclasses.replace(new(1), payload={}, error="template failed: ZeroDivision")
    refused = new(2, error="HTTP 400: refused")  # rendered, and dead for another reason
    await box.append(batch(1))
    assert await box.settle([Sequenced(batch(1).id, [unrendered, refused], "[]")], 100.0) == [2]
    assert await box.replay([unrendered.id], 110.0) == 0  # nothing to send: it stays dead
    assert await box.replay(None, 110.0) == 1  # the other one
    fixed = [dataclasses.replace(d, payload={"body": "fixed"}, error=None)
             for d in (unrendered, refused)]
    # The same item again in a batch that is not a reroute: stored already, nothing changes.
    await box.append(batch(2))
    assert await box.settle([Sequenced(batch(2).id, fixed, "[]")], 120.0) == [0]
    assert (await box.get(unrendered.id)).status is Status.DEAD  # type: ignore[union-attr]

    assert await box.reroute([batch(1).id], None) == 1
    [taken] = await box.waiting(10)
    assert taken.rerouted
    assert await box.settle([Sequenced(batch(1).id, fixed, "[]", rerouted=True)], 200.0) == [1]
    row = await box.get(unrendered.id)
    assert row is not None
    assert (row.status, row.payload, row.last_error, row.attempts) == (
        Status.PENDING, {"body": "fixed"}, None, 0)
    again = await box.get(refused.id)  # replayed before: pending with its own rendering
    assert again is not None and again.payload == refused.payload
    claimed = await box.claim("s", 10, 300.0, 30.0)
    assert {d.id for d in claimed} == {unrendered.id, refused.id}


async def test_inbox_keeps_acceptance_order_and_the_body(box: Store) -> None:
    for n in (3, 1, 2):
        await box.append(batch(n, at=100.0 + n))
    waiting = await box.waiting(10)
    assert [b.id for b in waiting] == [batch(n).id for n in (3, 1, 2)]
    assert waiting[0] == batch(3, at=103.0)
    assert [b.id for b in await box.waiting(2)] == [batch(3).id, batch(1).id]
    assert await box.inbox_depth() == (3, 101.0, 0)


async def test_settle_stores_deliveries_and_marks_in_one_go(box: Store) -> None:
    await box.enqueue([new(1)], 90.0)  # stored by an earlier batch
    for n in (1, 2, 3):
        await box.append(batch(n))
    results = await box.settle([
        Sequenced(batch(1).id, [new(1), new(2)], '[{"uuid": "u1"}]'),
        Failed(batch(2).id, "KeyError: 'x'"),
        Sequenced(batch(3).id, [], "[]"),
    ], 200.0)
    assert results == [1, None, 0]
    assert await box.waiting(10) == []
    assert await box.counts() == {"pending": 2, "delivered": 0, "dead": 0}
    stored = await box.get("d0002")
    assert stored is not None and stored.batch_id == "b1" and stored.created_at == 200.0
    first = await box.batch(batch(1).id)
    assert first is not None
    assert (first.status, first.deliveries, first.duplicates, first.sequenced_at) == (
        BatchStatus.SEQUENCED, 1, 1, 200.0)
    assert first.summary == '[{"uuid": "u1"}]' and first.body == batch(1).body
    failed = await box.batch(batch(2).id)
    assert failed is not None and (failed.status, failed.error) == (
        BatchStatus.FAILED, "KeyError: 'x'")
    assert await box.inbox_depth() == (0, None, 1)
    listed = await box.batches(10)
    assert [b.id for b in listed] == [batch(n).id for n in (3, 2, 1)]  # newest first
    assert listed[0].body is None and listed[2].deliveries == 1


async def test_a_batch_settled_already_is_not_settled_again(box: Store) -> None:
    await box.append(batch(1))
    assert await box.settle([Sequenced(batch(1).id, [new(1)], "[]")], 200.0) == [1]
    # A second settle of the same batch (a sequencer that read it before) changes nothing.
    assert await box.settle([Sequenced(batch(1).id, [new(1), new(2)], "[]")], 201.0) == [None]
    assert await box.get("d0002") is None
    info = await box.batch(batch(1).id)
    assert info is not None and (info.deliveries, info.sequenced_at) == (1, 200.0)


async def test_reroute_by_id_and_since(box: Store) -> None:
    for n in (1, 2, 3):
        await box.append(batch(n, at=100.0 * n))
    await box.settle([Sequenced(batch(1).id, [new(1)], "[]"), Failed(batch(2).id, "boom"),
                      Sequenced(batch(3).id, [], "[]")], 400.0)
    assert await box.reroute([batch(2).id, "nope"], None) == 1
    waiting = await box.waiting(10)
    assert [b.id for b in waiting] == [batch(2).id]
    again = await box.batch(batch(2).id)
    assert again is not None and (again.status, again.error) == (BatchStatus.WAITING, None)
    assert await box.reroute(None, 250.0) == 1  # batch 3 (received at 300); 2 waits already
    assert [b.id for b in await box.waiting(10)] == [batch(2).id, batch(3).id]
    # Routed again: what was stored already is not stored twice.
    assert await box.settle([Sequenced(batch(2).id, [new(1), new(5)], "[]"),
                             Sequenced(batch(3).id, [], "[]")], 500.0) == [1, 0]
    assert (await box.counts())["pending"] == 2


async def test_sweep_forgets_old_sequenced_batches_only(box: Store) -> None:
    for n in (1, 2, 3, 4):
        await box.append(batch(n))
    await box.settle([Sequenced(batch(1).id, [], "[]"), Failed(batch(2).id, "boom")], 100.0)
    await box.settle([Sequenced(batch(3).id, [], "[]")], 500.0)
    assert await box.sweep_batches(400.0) == 1
    assert await box.batch(batch(1).id) is None
    assert [b.id for b in await box.batches(10)] == [batch(n).id for n in (4, 3, 2)]


async def test_sweep_keeps_a_batch_a_dead_letter_with_nothing_rendered_needs(
        box: Store) -> None:
    """A delivery whose template failed has nothing to send: `bridge batches reroute`
    renders it from its batch, so that batch outlives inbox_retention while the letter is
    dead. A letter that was rendered (a receiver's 4xx) needs no batch."""
    for n in (1, 2, 3):
        await box.append(batch(n))
    unrendered = dataclasses.replace(new(1, error="template failed: x"), payload={},
                                     batch_id=batch(1).id)
    refused = dataclasses.replace(new(2), batch_id=batch(2).id)
    await box.settle([Sequenced(batch(1).id, [unrendered], "[]"),
                      Sequenced(batch(2).id, [refused], "[]"),
                      Sequenced(batch(3).id, [], "[]")], 100.0)
    [claimed] = await box.claim("s", 10, 100.0, 30)
    await box.dead_letter(claimed.id, "receiver answered HTTP 400", 101.0)
    assert await box.sweep_batches(400.0) == 2
    assert [b.id for b in await box.batches(10)] == [batch(1).id]


async def test_the_inbox_survives_a_restart(reopen: StoreFactory) -> None:
    box = await reopen()
    await box.append(batch(1))
    await box.append(batch(2))
    await box.settle([Sequenced(batch(1).id, [new(1)], "[]")], 200.0)
    await box.close()
    box2 = await reopen()
    assert [b.id for b in await box2.waiting(10)] == [batch(2).id]
    assert (await box2.counts())["pending"] == 1


async def test_concurrent_appends_all_land(box: Store) -> None:
    await asyncio.gather(*(box.append(batch(n)) for n in range(200)))
    assert (await box.inbox_depth())[0] == 200
    assert len({b.id for b in await box.waiting(500)}) == 200


async def test_postgres_one_sequencer_at_a_time_and_handover() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        a, b = from_url(url), from_url(url)
        await a.open(recover=True)
        await b.open(recover=True)
        try:
            assert await a.acquire_sequencer() is True
            assert await b.acquire_sequencer() is False
            await a.append(batch(1))
            with pytest.raises(StorageError, match="does not hold the sequencer"):
                await b.settle([Sequenced(batch(1).id, [new(1)], "[]")], 200.0)
            await a.release_sequencer()  # as a replica's death ends its connection
            assert await b.acquire_sequencer() is True
            assert await b.settle([Sequenced(batch(1).id, [new(1)], "[]")], 200.0) == [1]
            assert await a.acquire_sequencer() is False
        finally:
            await a.close()
            await b.close()


async def test_postgres_a_silent_sequencer_is_ended_and_the_lock_taken_over() -> None:
    """A replica frozen (or cut off, its session still open on the server's side) holds
    the lock and says nothing: after `silent_for` another replica ends its session and
    takes over, and nothing the frozen one does afterwards can commit."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        frozen, other = from_url(url), from_url(url)
        for box in (frozen, other):
            await box.open(recover=True)
        try:
            assert isinstance(other, PostgresStore)
            other.silent_for = 1.0
            assert await frozen.acquire_sequencer()
            waiting = batch(1)
            await frozen.append(waiting)
            assert not await other.acquire_sequencer()  # not silent long enough yet
            await asyncio.sleep(1.5)
            assert await other.acquire_sequencer()
            assert other.sequencer_term == 1
            with pytest.raises(Exception):  # noqa: B017 (its session is gone: any error)
                await frozen.settle([Sequenced(waiting.id, [new(1)], "[]", {})], 101.0)
            assert not await frozen.acquire_sequencer()  # the other holds it now
            assert await other.settle([Sequenced(waiting.id, [new(1)], "[]", {})], 102.0) == [1]
        finally:
            for box in (frozen, other):
                await box.close()


async def test_postgres_a_sequencer_busy_elsewhere_is_never_ended() -> None:
    """A holder routing a large take touches no storage for seconds: its heartbeat speaks
    for it meanwhile."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        holder, other = from_url(url), from_url(url)
        for box in (holder, other):
            await box.open(recover=True)
        try:
            assert isinstance(other, PostgresStore)
            other.silent_for = 3.0  # past the holder's heartbeat (SEQUENCER_HEARTBEAT)
            assert await holder.acquire_sequencer()
            for _ in range(12):  # 6 s in which the holder asks storage for nothing
                assert not await other.acquire_sequencer()
                await asyncio.sleep(0.5)
            assert await holder.acquire_sequencer()
            assert holder.sequencer_term == 1  # never lost, never taken again
            await holder.append(batch(1))
            [waiting] = await holder.waiting(10)
            assert await holder.settle([Sequenced(waiting.id, [], "[]", {})], 101.0) == [0]
        finally:
            for box in (holder, other):
                await box.close()


async def test_postgres_a_replica_never_ends_a_sequencer_of_another_database() -> None:
    """pg_locks covers the whole server; the lock is the same number in every database."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url, postgres.fresh_database() as elsewhere:
        holder, other = from_url(url), from_url(url)
        for box in (holder, other):
            await box.open(recover=True)
        frozen = await asyncpg.connect(elsewhere)  # another deployment's, silent
        try:
            assert isinstance(other, PostgresStore)
            other.silent_for = 3.0  # past the holder's heartbeat (SEQUENCER_HEARTBEAT)
            assert await frozen.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK)
            assert await holder.acquire_sequencer()
            await asyncio.sleep(3.5)
            assert not await other.acquire_sequencer()
            assert await frozen.fetchval("SELECT 1") == 1  # not ended
        finally:
            await frozen.close()
            for box in (holder, other):
                await box.close()


async def test_postgres_a_holder_hidden_from_this_role_is_said_not_ended(
    caplog: pytest.LogCaptureFixture
) -> None:
    """Another role sees other sessions' activity as NULL (without pg_read_all_stats): it
    cannot tell a frozen holder from a working one, and says so once."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    role = f"bridge_test_role_{os.urandom(4).hex()}"
    admin = await asyncpg.connect(postgres.ADMIN_DSN)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        async with postgres.fresh_database() as url:
            holder = from_url(url)
            await holder.open(recover=True)
            parts = urllib.parse.urlsplit(url)
            host = parts.netloc.rsplit("@", 1)[-1]
            other = PostgresStore(urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{host}")))
            other.silent_for = 0.5
            try:
                assert await holder.acquire_sequencer()
                await asyncio.sleep(1.0)
                with caplog.at_level(logging.WARNING, logger="bridge.storage"):
                    for _ in range(3):
                        assert not await other.acquire_sequencer()
                said = [r.getMessage() for r in caplog.records]
                assert len([m for m in said if "cannot be seen" in m]) == 1, said
                assert holder.sequencer_term == 1 and await holder.acquire_sequencer()
            finally:
                await other.close()
                await holder.close()
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_postgres_a_replica_whose_clock_is_off_the_server_s_is_told(
    caplog: pytest.LogCaptureFixture
) -> None:
    """Leases are read on each replica's clock: one far ahead of the others sends what they
    have in flight again. The store compares its clock with the server's at start."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        right, ahead = PostgresStore(url), PostgresStore(url, clock=lambda: time.time() + 30)
        with caplog.at_level(logging.WARNING, logger="bridge.storage"):
            for box in (right, ahead):
                await box.open(recover=True)
        try:
            assert right.clock_offset is not None and abs(right.clock_offset) < 1
            assert ahead.clock_offset is not None and abs(ahead.clock_offset + 30) < 1
            [said] = [r for r in caplog.records if "clock is off" in r.getMessage()]
            assert 29 < said.ahead_s < 31  # type: ignore[attr-defined]
        finally:
            for box in (right, ahead):
                await box.close()


async def test_postgres_notifies_other_replicas() -> None:
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    async with postgres.fresh_database() as url:
        writer, listener = from_url(url), from_url(url)
        await writer.open(recover=True)
        await listener.open(recover=True)
        heard: list[str] = []
        got = asyncio.Event()

        def hear(what: str) -> None:
            heard.append(what)
            got.set()

        try:
            await listener.subscribe(lambda: hear("batches"), lambda: hear("deliveries"))
            await writer.append(batch(1))
            await asyncio.wait_for(got.wait(), 10)
            assert heard == ["batches"]
            got.clear()
            assert await writer.acquire_sequencer()
            await writer.settle([Sequenced(batch(1).id, [new(1)], "[]")], 200.0)
            await asyncio.wait_for(got.wait(), 10)
            assert heard == ["batches", "deliveries"]
        finally:
            await writer.close()
            await listener.close()


async def test_postgres_listens_again_after_an_outage_of_several_tries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The listening connection is lost and the server stays out of reach for more than
    one try to listen again: it keeps trying, and notifications are heard once it is back
    (it gave up after one failed try, leaving the replica on 1 s polling for good)."""
    require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                    "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
    from bridge.outbox import postgres as pg_store
    monkeypatch.setattr(pg_store, "RELISTEN_AFTER", 0.05)
    monkeypatch.setattr(pg_store, "RELISTEN_AT_MOST", 0.1)
    async with postgres.fresh_database() as url:
        proxy = TcpProxy(5432, 0)
        await proxy.start()
        writer = from_url(url)
        listener = from_url(url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
        await writer.open(recover=True)
        await listener.open(recover=True)
        got = asyncio.Event()
        try:
            await listener.subscribe(got.set, lambda: None)
            await proxy.go_down()  # the listening connection reset, new ones refused
            await asyncio.sleep(0.6)  # several tries to listen again fail meanwhile
            await proxy.start()
            for n in range(100):  # heard once it listens again; each append notifies
                await writer.append(batch(n + 1))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got.wait(), 0.1)
                if got.is_set():
                    break
            assert got.is_set(), "no notification heard after the server came back"
        finally:
            await writer.close()
            await listener.close()
            await proxy.go_down()


# ---- shipment state ------------------------------------------------------------------------

async def test_shipment_states_are_written_with_their_batch_only(reopen: StoreFactory) -> None:
    box = await reopen()
    await box.append(batch(1))
    await box.append(batch(2))
    t1, o1 = ("tracking", "t1"), ("order", "o1")
    assert await box.states([t1, o1]) == {}
    assert await box.settle([Sequenced(batch(1).id, [new(1)], "[]",
                                       {t1: '{"v": 1}', o1: '{"v": "o"}'})], 100.0) == [1]
    # A batch settled already writes nothing of its states (its deliveries neither).
    assert await box.settle([Sequenced(batch(1).id, [new(2)], "[]", {t1: '{"v": 99}'}),
                             Sequenced(batch(2).id, [], "[]", {t1: '{"v": 2}'})],
                            200.0) == [None, 0]
    assert await box.states([t1, o1, ("tracking", "never")]) == {
        t1: '{"v": 2}', o1: '{"v": "o"}'}
    await box.close()
    box2 = await reopen()  # durable
    assert await box2.states([t1]) == {t1: '{"v": 2}'}
    assert await box2.forget_states(150.0) == 1  # o1, unchanged since 100
    assert await box2.states([t1, o1]) == {t1: '{"v": 2}'}


async def test_a_settle_updates_known_states_and_adds_new_ones(box: Store) -> None:
    # More than one statement's worth (SQLite writes them in parts, each updated and then
    # inserted), known and new states mixed within every part, one uuid under both kinds.
    # Of two batches in one settle that change one shipment, the later one's state stays.
    known = {("tracking", f"t{i}"): f'{{"n": {i}}}' for i in range(0, 200, 2)}
    for n in (1, 2, 3):
        await box.append(batch(n))
    assert await box.settle([Sequenced(batch(1).id, [], "[]", known)], 100.0) == [0]
    later = {("tracking", f"t{i}"): f'{{"n": {i}, "later": true}}' for i in range(200)}
    later[("order", "t0")] = '{"kind": "order"}'
    last = {("tracking", "t7"): '{"n": 7, "last": true}'}
    assert await box.settle([Sequenced(batch(2).id, [], "[]", later),
                             Sequenced(batch(3).id, [], "[]", last)], 200.0) == [0, 0]
    assert await box.states(list(later)) == later | last
    assert await box.forget_states(150.0) == 0  # every one written at 200


async def test_shipment_states_are_forgotten_to_the_second_across_days(box: Store) -> None:
    # PostgreSQL finds them by the day they changed (0007), then compares the second.
    day = 86400.0
    written = {("tracking", "day9"): 10 * day - 1, ("tracking", "day10"): 10 * day + 5,
               ("tracking", "day10-later"): 10 * day + 7, ("tracking", "day11"): 11 * day}
    for n, (key, at) in enumerate(written.items(), start=1):
        await box.append(batch(n))
        assert await box.settle([Sequenced(batch(n).id, [], "[]", {key: "{}"})], at) == [0]
    assert await box.forget_states(10 * day + 6) == 2  # day9, and day10 at 5 s past
    assert set(await box.states(list(written))) == {("tracking", "day10-later"),
                                                    ("tracking", "day11")}


async def test_many_shipment_states_are_read_at_once(box: Store) -> None:
    # A take's worth of keys: more than one statement's (SQLite reads them in parts),
    # asked twice over, half of them never stored, one uuid under both kinds.
    stored = {("tracking", f"t{i}"): f'{{"n": {i}}}' for i in range(0, 300, 2)}
    stored[("order", "t0")] = '{"kind": "order"}'
    await box.append(batch(1))
    assert await box.settle([Sequenced(batch(1).id, [], "[]", stored)], 100.0) == [0]
    asked = [("tracking", f"t{i}") for i in range(300)] + [("order", "t0"), ("order", "t2")]
    assert await box.states(asked + asked[::-1]) == stored
    assert await box.states([]) == {}
