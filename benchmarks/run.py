"""The benchmark suite: `bridge serve` against its ceilings, on this machine, in one run.

    .venv/bin/python benchmarks/run.py [--duration 10] [--concurrency 32] [--no-backlog]

Phases, each process on its own (loads never share an event loop with what they measure):
 1. sink ceiling: a bare aiohttp client posts envelope-shaped bodies to the counting sink
    at the HTTP sink's concurrency (8).
 2. intake ceiling: the load generator posts 10-item isendu batches at `--concurrency` to a
    bare aiohttp app that parses the JSON and answers 200; a probe times verifications.
 3. bridge under saturation: the same load and probe against `bridge serve` (SQLite outbox,
    HTTP sink -> the counting sink); then the load stops and the backlog drains for
    `--drain` seconds: deliveries/s with the dispatcher alone.
 4. bridge paced: a fresh bridge gets batches at a fixed rate that its dispatcher can keep
    up with (`--paced-load` x the drain rate): end-to-end latency without a backlog.
 5. backlog RSS (rss_backlog.py): peak RSS with 100,000 deliveries pending.
Prints the results table and writes every raw figure to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    BARE_APP,
    HOST,
    PYTHON,
    REPO,
    SINK_SERVER,
    WEBHOOK_PATH,
    Child,
    Children,
    ForeignCpu,
    Row,
    bridge_config,
    bridge_source,
    children_in,
    cpu_seconds,
    depths,
    fmt,
    free_port,
    http_json,
    loadgen_argv,
    machine_info,
    print_table,
    proc_status_kb,
    routes_per_item,
    run_json,
    run_main,
    start_bridge,
    stored_deliveries,
    wait_ready,
    work_dir,
    write_results,
)
from rss_backlog import backlog_rows, run_backlog

INTAKE_RATIO = 0.50  # accepted batches/s >= 50% of the bare app's
VERIFY_P99_MS = 50.0
DELIVERY_RATIO = 0.40  # deliveries/s >= 40% of the bare client's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per load")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--concurrency", type=int, default=32, help="batches in flight")
    p.add_argument("--items", type=int, default=10, help="items per batch")
    p.add_argument("--sink-concurrency", type=int, default=8, help="the HTTP sink's")
    p.add_argument("--intake-concurrency", type=int, default=None,
                   help="the bridge's server.intake_concurrency (default: its own default)")
    p.add_argument("--drain", type=float, default=10.0, help="seconds of backlog draining")
    p.add_argument("--paced-load", type=float, default=0.5,
                   help="paced phase rate as a fraction of the measured drain rate")
    p.add_argument("--verify-interval", type=float, default=0.02, help="seconds between probes")
    p.add_argument("--backlog", type=int, default=100_000, help="pending deliveries for RSS")
    p.add_argument("--backlog-mode", choices=("503", "hang"), action="append",
                   help="receiver behaviour in the RSS phase; repeat for both (default: both)")
    p.add_argument("--no-backlog", action="store_true", help="skip the RSS backlog phase")
    p.add_argument("--log-level", default="INFO", help="the bridge's (default INFO, as shipped)")
    p.add_argument("--data-dir", help="where temporary outboxes live (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs, db)")
    p.add_argument("--rev", help="benchmark this git revision's bridge/ (e.g. HEAD), exported "
                   "read-only with git archive; default: the installed (working) tree")
    p.add_argument("--bridge-src", help="benchmark the bridge/ package in this folder")
    return p.parse_args()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, kids: Children, args: argparse.Namespace) -> None:
        self.kids = kids
        self.args = args
        self.sink = ""
        self.src = bridge_source(kids, args.rev, args.bridge_src)
        self.per_item = 2.0  # set from bridge dry-run before any load

    def intake_argv(self, url: str, prefix: int, rate: float = 0.0) -> list[str]:
        a = self.args
        return loadgen_argv("intake", url, "--concurrency", str(a.concurrency),
                            "--duration", str(a.duration), "--warmup", str(a.warmup),
                            "--items", str(a.items), "--prefix", str(prefix),
                            "--rate", str(rate))

    def verify_argv(self, url: str) -> list[str]:
        a = self.args
        return loadgen_argv("verify", url, "--duration", str(a.duration), "--delay",
                            str(a.warmup), "--interval", str(a.verify_interval))

    def start_sink(self) -> None:
        port = free_port()
        child = self.kids.start("sink", [PYTHON, SINK_SERVER, "--port", str(port)])
        self.sink = f"http://{HOST}:{port}"
        wait_ready(self.sink + "/healthz", child)

    def sink_stats(self, t0: float = 0.0, t1: float = 1e12) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(self.sink + f"/stats?t0={t0}&t1={t1}")
        return stats

    def reset_sink(self) -> None:
        http_json(self.sink + "/reset", data=b"")

    # ---- ceilings ----------------------------------------------------------------------

    def sink_ceiling(self) -> dict[str, Any]:
        a = self.args
        say(f"sink ceiling: bare aiohttp client, concurrency {a.sink_concurrency}")
        result, _ = run_json(self.kids, "loadgen-sinkclient", loadgen_argv(
            "sinkclient", self.sink + "/hook", "--concurrency", str(a.sink_concurrency),
            "--duration", str(a.duration), "--warmup", str(a.warmup)),
            timeout=a.duration + a.warmup + 60)
        self.reset_sink()
        return result

    def intake_ceiling(self) -> dict[str, Any]:
        a = self.args
        say(f"intake ceiling: bare aiohttp app, concurrency {a.concurrency}")
        port = free_port()
        bare = self.kids.start("bare-app", [PYTHON, BARE_APP, "--port", str(port),
                                            "--path", WEBHOOK_PATH])
        url = f"http://{HOST}:{port}"
        wait_ready(url + "/healthz", bare)
        result = self.load_with_probe(url + WEBHOOK_PATH, prefix=1, watch=bare)
        self.kids.stop(bare)
        return result

    def load_with_probe(self, url: str, prefix: int, watch: Child) -> dict[str, Any]:
        """Closed-loop load with the verification probe running beside it."""
        a = self.args
        with open(self.kids.workdir / f"verify-{prefix}.json", "wb") as out:
            probe = self.kids.start(f"verify-{prefix}", self.verify_argv(url), stdout=out)
            cpu0, wall0 = cpu_seconds(watch.pid) or 0.0, time.monotonic()
            load, peaks = run_json(self.kids, f"loadgen-intake-{prefix}",
                                   self.intake_argv(url, prefix),
                                   timeout=a.duration + a.warmup + 120, watch=[watch.pid])
            cpu1, wall1 = cpu_seconds(watch.pid) or 0.0, time.monotonic()
            probe.proc.wait(timeout=30)
            self.kids.stop(probe)
        verify = json.loads((self.kids.workdir / f"verify-{prefix}.json").read_text())
        return {"load": load, "verify": verify,
                "server_cpu_percent": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
                "server_peak_rss_mb": round(peaks.get(watch.pid, 0) / 1024, 1)}

    # ---- the bridge --------------------------------------------------------------------

    def config(self, name: str) -> str:
        db = self.kids.workdir / name / "bridge.db"
        return bridge_config(free_port(), self.sink + "/hook", db,
                             sink_concurrency=self.args.sink_concurrency,
                             intake_concurrency=self.args.intake_concurrency)

    def routes_per_item(self) -> dict[str, Any]:
        """What `bridge dry-run` says the load's item mix fans out to."""
        return routes_per_item(self.kids.workdir, self.config("dry-run"), self.src)

    def bridge_saturated(self) -> dict[str, Any]:
        a = self.args
        say(f"bridge under saturation: concurrency {a.concurrency}, then {a.drain:g}s drain")
        self.reset_sink()
        bridge, base = start_bridge(self.kids, "bridge-saturated", self.config("saturated"),
                                    a.log_level, self.src)
        result = self.load_with_probe(base + WEBHOOK_PATH, prefix=2, watch=bridge)
        load = result["load"]
        result["sink_during_load"] = self.sink_stats(load["window_start"], load["window_end"])
        result["drain"] = self.drain(base, load)
        result["deliveries_made"] = result["drain"]["deliveries_made"]
        result["peak_rss_mb"] = round((proc_status_kb(bridge.pid, "VmHWM") or 0) / 1024, 1)
        self.kids.stop(bridge)
        return result

    def expected(self, base: str, load: dict[str, Any]) -> tuple[int, bool]:
        """(deliveries the load made, exact?): from the answers (a bridge before the inbox),
        else the outbox's rows plus, while batches still wait in the inbox, their share
        estimated from bridge dry-run (exact once the inbox is empty)."""
        if load.get("deliveries_reported", True):
            return int(load["deliveries_total"]), True
        d = depths(base)
        waiting = d["inbox"].get("waiting", 0)
        estimate = waiting * load["items_per_batch"] * self.per_item
        return sum(d["outbox"].values()) + round(estimate), waiting == 0

    def drain(self, base: str, load: dict[str, Any]) -> dict[str, Any]:
        """Deliveries/s once intake stopped: the dispatcher (and, with the inbox, the
        sequencer finishing what waits) from a deep backlog."""
        load_end = load["end_unix"]
        until = load_end + self.args.drain
        foreign = ForeignCpu()
        expected, exact = self.expected(base, load)
        while time.time() < until:
            if exact and self.sink_stats()["total"] >= expected:
                break  # drained before the window closed
            time.sleep(0.5)
            foreign.sample()
            if not exact:
                expected, exact = self.expected(base, load)
        stats = self.sink_stats(load_end, until)
        span = until - load_end
        if exact and stats["total"] >= expected and stats["last"] is not None:
            span = max(1e-3, stats["last"] - load_end)
        if not exact:
            expected, exact = self.expected(base, load)
        return {"window_seconds": round(span, 3), "delivered": stats["count"],
                "deliveries_per_s": stats["count"] / span, "backlog_left":
                expected - self.sink_stats()["total"], "e2e": stats["e2e"],
                "deliveries_made": expected, "deliveries_exact": exact,
                "foreign_cpu_percent": foreign.percent()}

    def bridge_paced(self, rate: float) -> dict[str, Any]:
        a = self.args
        say(f"bridge paced: {rate:,.0f} batches/s for end-to-end latency without a backlog")
        self.reset_sink()
        bridge, base = start_bridge(self.kids, "bridge-paced", self.config("paced"),
                                    a.log_level, self.src)
        load, _ = run_json(self.kids, "loadgen-paced",
                           self.intake_argv(base + WEBHOOK_PATH, prefix=3, rate=rate),
                           timeout=a.duration + a.warmup + 120)
        made, _ = stored_deliveries(base, load, timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and self.sink_stats()["total"] < made:
            time.sleep(0.25)
        stats = self.sink_stats(load["window_start"], 1e12)
        self.kids.stop(bridge)
        return {"rate": rate, "load": load, "sink": stats, "deliveries_made": made,
                "undelivered": made - self.sink_stats()["total"]}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": machine_info(), "args": vars(args),
        "bridge": _describe_source(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with children_in(workdir) as kids:
        bench = Bench(kids, args)
        bench.start_sink()
        out["routes"] = bench.routes_per_item()
        bench.per_item = out["routes"]["per_item"]
        say(f"routes per item (bridge dry-run): {bench.per_item}")
        out["sink_ceiling"] = bench.sink_ceiling()
        out["intake_ceiling"] = bench.intake_ceiling()
        out["saturated"] = bench.bridge_saturated()
        load = out["saturated"]["load"]
        per_batch = out["saturated"]["deliveries_made"] / max(1, load["requests_total"])
        rate = args.paced_load * out["saturated"]["drain"]["deliveries_per_s"] / max(1.0, per_batch)
        out["paced"] = bench.bridge_paced(max(1.0, round(rate)))
        if not args.no_backlog:
            out["backlog"] = []
            for n, mode in enumerate(args.backlog_mode or ["503", "hang"]):
                say(f"backlog RSS: filling to {args.backlog:,} pending (receiver {mode})")
                out["backlog"].append(run_backlog(
                    kids, pending=args.backlog, mode=mode, concurrency=args.concurrency,
                    drain=args.drain, log_level=args.log_level, prefix=90 + n,
                    src=bench.src, per_item=bench.per_item))
    return out


def _describe_source(args: argparse.Namespace) -> str:
    if args.bridge_src:
        return f"folder {args.bridge_src}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", args.rev or "HEAD"],
                                capture_output=True, text=True, cwd=REPO, timeout=10
                                ).stdout.strip()
    except OSError:
        commit = "?"
    if args.rev:
        return f"git {args.rev} ({commit})"
    return f"installed working tree (HEAD {commit}, plus any uncommitted changes)"


