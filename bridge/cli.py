"""`bridge serve | check | dry-run | send-test | dlq ...`: one async function per command
(`migrate` and `batches ...` in cli_batches.py)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge import __version__
from bridge.cli_batches import add_batch_commands
from bridge.cli_common import (
    SKIP_REASONS,
    iso,
    load_for,
    open_store,
    origin,
    plural,
    positive_int,
    storage_in_use,
    storage_origin,
    written_with,
)
from bridge.config import LoadedConfig
from bridge.config_types import format_duration, format_rate
from bridge.dispatch.breaker import probe_schedule
from bridge.errors import BridgeError, ConfigError, PayloadError, PermanentSinkError
from bridge.logs import setup_logging
from bridge.models import COALESCED, Batch, Delivery, Status
from bridge.parse import Verification, parse_request
from bridge.redact import redact
from bridge.routing.router import Router, compile_routes
from bridge.runtime import build_runtime, build_sinks, register_secrets
from bridge.sequencer import plan_item, state_book
from bridge.sinks.base import Sink
from bridge.state import StateBook
from bridge.yamlsource import variable_spans

log = logging.getLogger("bridge")
Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]




# ---- serve ---------------------------------------------------------------------------------

async def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.http.app import create_app
    from bridge.http.connections import Guard, GuardedSite

    loaded = load_for(args)
    cfg = loaded.config
    rt = build_runtime(cfg)
    app = create_app(rt)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    rt.storage_origin = storage_origin(loaded)
    await runner.setup()  # opens the store: StorageUnavailable says what is wrong
    host, port = cfg.server.host_port()
    # Each connection is timed and counted: read_timeout, keepalive_timeout, max_connections.
    site = GuardedSite(runner, host, port, Guard.of(cfg.server, rt.metrics))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(f"cannot listen on {host}:{port} ({_listen_origin(loaded)}): "
                           f"{exc.strerror or exc}; {_listen_remedy(loaded)}") from None
    # What is built by now (modules, config, templates, sinks, the store) lives as long as
    # the process. Frozen, the cyclic GC stops rescanning it: under saturation a full
    # collection held the event loop (and any verification) for 35-45 ms, and ~1 ms after.
    gc.collect()
    gc.freeze()
    shown_path = loaded.source.raw.get(("server", "webhook_path"), cfg.server.webhook_path)
    log.info("bridge serving", extra={
        "listen": f"{host}:{port}", "webhook_path": shown_path,
        "storage": storage_in_use(loaded),
        "sinks": sorted(rt.sinks), "routes": [r.name for r in cfg.routes], "version": __version__,
        "gc_frozen_objects": gc.get_freeze_count()})
    _warn_of_demo_secrets(loaded, host, port)
    for warning in loaded.source.warnings:
        log.warning(f"config: {warning}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    got: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        got.append(sig)
        stop.set()

    # SIGHUP too (a closed terminal, or a `reload` out of habit): by default it would end
    # the process at once, with sends cut off. It stops as SIGTERM does; nothing reloads.
    # Ignored when inherited ignored: `nohup bridge serve` must outlive its terminal.
    stopping = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stopping.append(signal.SIGHUP)
    for sig in stopping:
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    extra: dict[str, str] = {"signal": got[0].name}
    if got[0] is signal.SIGHUP:
        extra["note"] = ("SIGHUP stops the bridge; it does not reload its config: "
                         "start it again to apply changes")
    log.info("stopping: no new requests; finishing sends in flight (up to 10s)", extra=extra)
    await runner.cleanup()
    log.info("stopped")
    return 0


def _listen_origin(loaded: LoadedConfig) -> str:
    if ("server", "listen") not in loaded.source.lines:
        return "server.listen not set: the default"
    return ", ".join(["server.listen", *origin(loaded, ("server", "listen"))])


def _listen_remedy(loaded: LoadedConfig) -> str:
    """What to change, as the file has it: the variable it reads the address from, or the
    address it writes (or leaves out)."""
    file = loaded.source.file
    raw = loaded.source.raw.get(("server", "listen"))
    spans = variable_spans(raw) if raw else []
    if raw and spans:
        name, start, end = spans[-1]
        if len(spans) == 1 and (start, end) == (0, len(raw)):
            return (f"stop what holds the port, or set {name}=host:port "
                    f"(e.g. {name}=127.0.0.1:8081) to listen elsewhere")
        if end == len(raw) and raw[:start].endswith(":"):  # `127.0.0.1:${PORT}`
            return (f"stop what holds the port, or set {name}=<port> (e.g. {name}=8081) "
                    "to listen elsewhere")
        # `${HOST}:8080`: the port is written in the file.
        return (f"stop what holds the port, or change the port of server.listen in {file} "
                f"({raw} there) to a free one")
    if ("server", "listen") not in loaded.source.lines:
        return f"stop what holds the port, or set server.listen in {file} to a free host:port"
    return (f"stop what holds the port, or change server.listen in {file} "
            f"({loaded.config.server.listen} there) to a free host:port")


# The secret config/routes.yaml answers when ISENDU_SECRET is not set: public, in the repo.
DEMO_SECRET = "demo-secret-change-me"


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches `host` (an empty host is every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, others may reach it


def _warn_of_demo_secrets(loaded: LoadedConfig, host: str, port: int) -> None:
    """The shipped demo secret is fine on loopback; elsewhere anyone who reaches the port
    can have the verification answer it and post batches as isendu."""
    if is_loopback(host):
        return
    for i, integration in enumerate(loaded.config.integrations):
        if integration.secret.get_secret_value() != DEMO_SECRET:
            continue
        where = f"integrations[{i}].secret"
        secret_vars = written_with(loaded, ("integrations", i, "secret"))
        key_vars = written_with(loaded, ("integrations", i, "key_id"))
        if secret_vars:
            pair = f", and {key_vars[0]} to its key id" if key_vars else ""
            how = (f"Set {secret_vars[0]} (read by {where}) to your isendu API key's "
                   f"secret{pair}")
        else:
            how = f"Write your isendu API key's secret as {where} in {loaded.source.file}"
        log.warning(
            f"integration {integration.key_id!r} answers isendu's verification with the demo "
            f"secret shipped in config/routes.yaml, and {host}:{port} is reachable from "
            f"other machines: whoever reaches it can ask for the secret and post batches. "
            f"{how}; or listen on 127.0.0.1 only",
            extra={"listen": f"{host}:{port}", "key_id": integration.key_id})


# ---- check ---------------------------------------------------------------------------------

async def cmd_check(args: argparse.Namespace) -> int:
    loaded = load_for(args)
    cfg = loaded.config
    raw = loaded.source.raw
    built = build_sinks(cfg)
    register_secrets(cfg, built)
    print(f"{loaded.source.file}: OK")
    for warning in loaded.source.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # A token in the path, written literally, is masked as it is in the logs.
    print(redact(f"server: listen {cfg.server.listen}, webhook_path "
                 f"{raw.get(('server', 'webhook_path'), cfg.server.webhook_path)}, "
                 f"max_body_bytes {cfg.server.max_body_bytes}"))
    server = cfg.server
    print(f"connections: read_timeout {format_duration(server.read_timeout)}, "
          f"keepalive_timeout {format_duration(server.keepalive_timeout)}, "
          f"max_connections {server.max_connections}, "
          f"intake_concurrency {server.intake_concurrency}")
    print(redact(f"storage: {storage_in_use(loaded)}"))
    keys = ", ".join(i.key_id for i in cfg.integrations)
    print(f"integrations: {keys or '(none: every verification is answered 403)'}")
    print("sinks:")
    for name, sink in cfg.sinks.items():
        fields = sink.model_dump(mode="json", exclude_defaults=True, exclude={"type"},
                                 by_alias=True)
        fields = _as_written(fields, ("sinks", name), raw)
        shown = ", ".join(f"{k}={_show(v)}" for k, v in fields.items())
        # Values are shown as written (`${VAR}`, not what it held); secrets written
        # literally (an Authorization header, ?token=) are masked like everywhere else.
        print(redact(f"  {name} ({sink.type}){': ' + shown if shown else ''}"))
        print(f"    rate limit (per replica): {rate_text(built[name])}")
        print(f"    while its receiver is away: {probe_text(cfg, name, built[name])}")
    print("routes:")
    for route in cfg.routes:
        scope = route.kind or "order+tracking"
        when = "always" if route.when is None else "when " + json.dumps(
            _condition_json(route.when), ensure_ascii=False)
        print(f"  {route.name} [{scope}] {when} -> {', '.join(route.to)}"
              f"{''.join(', ' + part for part in route_settings(route))}")
    if not cfg.routes:
        print("  (none: every batch is accepted and nothing is sent)")
    return 0


def route_settings(route: Any) -> list[str]:
    """What a route sets beyond where it goes, in the words of the config."""
    parts = []
    if route.group is not None:
        parts.append(f"digest every {format_duration(route.group.window)} "
                     f"(up to {route.group.max_items} items)")
    if route.coalesce is not None:
        parts.append(f"coalesce {format_duration(route.coalesce)}")
    if not route.dedupe:
        parts.append("dedupe: false (repeats sent too)")
    if route.stale == "deliver":
        parts.append("stale: deliver")
    if isinstance(route.message, dict):
        parts.append(f"own message for {', '.join(sorted(route.message))}")
    elif route.message is not None:
        parts.append("own message")
    if route.stop:
        parts.append("stop")
    return parts


def rate_text(sink: Sink) -> str:
    """The limit the dispatcher will apply, and where it comes from."""
    configured = "rate_limit" in sink.config.model_fields_set
    limit = sink.rate_limit()
    if limit is None:
        note: str | None = getattr(sink, "rate_note", None)
        if configured:
            return "off (rate_limit: off)"
        return note or f"none ({sink.type_name} sinks have no default limit)"
    rate, burst = limit
    origin = "set by rate_limit" if configured else f"default for {sink.type_name}"
    return f"{format_rate(rate)}, burst {burst} ({origin})"


def probe_text(cfg: Any, name: str, sink: Sink) -> str:
    """How the sink's probes are spaced while it is down (bridge/dispatch/breaker.py)."""
    if not sink.reports_unreachable:
        return (f"every failure counts ({sink.type_name} does not tell an outage from a "
                "refusal, so the sink never goes down)")
    own = cfg.sinks[name].probe_interval
    first, longest = probe_schedule(cfg.retry_for(name), own)
    if own is not None:
        return f"one probe every {format_duration(first)} (probe_interval)"
    if first == longest:
        return f"one probe every {format_duration(first)} (from retry)"
    return (f"one probe after {format_duration(first)}, then twice as long each time up to "
            f"{format_duration(longest)} (from retry)")


