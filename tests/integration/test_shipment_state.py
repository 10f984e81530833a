"""Shipment state through the real sequencer, on SQLite and PostgreSQL: isendu's unordered,
batched, repeating snapshots become each real change notified once, in step order.

Each case appends batches to the store's inbox, as the intake does, and lets the sequencer
settle them; what each route would notify is read back from the outbox (a console sink
renders, per delivery, the snapshot's status and the timestamps of its `new_steps`)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import sequencer as sequencer_module
from bridge.config import BridgeConfig
from bridge.metrics import Metrics
from bridge.models import InboxBatch
from bridge.outbox import Store, from_url
from bridge.routing.router import Router, compile_routes
from bridge.runtime import build_sinks
from bridge.sequencer import (
    SETTLE_ROWS,
    SETTLE_ROWS_IDLE,
    TAKE,
    Sequencer,
    StateKeeping,
    state_book,
)
from bridge.state import EntityState
from tests.conftest import require_service
from tests.helpers import postgres

STATUSES = ["CREATED", "PICKED_UP", "IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED",
            "RETURNED", "IN_TRANSIT", "DELIVERED"]

CONFIG = {
    "sinks": {"chat": {"type": "console",
                       "message": "{{ item.status }}|"
                                  "{{ new_steps | map(attribute='timestamp') | join(',') }}|"
                                  "{{ previous.status if previous else '-' }}|"
                                  "{{ first_seen }}"}},
    "routes": [
        {"name": "chat", "kind": "tracking", "to": "chat"},
        # Everything, repeats and stale ones too: what a system reading Kafka would take.
        {"name": "all", "kind": "tracking", "to": "chat", "dedupe": False, "stale": "deliver"},
    ],
}


def step(i: int) -> dict[str, Any]:
    return {"timestamp": f"2025-11-0{1 + i // 24}T{i % 24:02d}:00:00Z",
            "status": STATUSES[i % len(STATUSES)], "description": f"step {i}"}


def snapshot(uuid: str, steps: list[int]) -> dict[str, Any]:
    """A tracking snapshot holding `steps` (isendu's are cumulative: every step so far)."""
    newest = max(steps)
    return {"uuid": uuid, "trackingNumber": "GLS1", "status": STATUSES[newest % len(STATUSES)],
            "delivered": STATUSES[newest % len(STATUSES)] == "DELIVERED",
            "steps": [step(i) for i in reversed(steps)]}  # isendu does not sort them


class Harness:
    """A store, and a sequencer on it with shipment state kept as `bridge serve` keeps it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        config = BridgeConfig.model_validate(CONFIG)
        router = Router(compile_routes(config, build_sinks(config)))
        book = state_book(config.state)
        assert book is not None
        self.sequencer = Sequencer(store, router, Metrics(), lambda: None, 86400.0,
                                   state=StateKeeping(store, book, 86400.0))
        self.received = 1_700_000_000.0

    async def post(self, *batches: list[dict[str, Any]]) -> list[str]:
        """Append each batch (a list of tracking items) to the inbox; returns their ids."""
        ids = []
        for items in batches:
            self.received += 1
            batch_id = uuidlib.uuid4().hex
            await self.store.append(InboxBatch(batch_id, self.received, len(items),
                                               json.dumps({"tracking": items}).encode()))
            ids.append(batch_id)
        return ids

    async def sequence(self) -> None:
        while taken := await self.store.waiting(TAKE):
            await self.sequencer.sequence(taken)

    async def notified(self, batch_ids: list[str], route: str) -> list[tuple[str, ...]]:
        """What `route` notified, in the order the sequencer made it: per delivery
        (status, new step timestamps, previous status, first_seen)."""
        out = []
        stored: set[str] = set()
        for batch_id in batch_ids:
            info = await self.store.batch(batch_id)
            assert info is not None and info.summary is not None
            for item in json.loads(info.summary):
                for did in item["deliveries"]:
                    if did in stored:
                        continue  # the same snapshot again: its delivery is stored once
                    stored.add(did)
                    delivery = await self.store.get(did)
                    assert delivery is not None
                    if delivery.route == route:
                        out.append(tuple(delivery.payload["text"].split("|")))
        return out

    async def state(self, uuid: str) -> EntityState | None:
        stored = await self.store.states([("tracking", uuid)])
        text = stored.get(("tracking", uuid))
        return None if text is None else EntityState.from_json("tracking", uuid, text)


async def open_harness(stack: AsyncExitStack, engine: str, folder: Path) -> Harness:
    """A harness on a new SQLite file or PostgreSQL database, closed with `stack`."""
    if engine == "sqlite":
        url = f"sqlite:///{folder}/bridge.db"
    else:
        require_service(await postgres.available(), "PostgreSQL on 127.0.0.1:5432",
                        "start it (pg_ctlcluster ... main start) or set BRIDGE_TEST_PG")
        url = await stack.enter_async_context(postgres.fresh_database())
    store = from_url(url)
    await store.open(recover=True)
    stack.push_async_callback(store.close)
    assert await store.acquire_sequencer()  # the serving process's sequencer
    return Harness(store)


class LoopThread:
    """An event loop of its own, so that hypothesis (which runs plain functions) can drive
    one store across all its examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=120)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LoopThread, Harness]]:
    runner = LoopThread()
    stack = AsyncExitStack()

    try:
        harness = runner.run(open_harness(stack, request.param,
                                          tmp_path_factory.mktemp("state")))
        yield runner, harness
    finally:
        runner.run(stack.aclose())
        runner.stop()


