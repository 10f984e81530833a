"""Shipment state: repeats, stale snapshots and new steps, by example and by property."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.models import Item
from bridge.state import KEPT_CONTENTS, EntityState, observe, step_key

STATUSES = ["CREATED", "PICKED_UP", "IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED"]


def step(n: int, status: str | None = None, error: bool = False) -> dict[str, Any]:
    s: dict[str, Any] = {"timestamp": f"2025-11-0{1 + n // 10}T{n % 10:02d}:00:00Z",
                         "status": status or STATUSES[min(n, len(STATUSES) - 1)],
                         "description": f"step {n}", "location": "Napoli"}
    if error:
        s["error"] = {"code": "E1", "message": "address unknown"}
    return s


def snapshot(steps: list[dict[str, Any]], uuid: str = "t1") -> Item:
    newest = max(steps, key=lambda s: s["timestamp"]) if steps else None
    return Item("tracking", uuid, {
        "uuid": uuid, "trackingNumber": "GLS1", "status": newest["status"] if newest else None,
        "delivered": bool(newest and newest["status"] == "DELIVERED"), "steps": steps})


def test_first_sight_is_a_change_with_every_step_new() -> None:
    obs, state = observe(None, snapshot([step(1), step(0)]))
    assert (obs.first_seen, obs.repeat, obs.stale, obs.previous) == (True, False, False, None)
    assert [s["description"] for s in obs.new_steps] == ["step 0", "step 1"]  # by time
    assert "status" in obs.changed and state.newest == step(1)["timestamp"]


def test_the_same_snapshot_again_is_a_repeat_even_reordered() -> None:
    _, state = observe(None, snapshot([step(0), step(1)]))
    obs, again = observe(state, snapshot([step(1), step(0)]))
    assert obs.repeat and not obs.stale and obs.new_steps == () and obs.changed == ()
    assert again.steps == state.steps


def test_one_new_step_is_a_change_carrying_that_step() -> None:
    _, state = observe(None, snapshot([step(0), step(1)]))
    obs, merged = observe(state, snapshot([step(0), step(1), step(2)]))
    assert obs.verdict == "change"
    assert [s["description"] for s in obs.new_steps] == ["step 2"]
    assert obs.changed == ("status",)
    assert obs.previous == {"status": "PICKED_UP", "delivered": False, "step": step(1)}
    assert len(merged.steps) == 3


def test_delivered_before_out_for_delivery() -> None:
    """The later snapshot arrives first: the earlier one is stale, its step is merged into
    the history, and the state keeps DELIVERED."""
    _, state = observe(None, snapshot([step(0), step(3), step(4)]))
    obs, merged = observe(state, snapshot([step(0), step(2), step(3)]))
    assert obs.stale and not obs.repeat
    assert [s["description"] for s in obs.new_steps] == ["step 2"]
    assert merged.fields["status"] == "DELIVERED" and len(merged.steps) == 4
    # A later snapshot holding every step brings nothing new: step 2 is not new again.
    obs, _ = observe(merged, snapshot([step(0), step(2), step(3), step(4)]))
    assert obs.repeat and obs.new_steps == ()


def test_a_changed_top_level_field_is_a_change() -> None:
    _, state = observe(None, snapshot([step(0)]))
    item = snapshot([step(0)])
    item.data["trackingUrl"] = "https://example.com/t/1"
    obs, _ = observe(state, item)
    assert obs.verdict == "change" and obs.changed == ("trackingUrl",)


def test_state_round_trips_through_json() -> None:
    _, state = observe(None, snapshot([step(0), step(1)]))
    again = EntityState.from_json("tracking", "t1", state.to_json())
    assert again == state


def test_orders_compare_as_json_and_by_version() -> None:
    def order(total: float, updated: str) -> Item:
        return Item("order", "o1", {"uuid": "o1", "total": total, "updatedAt": updated})

    def version_of(data: dict[str, Any]) -> Any:
        return data.get("updatedAt")

    _, state = observe(None, order(10, "2025-11-02T10:00:00Z"), version_of)
    obs, _ = observe(state, Item("order", "o1", {"updatedAt": "2025-11-02T10:00:00Z",
                                                 "total": 10, "uuid": "o1"}), version_of)
    assert obs.repeat  # key order ignored
    obs, kept = observe(state, order(9, "2025-11-02T09:00:00+00:00"), version_of)
    assert obs.stale and kept.fields["total"] == 10
    obs, newer = observe(state, order(12, "2025-11-02T11:00:00Z"), version_of)
    assert obs.verdict == "change" and obs.changed == ("total", "updatedAt")
    assert newer.fields["total"] == 12


def test_a_known_step_that_now_carries_an_error_is_news() -> None:
    _, state = observe(None, snapshot([step(0), step(1), step(2)]))
    failed = {**step(2), "error": {"code": "DAMAGED", "message": "parcel damaged"}}
    obs, merged = observe(state, snapshot([step(0), step(1), failed]))
    assert obs.verdict == "change" and obs.new_steps == (failed,)
    assert merged.steps == [step(0), step(1), failed]  # the history takes the error
    again, _ = observe(merged, snapshot([step(0), step(1), failed]))
    assert again.repeat
    # The same step without its error later (an older snapshot) changes nothing back.
    older, kept = observe(merged, snapshot([step(0), step(1), step(2)]))
    assert older.repeat and kept.steps[2] == failed


def test_an_order_without_a_version_or_without_an_offset_keeps_the_stale_check() -> None:
    def order(status: str, updated: Any) -> Item:
        return Item("order", "o1", {"uuid": "o1", "status": status, "updatedAt": updated})

    def version_of(data: dict[str, Any]) -> Any:
        return data.get("updatedAt")

    _, state = observe(None, order("SHIPPED", "2025-11-03T12:00:00Z"), version_of)
    # No version: it cannot be dated, so it is a change, and the version known stays.
    obs, state = observe(state, order("SHIPPED", None), version_of)
    assert obs.verdict == "change" and state.version == "2025-11-03T12:00:00Z"
    obs, _ = observe(state, order("NEW", "2025-11-03T08:00:00Z"), version_of)
    assert obs.stale  # older than the version known before the versionless one
    # An ISO time without an offset is UTC, and a lower-case z is Z, as in step timestamps.
    obs, _ = observe(state, order("PAID", "2025-11-03T11:30:00"), version_of)
    assert obs.stale
    obs, _ = observe(state, order("PAID", "2025-11-03T11:45:00z"), version_of)
    assert obs.stale


def test_content_back_again_counts_as_a_new_occurrence_a_repeat_does_not() -> None:
    def order(status: str) -> Item:
        return Item("order", "o1", {"uuid": "o1", "status": status})

    seen = []
    state = None
    for status in ("PAID", "ON_HOLD", "PAID", "PAID", "ON_HOLD", "PAID"):
        obs, state = observe(state, order(status))
        seen.append((obs.verdict, obs.occurrence))
    # Each change has a number of its own; a repeat takes its change's.
    assert seen == [("first_seen", 1), ("change", 2), ("change", 3), ("repeat", 3),
                    ("change", 4), ("change", 5)]
    assert state is not None
    again = EntityState.from_json("order", "o1", state.to_json())
    assert again.contents == state.contents and len(state.contents) == 2


def test_only_the_last_contents_are_kept() -> None:
    state = None
    for n in range(KEPT_CONTENTS + 3):
        _, state = observe(state, Item("order", "o1", {"uuid": "o1", "n": n}))
    assert state is not None and len(state.contents) == KEPT_CONTENTS
    obs, _ = observe(state, Item("order", "o1", {"uuid": "o1", "n": 0}))
    # Back to a content too far back to be known: still a change with a number of its own.
    assert obs.verdict == "change" and obs.occurrence == KEPT_CONTENTS + 4
    # A repeat of it takes the number of that change.
    _, later = observe(state, Item("order", "o1", {"uuid": "o1", "n": 1}))
    again, _ = observe(later, Item("order", "o1", {"uuid": "o1", "n": 1}))
    assert again.repeat and again.occurrence == KEPT_CONTENTS + 4


@st.composite
def deliveries_of_a_shipment(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    """A true sequence of n steps, and snapshots of it (each holding the steps up to some
    point, as isendu's cumulative snapshots do), shuffled and repeated."""
    n = draw(st.integers(min_value=1, max_value=8))
    cuts = draw(st.lists(st.integers(min_value=1, max_value=n), min_size=1, max_size=12))
    cuts.append(n)  # the last snapshot arrives at some point
    order = draw(st.permutations(cuts))
    return n, [list(range(c)) for c in order]


@given(deliveries_of_a_shipment())
@settings(max_examples=300, deadline=None)
def test_changes_never_go_back_and_each_step_is_new_once(
    case: tuple[int, list[list[int]]],
) -> None:
    n, snapshots = case
    state: EntityState | None = None
    notified_newest: list[str] = []
    new_seen: list[tuple[str, str, str]] = []
    for cut in snapshots:
        obs, state = observe(state, snapshot([step(i) for i in cut]))
        new_seen += [step_key(s) for s in obs.new_steps]
        if obs.verdict in ("first_seen", "change"):  # what a route with the defaults notifies
            notified_newest.append(max(step(i)["timestamp"] for i in cut))
    assert notified_newest == sorted(notified_newest)  # never back in step time
    assert len(notified_newest) == len(set(notified_newest))  # each real change once
    assert sorted(new_seen) == sorted(step_key(step(i)) for i in range(n))  # each step once
    assert state is not None and len(state.steps) == n  # the full history
    assert state.fields["status"] == step(n - 1)["status"]


def test_the_book_writes_only_what_changed_and_undoes_a_failed_batch() -> None:
    from bridge.state import StateBook

    book = StateBook()
    assert book.observe(snapshot([step(0)])).first_seen
    assert set(book.take_changed()) == {("tracking", "t1")}
    assert book.observe(snapshot([step(0)])).repeat
    assert book.take_changed() == {}  # a repeat writes nothing
    # A batch that fails halfway: what it observed is not kept.
    assert book.observe(snapshot([step(0), step(1)])).new_steps
    assert book.observe(snapshot([step(0)], uuid="t2")).first_seen
    book.undo()
    assert ("tracking", "t2") not in book.known
    assert book.observe(snapshot([step(0), step(1)])).new_steps  # still new
    stored = book.take_changed()
    book.forget()  # memory lost (a restart): the state comes back from storage
    book.load(stored, [("tracking", "t1"), ("tracking", "t9")])
    assert book.observe(snapshot([step(0), step(1)])).repeat
    assert book.missing([snapshot([step(0)], uuid="t9")]) == [("tracking", "t9")]


def test_the_book_keeps_states_as_their_json_between_batches() -> None:
    """What was written is what memory keeps (a parsed state took ~4x the memory); a
    shipment that comes back is parsed again, and an undo puts the JSON back."""
    from bridge.state import StateBook

    book = StateBook()
    book.observe(snapshot([step(0)]))
    assert isinstance(book.known[("tracking", "t1")], EntityState)  # within the batch
    written = book.take_changed()
    assert book.known[("tracking", "t1")] == written[("tracking", "t1")]
    seen = book.observe(snapshot([step(0), step(1)]))
    assert [s["description"] for s in seen.new_steps] == ["step 1"]
    assert seen.previous == {"status": step(0)["status"], "delivered": False, "step": step(0)}
    book.undo()
    assert book.known[("tracking", "t1")] == written[("tracking", "t1")]
    assert book.observe(snapshot([step(0)])).repeat
    assert book.known[("tracking", "t1")] == written[("tracking", "t1")]  # a repeat: as it was


def test_the_book_keeps_the_most_recently_observed() -> None:
    from bridge.state import StateBook

    book = StateBook()
    for uuid in ("a", "b", "c"):
        book.observe(snapshot([step(0)], uuid=uuid))
    book.observe(snapshot([step(0)], uuid="a"))  # a repeat, seen last
    book.trim(2)
    assert sorted(u for _, u in book.known) == ["a", "c"]


def test_a_state_keeps_numbers_no_float_holds_as_written() -> None:
    from bridge.parse import parse_request

    body = (b'{"order": [{"uuid": "n1", "total": 1e999, "n": 123456789012345678901234567890,'
            b' "lines": [{"qty": -2.5E+400}, 1.5]}]}')
    [item] = parse_request(body).items  # type: ignore[union-attr]
    _, state = observe(None, item)
    text = state.to_json()
    assert '"n":123456789012345678901234567890' in text and '"total":1e999' in text
    again = EntityState.from_json("order", "n1", text)
    assert observe(again, item)[0].repeat  # read back, it is the same order


def test_a_coalescing_window_gathers_the_steps_of_its_changes() -> None:
    from bridge.state import hold

    seen, state = observe(None, snapshot([step(0)]))
    first, wait, window = hold(state, "r", 10.0, seen, now=100.0, flush=False)
    assert wait == 10.0 and [s["description"] for s in first.new_steps] == ["step 0"]
    seen, state = observe(state, snapshot([step(0), step(1)]))
    second, wait, again = hold(state, "r", 10.0, seen, now=104.0, flush=False)
    assert again == window and wait == 6.0  # the same window: it closes when it was to
    assert [s["description"] for s in second.new_steps] == ["step 0", "step 1"]
    assert second.previous is None  # what was known before the window opened
    # Written with the state, the window survives a restart.
    state = EntityState.from_json("tracking", "t1", state.to_json())
    seen, state = observe(state, snapshot([step(0), step(1), step(2, error=True)]))
    flushed, wait, last = hold(state, "r", 10.0, seen, now=105.0, flush=True)
    assert (wait, last) == (0.0, window) and len(flushed.new_steps) == 3
    assert state.windows == {}  # closed by the step with an error
    seen, state = observe(state, snapshot([step(0), step(1), step(2, error=True), step(3)]))
    fresh, wait, other = hold(state, "r", 10.0, seen, now=106.0, flush=False)
    assert other != window and [s["description"] for s in fresh.new_steps] == ["step 3"]


def test_odd_steps_are_left_out_or_keyed_as_text() -> None:
    """What isendu's docs do not promise: `steps` that is no list, entries that are no
    objects, a step without a description or with a number for a status."""
    item = Item("tracking", "t9", {"uuid": "t9", "status": "X", "steps": "not a list"})
    obs, state = observe(None, item)
    assert obs.new_steps == () and state.steps == [] and state.newest is None
    odd = {"timestamp": "2025-11-01T09:00:00Z", "status": 3}
    item = Item("tracking", "t9", {"uuid": "t9", "status": "X",
                                   "steps": [7, None, odd, dict(odd), step(0)]})
    obs, state = observe(state, item)
    assert [s["status"] for s in obs.new_steps] == [step(0)["status"], 3]  # by time, once
    assert step_key(odd) == ("2025-11-01T09:00:00Z", "3", "")
    again, _ = observe(state, item)
    assert again.repeat


def test_a_state_stored_before_contents_were_kept_still_loads() -> None:
    """States written before 28aa641 have no `contents`: they load, and the content they
    hold counts as seen once from the next change on."""
    _, state = observe(None, Item("order", "o1", {"uuid": "o1", "status": "PAID"}))
    doc = json.loads(state.to_json())
    del doc["contents"]
    old = EntityState.from_json("order", "o1", json.dumps(doc))
    assert old.contents == {}
    obs, merged = observe(old, Item("order", "o1", {"uuid": "o1", "status": "ON_HOLD"}))
    # Change number 2: ids salted, none of those stored before the upgrade (unsalted).
    assert obs.verdict == "change" and obs.occurrence == 2 and len(merged.contents) == 1


def test_true_and_1_are_not_the_same_value() -> None:
    """JSON tells them apart (a receiver reading `delivered` does too); Python does not."""
    _, state = observe(None, Item("order", "o1", {"uuid": "o1", "paid": True, "n": 1}))
    obs, _ = observe(state, Item("order", "o1", {"uuid": "o1", "paid": 1, "n": 1}))
    assert obs.verdict == "change" and obs.changed == ("paid",)
    obs, _ = observe(state, Item("order", "o1", {"uuid": "o1", "paid": True, "n": 1.0}))
    assert obs.changed == ("n",)
    obs, _ = observe(state, Item("order", "o1", {"n": 1, "paid": True, "uuid": "o1"}))
    assert obs.repeat


def test_every_change_has_a_number_of_its_own_however_often_content_returns() -> None:
    """A B A C0..C19 A X A: each change's number is new, so no change of it can get an id
    stored for an earlier one (contents further back than KEPT_CONTENTS included)."""
    statuses = ["A", "B", "A", *[f"C{i}" for i in range(KEPT_CONTENTS + 4)], "A", "X", "A"]
    state, numbers = None, []
    for status in statuses:
        obs, state = observe(state, Item("order", "o1", {"uuid": "o1", "status": status}))
        assert not obs.repeat
        numbers.append(obs.occurrence)
    assert numbers == list(range(1, len(statuses) + 1))


def test_a_type_changed_deep_inside_a_field_is_a_change_too() -> None:
    _, state = observe(None, Item("order", "o1", {"uuid": "o1", "dims": {"w": 1}, "t": [1]}))
    obs, _ = observe(state, Item("order", "o1", {"uuid": "o1", "dims": {"w": True}, "t": [1]}))
    assert obs.verdict == "change" and obs.changed == ("dims",)
    obs, _ = observe(state, Item("order", "o1", {"uuid": "o1", "dims": {"w": 1}, "t": [1.0]}))
    assert obs.changed == ("t",)
