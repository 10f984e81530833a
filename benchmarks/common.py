"""What every benchmark shares: realistic isendu bodies, child processes, /proc readings,
percentiles and the results table.

Imported by run.py, rss_backlog.py and the helper processes (loadgen.py, sink_server.py,
bare_app.py), which all live in this folder and are started as `python benchmarks/<file>`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SAMPLES = REPO / "tests" / "data" / "isendu"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
BRIDGE_BIN = str(Path(PYTHON).with_name("bridge"))
SINK_SERVER = str(BENCH_DIR / "sink_server.py")
BARE_APP = str(BENCH_DIR / "bare_app.py")
HOST = "127.0.0.1"  # every byte of benchmark traffic stays on this machine
WEBHOOK_PATH = "/isendu/webhook"
KEY_ID = "bench-key"
SECRET = "bench-secret-0123456789"

# The last 12 hex digits of every item uuid are replaced by this marker in a batch
# skeleton, then by a per-batch token: each batch carries unique item contents, because the
# bridge stores an item once per (sink, route, content hash) and would skip repeats.
MARKER = b"c0ffeec0ffee"


# ---- realistic isendu bodies ---------------------------------------------------------------

def sample_items() -> list[tuple[str, dict[str, Any]]]:
    """Every distinct (kind, item) of the shared samples, in file order."""
    docs = [json.loads((SAMPLES / "batch.json").read_text())]
    docs += [json.loads(line) for line in
             (SAMPLES / "batches.jsonl").read_text().splitlines() if line.strip()]
    seen: set[str] = set()
    out: list[tuple[str, dict[str, Any]]] = []
    for doc in docs:
        for kind in ("order", "tracking"):
            for item in doc.get(kind) or []:
                key = kind + json.dumps(item, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    out.append((kind, item))
    return out


def _marked(item: dict[str, Any]) -> dict[str, Any]:
    copy = dict(item)
    copy["uuid"] = str(item["uuid"])[:-12] + MARKER.decode()
    return copy


class BatchFactory:
    """Unique, realistic batch bodies at a few microseconds each.

    Skeletons are batches of `items` sample items (the samples' own mix of orders and
    tracking updates, shuffled once) serialised up front; a body is a skeleton with the
    marker replaced by a token unique to (prefix, batch number).
    """

    def __init__(self, prefix: int, items: int = 10, skeletons: int = 512, seed: int = 7) -> None:
        pool = sample_items()
        random.Random(seed).shuffle(pool)
        self.prefix = prefix & 0xFFFF
        self.items = items
        self.skeletons: list[bytes] = []
        for k in range(skeletons):
            chosen = [pool[(k * items + j) % len(pool)] for j in range(items)]
            doc: dict[str, list[dict[str, Any]]] = {}
            for kind, item in chosen:
                doc.setdefault(kind, []).append(_marked(item))
            self.skeletons.append(json.dumps(doc, ensure_ascii=False).encode())

    def body(self, n: int) -> bytes:
        token = f"{self.prefix:04x}{n & 0xFFFFFFFF:08x}".encode()
        return self.skeletons[n % len(self.skeletons)].replace(MARKER, token)


def envelope_bodies(count: int, prefix: int) -> list[tuple[str, bytes]]:
    """(delivery id, body) pairs shaped like the HTTP sink's default JSON envelope."""
    pool = sample_items()
    routes = ("all-tracking", "tracking-moving", "all-orders", "orders-in-progress")  # as ROUTES
    out = []
    for n in range(count):
        kind, item = pool[n % len(pool)]
        did = f"dlv_{prefix:08x}{n:024x}"
        received = iso_now()
        body = ('{"id":' + json.dumps(did) + ',"kind":' + json.dumps(kind)
                + ',"route":' + json.dumps(routes[n % len(routes)])
                + ',"received_at":' + json.dumps(received) + ',"data":'
                + json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                + "}")
        out.append((did, body.encode()))
    return out


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def verification_body() -> bytes:
    return json.dumps({"keyId": KEY_ID}).encode()


