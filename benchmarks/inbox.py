"""The inbox-first intake against its ceilings and against the design before it, in one run.

    .venv/bin/python benchmarks/inbox.py [--old-rev 29d60bf] [--burst 3000] [--window 60]

Phases (every process on its own; each figure's ceiling is measured in this run):
 1. routes: `bridge dry-run` of the sample mix with both revisions: deliveries per item (~2).
 2. sink ceiling: a bare aiohttp client posting to the counting sink (`loadgen.py sinkclient`).
 3. burst, bare app: `--burst` batches of `--items` at `--concurrency`, the verification
    probe beside it (bare_app.py).
 4. burst, new bridge (the installed tree, or `--bridge-src`), then old bridge (`--old-rev`),
    each fresh: the same burst and probe; then the sink counts until every delivery the
    burst made has arrived: first POST -> last delivery, and deliveries/s after the last 200.
 5. sustained: fresh new bridges get paced batches for `--window` seconds each, the inbox's
    waiting batches sampled from /metrics; the highest rate at which it does not grow,
    against the old revision's accepted batches/s from phase 4.
 6. inbox backlog: `--inbox-backlog` batches appended to a SQLite inbox through the bridge's
    own Store.append (prefill_inbox.py), then `bridge serve` on it: peak RSS (VmHWM) while
    it sequences them all.
 7. delivery backlog (rss_backlog.py): peak RSS with `--backlog` deliveries pending.
Prints the table and writes every raw figure to benchmarks/results/inbox-<time>.json.
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
    BENCH_DIR,
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
    latency_summary,
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
from rss_backlog import RSS_LIMIT_MB, backlog_rows, run_backlog

OLD_REV = "29d60bf"  # the last commit before the inbox
INTAKE_RATIO = 0.50  # accepted batches/s >= 50% of the bare app's
ACK_P99_FACTOR = 4.0  # ack p99 <= 4x the bare app's
VERIFY_P99_MS = 50.0
DELIVERY_RATIO = 0.40  # deliveries/s >= 40% of the bare client's
FAN_OUT = (1.5, 2.5)  # "about 2 deliveries per item"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--burst", type=int, default=3000, help="batches in the burst")
    p.add_argument("--concurrency", type=int, default=32, help="batches in flight (burst)")
    p.add_argument("--items", type=int, default=10, help="items per batch")
    p.add_argument("--sink-concurrency", type=int, default=8, help="the HTTP sink's")
    p.add_argument("--verify-interval", type=float, default=0.02, help="seconds between probes")
    p.add_argument("--settle-timeout", type=float, default=900.0,
                   help="seconds to wait for a burst's last delivery")
    p.add_argument("--sink-duration", type=float, default=10.0,
                   help="measured seconds of the sink ceiling")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds each sustained rate is held (quick runs: less)")
    p.add_argument("--sample-every", type=float, default=5.0,
                   help="seconds between /metrics samples of the inbox (sustained, inbox "
                   "backlog); each is a scrape that counts the outbox, a cost to the bridge")
    p.add_argument("--growth-slack", type=float, default=1.0,
                   help="sustained: the inbox may gain at most this many seconds' worth of "
                   "arrivals over the window and still count as not growing")
    p.add_argument("--rates", type=float, nargs="+",
                   help="sustained: these batches/s instead of the search from the old "
                   "revision's accepted batches/s")
    p.add_argument("--steps", type=int, default=4, help="sustained: most rates tried")
    p.add_argument("--sustain-concurrency", type=int, default=256,
                   help="sustained: most batches in flight while pacing")
    p.add_argument("--no-sustained", action="store_true", help="skip phase 5")
    p.add_argument("--inbox-backlog", type=int, default=100_000,
                   help="batches waiting in the inbox for its RSS phase (0: skip)")
    p.add_argument("--inbox-backlog-receiver", choices=("ok", "503", "hang"), default="ok",
                   help="the sink's receiver while that backlog is sequenced")
    p.add_argument("--backlog", type=int, default=100_000,
                   help="pending deliveries for the delivery-backlog RSS phase")
    p.add_argument("--backlog-mode", choices=("503", "hang"), action="append",
                   help="receiver in the delivery-backlog phase; repeat for both "
                   "(default: both)")
    p.add_argument("--no-backlog", action="store_true", help="skip phase 7")
    p.add_argument("--drain", type=float, default=10.0,
                   help="phase 7, receiver hang: seconds of draining after a restart")
    p.add_argument("--log-level", default="INFO", help="the bridges' (default INFO, as shipped)")
    p.add_argument("--data-dir", help="where temporary storage lives (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs, db)")
    p.add_argument("--old-rev", default=OLD_REV,
                   help=f"the design before the inbox, exported with git archive ({OLD_REV})")
    p.add_argument("--rev", help="benchmark this git revision as the new bridge (default: "
                   "the installed working tree)")
    p.add_argument("--bridge-src", help="benchmark the bridge/ package in this folder as new")
    return p.parse_args()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, kids: Children, args: argparse.Namespace) -> None:
        self.kids = kids
        self.args = args
        self.sink = ""
        self.new_src = bridge_source(kids, args.rev, args.bridge_src)
        self.old_src = _export(kids, args.old_rev, "src-old")
        self.n = 0  # makes every load's bodies unique

    def prefix(self) -> int:
        self.n += 1
        return self.n

    # ---- helpers -----------------------------------------------------------------------

    def start_sink(self) -> None:
        port = free_port()
        child = self.kids.start("sink", [PYTHON, SINK_SERVER, "--port", str(port)])
        self.sink = f"http://{HOST}:{port}"
        wait_ready(self.sink + "/healthz", child)

    def sink_stats(self, t0: float = 0.0, t1: float = 1e12) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(self.sink + f"/stats?t0={t0}&t1={t1}")
        return stats

    def config(self, name: str) -> str:
        db = self.kids.workdir / name / "bridge.db"
        return bridge_config(free_port(), self.sink + "/hook", db,
                             sink_concurrency=self.args.sink_concurrency)

    def burst(self, url: str, name: str, watch: Child) -> dict[str, Any]:
        """The burst with the verification probe beside it, cut to the burst's window."""
        a = self.args
        stop = self.kids.workdir / f"stop-{name}"
        with open(self.kids.workdir / f"verify-{name}.json", "wb") as out:
            probe = self.kids.start(f"verify-{name}", loadgen_argv(
                "verify", url, "--duration", "3600", "--interval", str(a.verify_interval),
                "--stop-file", str(stop)), stdout=out)
            time.sleep(0.5)  # the probe is running before the first batch goes out
            cpu0, wall0 = cpu_seconds(watch.pid) or 0.0, time.monotonic()
            load, peaks = run_json(self.kids, f"loadgen-{name}", loadgen_argv(
                "intake", url, "--concurrency", str(a.concurrency), "--burst", str(a.burst),
                "--warmup", "0", "--duration", "3600", "--items", str(a.items),
                "--prefix", str(self.prefix())), timeout=a.settle_timeout, watch=[watch.pid])
            cpu1, wall1 = cpu_seconds(watch.pid) or 0.0, time.monotonic()
            stop.touch()
            probe.proc.wait(timeout=30)
            self.kids.stop(probe)
        verify = json.loads((self.kids.workdir / f"verify-{name}.json").read_text())
        t0, t1 = load["first_post_unix"] or 0.0, load["last_answer_unix"] or 0.0
        during = [lat for start, lat in verify.pop("samples") if t0 <= start <= t1]
        verify["latency_all"] = verify.pop("latency")
        verify["latency"] = latency_summary(during)
        return {"load": load, "verify": verify,
                "server_cpu_percent": round(100 * (cpu1 - cpu0) / max(1e-6, wall1 - wall0), 1),
                "server_peak_rss_mb": round(peaks.get(watch.pid, 0) / 1024, 1)}

    # ---- phases ------------------------------------------------------------------------

    def sink_ceiling(self) -> dict[str, Any]:
        a = self.args
        say(f"sink ceiling: bare aiohttp client, concurrency {a.sink_concurrency}")
        result, _ = run_json(self.kids, "loadgen-sinkclient", loadgen_argv(
            "sinkclient", self.sink + "/hook", "--concurrency", str(a.sink_concurrency),
            "--duration", str(a.sink_duration), "--warmup", "1"),
            timeout=a.sink_duration + 60)
        http_json(self.sink + "/reset", data=b"")
        return result

    def bare_burst(self) -> dict[str, Any]:
        say(f"burst, bare app: {self.args.burst:,} batches at concurrency "
            f"{self.args.concurrency}")
        port = free_port()
        bare = self.kids.start("bare-app", [PYTHON, BARE_APP, "--port", str(port),
                                            "--path", WEBHOOK_PATH])
        url = f"http://{HOST}:{port}"
        wait_ready(url + "/healthz", bare)
        result = self.burst(url + WEBHOOK_PATH, "bare", bare)
        self.kids.stop(bare)
        return result

    def bridge_burst(self, which: str, src: str | None) -> dict[str, Any]:
        a = self.args
        say(f"burst, {which} bridge: {a.burst:,} batches at concurrency {a.concurrency}, "
            "then every delivery to the sink")
        http_json(self.sink + "/reset", data=b"")
        bridge, base = start_bridge(self.kids, f"bridge-burst-{which}",
                                    self.config(f"burst-{which}"), a.log_level, src)
        result = self.burst(base + WEBHOOK_PATH, which, bridge)
        load = result["load"]
        foreign = ForeignCpu()
        made, known_after = stored_deliveries(base, load, timeout=a.settle_timeout)
        deadline = time.time() + a.settle_timeout
        while self.sink_stats()["total"] < made and time.time() < deadline:
            time.sleep(0.2)
            foreign.sample()
        stats = self.sink_stats()
        after = self.sink_stats(load["last_answer_unix"], 1e12)
        last = stats["last_any"]
        result.update({
            "deliveries_made": made, "sequenced_after_s": round(known_after, 3),
            "delivered": stats["total"], "undelivered": made - stats["total"],
            "first_post_to_last_delivery_s": None if last is None or stats["total"] < made
            else round(last - load["first_post_unix"], 3),
            "after_last_ack": {"delivered": after["count"], "seconds": None if last is None
                               else round(last - load["last_answer_unix"], 3)},
            "settle_foreign_cpu_percent": foreign.percent(),
            "peak_rss_mb": round((proc_status_kb(bridge.pid, "VmHWM") or 0) / 1024, 1)})
        span = result["after_last_ack"]["seconds"]
        result["after_last_ack"]["deliveries_per_s"] = (
            after["count"] / span if span and span > 0 else None)
        self.kids.stop(bridge)
        return result

    def sustained(self, floor: float) -> list[dict[str, Any]]:
        """A few paced rates, each against a fresh bridge: does the inbox grow?"""
        a = self.args
        tried: list[dict[str, Any]] = []
        rates = list(a.rates) if a.rates else [max(1.0, round(floor))]
        while rates and len(tried) < a.steps:
            rate = rates.pop(0)
            tried.append(self.paced(rate))
            if a.rates:
                continue
            held = [t["rate"] for t in tried if t["held"]]
            failed = [t["rate"] for t in tried if not t["held"]]
            if tried[-1]["held"]:
                # Up: halfway to the lowest rate that failed, or half as much again.
                nxt = (rate + min(failed)) / 2 if failed else rate * 1.5
            else:
                nxt = (rate + max(held)) / 2 if held else rate * 0.6
            if abs(nxt - rate) / rate >= 0.1:
                rates.append(round(nxt))
        return tried

    def paced(self, rate: float) -> dict[str, Any]:
        a = self.args
        say(f"sustained: {rate:,.0f} batches/s for {a.window:g}s, inbox sampled every "
            f"{a.sample_every:g}s")
        bridge, base = start_bridge(self.kids, f"bridge-paced-{rate:.0f}",
                                    self.config(f"paced-{rate:.0f}"), a.log_level,
                                    self.new_src)
        name = f"loadgen-paced-{rate:.0f}"
        out_path = self.kids.workdir / f"{name}.json"
        foreign = ForeignCpu()
        samples: list[tuple[float, int]] = []
        with open(out_path, "wb") as out:
            gen = self.kids.start(name, loadgen_argv(
                "intake", base + WEBHOOK_PATH, "--rate", str(rate), "--concurrency",
                str(a.sustain_concurrency), "--warmup", "0", "--duration", str(a.window),
                "--items", str(a.items), "--prefix", str(self.prefix())), stdout=out)
            t0 = time.monotonic()
            next_sample = t0 + a.sample_every
            while gen.proc.poll() is None:
                if time.monotonic() >= next_sample:
                    next_sample += a.sample_every
                    waiting = depths(base)["inbox"].get("waiting", 0)
                    samples.append((round(time.monotonic() - t0, 2), waiting))
                    foreign.sample()
                if time.monotonic() > t0 + a.window + 120:
                    raise RuntimeError(f"{name} ran past {a.window + 120:.0f}s")
                time.sleep(0.05)
            self.kids.stop(gen)
        load: dict[str, Any] = json.loads(out_path.read_text())
        peak = round((proc_status_kb(bridge.pid, "VmHWM") or 0) / 1024, 1)
        self.kids.stop(bridge)
        growth = _growth(samples)
        slack = max(float(a.concurrency), a.growth_slack * rate)
        # Every 200 over first POST -> last answer: the window's own count would leave out
        # the batches still in flight when it closed (rate x ack latency of them).
        span = (load["last_answer_unix"] or 0.0) - (load["first_post_unix"] or 0.0)
        achieved = load["requests_total"] / span if span > 0 else 0.0
        bad = {k: v for k, v in load["statuses"].items() if k != "200"}
        if bad or load["errors"]:
            outcome = "refused"  # non-200 answers or client errors
        elif achieved < 0.95 * rate:
            outcome = "intake behind"  # the 200s themselves came slower than the pace
        elif growth is None:
            outcome = "too few samples"  # under 3: lower --sample-every or raise --window
        elif growth > slack:
            outcome = "inbox grew"
        else:
            outcome = "held"
        return {"rate": rate, "held": outcome == "held", "outcome": outcome,
                "achieved_per_s": achieved,
                "inbox_growth": growth, "slack": slack, "samples": samples,
                "ack": load["ack"], "statuses": load["statuses"], "errors": load["errors"],
                "peak_rss_mb": peak, "foreign_cpu_percent": foreign.percent()}

    def inbox_backlog(self) -> dict[str, Any]:
        a = self.args
        n = a.inbox_backlog
        say(f"inbox backlog: {n:,} batches appended through Store.append, then bridge serve "
            f"sequences them (receiver {a.inbox_backlog_receiver})")
        db = self.kids.workdir / "inbox-backlog" / "bridge.db"
        env = {"PYTHONPATH": self.new_src} if self.new_src else None
        fill, _ = run_json(self.kids, "prefill-inbox", [
            PYTHON, str(BENCH_DIR / "prefill_inbox.py"), str(db), "--batches", str(n),
            "--items", str(a.items)], timeout=3600, env=env)
        port = free_port()
        child = self.kids.start("sink-inbox-backlog", [
            PYTHON, SINK_SERVER, "--port", str(port), "--mode", a.inbox_backlog_receiver])
        sink = f"http://{HOST}:{port}"
        wait_ready(sink + "/healthz", child)
        config = bridge_config(free_port(), sink + "/hook", db, sink_timeout="3m",
                               sink_concurrency=a.sink_concurrency)
        started = time.monotonic()
        bridge, base = start_bridge(self.kids, "bridge-inbox-backlog", config, a.log_level,
                                    self.new_src)
        ready_at = time.monotonic()
        foreign = ForeignCpu()
        peak = 0
        waiting = n
        samples: list[tuple[float, int]] = []
        next_sample = time.monotonic()
        while waiting and time.monotonic() < started + a.settle_timeout:
            peak = max(peak, proc_status_kb(bridge.pid, "VmHWM") or 0)
            if time.monotonic() >= next_sample:
                next_sample += a.sample_every
                waiting = depths(base)["inbox"].get("waiting", 0)
                samples.append((round(time.monotonic() - ready_at, 2), waiting))
                foreign.sample()
            time.sleep(0.1)
        emptied = time.monotonic() - ready_at  # within --sample-every
        peak = max(peak, proc_status_kb(bridge.pid, "VmHWM") or 0)
        d = depths(base)
        self.kids.stop(bridge)
        self.kids.stop(child)
        return {"batches": n, "fill": fill, "receiver": a.inbox_backlog_receiver,
                "ready_after_s": round(ready_at - started, 2), "emptied": not waiting,
                "emptied_after_s": round(emptied, 2),
                "sequenced_per_s": n / emptied if not waiting and emptied > 0 else None,
                "peak_rss_mb": round(peak / 1024, 1), "depths_after": d,
                "samples": samples, "foreign_cpu_percent": foreign.percent()}


