"""What shipment state costs the sequencer: CPU per batch with `state.enabled` true and false,
alternating in one run.

    .venv/bin/python benchmarks/state_cost.py                      # about 4 minutes
    .venv/bin/python benchmarks/state_cost.py --batches 1000 --rounds 1   # a quick look
    .venv/bin/python benchmarks/state_cost.py --engine postgres           # on 127.0.0.1:5432

Two feeds of `--batches` batches of `--items` items, each built once (seeded) and appended to
a SQLite inbox through the bridge's own `Store.append`, as prefill_inbox.py does:
- *histories*: shipments sending several snapshots each, as isendu does. Every distinct
  shipment of the samples is a template: a tracking one sends its steps cumulatively (one
  snapshot per step so far), an order moves on through up to two more statuses; each template
  is used by many shipments (their own uuids), 1/3 of the items orders as in the samples.
  A snapshot is sent again later with `--repeat` odds (a repeat), and the one before a
  snapshot arrives after it with `--stale` odds (stale for tracking; orders have no
  `order_version_path` here, so theirs are changes). A shipment's snapshots are `--gap`
  items apart on average (exponential). What happened before the feed's first batch (the
  earlier snapshots of shipments under way) is sequenced first, with state on and untimed:
  the measured process starts with those states in storage and none in memory, as after a
  restart, so they are read back and merged.
- *unique*: benchmarks/common.py's BatchFactory, every item its own uuid: the worst case for
  the state (every item a new row, nothing skipped).

Each measurement is a process of its own: a copy of the feed's inbox (a fresh database: a
copy of the file, or on PostgreSQL `CREATE DATABASE ... TEMPLATE` the feed's), the
bridge's runtime built from the benchmark config (common.bridge_config, seven routes, about 2
deliveries per item) plus `state: {enabled: ...}`, logging as `bridge serve` ships it (INFO,
one JSON line per batch, to a file), the GC frozen as `serve` freezes it, and the real
Sequencer running until every batch is sequenced. Timed: CPU of the whole process (the event
loop and SQLite's writer thread; time.process_time; user and system apart in the JSON, with
the bytes the process wrote, from /proc/self/io) and wall time. On PostgreSQL the server's
CPU and writes are part of the work: every process of the server's user (its backends, WAL
writer, checkpointer, ...) is counted from /proc, alive at start and end or born between
(autovacuum workers that come and go between are missed), and added to the bridge's. The
dispatcher does not run. On and off alternate, their order swapped every round. Prints per
feed the median CPU per batch and its spread, the ratio on/off, what the state saw
(bridge_items_observed_total) and how busy the rest of the machine was; writes the raw figures to
benchmarks/results/state_cost-<time>.json; exits 1 when a ratio is over `--max-ratio` (1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import pwd
import random
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    BatchFactory,
    Row,
    bridge_config,
    children_in,
    fmt,
    machine_info,
    print_table,
    run_json,
    run_main,
    sample_items,
    work_dir,
    write_results,
)

ORDER_PATH = ["NEW", "PAID", "PROCESSING", "READY_TO_SHIP", "SHIPPED"]
VERDICTS = ("first_seen", "change", "repeat", "stale")
FEEDS = ("histories", "unique")


# ---- the feeds -----------------------------------------------------------------------------

def templates() -> dict[str, list[list[dict[str, Any]]]]:
    """Per kind, every sample shipment's snapshots in the order they happen."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, item in sample_items():
        key = (kind, item["uuid"])
        if key not in latest or len(item.get("steps") or []) > len(latest[key]["steps"]):
            latest[key] = item
    out: dict[str, list[list[dict[str, Any]]]] = {"order": [], "tracking": []}
    for (kind, _), item in latest.items():
        if kind == "tracking":
            by_time = sorted(item["steps"], key=lambda s: s["timestamp"])
            snaps = []
            for k in range(1, len(by_time) + 1):
                last = by_time[k - 1]
                snaps.append({**item, "status": last["status"],
                              "delivered": last["status"] == "DELIVERED",
                              # cumulative, in isendu's own (unsorted) order
                              "steps": [s for s in item["steps"] if s in by_time[:k]]})
        else:
            at = ORDER_PATH.index(item["status"]) if item["status"] in ORDER_PATH else 0
            snaps = [{**item, "status": s} for s in ORDER_PATH[at:at + 3]]
        out[kind].append(snaps)
    return out


