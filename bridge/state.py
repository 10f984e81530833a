"""Shipment state: what the sequencer knows of each item (kind + uuid), and what a new
snapshot of it brings.

isendu sends snapshots: batched, out of order, repeated. Against the state merged from every
snapshot seen so far, a snapshot is
- a **repeat** when it brings nothing new: no step never seen, no top-level field changed
  (for an order: the same JSON, key order ignored);
- **stale** when its newest step is older than the newest step seen (for an order: its
  version, `state.order_version_path`, is older than the version seen);
- otherwise a **change**.
Steps never seen before are merged whatever the snapshot is, so the history stays complete;
the top-level fields are taken only from a snapshot that is not stale, so a late snapshot
never turns a DELIVERED shipment back to OUT_FOR_DELIVERY. Pure: no storage, no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge import jsontext
from bridge.canonical import canonical_json, digest
from bridge.models import Item, Kind
from bridge.moments import earlier, is_plain, iso_time, moment

StepKey = tuple[str, str, str]  # timestamp, status, description: what identifies a step


def step_key(step: dict[str, Any]) -> StepKey:
    t, s, d = step.get("timestamp"), step.get("status"), step.get("description")
    if type(t) is str and type(s) is str and type(d) is str:  # nearly always: no conversion
        return (t, s, d)
    return (_text(t), _text(s), _text(d))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


@dataclass(slots=True)
class EntityState:
    """The merged history of one item uuid."""

    kind: Kind
    uuid: str
    fields: dict[str, Any]  # top-level fields of the newest snapshot (tracking: not `steps`)
    steps: list[dict[str, Any]] = field(default_factory=list)  # every step, by timestamp
    newest: str | None = None  # tracking: newest step timestamp; order: version as text
    version: Any = None  # order: the version value as found (number or ISO time)
    # Coalescing routes' open windows, by route: {"until", "steps", "previous", "id"} (`hold`).
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The step keys of `steps`, worked out once and then kept with the state in memory.
    keys: frozenset[StepKey] | None = field(default=None, compare=False, repr=False)
    # How many changes (first sight included) it has had, and the contents of the last ones
    # (`digest` of the canonical JSON) with the number of the change that last brought each:
    # a shipment back to what it was (PAID, ON_HOLD, PAID) is a change again, and its
    # deliveries need ids other than the first time's (`occurrence`); a repeat takes the id
    # of the change it repeats.
    changes: int = 0
    contents: dict[str, int] = field(default_factory=dict)

    def step_keys(self) -> frozenset[StepKey]:
        if self.keys is None:
            self.keys = frozenset(step_key(s) for s in self.steps)
        return self.keys

    def to_json(self) -> str:
        doc = {"fields": self.fields, "steps": self.steps, "newest": self.newest,
               "version": self.version}
        if self.windows:
            doc["windows"] = self.windows
        if self.contents:
            doc["contents"] = self.contents
            doc["changes"] = self.changes
        return jsontext.dumps_exact(doc).decode()

    @classmethod
    def from_json(cls, kind: Kind, uuid: str, text: str) -> EntityState:
        doc = jsontext.loads(text.encode())
        return cls(kind=kind, uuid=uuid, fields=doc["fields"], steps=doc["steps"],
                   newest=doc["newest"], version=doc["version"],
                   windows=doc.get("windows", {}), contents=doc.get("contents", {}),
                   changes=doc.get("changes", 0))

    def summary(self) -> dict[str, Any]:
        """`previous` in templates: what was known before this snapshot."""
        return {"status": self.fields.get("status"), "delivered": self.fields.get("delivered"),
                "step": self.steps[-1] if self.steps else None}


@dataclass(frozen=True, slots=True)
class Observation:
    """What a snapshot brings against the state of its uuid."""

    first_seen: bool
    repeat: bool
    stale: bool
    new_steps: tuple[dict[str, Any], ...]  # steps not seen before, by timestamp
    changed: tuple[str, ...]  # top-level fields that differ from the state (all, first seen)
    previous: dict[str, Any] | None  # EntityState.summary() before, None on first sight
    # For delivery ids: the number of the change that brought this content (1: the first
    # sight, whose ids are unsalted). The same content as a change again is news again, as a
    # repeat it is not (the number of the change it repeats).
    occurrence: int = 1
    item_json: str | None = None  # the item's canonical JSON, worked out once

    @property
    def verdict(self) -> str:
        """first_seen, repeat, stale or change (bridge_items_observed_total)."""
        if self.first_seen:
            return "first_seen"
        return "repeat" if self.repeat else "stale" if self.stale else "change"


def first_sight(data: dict[str, Any], kind: Kind) -> Observation:
    """What a snapshot shows where no state is kept: everything in it is new."""
    steps = _in_order(_keyed(data.get("steps"))) if kind == "tracking" else []
    fields = tuple(k for k in data if k != "steps") if kind == "tracking" else tuple(data)
    return Observation(True, False, False, tuple(steps), fields, None)

# Contents remembered per shipment, for repeats to find the change they repeat (one that is
# too far back gets its first-sight id: a `dedupe: false` route may send it once more).
KEPT_CONTENTS = 16


def _occurrence(state: EntityState | None, merged: EntityState, item: Item, change: bool,
                ) -> tuple[int, str]:
    """(occurrence, canonical JSON) of `item`'s content; a change (or a first sight) is
    counted in `merged.contents`, the most recent last."""
    item_json = canonical_json(item.data)
    key = digest(item_json)
    if state is None:
        merged.contents, merged.changes = {key: 1}, 1
        return 1, item_json
    known = state.contents
    if not change:
        return known.get(key, 1), item_json
    # The shipment's next change number: never reused while its state is kept, so a content
    # back again, however long ago it was seen (or forgotten from `contents`), never gets
    # an id stored before. A state stored before changes were counted starts at 1, whose
    # deliveries had unsalted ids.
    n = max(state.changes, 1) + 1
    merged.changes = n
    contents = dict(known)
    contents.pop(key, None)
    contents[key] = n
    while len(contents) > KEPT_CONTENTS:
        del contents[next(iter(contents))]
    merged.contents = contents
    return n, item_json


VersionOf = Callable[[dict[str, Any]], Any]
# (route, window seconds, observation, flush) -> (observation, wait, window id): `hold`.
Holder = Callable[[str, float, Observation, bool], tuple[Observation, float, str]]


def observe(state: EntityState | None, item: Item, version_of: VersionOf | None = None
            ) -> tuple[Observation, EntityState]:
    """The observation of `item` against `state`, and the state merged with it."""
    if item.kind == "tracking":
        return _observe_tracking(state, item)
    return _observe_order(state, item, version_of)


def _by_time(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keyed = [(step_key(s), s) for s in steps]
    if all(is_plain(k[0]) for k, _ in keyed):
        return [s for _, s in sorted(keyed, key=lambda pair: pair[0])]
    return [s for _, s in sorted(keyed, key=lambda pair: _time_order(pair[0]))]


def _time_order(key: StepKey) -> tuple[str, str, str]:
    """A step key by the moment of its timestamp (bridge/moments.py), then as it is."""
    return (moment(key[0]), key[1], key[2])


def _keyed(steps: Any) -> dict[StepKey, dict[str, Any]]:
    """Each step of a snapshot's `steps` once (the first of equal keys), by its key; what
    is not a step (not an object) is left out."""
    return _keyed_plain(steps)[0]


def _keyed_plain(steps: Any) -> tuple[dict[StepKey, dict[str, Any]], bool]:
    """`_keyed`, and whether every timestamp is written the plain way (`...T07:40:13Z`:
    text order is time order, nothing to parse). step_key and is_plain inlined: the loop
    runs for every step of every snapshot, and a call per step was a fifth of the
    observation's time."""
    out: dict[StepKey, dict[str, Any]] = {}
    plain = True
    if not isinstance(steps, list):
        return out, plain
    for s in steps:
        if not isinstance(s, dict):
            continue
        t, st, d = s.get("timestamp"), s.get("status"), s.get("description")
        if type(t) is str and type(st) is str and type(d) is str:
            key = (t, st, d)
        else:
            key = (_text(t), _text(st), _text(d))
        if plain and not (len(key[0]) == 20 and key[0][19] == "Z" and key[0][10] == "T"):
            plain = False
        if key not in out:
            out[key] = s
    return out, plain