def _ratio_row(figure: str, measured: float, ceiling: float, need: float, what: str,
               digits: int = 0) -> Row:
    ratio = measured / ceiling if ceiling else 0.0
    return Row(figure=figure, target=f">= {need:.0%} of {what}", measured=fmt(measured, digits),
               ceiling=fmt(ceiling, digits), ratio=f"{ratio:.0%}",
               verdict="PASS" if ratio >= need else "FAIL")


def table(r: dict[str, Any]) -> list[Row]:
    bare, bridge, paced = r["intake_ceiling"], r["saturated"], r["paced"]
    bl, bb = bridge["load"], bare["load"]
    v99 = bridge["verify"]["latency"]["p99_ms"]
    sink_s = bridge["sink_during_load"]
    measured_s = bl["measured_seconds"]
    rows = [
        _ratio_row("accepted batches/s", bl["accepted_per_s"], bb["accepted_per_s"],
                   INTAKE_RATIO, "bare app"),
        Row(figure="ack latency p50 / p99", measured=_pair(bl["ack"]),
            ceiling=_pair(bb["ack"]) + " (bare)"),
        Row(figure="verification p99 under load", target=f"<= {VERIFY_P99_MS:.0f} ms",
            measured=fmt(v99, 1, "ms"),
            ceiling=fmt(bare["verify"]["latency"]["p99_ms"], 1, "ms") + " (bare)",
            verdict="PASS" if v99 is not None and v99 <= VERIFY_P99_MS
            and not bridge["verify"]["failures"] else "FAIL"),
        _ratio_row("deliveries/s (drain, intake stopped)",
                   bridge["drain"]["deliveries_per_s"], r["sink_ceiling"]["sent_per_s"],
                   DELIVERY_RATIO, "bare client"),
        Row(figure="deliveries/s (while intake saturated)",
            measured=fmt(sink_s["count"] / measured_s if measured_s else None),
            ceiling=fmt(r["sink_ceiling"]["sent_per_s"]) + " (bare client)"),
        Row(figure=f"end-to-end p50 / p99 (paced {paced['rate']:,.0f} batches/s)",
            measured=_pair(paced["sink"]["e2e"])),
        Row(figure="end-to-end p99 (while intake saturated)",
            measured=fmt(sink_s["e2e"]["p99_ms"], 0, "ms")),
        Row(figure="peak RSS (saturation run)", measured=fmt(bridge["peak_rss_mb"], 1, "MB"),
            ceiling=fmt(bare["server_peak_rss_mb"], 1, "MB") + " (bare app)"),
    ]
    for backlog in r.get("backlog", []):
        rows += backlog_rows(backlog)
    return rows