def _export(kids: Children, rev: str, folder: str) -> str:
    """A revision's bridge/ exported read-only into the work dir (git archive)."""
    dest = kids.workdir / folder
    dest.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "bridge"], cwd=REPO, check=True,
                             capture_output=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return str(dest)


def _growth(samples: list[tuple[float, int]]) -> float | None:
    """How many batches the inbox gained over the sampled span, by a least-squares line
    through (seconds, waiting): a sawtooth from the sequencer's takes averages out."""
    if len(samples) < 3:
        return None
    xs, ys = [s[0] for s in samples], [float(s[1]) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return round(slope * (xs[-1] - xs[0]), 1)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": machine_info(), "args": vars(args),
        "new_bridge": _describe(args.rev, args.bridge_src), "old_bridge": _describe(
            args.old_rev, None), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with children_in(workdir) as kids:
        bench = Bench(kids, args)
        bench.start_sink()
        out["routes"] = {
            "new": routes_per_item(workdir, bench.config("dry-run"), bench.new_src),
            "old": routes_per_item(workdir, bench.config("dry-run"), bench.old_src)}
        say(f"deliveries per item (bridge dry-run): new {out['routes']['new']['per_item']}, "
            f"old {out['routes']['old']['per_item']}")
        out["sink_ceiling"] = bench.sink_ceiling()
        out["bare"] = bench.bare_burst()
        out["new"] = bench.bridge_burst("new", bench.new_src)
        out["old"] = bench.bridge_burst("old", bench.old_src)
        if not args.no_sustained:
            out["sustained"] = bench.sustained(out["old"]["load"]["accepted_per_s"] or 1.0)
        if args.inbox_backlog:
            out["inbox_backlog"] = bench.inbox_backlog()
        if not args.no_backlog:
            out["backlog"] = []
            for n, mode in enumerate(args.backlog_mode or ["503", "hang"]):
                say(f"delivery backlog RSS: filling to {args.backlog:,} pending "
                    f"(receiver {mode})")
                out["backlog"].append(run_backlog(
                    kids, pending=args.backlog, mode=mode, concurrency=args.concurrency,
                    drain=args.drain, log_level=args.log_level, prefix=90 + n,
                    src=bench.new_src, per_item=out["routes"]["new"]["per_item"]))
    return out


def _describe(rev: str | None, src: str | None) -> str:
    if src:
        return f"folder {src}"
    commit = subprocess.run(["git", "rev-parse", "--short", rev or "HEAD"], capture_output=True,
                            text=True, cwd=REPO, timeout=10).stdout.strip() or "?"
    return f"git {rev} ({commit})" if rev else (
        f"installed working tree (HEAD {commit}, plus any uncommitted changes)")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(r: dict[str, Any]) -> list[Row]:
    bare, new, old = r["bare"], r["new"], r["old"]
    bl, nl, ol = bare["load"], new["load"], old["load"]
    n_items = f"{r['args']['burst']:,} x {r['args']['items']}"
    per_item = r["routes"]["new"]["per_item"]
    rows = [Row(figure="deliveries per item (bridge dry-run, new / old)",
                target=f"about 2 ({FAN_OUT[0]}-{FAN_OUT[1]})",
                measured=f"{per_item} / {r['routes']['old']['per_item']}",
                verdict=_verdict(FAN_OUT[0] <= per_item <= FAN_OUT[1]))]
    acc, acc_bare = nl["accepted_per_s"] or 0.0, bl["accepted_per_s"] or 0.0
    rows.append(Row(figure=f"accepted batches/s (burst {n_items})",
                    target=f">= {INTAKE_RATIO:.0%} of bare app", measured=fmt(acc),
                    ceiling=fmt(acc_bare) + " (bare)",
                    ratio=f"{acc / acc_bare:.0%}" if acc_bare else "-",
                    verdict=_verdict(nl["accepted"] == r["args"]["burst"]
                                     and acc >= INTAKE_RATIO * acc_bare)))
    p99, p99_bare = nl["ack"]["p99_ms"], bl["ack"]["p99_ms"]
    rows.append(Row(figure="ack latency p50 / p99 (burst)",
                    target=f"p99 <= {ACK_P99_FACTOR:g}x bare app's", measured=_pair(nl["ack"]),
                    ceiling=_pair(bl["ack"]) + " (bare)",
                    ratio=f"{p99 / p99_bare:.1f}x" if p99 and p99_bare else "-",
                    verdict=_verdict(p99 is not None and p99_bare is not None
                                     and p99 <= ACK_P99_FACTOR * p99_bare)))
    v = new["verify"]
    v99 = v["latency"]["p99_ms"]
    rows.append(Row(figure=f"verification p99 during the burst ({v['latency']['count']} probes)",
                    target=f"<= {VERIFY_P99_MS:.0f} ms", measured=fmt(v99, 1, "ms"),
                    ceiling=fmt(bare["verify"]["latency"]["p99_ms"], 1, "ms") + " (bare)",
                    verdict=_verdict(v99 is not None and v99 <= VERIFY_P99_MS
                                     and not v["failures"])))
    rows.append(Row(figure="old: accepted batches/s, ack p50 / p99 (burst)",
                    measured=f"{fmt(ol['accepted_per_s'])}, {_pair(ol['ack'])}"))
    e2e_new, e2e_old = new["first_post_to_last_delivery_s"], old["first_post_to_last_delivery_s"]
    rows.append(Row(figure="burst: first POST -> last delivery at the sink",
                    target="<= old design's", measured=fmt(e2e_new, 2, "s"),
                    ceiling=fmt(e2e_old, 2, "s") + " (old)",
                    ratio=f"{e2e_new / e2e_old:.0%}" if e2e_new and e2e_old else "-",
                    verdict=_verdict(e2e_new is not None and e2e_old is not None
                                     and e2e_new <= e2e_old)))
    sink_ceiling = r["sink_ceiling"]["sent_per_s"]
    drain_new = new["after_last_ack"]["deliveries_per_s"]
    rows.append(Row(figure="deliveries/s after the burst's last 200 (new)",
                    target=f">= {DELIVERY_RATIO:.0%} of bare client", measured=fmt(drain_new),
                    ceiling=fmt(sink_ceiling) + " (bare client)",
                    ratio=f"{drain_new / sink_ceiling:.0%}" if drain_new and sink_ceiling
                    else "-", verdict=_verdict(drain_new is not None
                                               and drain_new >= DELIVERY_RATIO * sink_ceiling)))
    rows.append(Row(figure="deliveries/s after the burst's last 200 (old)",
                    measured=fmt(old["after_last_ack"]["deliveries_per_s"]),
                    ceiling=fmt(sink_ceiling) + " (bare client)"))
    if "sustained" in r:
        tried = r["sustained"]
        held = [t["rate"] for t in tried if t["held"]]
        floor = ol["accepted_per_s"] or 0.0
        best = max(held) if held else None
        rows.append(Row(
            figure=f"sustained: highest rate the inbox holds over {r['args']['window']:g}s",
            target=">= old's accepted batches/s", measured=fmt(best, 0, "batches/s"),
            ceiling=fmt(floor) + " (old, burst)",
            ratio=f"{best / floor:.0%}" if best and floor else "-",
            verdict=_verdict(best is not None and best >= floor)))
        rows.append(Row(figure="sustained: rates tried (inbox growth, accepted/s)",
                        measured=", ".join(
                            f"{t['rate']:,.0f}: {t['outcome']} ({_signed(t['inbox_growth'])}, "
                            f"{fmt(t['achieved_per_s'])}/s)" for t in tried)))
    ib = r.get("inbox_backlog")
    if ib:
        rows.append(Row(figure=f"peak RSS, {ib['batches']:,} batches waiting in the inbox "
                        f"(sequencing them, receiver {ib['receiver']})",
                        target=f"<= {RSS_LIMIT_MB:.0f} MB",
                        measured=fmt(ib["peak_rss_mb"], 1, "MB"),
                        ratio=f"{ib['peak_rss_mb'] / RSS_LIMIT_MB:.0%} of limit",
                        verdict=_verdict(ib["emptied"] and ib["peak_rss_mb"] <= RSS_LIMIT_MB)))
        rows.append(Row(figure="that inbox: emptied after (from ready) / batches sequenced/s",
                        measured=f"{fmt(ib['emptied_after_s'], 1, 's')} / "
                        f"{fmt(ib['sequenced_per_s'])}"
                        + ("" if ib["emptied"] else " (NOT emptied)")))
    for backlog in r.get("backlog", []):
        rows += backlog_rows(backlog)
    rows.append(Row(figure="peak RSS during the burst (new / old)",
                    measured=f"{fmt(new['peak_rss_mb'], 1)} / {fmt(old['peak_rss_mb'], 1)} MB",
                    ceiling=fmt(bare["server_peak_rss_mb"], 1, "MB") + " (bare app)"))
    return rows


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+,.0f}"


