"""The router: a pure function of (item, config, what the item brings against its
shipment's state) -> deliveries. `bridge dry-run` calls it too."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from bridge.canonical import canonical_json
from bridge.config import BridgeConfig, Route, predicate_of
from bridge.errors import TemplateRenderError
from bridge.models import COALESCED, Batch, Item, NewDelivery
from bridge.routing.conditions import Predicate, always
from bridge.sinks.base import RenderContext, Sink
from bridge.state import Holder, Observation
from bridge.templates import DEFAULT_SUMMARY, Template


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    kind: str | None
    matches: Predicate
    targets: tuple[tuple[Sink, Template | None], ...]
    stop: bool
    group_window: float | None = None  # seconds; None: every item goes out on its own
    dedupe: bool = True  # a repeat (nothing new against the shipment's state) is skipped
    skip_stale: bool = True  # a snapshot older than what was seen is skipped
    coalesce: float | None = None  # seconds: a shipment's changes within it go out as one


@dataclass(slots=True)
class Routed:
    """What routing made of one item."""

    deliveries: list[NewDelivery]
    routes: list[str]  # the routes whose conditions matched
    skipped: dict[str, str]  # route -> why it sends nothing: "repeat" or "stale"


def compile_routes(config: BridgeConfig, sinks: dict[str, Sink]) -> list[CompiledRoute]:
    return [_compile(route, sinks) for route in config.routes]


def _compile(route: Route, sinks: dict[str, Sink]) -> CompiledRoute:
    targets = []
    for name in route.to:
        message = route.message.get(name) if isinstance(route.message, dict) else route.message
        targets.append((sinks[name], message))
    return CompiledRoute(
        name=route.name,
        kind=route.kind,
        matches=predicate_of(route.when) if route.when is not None else always,
        targets=tuple(targets),
        stop=route.stop,
        group_window=route.group.window if route.group else None,
        dedupe=route.dedupe,
        skip_stale=route.stale == "skip",
        coalesce=route.coalesce,
    )


def _has_error(ctx: RenderContext, seen: Observation | None) -> bool:
    """A step with an error is news now (it never waits for a digest or a coalescing
    window): the newest step, or any step this snapshot brings, though a later one came
    with it."""
    step = ctx.last_step
    if step and step.get("error"):
        return True
    return seen is not None and any(
        isinstance(s, dict) and s.get("error") for s in seen.new_steps)


def delivery_id(sink: str, route: str, kind: str, item_json: str) -> str:
    """Stable per (sink, route, item content): a repeated isendu item maps to the same
    delivery, which the outbox stores once and receivers can recognise by `webhook-id`."""
    return delivery_id_of(item_json.encode(), sink, route, kind)


@functools.lru_cache(maxsize=4096)
def _id_prefix(sink: str, route: str, kind: str) -> hashlib._Hash:
    return hashlib.sha256(f"{sink}\x1f{route}\x1f{kind}\x1f".encode())


def delivery_id_of(item_bytes: bytes, sink: str, route: str, kind: str,
                   occurrence: int = 1) -> str:
    """`delivery_id` for an item already encoded (once per item, not once per delivery).
    `occurrence`: the number of the shipment's change that brought this content (shipment
    state; 1, unsalted, for its first sight and where no state is kept): a shipment back to
    what it was makes new deliveries, where the same content as a repeat keeps the id of
    the change that brought it."""
    h = _id_prefix(sink, route, kind).copy()
    h.update(item_bytes)
    if occurrence > 1:
        h.update(b"\x1f#%d" % occurrence)
    return "dlv_" + h.hexdigest()[:32]


class Router:
    def __init__(self, routes: list[CompiledRoute]) -> None:
        self.routes = routes

    def matching(self, item: Item, seen: Observation | None = None) -> list[CompiledRoute]:
        out = []
        for route in self.routes:
            if route.kind is not None and route.kind != item.kind:
                continue
            if route.matches(item.data, seen):
                out.append(route)
                if route.stop:
                    break
        return out

    def route_item(self, item: Item, batch: Batch, seen: Observation | None = None,
                   replay: bool = False, hold: Holder | None = None) -> Routed:
        """`seen`: what the item brings against its shipment's state (None: no state kept).
        `replay`: the batch was rerouted by hand, so it is routed as it comes, repeats and
        stale snapshots too (delivery ids keep what was stored already from being stored
        twice): its own snapshots are in the state already, from its first time.
        `hold`: the shipment's coalescing windows (bridge/state.py `hold`)."""
        matched = self.matching(item, seen)
        skipped: dict[str, str] = {}
        sending = []
        for route in matched:
            if seen is None or replay:
                sending.append(route)
            elif seen.repeat and route.dedupe:
                skipped[route.name] = "repeat"
            elif seen.stale and route.skip_stale:
                skipped[route.name] = "stale"
            else:
                sending.append(route)
        names = [r.name for r in matched]
        if not sending:
            return Routed([], names, skipped)
        item_json = (seen.item_json if seen is not None and seen.item_json is not None
                     else canonical_json(item.data))
        occurrence = seen.occurrence if seen is not None else 1
        ctx = RenderContext(item.data, item.kind, batch.received_at, item_json, seen)
        item_bytes = item_json.encode()
        out = []
        for route in sending:
            # An item whose latest step failed is news now: it never waits for a digest.
            grouped = route.group_window is not None and not _has_error(ctx, seen)
            route_ctx, window, wait = ctx, None, 0.0
            if (route.coalesce is not None and hold is not None and seen is not None
                    and not (seen.repeat or seen.stale)):
                held, wait, window = hold(route.name, route.coalesce, seen,
                                          _has_error(ctx, seen))
                route_ctx = RenderContext(item.data, item.kind, batch.received_at, item_json,
                                          held)
            for sink, message in route.targets:
                did = delivery_id_of(item_bytes, sink.name, route.name, item.kind, occurrence)
                try:
                    payload = sink.render(route_ctx, route.name, did, message)
                    if grouped:
                        payload["summary"] = DEFAULT_SUMMARY[item.kind].render(
                            ctx.vars(route.name, did))
                    error = None
                except TemplateRenderError as exc:
                    payload, error = {}, str(exc)
                d = NewDelivery(
                    id=did, sink=sink.name, route=route.name, item_uuid=item.uuid,
                    kind=item.kind, payload=payload, batch_id=batch.batch_id, error=error,
                )
                if grouped and route.group_window is not None:
                    d.group_key, d.delay = f"{route.name}>{sink.name}", route.group_window
                elif window is not None:
                    # One window's changes leave together, as the last one's message.
                    d.group_key = f"{COALESCED}{route.name}>{sink.name}>{item.uuid}>{window}"
                    d.delay = wait
                out.append(d)
        return Routed(out, names, skipped)

    def route_batch(self, batch: Batch) -> list[NewDelivery]:
        """Every item as if seen for the first time (no shipment state)."""
        out: list[NewDelivery] = []
        for item in batch.items:
            out.extend(self.route_item(item, batch).deliveries)
        return out