def history_bodies(args: argparse.Namespace) -> tuple[list[bytes], list[bytes]]:
    """The past (sequenced before the clock starts) and the batches measured."""
    rng = random.Random(args.seed)
    kinds = templates()
    share = {k: sum(1 for kind, _ in sample_items() if kind == k) for k in kinds}
    mean_len = {k: statistics.mean(len(h) for h in kinds[k]) for k in kinds}
    # Shipments picked so that each kind's share of the items is the samples' share.
    weight = [share[k] / mean_len[k] for k in kinds]
    total = args.batches * args.items
    life = args.gap * max(mean_len.values())
    events: list[tuple[float, int, str, dict[str, Any]]] = []
    measured = 0
    shipment = 0
    while measured < total:
        kind = rng.choices(list(kinds), weight)[0]
        snaps = rng.choice(kinds[kind])
        uuid = snaps[0]["uuid"][:-12] + f"{shipment:012x}"
        times = [rng.uniform(-life, total)]
        for _ in snaps[1:]:
            times.append(times[-1] + rng.expovariate(1 / args.gap))
        for k in range(1, len(snaps)):  # the one before arrives after this one: stale
            if rng.random() < args.stale:
                times[k - 1] = times[k] + rng.expovariate(4 / args.gap)
        sends = list(zip(times, snaps, strict=True))
        sends += [(t + rng.expovariate(4 / args.gap), snap) for t, snap in sends
                  if rng.random() < args.repeat]  # sent again: a repeat
        sends = [(t, snap) for t, snap in sends if t < total]
        measured += sum(1 for t, _ in sends if t >= 0)
        events += [(t, shipment, kind, {**snap, "uuid": uuid}) for t, snap in sends]
        shipment += 1
    events.sort(key=lambda e: (e[0], e[1]))
    past = sum(1 for e in events if e[0] < 0)
    return (_batches(events[:past], args.items),
            _batches(events[past:past + total], args.items))


def _batches(events: list[tuple[float, int, str, dict[str, Any]]], items: int) -> list[bytes]:
    bodies = []
    for first in range(0, len(events), items):
        doc: dict[str, list[dict[str, Any]]] = {}
        for _, _, kind, item in events[first:first + items]:
            doc.setdefault(kind, []).append(item)
        bodies.append(json.dumps(doc, ensure_ascii=False).encode())
    return bodies


def unique_bodies(args: argparse.Namespace) -> tuple[list[bytes], list[bytes]]:
    factory = BatchFactory(prefix=args.seed, items=args.items)
    return [], [factory.body(n) for n in range(args.batches)]


# ---- where the inbox lives: a SQLite file or a PostgreSQL database -------------------------

def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def storage_url(target: str) -> str:
    return target if is_postgres(target) else f"sqlite:///{target}"


def _pg_admin(target: str) -> tuple[str, str]:
    """(the server's `postgres` database, this target's database name)."""
    base, _, name = target.rpartition("/")
    return base + "/postgres", name


async def _pg_admin_sql(target: str, sql: str) -> None:
    import asyncpg

    admin, _ = _pg_admin(target)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_target(workdir: Path, pg: str | None, name: str, template: str | None) -> str:
    """A new, empty inbox, or a copy of `template`'s."""
    if pg is None:
        path = workdir / f"{name}.db"
        if template is not None:
            shutil.copy(template, path)
        return str(path)
    target = pg.rstrip("/").rpartition("/")[0] + f"/bench_state_{os.getpid()}_{name}"
    _, db = _pg_admin(target)
    # FILE_COPY: the copy checkpoints now, where WAL_LOG would leave its pages to a
    # checkpoint during the measurement.
    copy = (f' TEMPLATE "{_pg_admin(template)[1]}" STRATEGY = FILE_COPY'
            if template is not None else "")
    asyncio.run(_pg_admin_sql(target, f'CREATE DATABASE "{db}"{copy}'))
    return target


