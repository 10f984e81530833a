"""The inbox as operators see it: a poison batch fails alone, refusals store nothing, the
inbox depth and lag metrics, and `bridge batches list | show | reroute` and `bridge migrate`
on a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from bridge.models import InboxBatch
from tests.conftest import BridgeFactory
from tests.helpers.bridge import Bridge, eventually, sample_batch
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Receiver
from tests.integration.test_cli import bridge as run_bridge

CONFIG = """
integrations:
  - {key_id: shop, secret: shop-secret-value}
server:
  max_body_bytes: 64KiB
sinks:
  hook: {type: http, url: "${URL}/in"}
routes:
  - {name: all, to: hook}
"""


def _metric(bridge: Bridge, name: str, labels: dict[str, str] | None = None) -> float:
    return bridge.rt.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_a_poison_batch_fails_alone_and_the_others_are_delivered(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG, {"URL": url})
    caplog.set_level(logging.INFO)
    before = (await bridge.post({"order": [{"uuid": "before"}]}))[1]
    # A row the router cannot take (here: a body the parser of this release refuses, as a
    # row written by another release or a damaged disk would be).
    await bridge.rt.store.append(InboxBatch("f" * 32, time.time(), 1, b'{"order": [{"uuid"'))
    bridge.rt.sequencer.wake()
    after = (await bridge.post({"order": [{"uuid": "after"}]}))[1]
    assert before["deliveries"] == after["deliveries"] == 1
    poison = await bridge.rt.store.batch("f" * 32)
    assert poison is not None and poison.status == "failed"
    assert poison.error is not None and "malformed JSON" in poison.error
    await rec.wait_for(2)
    assert sorted(r.json()["data"]["uuid"] for r in rec.requests) == ["after", "before"]
    assert _metric(bridge, "bridge_batches_sequenced_total", {"outcome": "failed"}) == 1
    assert _metric(bridge, "bridge_batches_sequenced_total", {"outcome": "sequenced"}) == 2
    failed = [r for r in caplog.records if r.getMessage() == "batch failed to route; marked failed"]
    assert len(failed) == 1 and failed[0].__dict__["batch_id"] == "f" * 32
    sequenced = [r.__dict__ for r in caplog.records if r.getMessage() == "batch sequenced"]
    assert [(r["batch_id"], r["deliveries"], r["duplicates"]) for r in sequenced] == [
        (before["batch_id"], 1, 0), (after["batch_id"], 1, 0)]
    text = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_inbox_batches{status="failed"} 1.0' in text


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (b'{"tracking": [{"status": "no uuid"}]}', 400),
    (b'{"order": {"uuid": "not a list"}}', 400),
    (json.dumps({"order": [{"uuid": "x", "pad": "p" * 70_000}]}).encode(), 413),
])
async def test_every_refusal_leaves_the_inbox_unchanged(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], body: bytes, status: int,
) -> None:
    bridge = await make_bridge(CONFIG, {"URL": receiver[1]})
    got, _ = await bridge.post(body)
    assert got == status
    assert (await bridge.client.get("/isendu/webhook")).status == 405
    assert await bridge.rt.store.batches(10) == []
    assert await bridge.rt.store.inbox_depth() == (0, None, 0)


async def test_the_inbox_grows_while_the_sequencer_is_away_and_drains_after(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG, {"URL": url})
    await bridge.rt.sequencer.stop()  # as a sequencer far behind (or on another replica)
    answers = [(await bridge.post(sample_batch(), settle=False))[1] for _ in range(3)]
    assert all(set(a) == {"accepted", "batch_id"} for a in answers)  # nothing per delivery
    text = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_inbox_batches{status="waiting"} 3.0' in text
    lag = _metric(bridge, "bridge_sequencer_lag_seconds")
    assert lag > 0
    assert (await bridge.client.get("/readyz")).status == 200  # work waits in storage
    assert await bridge.rt.store.counts() == {"pending": 0, "delivered": 0, "dead": 0}
    await bridge.rt.sequencer.start()
    settled = [await bridge.settled(a["batch_id"]) for a in answers]
    items = len(sample_batch()["order"]) + len(sample_batch()["tracking"])
    assert [s["deliveries"] for s in settled] == [items, 0, 0]  # repeats stored once
    # Not routed at all: nothing in them is new against the shipments' states.
    assert [s["duplicates"] for s in settled] == [0, 0, 0]
    assert all(v in ("repeat", "stale") for s in settled[1:] for v in s["verdicts"])
    await rec.wait_for(items)
    await bridge.client.get("/metrics")
    assert _metric(bridge, "bridge_inbox_batches", {"status": "waiting"}) == 0
    assert _metric(bridge, "bridge_sequencer_lag_seconds") == 0


CLI_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN:-127.0.0.1:8080}}
sinks:
  ops: {{type: console}}
routes:
  - name: created
    kind: tracking
    when: {{path: $.status, equals: {status}}}
    to: ops
"""


