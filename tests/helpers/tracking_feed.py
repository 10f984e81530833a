"""Cumulative tracking snapshots of a few shipments as isendu sends them (shuffled, repeated,
split over many batches, some batches sent twice), what one route with the defaults should
notify of them, and a receiver that records what arrives and answers some first attempts
with 503. Worked out independently of bridge/state.py, for acceptance tests of issue #13."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

STATUSES = ["CREATED", "PICKED_UP", "IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED",
            "RETURNED", "IN_TRANSIT", "DELIVERED"]

# A route with the defaults (dedupe, stale: skip), whose body says what it was told: the
# snapshot's status and newest step, and the timestamps of the steps it brings.
CHAT_MESSAGE = (
    '{{ {"uuid": item.uuid, "status": item.status, "last": last_step.timestamp, '
    '"new_steps": new_steps | map(attribute="timestamp") | list, '
    '"first_seen": first_seen} | json }}'
)


@dataclass(frozen=True)
class Shipment:
    uuid: str
    timestamps: tuple[str, ...]  # its true history, oldest first

    @property
    def last_status(self) -> str:
        return status_of(len(self.timestamps) - 1)

    def snapshot(self, cut: int) -> dict[str, Any]:
        """What isendu sends once `cut` steps happened: every step so far, unsorted."""
        status = status_of(cut - 1)
        steps = [{"timestamp": self.timestamps[i], "status": status_of(i),
                  "description": f"step {i}", "location": f"hub {i % 3}"}
                 for i in range(cut)]
        random.Random(f"{self.uuid}/{cut}").shuffle(steps)  # the same snapshot, the same bytes
        return {"uuid": self.uuid, "trackingNumber": f"GLS-{self.uuid}", "status": status,
                "delivered": status == "DELIVERED", "steps": steps}


def status_of(step: int) -> str:
    return STATUSES[step % len(STATUSES)]


def feed(seed: int, shipments: int = 14, min_batches: int = 200
         ) -> tuple[list[Shipment], list[dict[str, Any]]]:
    """Shipments of 8 to 12 steps, each snapshot of every one of them (and as many again,
    repeated), roughly in step order with local disorder (so some arrive stale), all
    shipments interleaved, 1 to 3 items a batch; one batch in ten is sent twice."""
    rng = random.Random(seed)
    ships = []
    for s in range(shipments):
        n = rng.randint(8, 12)
        ships.append(Shipment(f"ship-{seed}-{s}", tuple(
            f"2025-11-{1 + i // 6:02d}T{(i % 6) * 4:02d}:{s:02d}:00Z" for i in range(n))))
    entries = []
    for ship in ships:
        n = len(ship.timestamps)
        cuts = list(range(1, n + 1)) + [rng.randint(1, n) for _ in range(2 * n)]
        entries += [(c + rng.uniform(-3.0, 3.0), ship, c) for c in cuts]
    entries.sort(key=lambda e: e[0])
    batches: list[dict[str, Any]] = []
    while entries:
        size = rng.randint(1, 3)
        batches.append({"tracking": [ship.snapshot(c) for _, ship, c in entries[:size]]})
        entries = entries[size:]
    for _ in range(len(batches) // 10):  # a retry of a batch whose 200 isendu never saw
        k = rng.randrange(len(batches))
        batches.insert(min(len(batches), k + rng.randint(1, 20)), batches[k])
    assert len(batches) >= min_batches, len(batches)
    return ships, batches


@dataclass(frozen=True)
class Note:
    """One notification of a shipment, as CHAT_MESSAGE renders it."""

    status: str
    last: str
    new_steps: tuple[str, ...]
    first_seen: bool

    @classmethod
    def of(cls, body: bytes) -> Note:
        doc = json.loads(body)
        return cls(doc["status"], doc["last"], tuple(doc["new_steps"]), doc["first_seen"])


def expected_notes(ships: list[Shipment], accepted: list[dict[str, Any]]
                   ) -> dict[str, list[Note]]:
    """Per shipment, what the route should notify of these batches sequenced in this order.
    The snapshots are cumulative, so one is news exactly when it holds more steps than any
    before it (fewer: stale; as many: a repeat), and what it brings is the steps between."""
    by_uuid = {s.uuid: s for s in ships}
    most: dict[str, int] = {}
    out: dict[str, list[Note]] = {s.uuid: [] for s in ships}
    for batch in accepted:
        for item in batch["tracking"]:
            ship, cut = by_uuid[item["uuid"]], len(item["steps"])
            before = most.get(ship.uuid, 0)
            if cut > before:
                out[ship.uuid].append(Note(status_of(cut - 1), ship.timestamps[cut - 1],
                                           ship.timestamps[before:cut], before == 0))
                most[ship.uuid] = cut
    return out


def check_shipment(ship: Shipment, notes: list[Note], state: dict[str, Any] | None) -> None:
    """What issue #13 promises of one shipment: `notes` as the sequencer made them, `state`
    the shipment_state row's JSON."""
    lasts = [n.last for n in notes]
    assert lasts == sorted(lasts) and len(set(lasts)) == len(lasts), \
        f"{ship.uuid}: notified out of step order or twice: {notes}"
    brought = Counter(t for n in notes for t in n.new_steps)
    assert sorted(brought) == list(ship.timestamps) and set(brought.values()) == {1}, \
        f"{ship.uuid}: each step is new in exactly one notification: {notes}"
    assert (notes[-1].status, notes[-1].last) == (ship.last_status, ship.timestamps[-1]), \
        f"{ship.uuid}: the last notified is not the true last status: {notes}"
    assert [n.first_seen for n in notes] == [True] + [False] * (len(notes) - 1), \
        f"{ship.uuid}: first_seen other than on the first notification: {notes}"
    assert state is not None, f"{ship.uuid}: no shipment_state row"
    history = [(s["timestamp"], s["status"]) for s in state["steps"]]
    assert history == [(t, status_of(i)) for i, t in enumerate(ship.timestamps)], \
        f"{ship.uuid}: the stored state lacks the full history: {history}"
    assert (state["fields"]["status"], state["newest"]) == (ship.last_status,
                                                            ship.timestamps[-1]), \
        f"{ship.uuid}: the stored state is not the newest: {state}"