def remove_target(target: str) -> None:
    if is_postgres(target):
        db = _pg_admin(target)[1]
        asyncio.run(_pg_admin_sql(target, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        return
    for suffix in ("", ".yaml", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)


async def prefill(target: str, bodies: list[bytes], items: int) -> None:
    from bridge.models import InboxBatch
    from bridge.outbox import from_url

    store = from_url(storage_url(target))
    await store.open()
    start = time.time() - len(bodies)  # one a second, oldest first
    try:
        for first in range(0, len(bodies), 256):  # in flight at once: the writer groups them
            await asyncio.gather(*(
                store.append(InboxBatch(os.urandom(16).hex(), start + n, items, bodies[n]))
                for n in range(first, min(first + 256, len(bodies)))))
    finally:
        await store.close()


# ---- one measurement (a process of its own) ------------------------------------------------

COUNTS = ("SELECT COUNT(*) FROM deliveries", "SELECT COUNT(*) FROM shipment_state",
          "SELECT COUNT(*) FROM inbox WHERE status = 'failed'")


async def rows(target: str) -> tuple[int, ...]:
    """Deliveries, shipment states and failed batches in the inbox's database."""
    if is_postgres(target):
        import asyncpg

        conn = await asyncpg.connect(target)
        try:
            return tuple([int(await conn.fetchval(sql)) for sql in COUNTS])
        finally:
            await conn.close()
    with sqlite3.connect(target) as db:
        return tuple(int(db.execute(sql).fetchone()[0]) for sql in COUNTS)


def written(pid: int | str = "self") -> int:
    """Bytes a process had written to storage (WAL and checkpoints), from /proc."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def server_usage(uid: int | None) -> dict[int, tuple[float, int]]:
    """Per process of `uid` (PostgreSQL's): CPU seconds and bytes written so far."""
    if uid is None:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(entry)] = ((int(fields[11]) + int(fields[12])) / ticks, written(entry))
        except (OSError, StopIteration):
            continue  # gone meanwhile
    return out


def server_delta(before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]
                 ) -> tuple[float, int]:
    """What the server's processes used between two readings (a pid born between: all of
    its use; one gone between: lost)."""
    cpu = sum(c - before.get(pid, (0.0, 0))[0] for pid, (c, _) in after.items())
    io = sum(w - before.get(pid, (0.0, 0))[1] for pid, (_, w) in after.items())
    return cpu, io


def server_uid(target: str) -> int | None:
    return pwd.getpwnam("postgres").pw_uid if is_postgres(target) else None


async def drain(target: str, state: bool, log_level: str, workdir: Path) -> dict[str, Any]:
    from bridge.config import load_config
    from bridge.logs import setup_logging
    from bridge.runtime import build_runtime

    cfg = workdir / f"drain-{os.getpid()}.yaml"
    cfg.write_text(bridge_config(1, "http://127.0.0.1:1/hook", storage_url(target))
                   + f"state:\n  enabled: {str(state).lower()}\n")
    setup_logging(log_level)  # stderr: the child's log file
    rt = build_runtime(load_config(cfg).config)
    await rt.store.open()
    before = await rows(target)  # the past's, if any
    uid = server_uid(target)
    loaded = 0  # states found in storage (the rest of the keys read were first sightings)
    read_states = rt.store.states

    async def counting(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        nonlocal loaded
        found = await read_states(keys)
        loaded += len(found)
        return found

    rt.store.states = counting  # type: ignore[method-assign]
    waiting, _, _ = await rt.store.inbox_depth()
    done = [rt.metrics.batches_sequenced.labels(o) for o in ("sequenced", "failed")]
    gc.collect()
    gc.freeze()
    server0 = server_usage(uid)
    times0, io0 = os.times(), written()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await rt.sequencer.start()
    # Two counters read every 10 ms (the sequencer has no hook to wait on: none is added).
    while sum(c._value.get() for c in done) < waiting:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    times, io = os.times(), written()
    server_cpu, server_io = server_delta(server0, server_usage(uid))  # its backends still open
    await rt.sequencer.stop()
    await rt.store.close()
    seen = {v: sum(int(rt.metrics.registry.get_sample_value(
        "bridge_items_observed_total", {"kind": k, "verdict": v}) or 0)
        for k in ("order", "tracking")) for v in VERDICTS}
    deliveries, states, failed = (a - b for a, b in zip(await rows(target), before,
                                                        strict=True))
    return {"batches": waiting, "cpu_s": cpu + server_cpu, "bridge_cpu_s": cpu,
            "server_cpu_s": server_cpu, "wall_s": wall, "user_s": times.user - times0.user,
            "system_s": times.system - times0.system,
            "written_mb": (io - io0 + server_io) / 2**20,
            "commits": getattr(rt.store, "commits", None), "deliveries": deliveries,
            "states_stored": states, "states_loaded": loaded, "verdicts": seen,
            "failed": failed}


# ---- the run -------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batches", type=int, default=5000, help="batches per feed")
    p.add_argument("--items", type=int, default=10, help="items per batch")
    p.add_argument("--rounds", type=int, default=3, help="on/off pairs per feed")
    p.add_argument("--feeds", nargs="+", choices=FEEDS, default=list(FEEDS))
    p.add_argument("--gap", type=float, default=8000.0,
                   help="histories: mean items between two snapshots of one shipment")
    p.add_argument("--repeat", type=float, default=0.1, help="histories: odds of a repeat")
    p.add_argument("--stale", type=float, default=0.1, help="histories: odds of a stale one")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--max-ratio", type=float, default=1.3)
    p.add_argument("--log-level", default="INFO", help="the bridge's, as `serve --log-level`")
    p.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="--engine postgres: the server (a database is made per measurement)")
    p.add_argument("--data-dir", help="where the SQLite files live (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--drain", help=argparse.SUPPRESS)  # the child's mode: a file or a URL
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--state", choices=("on", "off"), help=argparse.SUPPRESS)
    return p.parse_args()


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_batch = [1000 * r["cpu_s"] / r["batches"] for r in runs]
    wall = [1000 * r["wall_s"] / r["batches"] for r in runs]
    def median(key: str, scale: float = 1000.0) -> float:
        return float(statistics.median(scale * r[key] / r["batches"] for r in runs))

    return {"cpu_ms_per_batch": statistics.median(per_batch), "cpu_min": min(per_batch),
            "server_ms_per_batch": median("server_cpu_s"),
            "user_ms_per_batch": median("user_s"), "system_ms_per_batch": median("system_s"),
            "written_kb_per_batch": median("written_mb", 1024.0),
            "cpu_max": max(per_batch), "wall_ms_per_batch": statistics.median(wall),
            "foreign_cpu_percent": max(r["foreign_cpu_percent"] for r in runs)}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "machine": machine_info(), "load_before": os.getloadavg(),
                           "feeds": {}}
    pg = args.pg if args.engine == "postgres" else None
    not_foreign = pwd.getpwnam("postgres").pw_uid if pg else None  # the server is measured
    made: list[str] = []

    def child(name: str, target: str, state: str, log_level: str) -> dict[str, Any]:
        result, _ = run_json(kids, name, [PYTHON, __file__, "--drain", target, "--state",
                                          state, "--log-level", log_level, "--workdir",
                                          str(workdir)],
                             timeout=3600, not_foreign_uid=not_foreign)
        return result

    with children_in(workdir) as kids:
        try:
            for feed in args.feeds:
                past, bodies = (history_bodies if feed == "histories" else unique_bodies)(args)
                master = create_target(workdir, pg, feed, None)
                made.append(master)
                if past:  # sequenced with state on: its states are in storage, not in memory
                    asyncio.run(prefill(master, past, args.items))
                    out["feeds"][feed] = {"past": child(f"{feed}-past", master, "on",
                                                        "WARNING")}
                asyncio.run(prefill(master, bodies, args.items))
                del past, bodies
                runs = measure_feed(args, feed,
                                    lambda name, target, state: child(name, target, state,
                                                                      args.log_level),
                                    functools.partial(create_target, workdir, pg,
                                                      template=master))
                on, off = summary(runs["on"]), summary(runs["off"])
                out["feeds"].setdefault(feed, {}).update({
                    "on": on, "off": off, "runs": runs,
                    "ratio": on["cpu_ms_per_batch"] / off["cpu_ms_per_batch"],
                    "round_ratios": [a["cpu_s"] / b["cpu_s"] for a, b in
                                     zip(runs["on"], runs["off"], strict=True)]})
        finally:
            for target in made:
                remove_target(target)
    out["load_after"] = os.getloadavg()
    return out