def _pair(summary: dict[str, Any]) -> str:
    return f"{fmt(summary['p50_ms'], 1)} / {fmt(summary['p99_ms'], 1)} ms"


def notes(r: dict[str, Any]) -> list[str]:
    new, old = r["new"], r["old"]
    items = r["args"]["burst"] * r["args"]["items"]
    out = [f"burst of {r['args']['burst']:,} batches ({items:,} items): new made "
           f"{new['deliveries_made']:,} deliveries (counted from /metrics once its inbox "
           f"was empty, {new['sequenced_after_s']}s after the last 200), old "
           f"{old['deliveries_made']:,} (from its answers); dry-run predicts "
           f"{items * r['routes']['new']['per_item']:,.0f}",
           f"cpu during the burst: new {new['server_cpu_percent']}%, old "
           f"{old['server_cpu_percent']}%, bare app {r['bare']['server_cpu_percent']}% of one "
           f"core ({r['machine']['cpus']} cpus)"]
    for which in ("new", "old"):
        b = r[which]
        if b["undelivered"]:
            out.append(f"{which}: {b['undelivered']:,} deliveries never reached the sink "
                       f"within --settle-timeout")
        bad = {k: v for k, v in b["load"]["statuses"].items() if k != "200"}
        if bad or b["load"]["errors"] or b["verify"]["failures"]:
            out.append(f"{which}: non-200 answers {bad}, errors {b['load']['errors']}, "
                       f"verification failures {b['verify']['failures']}")
    foreign = {"sink ceiling": r["sink_ceiling"]["foreign_cpu_percent"],
               "bare burst": r["bare"]["load"]["foreign_cpu_percent"],
               "new burst": new["load"]["foreign_cpu_percent"],
               "new settle": new["settle_foreign_cpu_percent"],
               "old burst": old["load"]["foreign_cpu_percent"],
               "old settle": old["settle_foreign_cpu_percent"]}
    for t in r.get("sustained", []):
        foreign[f"sustained {t['rate']:,.0f}"] = t["foreign_cpu_percent"]
    if "inbox_backlog" in r:
        foreign["inbox backlog"] = r["inbox_backlog"]["foreign_cpu_percent"]
    out.append("other processes on the machine used (% of one cpu): " + ", ".join(
        f"{k} {v}%" for k, v in foreign.items())
        + ("  <- NOT QUIET: rerun" if max(foreign.values()) > 15 else ""))
    out.append(f"new bridge: {r['new_bridge']}; old bridge: {r['old_bridge']}")
    return out


def main() -> int:
    args = parse_args()
    with work_dir(args.keep, args.data_dir) as workdir:
        results = run(args, workdir)
    rows = table(results)
    results["table"] = [row.__dict__ for row in rows]
    results["notes"] = notes(results)
    path = write_results("inbox", results)
    print()
    print_table(rows)
    print()
    for line in results["notes"]:
        print(f"- {line}")
    print(f"\nraw figures: {path.relative_to(REPO)}")
    return 0 if all(row.verdict != "FAIL" for row in rows) else 1


if __name__ == "__main__":
    run_main(main)