def _plain(keyed: dict[StepKey, dict[str, Any]]) -> bool:
    """Every timestamp written the plain way: see `_keyed_plain`."""
    return all(is_plain(k[0]) for k in keyed)


def _in_order(keyed: dict[StepKey, dict[str, Any]], plain: bool | None = None
              ) -> list[dict[str, Any]]:
    """The steps by time: keys start with the timestamp, and no two are equal."""
    if plain if plain is not None else _plain(keyed):
        return [keyed[k] for k in sorted(keyed)]
    return [keyed[k] for k in sorted(keyed, key=_time_order)]


def _newest(keyed: dict[StepKey, dict[str, Any]], plain: bool) -> str | None:
    """The timestamp of the newest step, as written."""
    if not keyed:
        return None
    return max(keyed)[0] if plain else max(keyed, key=_time_order)[0]


def _changed(before: dict[str, Any] | None, after: dict[str, Any]) -> tuple[str, ...]:
    """Names of the top-level fields whose JSON values differ: Python's `True == 1` (and
    `1 == 1.0`, at any depth) would call `"delivered": 1` after `true` the same."""
    if before is None:
        return tuple(after)
    get = before.get
    if before == after:  # a repeat, most often: one comparison in C, then as JSON
        if canonical_json(before) == canonical_json(after):
            return ()
        return tuple(k for k, v in after.items() if canonical_json(get(k)) != canonical_json(v))
    names = [k for k, v in after.items()
             if get(k, _MISSING) != v or type(get(k)) is not type(v)]
    return tuple(names + [k for k in before if k not in after])