@st.composite
def a_shipment_fed_in_batches(draw: st.DrawFn) -> tuple[int, list[list[list[int]]], list[bool]]:
    """A true sequence of n steps; cumulative snapshots of it, shuffled and repeated, split
    over batches (a batch may hold several snapshots of it); and, per batch, whether the
    sequencer's memory is lost before it (a restart: states come from storage again)."""
    n = draw(st.integers(min_value=1, max_value=7))
    cuts = draw(st.lists(st.integers(min_value=1, max_value=n), min_size=0, max_size=10))
    cuts.append(n)  # the full history arrives at some point
    order = draw(st.permutations(cuts))
    snapshots = [list(range(c)) for c in order]
    batches: list[list[list[int]]] = []
    while snapshots:
        size = draw(st.integers(min_value=1, max_value=min(3, len(snapshots))))
        batches.append(snapshots[:size])
        snapshots = snapshots[size:]
    restarts = draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    return n, batches, restarts


@given(case=a_shipment_fed_in_batches())
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_each_real_change_is_notified_once_and_in_step_order(
    engine: tuple[LoopThread, Harness], case: tuple[int, list[list[list[int]]], list[bool]],
) -> None:
    runner, harness = engine
    n, batches, restarts = case
    uuid = uuidlib.uuid4().hex  # a shipment of its own per example: the store is shared

    async def run() -> None:
        ids = []
        for cuts, restart in zip(batches, restarts, strict=True):
            if restart:
                harness.sequencer.state.book.forget()  # type: ignore[union-attr]
            ids += await harness.post([snapshot(uuid, cut) for cut in cuts])
            if restart or len(ids) % 2 == 0:  # sometimes several batches in one take
                await harness.sequence()
        await harness.sequence()

        chat = await harness.notified(ids, "chat")
        newest = [max(ts.split(",")) for _, ts, _, _ in chat]
        # Never back in step time, and no change twice.
        assert newest == sorted(newest) and len(newest) == len(set(newest)), chat
        # Each step is new in exactly one notification; the last one is the true last step.
        new_steps = [t for _, ts, _, _ in chat for t in ts.split(",")]
        assert sorted(new_steps) == sorted(step(i)["timestamp"] for i in range(n))
        assert chat[-1][0] == snapshot(uuid, list(range(n)))["status"]
        assert [first for *_, first in chat] == ["True"] + ["False"] * (len(chat) - 1)
        # The route that takes everything got every snapshot but the byte-for-byte repeats
        # (stable delivery ids), and so at least as much as the other.
        everything = await harness.notified(ids, "all")
        distinct = {tuple(c) for cuts in batches for c in cuts}
        assert len(everything) == len(distinct) >= len(chat)
        # The state holds the whole history, the newest status, nothing twice.
        state = await harness.state(uuid)
        assert state is not None
        assert [s["timestamp"] for s in state.steps] == [step(i)["timestamp"] for i in range(n)]
        assert state.fields["status"] == snapshot(uuid, list(range(n)))["status"]

    runner.run(run())