def _pair(summary: dict[str, Any]) -> str:
    return f"{fmt(summary['p50_ms'], 1)} / {fmt(summary['p99_ms'], 1)} ms"


def notes(r: dict[str, Any]) -> list[str]:
    bl, bridge = r["saturated"]["load"], r["saturated"]
    per_batch = bridge["deliveries_made"] / max(1, bl["requests_total"])
    dups = (f"{bl['duplicates_total']} duplicates" if bl.get("deliveries_reported", True)
            else "counted from its /metrics (inbox)"
            + ("" if bridge["drain"]["deliveries_exact"] else
               ", estimated: batches were still waiting"))
    out = [
        f"batches of {r['args']['items']} items, {r['routes']['per_item']} routes/item "
        f"(bridge dry-run); the bridge stored {per_batch:.1f} deliveries/batch, {dups}",
        f"cpu: bridge {bridge['server_cpu_percent']}%, bare app "
        f"{r['intake_ceiling']['server_cpu_percent']}% of one core during their loads "
        f"({r['machine']['cpus']} cpus)",
        f"backlog after the saturation run's drain window: {bridge['drain']['backlog_left']:,} "
        "deliveries",
    ]
    foreign = {"sink ceiling": r["sink_ceiling"]["foreign_cpu_percent"],
               "intake ceiling": r["intake_ceiling"]["load"]["foreign_cpu_percent"],
               "bridge saturated": bl["foreign_cpu_percent"],
               "drain": bridge["drain"]["foreign_cpu_percent"],
               "bridge paced": r["paced"]["load"]["foreign_cpu_percent"]}
    out.append("other processes on the machine used (% of one cpu): " + ", ".join(
        f"{k} {v}%" for k, v in foreign.items())
        + ("  <- NOT QUIET: rerun" if max(foreign.values()) > 15 else ""))
    out.append(f"bridge: {r['bridge']}")
    bad = {k: v for k, v in bl["statuses"].items() if k != "200"}
    if bad or bl["errors"] or bridge["verify"]["failures"]:
        out.append(f"non-200 answers: {bad}, errors: {bl['errors']}, "
                   f"verification failures: {bridge['verify']['failures']}")
    return out


def main() -> int:
    args = parse_args()
    with work_dir(args.keep, args.data_dir) as workdir:
        results = run(args, workdir)
    rows = table(results)
    results["table"] = [row.__dict__ for row in rows]
    results["notes"] = notes(results)
    path = write_results("run", results)
    print()
    print_table(rows)
    print()
    for line in results["notes"]:
        print(f"- {line}")
    print(f"\nraw figures: {path.relative_to(REPO)}")
    return 0 if all(row.verdict != "FAIL" for row in rows) else 1


if __name__ == "__main__":
    run_main(main)