_MISSING = object()


def _observe_tracking(state: EntityState | None, item: Item) -> tuple[Observation, EntityState]:
    keyed, plain = _keyed_plain(item.data.get("steps"))
    fields = dict(item.data)
    fields.pop("steps", None)
    newest_here = _newest(keyed, plain)
    if state is None:
        merged = EntityState("tracking", item.uuid, fields, _in_order(keyed, plain), newest_here,
                             keys=frozenset(keyed))
        n, item_json = _occurrence(None, merged, item, True)
        return Observation(True, False, False, tuple(merged.steps), tuple(fields), None, n,
                           item_json), merged
    seen = state.step_keys()
    new = {k: s for k, s in keyed.items() if k not in seen}
    failed = _newly_failed(state, keyed, seen)
    base = state.steps
    if failed:  # known steps that now carry an error: news, and the history takes them
        base = [failed.get(step_key(s), s) for s in state.steps]
        new = {**new, **failed}
    new_steps = _in_order(new, plain)
    # A snapshot without steps cannot say when it was taken: against a state that has
    # steps it counts as older, so that `steps: []` with an early status never turns a
    # DELIVERED shipment back.
    stale = state.newest is not None and (newest_here is None
                                          or earlier(newest_here, state.newest))
    changed = _changed(state.fields, fields)
    newest = (newest_here if state.newest is None
              or (newest_here is not None and earlier(state.newest, newest_here))
              else state.newest)
    fresh = [s for s in new_steps if step_key(s) not in failed] if failed else new_steps
    steps, keys = ((_merged(base, fresh), seen.union(new)) if fresh
                   else (base, seen))
    merged = EntityState("tracking", item.uuid, state.fields if stale else fields, steps,
                         newest, windows=dict(state.windows), keys=keys,
                         contents=state.contents, changes=state.changes)
    repeat = not new_steps and not changed
    n, item_json = _occurrence(state, merged, item, not repeat and not stale)
    return Observation(False, repeat, stale and not repeat, tuple(new_steps), changed,
                       state.summary(), n, item_json), merged


def _newly_failed(state: EntityState, keyed: dict[StepKey, dict[str, Any]],
                  seen: frozenset[StepKey]) -> dict[StepKey, dict[str, Any]]:
    """Steps seen before that now carry an `error` they did not (isendu's failure signal,
    added to a step already sent: a customs hold on the step that reached customs)."""
    if not any(s.get("error") for k, s in keyed.items() if k in seen):
        return {}  # nearly always: no index of the state's steps is built
    known = {step_key(s): s for s in state.steps}
    return {k: s for k, s in keyed.items()
            if k in seen and s.get("error") and known[k].get("error") != s.get("error")}