def _as_written(value: Any, path: tuple[str | int, ...], raw: dict[Any, str]) -> Any:
    """`value` with every string that came from `${VAR}` substitution put back as written."""
    if isinstance(value, dict):
        return {k: _as_written(v, (*path, k), raw) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_written(v, (*path, i), raw) for i, v in enumerate(value)]
    return raw.get(path, value) if isinstance(value, str) else value


def _show(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _condition_json(c: Any) -> Any:
    if isinstance(c, list):
        return [_condition_json(x) for x in c]
    data = c.model_dump(by_alias=True, exclude_unset=True)
    return data


# ---- dry-run -------------------------------------------------------------------------------

async def cmd_dry_run(args: argparse.Namespace) -> int:
    cfg = load_for(args).config
    sinks = build_sinks(cfg)
    register_secrets(cfg, sinks)
    router = Router(compile_routes(cfg, sinks))
    try:
        bodies = list(_dry_run_bodies(args.payload))
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    # One history for every batch given, in order, as the sequencer keeps it; nothing stored.
    book = state_book(cfg.state)
    # What serve stored is not read: a batch it sequenced shows here as first seen. Said
    # first, where the verdicts are read (on stderr with --json, whose stdout is JSON only).
    print("shipment state: starts empty; nothing stored is read or written (the batches "
          "given are one history, in order)" if book is not None else
          "shipment state: off (state.enabled: false); every item is routed as first seen",
          file=sys.stderr if args.json else sys.stdout)
    many = len(bodies) > 1
    items = deliveries = again = 0
    made: dict[str, str] = {}  # delivery id -> the batch that made it: the outbox's view
    for where, body in bodies:
        try:
            parsed = parse_request(body)
        except PayloadError as exc:
            print(f"error: {where}: {exc.where}: {exc.message} (isendu would get HTTP 400)",
                  file=sys.stderr)
            return 1
        if isinstance(parsed, Verification):
            known = parsed.key_id in {i.key_id for i in cfg.integrations}
            print((f"{where}: " if many else "")
                  + f"verification request for keyId {parsed.key_id!r}: "
                  + ("would answer 200 with its secret" if known
                     else "unknown keyId, would answer 403"))
            continue
        if parsed.unknown_keys:  # as `serve` warns: accepted, and nothing comes of it
            keys = ", ".join(repr(k[:64]) for k in parsed.unknown_keys[:10])
            print(f"warning: {where}: the body has neither keyId, order nor tracking (its "
                  f"keys: {keys}); isendu's answer would be 200, as for an empty batch",
                  file=sys.stderr)
        report = dry_run(router, parsed, book, made, where)
        items += len(parsed.items)
        every = [d for r in report for d in r["deliveries"]]
        deliveries += len(every)
        again += sum(1 for d in every if "stored_by" in d)
        _print_dry_run(report, where if many else None, args.json)
    print(f"{plural(len(bodies), 'batch', 'batches')}, " if many else "", end="",
          file=sys.stderr)
    print(f"{plural(items, 'item')}, {plural(deliveries - again, 'delivery', 'deliveries')}"
          + (f" (and {again} made again, which the outbox would store once)" if again else "")
          + "; nothing sent, nothing stored", file=sys.stderr)
    return 0


def _dry_run_bodies(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """(where, body) per batch: a file each, or a line each of a JSON-lines file."""
    for path in paths:
        data = Path(path).read_bytes()
        if path.endswith((".jsonl", ".ndjson")):
            for n, line in enumerate(data.splitlines(), 1):
                if line.strip():
                    yield f"{path}:{n}", line
        else:
            yield path, data


def _print_dry_run(report: list[dict[str, Any]], where: str | None, as_json: bool) -> None:
    # Every line scrubbed: a template may put a header's token into what a sink would get.
    if as_json:
        for row in report:  # scrubbed before encoding: JSON escapes would hide a secret
            row = {"batch": where, **row} if where is not None else row
            print(json.dumps(_scrubbed(row), ensure_ascii=False))
        return
    if where is not None:
        print(f"== {where}")
    for row in report:
        verdict = row.get("verdict")
        verdict = f" [{verdict}]" if verdict not in (None, "first_seen") else ""
        print(f"{row['kind']} {row['uuid']}{verdict}: "
              + (", ".join(row["routes"]) if row["routes"] else "no route matches"))
        for route, why in row.get("skipped", {}).items():
            print(f"  -- {route}: skipped, {SKIP_REASONS.get(why, why)}")
        for d in row["deliveries"]:
            if "stored_by" in d:
                print(f"  == {d['sink']} via {d['route']}: made by {d['stored_by']} already "
                      "(the same id: stored once, not sent again)")
            elif d["error"]:
                print(redact(f"  -> {d['sink']} via {d['route']}: WOULD DEAD-LETTER: "
                             f"{d['error']}"))
            else:
                held = (" (held for its coalescing window: only the window's last change "
                        "goes out, with every step the window brought)"
                        if d.get("coalesced") else
                        " (held for the route's digest: sent with the other items of its "
                        "window as one message; this item's part of it)"
                        if d.get("digest") else "")
                print(f"  -> {d['sink']} via {d['route']}{held}:")
                for key, value in d["payload"].items():
                    print(redact(f"     {key}: {value}"))


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def dry_run(router: Router, batch: Batch, book: StateBook | None = None,
            made: dict[str, str] | None = None, where: str = "an earlier batch"
            ) -> list[dict[str, Any]]:
    """What the sequencer would make of `batch` after the batches `book` has seen: the same
    routing, nothing stored. `made`: the delivery ids of earlier batches of this run (and
    where they were made), so that one made again shows as the outbox would store it:
    once."""
    rows = []
    for item in batch.items:
        seen = book.observe(item) if book else None
        hold = book.holder(item, time.time()) if book else None
        plan = plan_item(router, item, batch, seen, hold=hold)
        if book is not None:
            book.take_changed()
        row: dict[str, Any] = {"kind": item.kind, "uuid": item.uuid, "routes": plan.routes}
        if plan.verdict is not None:
            row["verdict"] = plan.verdict
        if plan.skipped:
            row["skipped"] = plan.skipped
        row["deliveries"] = []
        for d in plan.deliveries:
            out: dict[str, Any] = {"route": d.route, "sink": d.sink, "id": d.id,
                                   "payload": d.payload, "error": d.error}
            if made is not None:
                if d.id in made:
                    out["stored_by"] = made[d.id]
                else:
                    made[d.id] = where
            if d.group_key is not None:
                out["coalesced" if d.group_key.startswith(COALESCED) else "digest"] = True
            row["deliveries"].append(out)
        rows.append(row)
    return rows


# ---- send-test -----------------------------------------------------------------------------

async def cmd_send_test(args: argparse.Namespace) -> int:
    from bridge.canonical import canonical_json
    from bridge.outbox.memory import MemoryStore
    from bridge.parse import utc_now
    from bridge.routing.router import delivery_id
    from bridge.samples import SAMPLE_ORDER, SAMPLE_TRACKING
    from bridge.sinks.base import RenderContext

    cfg = load_for(args).config
    if args.sink not in cfg.sinks:
        known = ", ".join(sorted(cfg.sinks)) or "none defined"
        print(f"error: no sink named {args.sink!r} (sinks: {known})", file=sys.stderr)
        return 2
    sinks = build_sinks(cfg)
    register_secrets(cfg, sinks)
    sink = sinks[args.sink]
    sink.memory = MemoryStore()  # nothing is stored: a thread, if any, lives for this run
    failures = 0
    try:
        for kind, item in (("order", SAMPLE_ORDER), ("tracking", SAMPLE_TRACKING)):
            item_json = canonical_json(item)
            did = delivery_id(sink.name, "send-test", kind, item_json + str(time.time()))
            ctx = RenderContext(item, kind, utc_now(), item_json)  # type: ignore[arg-type]
            payload = sink.render(ctx, "send-test", did, None)
            now = time.time()
            delivery = Delivery(
                id=did, sink=sink.name, route="send-test", item_uuid=item["uuid"], kind=kind,  # type: ignore[arg-type]
                payload=payload, status=Status.PENDING, attempts=1, next_attempt_at=now,
                created_at=now, updated_at=now, enqueued_at=now)
            result = (await sink.send_many([delivery]))[0]
            if result is None:
                print(f"sample {kind} sent through {sink.name} ({sink.type_name})")
            else:
                failures += 1
                what = "permanent" if isinstance(result, PermanentSinkError) else "temporary"
                print(f"sample {kind} FAILED through {sink.name}: {redact(result.reason)} "
                      f"({what} error)", file=sys.stderr)
    finally:
        await sink.close()
    return 1 if failures else 0


# ---- dlq -----------------------------------------------------------------------------------

async def cmd_dlq_list(args: argparse.Namespace) -> int:
    loaded = load_for(args)
    cfg = loaded.config
    # Reasons are scrubbed when stored; scrubbed again here with today's secrets, for
    # rows stored before a secret was known as one.
    register_secrets(cfg, build_sinks(cfg))
    store = await open_store(loaded)
    try:
        dead = await store.list_dead(args.limit)
    finally:
        await store.close()
    if args.json:
        for d in dead:
            print(json.dumps({"id": d.id, "sink": d.sink, "route": d.route, "kind": d.kind,
                              "item_uuid": d.item_uuid, "attempts": d.attempts,
                              "reason": redact(d.last_error or ""),
                              "dead_at": iso(d.updated_at)}, ensure_ascii=False))
        return 0
    if not dead:
        print("no dead deliveries")
        return 0
    for d in dead:
        print(f"{d.id}  {iso(d.updated_at)}  sink={d.sink} route={d.route} "
              f"{d.kind}={d.item_uuid} attempts={d.attempts}\n"
              f"    reason: {redact(d.last_error or '')}")
    return 0


def unrendered(d: Delivery) -> str:
    """Why a dead delivery whose template failed is not replayed, and what to do instead."""
    return f"{d.id}: its template failed ({d.last_error}), so there is nothing to send; " + (
        _rerender(d.batch_id, "it"))


def _rerender(batch_id: str | None, what: str) -> str:
    if batch_id is None:  # stored by a release before the inbox: no batch to route again
        return ("stored before batches were kept (by a release before the inbox), so no "
                f"batch can render {what} again")
    return (f"fix the template, restart `bridge serve`, then run "
            f"`bridge batches reroute {batch_id}` to render {what} again")


UNRENDERED_LISTED = 100_000  # dead letters read back for `dlq replay --all`'s report


def unrendered_batches(dead: list[Delivery]) -> list[str]:
    """`unrendered` for many: a template broken for a day leaves thousands of letters, and
    one reroute per batch is what they need."""
    by_batch: dict[str | None, list[Delivery]] = {}
    for d in dead:
        by_batch.setdefault(d.batch_id, []).append(d)
    out = []
    for batch_id, letters in by_batch.items():
        n = len(letters)
        reasons = list(dict.fromkeys(d.last_error for d in letters))
        others = len(reasons) - 1
        why = str(reasons[0]) + (
            f"; {plural(others, 'other reason')} in `bridge dlq list`" if others else "")
        out.append(f"batch {batch_id or '(none)'}: {plural(n, 'delivery', 'deliveries')} "
                   f"whose template failed ({why}), so there is nothing to send; "
                   + _rerender(batch_id, "it" if n == 1 else "them"))
    return out


async def cmd_dlq_replay(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        given = "both delivery ids and --all" if args.all else "neither"
        print(f"error: give delivery ids (see `bridge dlq list`) or --all; got {given}",
              file=sys.stderr)
        return 2
    store = await open_store(load_for(args))
    refused: list[str] = []
    try:
        for delivery_id in args.ids:  # say which ids cannot be replayed, and why
            row = await store.get(delivery_id)
            if row is None:
                refused.append(f"{delivery_id}: no such delivery")
            elif row.status is not Status.DEAD:
                refused.append(f"{delivery_id}: is {row.status.value}, not dead")
            elif not row.payload:
                refused.append(unrendered(row))
        count = await store.replay(None if args.all else args.ids, time.time())
        if args.all:  # what --all left dead, and why: one line per batch, however many
            left = await store.list_dead(UNRENDERED_LISTED)
            refused += unrendered_batches([d for d in left if not d.payload])
            if len(left) == UNRENDERED_LISTED:
                refused.append(f"only the newest {UNRENDERED_LISTED:,} dead letters were "
                               "read for this list: there are more; `bridge dlq list` shows "
                               "them")
    finally:
        await store.close()
    print(f"{count} {'delivery' if count == 1 else 'deliveries'} back to pending")
    for line in refused:
        print(f"not replayed: {line}", file=sys.stderr)
    return 1 if refused else 0


# ---- wiring --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # Before or after the command: given in both places, the one after wins. SUPPRESS, so
    # a subcommand's parser leaves what was given before it alone when not given again.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="routes.yaml (default: $BRIDGE_CONFIG or config/routes.yaml)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper,
                        help=f"one of {', '.join(LOG_LEVELS)} "
                        "(default: $BRIDGE_LOG_LEVEL or INFO)")
    parser = argparse.ArgumentParser(prog="bridge", parents=[common],
                                     description="isendu webhooks in, notifications out.")
    parser.add_argument("--version", action="version", version=f"bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the bridge").set_defaults(fn=cmd_serve)
    sub.add_parser("check", parents=[common], help="validate the config").set_defaults(fn=cmd_check)
    p = sub.add_parser("dry-run", parents=[common],
                       help="show what a payload would cause; sends and stores nothing")
    p.add_argument("payload", nargs="+",
                   help="isendu JSON bodies (saved batches), taken in order as one history; "
                        "a .jsonl file holds a batch per line")
    p.add_argument("--json", action="store_true", help="one JSON object per item")
    p.set_defaults(fn=cmd_dry_run)
    p = sub.add_parser("send-test", parents=[common],
                       help="send a sample order and tracking message through one sink")
    p.add_argument("sink", help="a sink name from the config")
    p.set_defaults(fn=cmd_send_test)
    dlq = sub.add_parser("dlq", parents=[common], help="dead-letter queue")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    p = dsub.add_parser("list", parents=[common], help="dead deliveries, newest first")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=positive_int, default=100)
    p.set_defaults(fn=cmd_dlq_list)
    p = dsub.add_parser("replay", parents=[common], help="send dead deliveries again")
    p.add_argument("ids", nargs="*", help="delivery ids (see `bridge dlq list`)")
    p.add_argument("--all", action="store_true", help="replay every dead delivery")
    p.set_defaults(fn=cmd_dlq_replay)
    add_batch_commands(sub, common)
    # Named by their choices, not their dest: "required: {list,replay}", not "dlq_command".
    for group in (sub, dsub, *(a for a in sub.choices["batches"]._actions
                               if isinstance(a, argparse._SubParsersAction))):
        group.metavar = "{" + ",".join(group.choices) + "}"
    return parser


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # WARN and FATAL work too


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = getattr(args, "log_level", None)
    level = given or os.environ.get("BRIDGE_LOG_LEVEL", "INFO")
    if level.upper() not in (*LOG_LEVELS, "WARN", "FATAL"):
        where = "--log-level" if given else "BRIDGE_LOG_LEVEL"
        parser.error(f"{where} {level.lower()!r}: expected one of {', '.join(LOG_LEVELS)}")
    setup_logging(level.upper())
    fn: Command = args.fn
    try:
        return asyncio.run(fn(args))
    except ConfigError as exc:
        print("config error" + ("s" if len(exc.problems) > 1 else "") + ":", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except (BridgeError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bridge check | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
