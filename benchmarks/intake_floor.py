"""Where the intake's time goes: the bridge's intake beside durable floors, same load.

    .venv/bin/python benchmarks/intake_floor.py [--rounds 3] [--duration 8]

Each round runs the same closed-loop load (10-item batches, concurrency 32) against:
 - `bare`: benchmarks/bare_app.py, which parses the JSON and answers 200 (the ceiling);
 - `durable-app`: benchmarks/durable_app.py, the issue's "minimal aiohttp app that parses,
   validates and writes each batch as one SQLite row with group commit and fsync": the
   floor any durable intake in Python on this machine stands on;
 - `durable-small-row`: the same app storing only the first 100 bytes of each body: what
   the body's size costs that floor;
 - `intake-memory`: `bridge serve` on `memory://` with only its intake running
   (benchmarks/intake_only_serve.py: no sequencer, no dispatcher): everything the bridge's
   intake does but the SQLite row;
 - `intake-sqlite`: the same on SQLite (WAL, synchronous=FULL): the bridge's intake alone;
 - `bridge`: the real `bridge serve` on SQLite, its sequencer routing the benchmark's seven
   routes (~20 deliveries a batch) and its dispatcher running, as a burst meets it.
The receiver hangs (no send ever finishes), so deliveries pile up instead of being sent.
For each: accepted batches/s, its share of the bare app's in the same round, and the
server's CPU per batch (all its threads). The rounds alternate, so drift hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    BARE_APP,
    HOST,
    PYTHON,
    SINK_SERVER,
    WEBHOOK_PATH,
    Children,
    bridge_config,
    bridge_source,
    children_in,
    cpu_seconds,
    free_port,
    loadgen_argv,
    run_json,
    run_main,
    start_bridge,
    wait_ready,
    work_dir,
    write_results,
)

DURABLE_APP = str(Path(__file__).resolve().with_name("durable_app.py"))
INTAKE_ONLY = str(Path(__file__).resolve().with_name("intake_only_serve.py"))
VARIANTS = ("bare", "durable-app", "durable-small-row", "intake-memory", "intake-sqlite",
            "bridge")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per load")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--data-dir", help="where the SQLite outboxes live (default: $TMPDIR)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (bare is always run)")
    p.add_argument("--rev", help="this git revision's bridge/ (e.g. HEAD) instead of the "
                   "installed working tree")
    return p.parse_args()


def variant_config(name: str, port: int, sink_url: str, kids: Children, n: int) -> str:
    text = bridge_config(port, sink_url, kids.workdir / f"{name}-{n}" / "bridge.db")
    if name == "intake-memory":
        lines = [ln if not ln.startswith("storage:") else "storage: memory://"
                 for ln in text.splitlines()]
        text = "\n".join(lines) + "\n"
    return text


def start_server(kids: Children, name: str, n: int, sink_url: str, src: str | None
                 ) -> tuple[Any, str]:
    port = free_port()
    base = f"http://{HOST}:{port}"
    if name in ("bare", "durable-app", "durable-small-row"):
        argv = [PYTHON, BARE_APP if name == "bare" else DURABLE_APP, "--port", str(port),
                "--path", WEBHOOK_PATH]
        if name != "bare":
            argv += ["--db", str(kids.workdir / f"{name}-{n}.db")]
        if name == "durable-small-row":
            argv += ["--row-bytes", "100"]
        server = kids.start(f"{name}-{n}", argv)
        wait_ready(base + "/healthz", server)
        return server, base
    if name == "bridge":
        return start_bridge(kids, f"{name}-{n}", variant_config(name, port, sink_url, kids, n),
                            "INFO", src)
    cfg = kids.workdir / f"{name}-{n}.yaml"
    cfg.write_text(variant_config(name, port, sink_url, kids, n))
    server = kids.start(f"{name}-{n}", [PYTHON, INTAKE_ONLY, "--log-level", "INFO", "serve",
                                        "--config", str(cfg)],
                        env={"PYTHONPATH": src} if src else None)
    wait_ready(base + "/readyz", server)
    return server, base


def measure(kids: Children, args: argparse.Namespace, name: str, sink_url: str,
            n: int, src: str | None) -> dict[str, Any]:
    server, base = start_server(kids, name, n, sink_url, src)
    cpu0 = cpu_seconds(server.pid) or 0.0
    load, _ = run_json(kids, f"load-{name}-{n}", loadgen_argv(
        "intake", base + WEBHOOK_PATH, "--concurrency", str(args.concurrency), "--duration",
        str(args.duration), "--warmup", str(args.warmup), "--prefix", str(100 + n)),
        timeout=args.duration + args.warmup + 120)
    cpu1 = cpu_seconds(server.pid) or 0.0
    kids.stop(server)
    if load["statuses"].keys() - {"200"} or load["errors"]:
        raise RuntimeError(f"{name}: non-200 answers {load['statuses']} {load['errors']}")
    return {"accepted_per_s": load["accepted_per_s"],
            "cpu_us_per_batch": 1e6 * (cpu1 - cpu0) / max(1, load["requests_total"]),
            "foreign_cpu_percent": load["foreign_cpu_percent"]}


def main() -> int:
    args = parse_args()
    rounds: list[dict[str, dict[str, Any]]] = []
    with work_dir(False, args.data_dir) as workdir, children_in(workdir) as kids:
        sink_port = free_port()
        sink = kids.start("sink", [PYTHON, SINK_SERVER, "--port", str(sink_port),
                                   "--mode", "hang"])
        sink_url = f"http://{HOST}:{sink_port}"
        wait_ready(sink_url + "/healthz", sink)
        src = bridge_source(kids, args.rev, None)
        chosen = ["bare"] + [v for v in VARIANTS[1:] if v in args.variants.split(",")]
        for n in range(args.rounds):
            this: dict[str, dict[str, Any]] = {}
            for name in chosen:
                print(f"[{time.strftime('%H:%M:%S')}] round {n + 1}: {name}", file=sys.stderr,
                      flush=True)
                this[name] = measure(kids, args, name, sink_url + "/hook", n, src)
            rounds.append(this)
    print(f"\n{'variant':17s} {'batches/s per round':>28s} {'of bare (median)':>17s} "
          f"{'cpu us/batch (median)':>22s}")
    for name in chosen:
        rates = [r[name]["accepted_per_s"] for r in rounds]
        shares = [r[name]["accepted_per_s"] / r["bare"]["accepted_per_s"] for r in rounds]
        cpu = statistics.median(r[name]["cpu_us_per_batch"] for r in rounds)
        print(f"{name:17s} {' / '.join(f'{x:,.0f}' for x in rates):>28s} "
              f"{statistics.median(shares):>17.0%} {cpu:>22,.0f}")
    foreign = max(v["foreign_cpu_percent"] for r in rounds for v in r.values())
    print(f"\nother processes used at most {foreign}% of one cpu during any load"
          + ("  <- NOT QUIET: rerun" if foreign > 15 else ""))
    path = write_results("intake-floor", {"args": vars(args), "rounds": rounds,
                                          "bridge": args.rev or "installed working tree"})
    print(f"raw figures: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
