"""`bridge migrate` and `bridge batches list | show | reroute`: the inbox for operators."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from bridge.cli_common import (
    SKIP_REASONS,
    iso,
    load_for,
    open_store,
    positive_int,
    storage_in_use,
)
from bridge.config_types import parse_duration
from bridge.models import COALESCED, BatchInfo, BatchStatus
from bridge.outbox import Store
from bridge.redact import redact
from bridge.runtime import build_sinks, register_secrets


async def cmd_migrate(args: argparse.Namespace) -> int:
    loaded = load_for(args)
    store = await open_store(loaded, create=True)  # opening applies what is pending
    try:
        applied = await store.migrate()
    finally:
        await store.close()
    where = storage_in_use(loaded)  # which database, and where its URL came from
    if applied:
        for step in applied:
            print(f"applied {step}")
        print(f"{where}: migrated")
    else:
        print(f"{where}: up to date")
    return 0


async def _with_store(args: argparse.Namespace) -> Store:
    loaded = load_for(args)
    # Errors are scrubbed when stored; again here with today's secrets.
    register_secrets(loaded.config, build_sinks(loaded.config))
    return await open_store(loaded)


def _row(b: BatchInfo) -> dict[str, Any]:
    return {"id": b.id, "received_at": iso(b.received_at), "items": b.items,
            "deliveries": b.deliveries, "duplicates": b.duplicates, "status": b.status.value,
            "error": redact(b.error) if b.error else None,
            "sequenced_at": iso(b.sequenced_at) if b.sequenced_at else None}


async def cmd_batches_list(args: argparse.Namespace) -> int:
    store = await _with_store(args)
    try:
        rows = await store.batches(args.limit)
    finally:
        await store.close()
    if args.json:
        for b in rows:
            print(json.dumps(_row(b), ensure_ascii=False))
        return 0
    if not rows:
        print("no batches")
        return 0
    print(f"{'batch':32}  {'received':20}  {'items':>5}  {'new':>5}  {'dup':>5}  status")
    for b in rows:
        new = "-" if b.deliveries is None else str(b.deliveries)
        dup = "-" if b.duplicates is None else str(b.duplicates)
        line = f"{b.id:32}  {iso(b.received_at):20}  {b.items:>5}  {new:>5}  {dup:>5}  {b.status}"
        if b.error:
            line += f": {redact(b.error)}"
        print(line)
    return 0


async def cmd_batches_show(args: argparse.Namespace) -> int:
    store = await _with_store(args)
    try:
        b = await store.batch(args.id)
        if b is None:
            print(f"error: no batch {args.id!r} (see `bridge batches list`; sequenced batches "
                  "are kept for defaults.inbox_retention)", file=sys.stderr)
            return 1
        print(f"batch {b.id}: {b.status}, received {iso(b.received_at)}, {b.items} items"
              + (f", sequenced {iso(b.sequenced_at)}" if b.sequenced_at else ""))
        if b.status is BatchStatus.FAILED:
            print(f"  failed: {redact(b.error or '')}")
            print("  after fixing the cause: bridge batches reroute " + b.id)
            return 0
        if b.status is BatchStatus.WAITING or not b.summary:
            print("  waiting for the sequencer: not routed yet")
            return 0
        print(f"  {b.deliveries} new deliveries, {b.duplicates} already stored")
        for entry in json.loads(b.summary):
            await _show_item(store, b.id, entry)
    finally:
        await store.close()
    return 0


async def _show_item(store: Store, batch_id: str, entry: dict[str, Any]) -> None:
    # The summary the sequencer stored (sequencer.summary_of): routes matched, deliveries
    # made, and where shipment state is kept the verdict and the routes that skipped it.
    # A matched item with no deliveries was skipped, not unmatched.
    verdict = entry.get("verdict")
    head = f"{entry['kind']} {entry['uuid']}" + (f" [{verdict}]" if verdict else "")
    if not entry["routes"]:
        print(f"  {head}: no route matches")
        return
    print(f"  {head}: routes {', '.join(entry['routes'])}")
    for route, why in entry.get("skipped", {}).items():
        print(f"    -- {route}: skipped, {SKIP_REASONS.get(why, why)}")
    for delivery_id in entry["deliveries"]:
        d = await store.get(delivery_id)
        if d is None:
            print(f"    {delivery_id}: delivered and swept (defaults.delivered_retention)")
            continue
        origin = "" if d.batch_id == batch_id else f" (a repeat: stored by batch {d.batch_id})"
        error = f": {redact(d.last_error)}" if d.last_error else ""
        # Its window's changes leave as ONE message, the last one's: `delivered` says that
        # message went, not that this change was sent on its own.
        merged = (" (coalesced: its window's changes go out as one message, the last one's)"
                  if d.group_key is not None and d.group_key.startswith(COALESCED) else "")
        print(f"    {delivery_id} -> {d.sink} via {d.route}: {d.status}{error}{origin}{merged}")


def parse_since(text: str, now: float) -> float:
    """`2026-12-06T10:00:00Z` (ISO 8601) or a duration back from now (`90m`, `2h`, `1d`)."""
    try:
        return now - parse_duration(text)
    except (ValueError, TypeError):
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an ISO 8601 time such as "
                         "2026-12-06T10:00:00Z or a duration such as 2h") from None
    if moment.tzinfo is None:
        raise ValueError(f"--since {text!r}: give the time zone (a Z for UTC, or +01:00)")
    return moment.timestamp()


async def cmd_batches_reroute(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.since):
        given = "both batch ids and --since" if args.since else "neither"
        print(f"error: give batch ids (see `bridge batches list`) or --since TIME; got {given}",
              file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since, time.time()) if args.since else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = await _with_store(args)
    refused = []
    try:
        for batch_id in args.ids:
            b = await store.batch(batch_id)
            if b is None:
                refused.append(f"{batch_id}: no such batch")
            elif b.status is BatchStatus.WAITING:
                refused.append(f"{batch_id}: is waiting already")
        count = await store.reroute(args.ids or None, since)
    finally:
        await store.close()
    print(f"{count} {'batch' if count == 1 else 'batches'} back to waiting; the sequencer routes "
          "them again with the rules it loaded at start (restart `bridge serve` after editing "
          "the config); deliveries stored already are not stored twice, except those whose "
          "template failed: they are rendered again")
    for line in refused:
        print(f"not rerouted: {line}", file=sys.stderr)
    return 1 if refused else 0


def add_batch_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("migrate", parents=[common],
                   help="apply pending storage migrations (serve does it at start too)"
                   ).set_defaults(fn=cmd_migrate)
    batches = sub.add_parser("batches", parents=[common], help="accepted batches (the inbox)")
    bsub = batches.add_subparsers(dest="batches_command", required=True)
    p = bsub.add_parser("list", parents=[common], help="batches, newest first")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=positive_int, default=50)
    p.set_defaults(fn=cmd_batches_list)
    p = bsub.add_parser("show", parents=[common],
                        help="one batch: each item's verdict, the routes that matched or "
                        "skipped it, and its deliveries")
    p.add_argument("id", help="a batch id (see `bridge batches list`)")
    p.set_defaults(fn=cmd_batches_show)
    p = bsub.add_parser("reroute", parents=[common],
                        help="route batches again (with the rules `bridge serve` loaded at start)")
    p.add_argument("ids", nargs="*", help="batch ids")
    p.add_argument("--since", help="every batch received since: ISO 8601 time, or 2h back")
    p.set_defaults(fn=cmd_batches_reroute)