async def _serve_until_settled(config: Path, log: Path, body: bytes | None = None) -> None:
    """A real `bridge serve` on the file: POST `body` (if any), wait until the inbox has
    nothing waiting and nothing pending, stop it with SIGTERM."""
    async with BridgeProcess(config, log) as serving, aiohttp.ClientSession() as session:
        await serving.start(free_port())
        if body is not None:
            async with session.post(f"{serving.url}/isendu/webhook", data=body) as resp:
                assert resp.status == 200, await resp.text()
        db = config.parent / "bridge.db"

        async def quiet() -> bool:
            conn = sqlite3.connect(db)
            try:
                waiting = conn.execute(
                    "SELECT COUNT(*) FROM inbox WHERE status = 'waiting'").fetchone()[0]
                pending = conn.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
            finally:
                conn.close()
            return waiting == 0 and pending == 0

        await eventually(quiet, timeout=30, what="inbox sequenced and deliveries sent")
        assert await serving.terminate() == 0


async def test_batches_list_show_and_reroute_after_a_rule_fix(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    log = tmp_path / "bridge.log"
    config.write_text(CLI_CONFIG.format(db=db, status="CRATED"))  # a typo: nothing matches
    await _serve_until_settled(config, log, json.dumps(sample_batch()).encode())

    out = run_bridge("batches", "list", "--config", str(config))
    assert out.returncode == 0, out.stderr
    [batch_id] = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert "sequenced" in out.stdout
    listed = run_bridge("batches", "list", "--json", "--config", str(config))
    [row] = [json.loads(x) for x in listed.stdout.splitlines()]
    assert (row["id"], row["status"], row["items"], row["deliveries"], row["duplicates"]) == (
        batch_id, "sequenced", 6, 0, 0)
    shown = run_bridge("batches", "show", batch_id, "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("no route matches") == 6

    # The rule is fixed; the batch is routed again and makes the deliveries it should have.
    config.write_text(CLI_CONFIG.format(db=db, status="CREATED"))
    again = run_bridge("batches", "reroute", batch_id, "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "1 batch back to waiting" in again.stdout
    await _serve_until_settled(config, log)
    shown = run_bridge("batches", "show", batch_id, "--config", str(config))
    assert "routes created" in shown.stdout
    assert shown.stdout.count("-> ops via created: delivered") == 4  # the 4 CREATED items
    console = [line for line in log.read_text().splitlines() if line.startswith("[created]")]
    assert len(console) == 4

    # Rerouted again: what is stored already is not stored (or sent) twice.
    since = run_bridge("batches", "reroute", "--since", "1h", "--config", str(config))
    assert since.returncode == 0 and "1 batch back to waiting" in since.stdout
    await _serve_until_settled(config, log)
    listed = run_bridge("batches", "list", "--json", "--config", str(config))
    [row] = [json.loads(x) for x in listed.stdout.splitlines()]
    assert (row["deliveries"], row["duplicates"]) == (0, 4)
    assert len([x for x in log.read_text().splitlines() if x.startswith("[created]")]) == 4

    missing = run_bridge("batches", "reroute", "nope", "--config", str(config))
    assert missing.returncode == 1 and "nope: no such batch" in missing.stderr
    neither = run_bridge("batches", "reroute", "--config", str(config))
    assert neither.returncode == 2 and "give batch ids" in neither.stderr
    bad = run_bridge("batches", "reroute", "--since", "yesterday", "--config", str(config))
    assert bad.returncode == 2 and "expected an ISO 8601 time" in bad.stderr
    unknown = run_bridge("batches", "show", "nope", "--config", str(config))
    assert unknown.returncode == 1 and "no batch 'nope'" in unknown.stderr


TEMPLATE_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN:-127.0.0.1:8080}}
sinks:
  ops: {{type: console, message: "{message}"}}
routes:
  - {{name: all, kind: tracking, to: ops}}
"""
BROKEN = "{{ 1 / (item.steps | length - item.steps | length) }}"  # ZeroDivisionError
FIXED = "fixed {{ item.uuid }}"


async def test_a_failed_template_is_rendered_again_by_a_reroute_not_by_a_replay(
        tmp_path: Path) -> None:
    db, config, log = tmp_path / "bridge.db", tmp_path / "routes.yaml", tmp_path / "bridge.log"
    config.write_text(TEMPLATE_CONFIG.format(db=db, message=BROKEN))
    batch = sample_batch()
    await _serve_until_settled(config, log, json.dumps(batch).encode())
    listed = run_bridge("dlq", "list", "--config", str(config))
    dead = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("dlv_")]
    assert len(dead) == len(batch["tracking"]), listed.stdout
    assert "template failed" in listed.stdout and "ZeroDivisionError" in listed.stdout
    [batch_id] = [line.split()[0] for line in run_bridge(
        "batches", "list", "--config", str(config)).stdout.splitlines()[1:]]

    # Replayed, it would have nothing to send: refused, saying what to do instead.
    one = run_bridge("dlq", "replay", dead[0], "--config", str(config))
    assert one.returncode == 1 and "0 deliveries back to pending" in one.stdout
    assert f"{dead[0]}: its template failed" in one.stderr
    assert f"bridge batches reroute {batch_id}" in one.stderr
    every = run_bridge("dlq", "replay", "--all", "--config", str(config))
    assert "0 deliveries back to pending" in every.stdout
    # --all: one line for the batch, however many of its deliveries are left dead.
    assert every.returncode == 1
    [line] = every.stderr.splitlines()
    assert line.startswith(f"not replayed: batch {batch_id}: {len(dead)} deliveries whose "
                           "template failed (template failed: ZeroDivisionError"), line
    assert line.endswith(f"`bridge batches reroute {batch_id}` to render them again"), line

    # The template fixed and the bridge restarted, the batch rerouted: each is sent once.
    config.write_text(TEMPLATE_CONFIG.format(db=db, message=FIXED))
    assert run_bridge("batches", "reroute", batch_id, "--config", str(config)).returncode == 0
    await _serve_until_settled(config, log)
    sent = [line for line in log.read_text().splitlines() if line.startswith("fixed ")]
    assert sorted(sent) == sorted(f"fixed {t['uuid']}" for t in batch["tracking"])
    assert "no dead deliveries" in run_bridge("dlq", "list", "--config", str(config)).stdout
    [row] = [json.loads(x) for x in run_bridge(
        "batches", "list", "--json", "--config", str(config)).stdout.splitlines()]
    assert (row["deliveries"], row["duplicates"]) == (len(dead), 0)


def test_migrate_applies_once_and_says_so(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(CLI_CONFIG.format(db=tmp_path / "bridge.db", status="CREATED"))
    first = run_bridge("migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "applied 0001_deliveries" in first.stdout and "applied 0002_inbox" in first.stdout
    second = run_bridge("migrate", "--config", str(config))
    assert second.returncode == 0 and "up to date" in second.stdout


async def test_sequenced_batches_are_swept_after_the_retention(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str],
) -> None:
    text = CONFIG + "defaults:\n  inbox_retention: 1s\n"
    first = await make_bridge(text, {"URL": receiver[1]})
    _, answer = await first.post({"order": [{"uuid": "o1"}]})
    assert answer["status"] == "sequenced"
    await first.client.close()  # stops its sequencer and dispatcher
    await asyncio.sleep(1.2)
    # A bridge starting on the same file sweeps at its sequencer's first turn.
    second = await make_bridge(text, {"URL": receiver[1]})

    async def swept() -> bool:
        return await second.rt.store.batch(answer["batch_id"]) is None

    await eventually(swept, timeout=10, what="the old batch swept")


STATE_CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN:-127.0.0.1:8080}}
sinks:
  ops: {{type: console}}
routes:
  - {{name: all, to: ops}}
  - name: created
    kind: tracking
    when: {{path: $.status, equals: CREATED}}
    dedupe: false
    to: ops
  - {{name: never, kind: order, when: {{path: $.status, equals: NO_SUCH_STATUS}}, to: ops}}
"""


async def test_batches_show_gives_each_items_verdict_and_the_routes_that_skipped_it(
        tmp_path: Path) -> None:
    """The same batch twice against the shipment state: the second one's items are repeats
    (and one a stale snapshot), skipped by the routes that skip those; `show` says so for
    each, and which deliveries a route that does not skip repeats made (stored already, by
    the first batch), not "no route matches"."""
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(STATE_CONFIG.format(db=db))
    body = json.dumps(sample_batch()).encode()
    await _serve_until_settled(config, tmp_path / "bridge.log", body)
    await _serve_until_settled(config, tmp_path / "bridge.log", body)
    listed = run_bridge("batches", "list", "--json", "--config", str(config))
    second, first = [json.loads(x)["id"] for x in listed.stdout.splitlines()]

    shown = run_bridge("batches", "show", first, "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    order = "order 01d6a94c-ea60-4675-9e5e-3a9f64cec5fe"
    assert f"  {order} [first_seen]: routes all\n" in shown.stdout
    assert "[change]: routes all" in shown.stdout  # one shipment's second snapshot
    assert "skipped" not in shown.stdout and "no route matches" not in shown.stdout

    shown = run_bridge("batches", "show", second, "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "no route matches" not in out
    assert (f"  {order} [repeat]: routes all\n"
            "    -- all: skipped, a repeat, nothing new against what came before\n") in out
    assert out.count("[repeat]") == 5 and out.count("[stale]") == 1
    assert out.count("-- all: skipped, a repeat") == 5
    assert out.count("-- all: skipped, stale, older than what came before") == 1
    # `created` does not skip repeats: its deliveries are those the first batch stored.
    made = [line for line in out.splitlines() if "-> ops via created" in line]
    assert len(made) == 3 and all(f"(a repeat: stored by batch {first})" in x for x in made)


async def test_batches_show_says_no_route_matches_only_where_none_does(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(STATE_CONFIG.format(db=db).replace("  - {name: all, to: ops}\n", ""))
    await _serve_until_settled(config, tmp_path / "bridge.log",
                               json.dumps(sample_batch()).encode())
    listed = run_bridge("batches", "list", "--json", "--config", str(config))
    [batch_id] = [json.loads(x)["id"] for x in listed.stdout.splitlines()]
    out = run_bridge("batches", "show", batch_id, "--config", str(config)).stdout
    assert "  order 01d6a94c-ea60-4675-9e5e-3a9f64cec5fe [first_seen]: no route matches" in out


async def test_batches_show_says_a_coalesced_delivery_went_out_with_its_window(
        tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(STATE_CONFIG.format(db=db).replace(
        "  - {name: all, to: ops}\n", "  - {name: all, kind: tracking, to: ops, coalesce: 1s}\n"))
    await _serve_until_settled(config, tmp_path / "bridge.log",
                               json.dumps(sample_batch()).encode())
    listed = run_bridge("batches", "list", "--json", "--config", str(config))
    [batch_id] = [json.loads(x)["id"] for x in listed.stdout.splitlines()]
    out = run_bridge("batches", "show", batch_id, "--config", str(config)).stdout
    coalesced = [line for line in out.splitlines() if "-> ops via all" in line]
    assert len(coalesced) == 5 and all(
        "(coalesced: its window's changes go out as one message, the last one's)" in line
        for line in coalesced)
    assert not [line for line in out.splitlines()
                if "-> ops via created" in line and "coalesced" in line]