@dataclass
class Arrival:
    path: str
    webhook_id: str
    body: bytes
    status: int  # what it was answered


@dataclass
class FlakyReceiver:
    """Records every request in arrival order; answers the first attempt of about
    `fail_share` of the webhook-ids with 503 (chosen by the id's hash: the same ones every
    run), after a random delay of up to `max_delay` seconds."""

    fail_share: float = 0.0
    max_delay: float = 0.0
    seed: int = 0
    arrivals: list[Arrival] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._tried: set[str] = set()
        # While clear, requests are held unanswered (a receiver that stalls): a backlog
        # builds up, to be sent in a rush when it is set.
        self.gate = asyncio.Event()
        self.gate.set()

    def _fails(self, webhook_id: str) -> bool:
        if webhook_id in self._tried:
            return False
        self._tried.add(webhook_id)
        share = int(hashlib.sha256(webhook_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return share < self.fail_share

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        status = 503 if self._fails(webhook_id) else 200
        arrival = Arrival(request.path, webhook_id, body, status)
        self.arrivals.append(arrival)
        await self.gate.wait()
        if self.max_delay:
            await asyncio.sleep(self._rng.uniform(0, self.max_delay))
        return web.Response(status=status, text="busy" if status == 503 else "ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def accepted(self, path: str) -> dict[str, bytes]:
        """webhook-id -> body of every delivery answered 200 on `path`, in the order of
        their first such arrival (at least once: repeats dropped); a repeat's body must be
        the same."""
        out: dict[str, bytes] = {}
        for a in self.arrivals:
            if a.path != path or a.status != 200:
                continue
            assert out.setdefault(a.webhook_id, a.body) == a.body, \
                f"{a.webhook_id} came twice with different bodies"
        return out