# ---- figures -------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of `values` (q in 0..100); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Seconds in, milliseconds out."""
    ordered = sorted(values)

    def ms(q: float) -> float | None:
        p = percentile(ordered, q)
        return None if p is None else round(p * 1000, 2)

    return {"count": len(ordered), "p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99),
            "max_ms": None if not ordered else round(ordered[-1] * 1000, 2)}


# ---- /proc ---------------------------------------------------------------------------------

def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/<pid>/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """CPU used on this machine by processes other than this benchmark and its children.

    The figures only mean something on a quiet machine: this says how quiet it was. Deltas
    of /proc/<pid>/stat between samples, for every process that is not ours (a process born
    and gone between two samples is missed, so this is a lower bound).
    """

    def __init__(self, not_uid: int | None = None) -> None:
        self.seconds = 0.0
        self.started = time.monotonic()
        self.not_uid = not_uid  # a server measured as part of the work (PostgreSQL's user)
        self._last = self._read()

    def _read(self) -> dict[int, tuple[int, float]]:
        out: dict[int, tuple[int, float]] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if self.not_uid is not None and os.stat(f"/proc/{entry}").st_uid == self.not_uid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
        return out

    def sample(self) -> None:
        now = self._read()
        ours = {os.getpid()}
        changed = True
        while changed:  # descendants of this process, however deep
            changed = False
            for pid, (ppid, _) in now.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid, (_, cpu) in now.items():
            if pid not in ours and pid in self._last:
                self.seconds += max(0.0, cpu - self._last[pid][1])
        self._last = now

    def percent(self) -> float:
        """Average foreign load since creation, in % of one CPU."""
        elapsed = time.monotonic() - self.started
        return round(100 * self.seconds / elapsed, 1) if elapsed > 0 else 0.0


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release()}


