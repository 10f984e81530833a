"""Peak RSS of `bridge serve` while 100,000 deliveries wait in its SQLite outbox.

    .venv/bin/python benchmarks/rss_backlog.py [--pending 100000] [--mode 503|hang]

The HTTP sink's receiver is down: in mode `503` it answers every POST with 503 and
`Retry-After: 3600` (each delivery is attempted once and rescheduled an hour out, the usual
outage); in mode `hang` it never answers (8 sends stay in flight, everything else waits,
due). Batches are posted until the bridge reports `--pending` deliveries stored, then the
bridge's peak RSS (VmHWM) is read. A bridge with the inbox answers before it routes, so
there the load stops at items x routes per item (bridge dry-run), the sequencer is let
empty the inbox, and the outbox's pending count from /metrics decides; a shortfall (the
estimate was high) is topped up by another round. In mode `hang`, `--drain` seconds more restart the
bridge on the same outbox with a receiver that answers 200 and measure how fast the backlog
drains and the RSS while it does.

run.py runs this too, as its last phase; this entry point is for running it alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    HOST,
    PYTHON,
    SINK_SERVER,
    WEBHOOK_PATH,
    Child,
    Children,
    Row,
    bridge_config,
    bridge_source,
    children_in,
    fmt,
    free_port,
    http_json,
    loadgen_argv,
    machine_info,
    outbox_counts,
    print_table,
    proc_status_kb,
    routes_per_item,
    run_json,
    start_bridge,
    stored_deliveries,
    wait_ready,
    work_dir,
    write_results,
)

RSS_LIMIT_MB = 150.0


def start_sink(kids: Children, name: str, mode: str) -> str:
    port = free_port()
    child = kids.start(name, [PYTHON, SINK_SERVER, "--port", str(port), "--mode", mode])
    base = f"http://{HOST}:{port}"
    wait_ready(base + "/healthz", child)
    return base


def run_backlog(kids: Children, *, pending: int, mode: str, concurrency: int,
                drain: float, log_level: str, prefix: int = 90,
                src: str | None = None, per_item: float | None = None) -> dict[str, Any]:
    sink = start_sink(kids, f"sink-{mode}", mode)
    db = kids.workdir / f"backlog-{mode}" / "bridge.db"
    port = free_port()
    config = bridge_config(port, sink + "/hook", db, sink_timeout="3m")
    if per_item is None:
        per_item = routes_per_item(kids.workdir, config, src)["per_item"]
    bridge, base = start_bridge(kids, f"bridge-backlog-{mode}", config, log_level, src)
    started = time.monotonic()
    fills: list[dict[str, Any]] = []
    peak_kb = 0
    counts: dict[str, int] = {}
    for round_no in range(4):  # rounds after the first top up an estimate that fell short
        short = pending - counts.get("pending", 0)
        fill, peaks = run_json(
            kids, f"loadgen-backlog-{mode}-{round_no}",
            loadgen_argv("intake", base + WEBHOOK_PATH, "--concurrency", str(concurrency),
                         "--warmup", "0", "--duration", "600", "--until-deliveries",
                         str(short), "--per-item", str(per_item),
                         "--prefix", str(prefix + 100 * round_no)),
            timeout=660, watch=[bridge.pid])
        fills.append(fill)
        peak_kb = max(peak_kb, peaks.get(bridge.pid, 0))
        stored_deliveries(base, fill, timeout=600)  # the inbox emptied (with one)
        time.sleep(3.0)  # let the dispatcher's reaction to the last batches settle
        counts = outbox_counts(base)
        if counts.get("pending", 0) >= pending or fill.get("deliveries_reported", True):
            break
    fill_seconds = time.monotonic() - started
    hwm = max(peak_kb, proc_status_kb(bridge.pid, "VmHWM") or 0)
    result: dict[str, Any] = {
        "mode": mode, "target_pending": pending, "fill_seconds": round(fill_seconds, 2),
        "fill": fills[0] if len(fills) == 1 else fills, "fill_rounds": len(fills),
        "per_item": per_item, "outbox": counts,
        "sink_arrivals": http_json(sink + "/stats")["total"],
        "peak_rss_mb": round(hwm / 1024, 1),
        "rss_after_mb": round((proc_status_kb(bridge.pid, "VmRSS") or 0) / 1024, 1),
    }
    if mode == "hang" and drain > 0:
        result["drain"] = _drain(kids, bridge, db=db, seconds=drain, log_level=log_level,
                                 src=src)
    if bridge.proc.poll() is None:
        kids.stop(bridge)
    return result


def _drain(kids: Children, old: Child, *, db: Path, seconds: float, log_level: str,
           src: str | None) -> dict[str, Any]:
    """Restart on the same outbox with a receiver that answers: backlog drain rate + RSS."""
    for child in list(kids.children):
        if child.name == "sink-hang":
            kids.stop(child)  # its dropped connections end the hanging sends at once
    kids.stop(old)
    sink = start_sink(kids, "sink-drain", "ok")
    config = bridge_config(free_port(), sink + "/hook", db)
    bridge, _ = start_bridge(kids, "bridge-drain", config, log_level, src)
    t0 = time.time()
    peak = 0
    while time.time() < t0 + seconds:
        peak = max(peak, proc_status_kb(bridge.pid, "VmHWM") or 0)
        time.sleep(0.1)
    peak = max(peak, proc_status_kb(bridge.pid, "VmHWM") or 0)
    stats = http_json(sink + f"/stats?t0={t0}&t1={t0 + seconds}")
    kids.stop(bridge)
    return {"seconds": seconds, "delivered": stats["count"],
            "deliveries_per_s": round(stats["count"] / seconds, 1),
            "peak_rss_mb": round(peak / 1024, 1)}


def backlog_rows(result: dict[str, Any]) -> list[Row]:
    mode = result["mode"]
    pending = result["outbox"].get("pending", 0)
    peak = result["peak_rss_mb"]
    ok = pending >= result["target_pending"] and peak <= RSS_LIMIT_MB
    rows = [Row(
        figure=f"peak RSS, {pending:,} pending (receiver {mode})",
        target=f"<= {RSS_LIMIT_MB:.0f} MB at >= {result['target_pending']:,}",
        measured=fmt(peak, 1, "MB"), ratio=f"{peak / RSS_LIMIT_MB:.0%} of limit",
        verdict="PASS" if ok else "FAIL")]
    drain = result.get("drain")
    if drain:
        rows.append(Row(figure="deliveries/s draining that backlog (restarted)",
                        measured=fmt(drain["deliveries_per_s"], 0)))
        rows.append(Row(figure="peak RSS while draining it",
                        target=f"<= {RSS_LIMIT_MB:.0f} MB",
                        measured=fmt(drain["peak_rss_mb"], 1, "MB"),
                        verdict="PASS" if drain["peak_rss_mb"] <= RSS_LIMIT_MB else "FAIL"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--mode", choices=("503", "hang"), action="append",
                        help="receiver behaviour; repeat for both (default: 503 and hang)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--drain", type=float, default=10.0,
                        help="hang mode: seconds of draining after a restart (0: skip)")
    parser.add_argument("--log-level", default="INFO", help="the bridge's (default INFO)")
    parser.add_argument("--data-dir", help="where the temporary outbox lives (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, db)")
    parser.add_argument("--rev", help="benchmark this git revision's bridge/ (e.g. HEAD)")
    parser.add_argument("--bridge-src", help="benchmark the bridge/ package in this folder")
    args = parser.parse_args()
    results = []
    with work_dir(args.keep, args.data_dir) as workdir, children_in(workdir) as kids:
        src = bridge_source(kids, args.rev, args.bridge_src)
        for n, mode in enumerate(args.mode or ["503", "hang"]):
            print(f"filling the outbox to {args.pending:,} pending (receiver {mode}) ...",
                  file=sys.stderr)
            results.append(run_backlog(kids, pending=args.pending, mode=mode,
                                       concurrency=args.concurrency, drain=args.drain,
                                       log_level=args.log_level, prefix=90 + n, src=src))
    rows = [row for r in results for row in backlog_rows(r)]
    print_table(rows)
    path = write_results("rss_backlog", {"machine": machine_info(), "args": vars(args),
                                         "results": results,
                                         "table": [r.__dict__ for r in rows]})
    print(f"\nraw figures: {path}")
    return 0 if all(r.verdict != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