def _merged(steps_before: list[dict[str, Any]], new_steps: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """The steps known and the new ones, by time. Mostly the new steps come after every
    step seen: they are then added at the end, with no key worked out again."""
    if not steps_before:
        return new_steps
    last = step_key(steps_before[-1])
    first = step_key(new_steps[0])  # new_steps are in time order
    if (last < first if is_plain(last[0]) and is_plain(first[0])
            else _time_order(last) < _time_order(first)):
        return steps_before + new_steps
    return _by_time(steps_before + new_steps)


def _observe_order(state: EntityState | None, item: Item, version_of: VersionOf | None
                   ) -> tuple[Observation, EntityState]:
    fields = dict(item.data)
    version = version_of(item.data) if version_of else None
    merged = EntityState("order", item.uuid, fields, [], _version_text(version), version)
    if state is None:
        n, item_json = _occurrence(None, merged, item, True)
        return Observation(True, False, False, (), tuple(fields), None, n, item_json), merged
    changed = _changed(state.fields, fields)
    stale = _older(version, state.version)
    if stale:
        merged = state
    else:
        merged.windows = dict(state.windows)
        merged.contents, merged.changes = state.contents, state.changes
        if version is None and state.version is not None:
            # A snapshot without a version cannot be dated: the version known stays, or an
            # older one coming next would pass for news.
            merged.version, merged.newest = state.version, state.newest
    repeat = not changed
    n, item_json = _occurrence(state, merged, item, not repeat and not stale)
    return Observation(False, repeat, stale and not repeat, (), changed,
                       state.summary(), n, item_json), merged


def _version_text(version: Any) -> str | None:
    return None if version is None else str(version)


def _older(version: Any, than: Any) -> bool:
    """Numbers compare as numbers, ISO 8601 times as times; anything else is never older."""
    if version is None or than is None:
        return False
    if _is_number(version) and _is_number(than):
        return bool(version < than)
    if isinstance(version, str) and isinstance(than, str):
        a, b = iso_time(version), iso_time(than)
        if a is not None and b is not None:
            return a < b
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def hold(state: EntityState, route: str, seconds: float, seen: Observation, now: float,
         flush: bool) -> tuple[Observation, float, str]:
    """A change on a route that coalesces (`coalesce: 10s`): changes sequenced within one
    window of `seconds` become one message, the last one's, sent when the window closes.
    Returns the observation that message renders with (every step new since the window
    opened, and `previous` from before it), how long its delivery waits, and the window's
    id (its members go out together). `flush`: this change must not wait (a step with an
    error): it goes now, and takes the window's held changes with it."""
    window = state.windows.get(route)
    margin = min(1.0, seconds / 10)  # a change just before the close would miss the send
    if window is not None and now < window["until"] - margin:
        # This change's steps first: of two with one key, _keyed keeps the first, and a
        # step that failed since the window opened must be held with its error.
        steps = _in_order(_keyed(list(seen.new_steps) + window["steps"]))
        previous, until = window["previous"], window["until"]
        name = window.get("id") or f"{until:.3f}"  # a window opened by an older release
    else:
        steps, previous, until = list(seen.new_steps), seen.previous, now + seconds
        # The close alone does not tell windows apart: an error change that goes at once
        # and the change after it, routed within one millisecond, would share a window and
        # the error change wait for its close. The number of the change that opens it does.
        name = f"{until:.3f}#{seen.occurrence}"
    if flush:
        state.windows.pop(route, None)
    else:
        state.windows[route] = {"until": until, "steps": steps, "previous": previous,
                                "id": name}
    held = Observation(seen.first_seen, seen.repeat, seen.stale, tuple(steps), seen.changed,
                       previous, seen.occurrence, seen.item_json)
    return held, 0.0 if flush else until - now, name


class StateBook:
    """The states the sequencer (or `bridge dry-run`) works with, observed in order.

    `changed` collects the keys whose state moved since `take_changed()`, so that a batch
    writes exactly the states it changed, in its own transaction.

    Between batches a state is kept as the JSON that was written for it (or read back):
    ~0.7 KB, where the objects of a parsed state took ~3 KB, and thousands of them made
    every run of the garbage collector longer. It is parsed again when its shipment comes
    back (a few microseconds)."""

    def __init__(self, version_of: VersionOf | None = None) -> None:
        self.version_of = version_of
        # By (kind, uuid), oldest observed first: a state changed since `take_changed`
        # as it is, any other as its JSON.
        self.known: dict[tuple[str, str], EntityState | str] = {}
        self._changed: dict[tuple[str, str], EntityState] = {}
        self._before: dict[tuple[str, str], EntityState | str | None] = {}  # for `undo`

    def missing(self, items: list[Item]) -> list[tuple[str, str]]:
        """Keys of `items` whose state is not in memory (to be loaded first)."""
        return list(dict.fromkeys(
            k for k in ((i.kind, i.uuid) for i in items) if k not in self.known))

    def load(self, stored: dict[tuple[str, str], str],
             asked: list[tuple[str, str]]) -> None:
        for key in asked:
            text = stored.get(key)
            if text is not None:
                self.known[key] = text
            else:
                self.known.pop(key, None)

    def observe(self, item: Item, replay: bool = False) -> Observation:
        """`replay`: the item's batch was sequenced before and sent back by hand (`bridge
        batches reroute`): what it brought is in the state already. It is compared, and
        nothing is merged: an old snapshot replayed must not turn the shipment back, nor
        count as its content's next occurrence (its deliveries keep the ids they had)."""
        key = (item.kind, item.uuid)
        kept = self.known.pop(key, None)  # put back last: `trim` keeps the recent ones
        state = (EntityState.from_json(item.kind, item.uuid, kept) if isinstance(kept, str)
                 else kept)
        seen, merged = observe(state, item, self.version_of)
        if replay:
            if kept is not None:
                self.known[key] = kept
            known = state.contents if state is not None else {}
            return dataclasses.replace(
                seen, occurrence=known.get(digest(seen.item_json or ""), 1))
        if not seen.repeat:
            self._before.setdefault(key, kept)
            self.known[key] = self._changed[key] = merged
        elif kept is not None:
            self.known[key] = kept
        return seen

    def holder(self, item: Item, now: float) -> Holder:
        """`hold` on `item`'s state (after `observe`), for the router's coalescing routes."""
        key = (item.kind, item.uuid)

        def hold_item(route: str, seconds: float, seen: Observation, flush: bool
                      ) -> tuple[Observation, float, str]:
            kept = self.known[key]
            if isinstance(kept, str):  # a repeat, kept as it was: its windows change now
                self._before.setdefault(key, kept)
                kept = self.known[key] = EntityState.from_json(item.kind, item.uuid, kept)
            self._changed[key] = kept  # its windows are written with the batch
            return hold(kept, route, seconds, seen, now, flush)

        return hold_item

    def take_changed(self) -> dict[tuple[str, str], str]:
        """The states changed since the last call, as JSON, for one batch's transaction;
        memory keeps that JSON in their place."""
        out = {k: s.to_json() for k, s in self._changed.items()}
        known = self.known
        for key, text in out.items():
            if key in known:
                known[key] = text
        self._changed.clear()
        self._before.clear()
        return out

    def undo(self) -> None:
        """Back to the states of the last `take_changed` (a batch that failed to route)."""
        for key, state in self._before.items():
            if state is None:
                self.known.pop(key, None)
            else:
                self.known[key] = state
        self._changed.clear()
        self._before.clear()

    def forget(self) -> None:
        """Drop what memory holds (it may be ahead of storage after a failed write)."""
        self.known.clear()
        self._changed.clear()
        self._before.clear()

    def trim(self, keep: int) -> None:
        """Keep at most `keep` states in memory, the most recently observed ones."""
        extra = len(self.known) - keep
        if extra > 0:
            for key in list(self.known)[:extra]:
                del self.known[key]