# ---- child processes -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # If the orchestrator is killed outright (SIGKILL), the kernel stops its children too.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Children:
    """Every process a benchmark starts; `stop_all` runs on any exit, Ctrl-C included."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], stdout: int | IO[bytes] | None = None,
              env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it until it exits
        proc = subprocess.Popen(argv, stdout=stdout if stdout is not None else log,
                                stderr=log, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                env={**os.environ, **(env or {})},
                                preexec_fn=_die_with_parent)
        log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 15.0) -> int | None:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        return child.proc.returncode

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child, grace=5.0)


@contextlib.contextmanager
def children_in(workdir: Path) -> Iterator[Children]:
    kids = Children(workdir)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield kids
    finally:
        kids.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status; Ctrl-C (or SIGTERM) stops every child first."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def work_dir(keep: bool, data_dir: str | None) -> Iterator[Path]:
    base = data_dir or None
    if keep:
        path = Path(tempfile.mkdtemp(prefix="bridge-bench-", dir=base))
        print(f"work dir kept: {path}", file=sys.stderr)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bridge-bench-", dir=base) as tmp:
        yield Path(tmp)


def http_json(url: str, data: bytes | None = None, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def http_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text: str = resp.read().decode()
        return text


def wait_ready(url: str, child: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n"
                               f"{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready at {url} within {timeout}s:\n{child.log_tail()}")


def run_json(kids: Children, name: str, argv: list[str], timeout: float,
             watch: Sequence[int] = (), env: dict[str, str] | None = None,
             not_foreign_uid: int | None = None) -> tuple[dict[str, Any], dict[int, int]]:
    """Run a helper that prints one JSON object; meanwhile track the peak RSS (KiB) of
    `watch`ed pids (VmHWM is the kernel's own peak, sampling only covers a dying pid) and
    what the rest of the machine is doing (`foreign_cpu_percent` in the result; processes of
    `not_foreign_uid` are part of the work measured, not foreign)."""
    out_path = kids.workdir / f"{name}.json"
    foreign = ForeignCpu(not_foreign_uid)
    with open(out_path, "wb") as out:
        child = kids.start(name, argv, stdout=out, env=env)
        peaks: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        n = 0
        while child.proc.poll() is None:
            n += 1
            if n % 5 == 0:
                foreign.sample()
            for pid in watch:
                hwm = proc_status_kb(pid, "VmHWM")
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            if time.monotonic() > deadline:
                kids.stop(child)
                raise RuntimeError(f"{name} ran past {timeout}s:\n{child.log_tail()}")
            time.sleep(0.1)
        kids.stop(child)
    if child.proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({child.proc.returncode}):\n{child.log_tail()}")
    foreign.sample()
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["foreign_cpu_percent"] = foreign.percent()
    return result, peaks


# ---- configs -------------------------------------------------------------------------------

ROUTES_YAML = """\
  # About two routes match an average item (bridge dry-run says 2.07 for the samples' mix):
  # every item has its kind's catch-all route, most also match a status route, some a
  # third (delivered parcels, orders over 200, steps with an error: a JSONPath condition).
  - name: all-tracking
    kind: tracking
    to: receiver
  - name: tracking-moving
    kind: tracking
    when:
      path: $.status
      in: [PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERED]
    to: receiver
  - name: tracking-errors
    kind: tracking
    when:
      path: $.steps[*].error.code
      exists: true
    to: receiver
  - name: tracking-delivered
    kind: tracking
    when:
      path: $.delivered
      equals: true
    to: receiver
  - name: all-orders
    kind: order
    to: receiver
  - name: orders-over-200
    kind: order
    when:
      path: $.total.amount
      gt: 200
    to: receiver
  - name: orders-in-progress
    kind: order
    when:
      path: $.status
      in: [PAID, PROCESSING, READY_TO_SHIP, SHIPPED]
    to: receiver
"""


def bridge_config(port: int, sink_url: str, db_path: Path | str, sink_concurrency: int = 8,
                  sink_timeout: str = "10s", intake_concurrency: int | None = None) -> str:
    """`db_path`: a SQLite file, or a storage URL (postgresql://...)."""
    # None: the bridge's default (older revisions have no such setting).
    intake = "" if intake_concurrency is None else f"\n  intake_concurrency: {intake_concurrency}"
    storage = db_path if "://" in str(db_path) else f"sqlite:///{db_path}"
    return f"""\
# Written by benchmarks/; a throwaway bridge on 127.0.0.1.
server:
  listen: {HOST}:{port}
  webhook_path: {WEBHOOK_PATH}{intake}
integrations:
  - key_id: {KEY_ID}
    secret: {SECRET}
storage: {storage}
sinks:
  receiver:
    type: http
    url: {sink_url}
    concurrency: {sink_concurrency}
    timeout: {sink_timeout}
routes:
{ROUTES_YAML}"""


def bridge_source(kids: Children, rev: str | None, src: str | None) -> str | None:
    """Where `bridge` is imported from: the installed tree (None), a folder holding a
    `bridge/` package, or a git revision exported into the work dir (read-only git)."""
    if rev:
        dest = kids.workdir / "src"
        dest.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "bridge"], cwd=REPO, check=True,
                                 capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        return str(dest)
    return str(Path(src).resolve()) if src else None


def start_bridge(kids: Children, name: str, config_text: str, log_level: str,
                 src: str | None = None) -> tuple[Child, str]:
    cfg = kids.workdir / f"{name}.yaml"
    cfg.write_text(config_text)
    child = kids.start(name, [BRIDGE_BIN, "--log-level", log_level, "serve", "--config",
                              str(cfg)], env={"PYTHONPATH": src} if src else None)
    port = int(config_text.split(f"listen: {HOST}:", 1)[1].split()[0])
    base = f"http://{HOST}:{port}"
    wait_ready(base + "/readyz", child)
    return child, base


def outbox_counts(bridge_base: str) -> dict[str, int]:
    """Deliveries per status, from the bridge's own /metrics."""
    counts: dict[str, int] = depths(bridge_base)["outbox"]
    return counts


def depths(bridge_base: str) -> dict[str, Any]:
    """The bridge's storage depths from its /metrics: `outbox` (deliveries per status) and
    `inbox` (batches per status: waiting, failed), `{}` from a bridge before the inbox."""
    out: dict[str, Any] = {"outbox": {}, "inbox": {}}
    for line in http_text(bridge_base + "/metrics", timeout=120).splitlines():
        for prefix, key in (("bridge_outbox_deliveries{", "outbox"),
                            ("bridge_inbox_batches{", "inbox")):
            if line.startswith(prefix):
                status = line.split('status="', 1)[1].split('"', 1)[0]
                out[key][status] = int(float(line.rsplit(" ", 1)[1]))
    return out


def stored_deliveries(bridge_base: str, load: dict[str, Any], timeout: float = 600.0,
                      ) -> tuple[int, float]:
    """How many deliveries a load made, exactly, and how long it took to know.

    A bridge before the inbox said so in its answers (`deliveries_total`). With the inbox,
    the sequencer makes them after the 200s: wait until no batch is waiting, then the
    outbox's rows (every status; a fresh outbox per load) are the count. /metrics reads the
    inbox before the outbox for this (since 2026-12-07; before, a batch settled between
    its two reads was in neither, and the count came out short: 60,122 for 60,279 sent).
    """
    if load.get("deliveries_reported", True):
        return int(load["deliveries_total"]), 0.0
    started = time.monotonic()
    deadline = started + timeout
    while True:
        d = depths(bridge_base)
        if not d["inbox"].get("waiting", 0):
            return sum(d["outbox"].values()), time.monotonic() - started
        if time.monotonic() > deadline:
            raise RuntimeError(f"{d['inbox']['waiting']:,} batches still waiting in the inbox "
                               f"after {timeout:.0f}s; expected the sequencer to empty it")
        time.sleep(0.25)


def routes_per_item(workdir: Path, config_text: str, src: str | None) -> dict[str, Any]:
    """What `bridge dry-run` says the load's item mix (every distinct sample item, once)
    fans out to with this config, run with the benchmarked bridge code."""
    cfg = workdir / "dry-run.yaml"
    cfg.write_text(config_text)
    payload = workdir / "dry-run-batch.json"
    # Every item its own shipment: with shipment state on, two snapshots of one sample
    # shipment in one batch would be a change and a stale one, not the fan-out of the mix.
    doc: dict[str, list[dict[str, Any]]] = {}
    for n, (kind, item) in enumerate(sample_items()):
        doc.setdefault(kind, []).append({**item, "uuid": str(item["uuid"])[:-12] + f"{n:012x}"})
    payload.write_bytes(json.dumps(doc, ensure_ascii=False).encode())
    out = subprocess.run([BRIDGE_BIN, "dry-run", "--config", str(cfg), "--json",
                          str(payload)], capture_output=True, check=True, text=True,
                         cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": src} if src else None)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    deliveries = sum(len(r["deliveries"]) for r in rows)
    by_route: dict[str, int] = {}
    for r in rows:
        for d in r["deliveries"]:
            by_route[d["route"]] = by_route.get(d["route"], 0) + 1
    return {"items": len(rows), "deliveries": deliveries,
            "per_item": round(deliveries / len(rows), 3), "by_route": by_route}


# ---- output --------------------------------------------------------------------------------

@dataclass
class Row:
    figure: str
    measured: str
    target: str = "-"
    ceiling: str = "-"
    ratio: str = "-"
    verdict: str = "info"


def print_table(rows: list[Row], out: IO[str] = sys.stdout) -> None:
    head = ("figure", "target", "measured", "ceiling (same run)", "ratio", "result")
    cells = [head] + [(r.figure, r.target, r.measured, r.ceiling, r.ratio, r.verdict)
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for n, c in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def loadgen_argv(mode: str, *args: str) -> list[str]:
    return [PYTHON, str(BENCH_DIR / "loadgen.py"), mode, *args]