@pytest.fixture(params=["sqlite", "postgres"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with AsyncExitStack() as stack:
        yield await open_harness(stack, request.param, tmp_path)


async def test_delivered_before_out_for_delivery(harness: Harness) -> None:
    """DELIVERED arrives first (its snapshot lacks the OUT_FOR_DELIVERY step); the late
    OUT_FOR_DELIVERY one is never notified, yet its step joins the history and is not
    announced again by a later snapshot."""
    created, out_for_delivery, delivered, survey = 0, 3, 4, 5
    ids = await harness.post([snapshot("t1", [created, delivered])],
                             [snapshot("t1", [created, out_for_delivery])],
                             [snapshot("t1", [created, out_for_delivery, delivered, survey])])
    await harness.sequence()
    chat = await harness.notified(ids, "chat")
    assert [(status, steps) for status, steps, _, _ in chat] == [
        ("DELIVERED", f"{step(created)['timestamp']},{step(delivered)['timestamp']}"),
        ("RETURNED", step(survey)["timestamp"]),  # not the OUT_FOR_DELIVERY step again
    ]
    assert chat[1][2] == "DELIVERED"  # `previous` is the status last notified
    state = await harness.state("t1")
    assert state is not None
    assert [s["status"] for s in state.steps] == ["CREATED", "OUT_FOR_DELIVERY", "DELIVERED",
                                                  "RETURNED"]
    info = await harness.store.batch(ids[1])
    assert info is not None and info.summary is not None
    [item] = json.loads(info.summary)
    assert item["verdict"] == "stale" and item["skipped"] == {"chat": "stale"}


async def test_the_same_batch_twice_notifies_once(harness: Harness,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    batch = [snapshot("t1", [0, 1]), snapshot("t2", [0])]
    ids = await harness.post(batch, batch)
    with caplog.at_level(logging.INFO, logger="bridge.sequencer"):
        await harness.sequence()
    lines = [r.__dict__ for r in caplog.records if r.getMessage() == "batch sequenced"]
    assert [(r["batch_id"], r["deliveries"], r["repeats"], r["stale"]) for r in lines] == [
        (ids[0], 4, 0, 0), (ids[1], 0, 2, 0)]  # the log line says why nothing went out
    assert len(await harness.notified(ids[:1], "chat")) == 2
    assert await harness.notified(ids[1:], "chat") == []
    info = await harness.store.batch(ids[1])
    assert info is not None and info.summary is not None
    assert [i["verdict"] for i in json.loads(info.summary)] == ["repeat", "repeat"]
    observed = {v: harness.sequencer.metrics.registry.get_sample_value(
        "bridge_items_observed_total", {"kind": "tracking", "verdict": v})
        for v in ("first_seen", "repeat", "change")}
    assert observed == {"first_seen": 2.0, "repeat": 2.0, "change": 0.0}  # once per item


async def test_a_shipment_back_to_what_it_was_is_notified_again(harness: Harness) -> None:
    """IN_TRANSIT, EXCEPTION, IN_TRANSIT again, with the same steps: three changes. The third
    snapshot is byte for byte the first, whose delivery is stored: it is notified all the
    same (an id of its own), and only a repeat of it is not."""
    first = snapshot("t1", [0, 1, 2])
    exception = {**first, "status": "EXCEPTION"}
    ids = await harness.post([first], [exception], [first], [first])
    await harness.sequence()
    chat = await harness.notified(ids, "chat")
    assert [(status, previous) for status, _, previous, _ in chat] == [
        ("IN_TRANSIT", "-"), ("EXCEPTION", "IN_TRANSIT"), ("IN_TRANSIT", "EXCEPTION")]
    summaries = [json.loads((await harness.store.batch(i)).summary or "[]") for i in ids]
    assert [s[0]["verdict"] for s in summaries] == ["first_seen", "change", "change", "repeat"]
    routes = [{(await harness.store.get(d)).route: d  # type: ignore[union-attr]
               for d in s[0]["deliveries"]} for s in summaries]
    assert routes[0]["chat"] != routes[2]["chat"]  # the return is a delivery of its own
    assert routes[0]["all"] != routes[2]["all"]
    # `all` (dedupe: false) routes the repeat too, with the id of the change it repeats.
    assert set(summaries[3][0]["deliveries"]) <= set(summaries[2][0]["deliveries"])


async def test_a_rerouted_batch_stores_nothing_twice_and_moves_no_state(
        harness: Harness) -> None:
    """IN_TRANSIT, then EXCEPTION (same steps), then the first batch rerouted by hand: it is
    routed as it comes, but what it stored the first time is not stored again, and the
    shipment stays EXCEPTION (a reroute replays, it does not happen again)."""
    first = snapshot("t1", [0, 1, 2])
    ids = await harness.post([first], [{**first, "status": "EXCEPTION"}])
    await harness.sequence()
    before = await harness.store.counts()
    assert await harness.store.reroute([ids[0]], None) == 1
    await harness.sequence()
    assert await harness.store.counts() == before  # nothing new stored
    state = await harness.state("t1")
    assert state is not None and state.fields["status"] == "EXCEPTION"
    info = await harness.store.batch(ids[0])
    assert info is not None and info.status.value == "sequenced"


async def test_a_snapshot_without_steps_never_turns_a_shipment_back(harness: Harness) -> None:
    delivered = snapshot("t1", [0, 1, 2, 3, 4])
    early = {"uuid": "t1", "trackingNumber": "GLS1", "status": "CREATED", "delivered": False,
             "steps": []}
    ids = await harness.post([delivered], [early], [delivered])
    await harness.sequence()
    chat = await harness.notified(ids, "chat")
    assert [status for status, _, _, _ in chat] == ["DELIVERED"]  # once, never CREATED
    summaries = [json.loads((await harness.store.batch(i)).summary or "[]") for i in ids]
    assert [s[0]["verdict"] for s in summaries] == ["first_seen", "stale", "repeat"]
    state = await harness.state("t1")
    assert state is not None and state.fields["status"] == "DELIVERED"


async def test_a_timestamp_out_of_range_in_utc_fails_neither_its_batch_nor_the_other_items(
        harness: Harness) -> None:
    odd = {"uuid": "t2", "status": "CREATED", "delivered": False,
           "steps": [{"timestamp": "0001-01-01T00:00:00+01:00", "status": "CREATED",
                      "description": "year 0 in UTC"}]}
    [batch_id] = await harness.post([snapshot("t1", [0]), odd])
    await harness.sequence()
    info = await harness.store.batch(batch_id)
    assert info is not None and info.status == "sequenced", info
    chat = await harness.notified([batch_id], "chat")
    assert [(status, steps) for status, steps, _, _ in chat] == [
        ("CREATED", step(0)["timestamp"]), ("CREATED", "0001-01-01T00:00:00+01:00")]


async def test_a_failed_settle_while_later_batches_are_routed_loses_no_change(
        harness: Harness) -> None:
    """One take of several settles: the first fails while the batches after it are being
    routed (against a memory it had just forgotten). The take is abandoned, and taken again,
    t1's new step is a change and notified."""
    first = await harness.post([snapshot("t1", [0, 1])])
    await harness.sequence()
    def filler(b: int) -> list[dict[str, Any]]:  # a settle's worth of deliveries (2 an item)
        return [snapshot(f"f{b}-{i}", [0]) for i in range(SETTLE_ROWS_IDLE // 2 + 1)]

    # The second batch is routed while the first one's settle fails: t1, at its end, is
    # observed after the failure forgot every state.
    ids = await harness.post(filler(0), [*filler(1), snapshot("t1", [0, 1, 2])])
    settle = harness.store.settle
    calls = 0
    failed_with: list[Any] = []

    async def fails_first(outcomes: Any, now: float) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            failed_with.extend(outcomes)
            raise RuntimeError("disk full (injected)")
        return await settle(outcomes, now)

    yield_after = sequencer_module.YIELD_AFTER
    sequencer_module.YIELD_AFTER = 0.0  # the routing gives way after every item

    harness.store.settle = fails_first  # type: ignore[method-assign]
    try:
        taken = await harness.store.waiting(TAKE)
        await harness.sequencer.sequence(taken)  # the first settle fails: all stay waiting
        harness.store.settle = settle  # type: ignore[method-assign]
        await harness.sequence()
    finally:
        harness.store.settle = settle  # type: ignore[method-assign]
        sequencer_module.YIELD_AFTER = yield_after
    assert [o.batch_id for o in failed_with] == [ids[0]]  # the take was settled in parts
    info = await harness.store.batch(ids[-1])
    assert info is not None and info.summary is not None
    [t1] = [i for i in json.loads(info.summary) if i["uuid"] == "t1"]
    assert t1["verdict"] == "change"  # against t1's stored state, not a forgotten memory
    texts = [(await harness.store.get(d)).payload["text"]  # type: ignore[union-attr]
             for d in t1["deliveries"]]
    assert f"IN_TRANSIT|{step(2)['timestamp']}|PICKED_UP|False" in texts
    assert len(await harness.notified(first, "chat")) == 1


async def test_settles_are_short_while_a_request_is_in_flight(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a request is in flight, a take is settled in transactions of about SETTLE_ROWS
    deliveries (the request's commit waits for the settle under way); while none is, of
    about SETTLE_ROWS_IDLE (fewer commits for the same rows), unless routing them takes
    longer than SETTLE_IDLE_FOR (slow templates: the dispatcher would wait for them)."""
    per_batch = 100  # deliveries: 50 items of 2 routes
    batches = [[snapshot(f"s{b}-{i}", [0]) for i in range(per_batch // 2)]
               for b in range(2 * SETTLE_ROWS_IDLE // per_batch)]
    settle = harness.store.settle
    sizes: list[int] = []

    async def counting(outcomes: Any, now: float) -> Any:
        sizes.append(sum(len(o.deliveries) for o in outcomes))
        return await settle(outcomes, now)

    harness.store.settle = counting  # type: ignore[method-assign]
    pressure = harness.sequencer.pressure
    for in_flight, idle_for, limit in ((1, 60.0, SETTLE_ROWS), (0, 60.0, SETTLE_ROWS_IDLE),
                                       (0, 0.0, SETTLE_ROWS)):
        monkeypatch.setattr(sequencer_module, "SETTLE_IDLE_FOR", idle_for)
        sizes.clear()
        await harness.post(*batches)
        batches = [[{**item, "uuid": "n" + item["uuid"]} for item in b] for b in batches]
        pressure.in_flight = in_flight
        try:
            await harness.sequence()
        finally:
            pressure.in_flight = 0
        assert sum(sizes) == per_batch * len(batches), sizes
        # Each settle closes at the first batch that takes it to the limit.
        assert all(limit <= n < limit + per_batch for n in sizes[:-1]), (in_flight, idle_for,
                                                                          sizes)
        assert len(sizes) >= 2, sizes


async def test_a_snapshot_with_one_step_more_notifies_that_step(harness: Harness) -> None:
    ids = await harness.post([snapshot("t1", [0, 1, 2])], [snapshot("t1", [0, 1, 2, 3])])
    await harness.sequence()
    chat = await harness.notified(ids, "chat")
    assert chat[1] == ("OUT_FOR_DELIVERY", step(3)["timestamp"], "IN_TRANSIT", "False")


async def test_states_survive_a_restart_and_a_failed_batch_changes_none(
        harness: Harness) -> None:
    ids = await harness.post([snapshot("t1", [0, 1])])
    await harness.sequence()
    harness.sequencer.state.book.forget()  # type: ignore[union-attr]  # as after a restart
    # A poison batch in between: routing raises on its second item, after the first was
    # compared with t1's state (the fault is injected: no valid input makes the router
    # raise). It is marked failed and what it observed is undone, so its step 2 is still
    # new to the snapshot after it.
    router = harness.sequencer.router
    route_item = router.route_item

    def fails_on_boom(item: Any, *args: Any) -> Any:
        if item.uuid == "boom":
            raise ValueError("odd data")
        return route_item(item, *args)

    router.route_item = fails_on_boom  # type: ignore[method-assign]
    ids += await harness.post([snapshot("t1", [0, 1, 2]), snapshot("boom", [0])],
                              [snapshot("t1", [0, 1])], [snapshot("t1", [0, 1, 2])])
    await harness.sequence()
    infos = [await harness.store.batch(i) for i in ids]
    assert [i.status.value for i in infos if i] == ["sequenced", "failed", "sequenced",
                                                    "sequenced"]
    assert infos[1] is not None and infos[1].error == "ValueError: odd data"
    chat = await harness.notified([ids[0], ids[2], ids[3]], "chat")
    assert [c[1] for c in chat] == [f"{step(0)['timestamp']},{step(1)['timestamp']}",
                                    step(2)["timestamp"]]
    state = await harness.state("t1")
    assert state is not None and len(state.steps) == 3