def measure_feed(args: argparse.Namespace, feed: str, child: Any, copy: Any
                 ) -> dict[str, list[dict[str, Any]]]:
    """`--rounds` pairs of drains, each of a new `copy(name)` of the feed's inbox, on and off
    alternating."""
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for n in range(args.rounds):
        for state in (("on", "off") if n % 2 == 0 else ("off", "on")):
            target = copy(f"{feed}_{n}_{state}")
            try:
                result = child(f"{feed}-{n}-{state}", target, state)
            finally:
                remove_target(target)
            runs[state].append(result)
            print(f"{feed} round {n + 1} state {state}: "
                  f"{1000 * result['cpu_s'] / result['batches']:.3f} ms CPU/batch",
                  file=sys.stderr)
    return runs


def report(r: dict[str, Any], max_ratio: float) -> bool:
    rows, ok = [], True
    for feed, f in r["feeds"].items():
        on, off, first = f["on"], f["off"], f["runs"]["on"][0]
        passed = f["ratio"] <= max_ratio
        ok = ok and passed
        spread = ", ".join(f"{x:.2f}" for x in f["round_ratios"])
        rows += [
            Row(f"{feed}: CPU per batch, state on (min-max)",
                f"{fmt(on['cpu_ms_per_batch'], 3)} ms ({fmt(on['cpu_min'], 3)}-"
                f"{fmt(on['cpu_max'], 3)})"),
            Row(f"{feed}: CPU per batch, state off (min-max)",
                f"{fmt(off['cpu_ms_per_batch'], 3)} ms ({fmt(off['cpu_min'], 3)}-"
                f"{fmt(off['cpu_max'], 3)})"),
            Row(f"{feed}: ratio on/off (rounds: {spread})", f"{f['ratio']:.2f}",
                f"<= {max_ratio}", verdict="PASS" if passed else "FAIL"),
            Row(f"{feed}: the bridge's user + system CPU, written per batch, on / off",
                f"{fmt(on['user_ms_per_batch'], 2)} + {fmt(on['system_ms_per_batch'], 2)} ms, "
                f"{fmt(on['written_kb_per_batch'])} KB / {fmt(off['user_ms_per_batch'], 2)} + "
                f"{fmt(off['system_ms_per_batch'], 2)} ms, {fmt(off['written_kb_per_batch'])} KB"),
            *([Row(f"{feed}: of which PostgreSQL's processes, on / off",
                   f"{fmt(on['server_ms_per_batch'], 3)} / "
                   f"{fmt(off['server_ms_per_batch'], 3)} ms")]
              if off["server_ms_per_batch"] else []),
            Row(f"{feed}: wall per batch, on / off",
                f"{fmt(on['wall_ms_per_batch'], 3)} / {fmt(off['wall_ms_per_batch'], 3)} ms"),
        ]
        items = sum(first["verdicts"].values()) or 1
        shares = ", ".join(f"{v} {100 * n / items:.1f}%" for v, n in first["verdicts"].items())
        f["notes"] = (
            f"{feed}: {first['batches']:,} batches; the state saw {shares}; "
            f"{first['states_loaded']:,} states read back from storage, "
            f"{first['states_stored']:,} new state rows; deliveries per item on "
            f"{first['deliveries'] / items:.2f}, off "
            f"{f['runs']['off'][0]['deliveries'] / items:.2f}; other processes used up to "
            f"{max(on['foreign_cpu_percent'], off['foreign_cpu_percent'])}% of a core")
    print_table(rows)
    print()
    for f in r["feeds"].values():
        print(f["notes"])
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*r["load_before"]),
          "after: {:.2f} {:.2f} {:.2f}".format(*r["load_after"]))
    return ok


def main() -> int:
    args = parse_args()
    if args.drain:
        result = asyncio.run(drain(args.drain, args.state == "on", args.log_level,
                                   args.workdir))
        json.dump(result, sys.stdout)
        print()
        return 0
    with work_dir(args.keep, args.data_dir) as workdir:
        result = measure(args, workdir)
    ok = report(result, args.max_ratio)
    print(f"raw figures: {write_results('state_cost', result)}")
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
