"""Route conditions: each operator's meaning, path forms, and properties over random items."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import BridgeConfig, predicate_of
from bridge.routing.conditions import compile_leaf, compile_path

TRACKING = {
    "uuid": "u1", "status": "IN_TRANSIT", "delivered": False, "attempts": 2,
    "trackingNumber": "GLS821026103283",
    "steps": [
        {"status": "CREATED", "timestamp": "2025-11-03T10:50:09Z", "location": "Lyon"},
        {"status": "EXCEPTION", "timestamp": "2025-11-04T08:00:00Z",
         "error": {"code": "ADDR", "message": "address not found"}},
    ],
    "tags": ["fragile", "priority"],
}


@pytest.mark.parametrize(("path", "op", "value", "expected"), [
    ("$.status", "equals", "IN_TRANSIT", True),
    ("status", "equals", "DELIVERED", False),
    ("$.delivered", "equals", False, True),
    ("$.delivered", "equals", 0, False),  # booleans never equal numbers
    ("$.attempts", "equals", True, False),
    ("$.status", "not_equals", "DELIVERED", True),
    ("$.missing", "not_equals", "x", True),  # nothing found, so nothing equals
    ("$.status", "in", ["IN_TRANSIT", "DELIVERED"], True),
    ("$.status", "not_in", ["IN_TRANSIT"], False),
    ("$.trackingNumber", "matches", "^GLS\\d+$", True),
    ("$.trackingNumber", "matches", "^DHL", False),
    ("$.attempts", "matches", "^2$", True),  # numbers are matched as text
    ("$.steps[*].error.code", "exists", True, True),
    ("$.steps[0].error", "exists", True, False),
    ("$.steps[0].error", "exists", False, True),
    ("$.attempts", "gt", 1, True),
    ("$.attempts", "gte", 2, True),
    ("$.attempts", "lt", 2, False),
    ("$.attempts", "lte", 2, True),
    ("$.status", "gt", 1, False),  # a string never compares with a number
    ("$.steps[*].timestamp", "gt", "2025-11-04T00:00:00Z", True),  # ISO times compare as text
    ("$.trackingNumber", "contains", "8210", True),
    ("$.tags", "contains", "fragile", True),
    ("$.tags", "contains", "cold", False),
    ("$.steps[*].status", "equals", "EXCEPTION", True),  # any of several values
    ("$.steps[*].status", "not_equals", "EXCEPTION", False),  # ... negation: none may
    ("$.steps[?(@.status == 'EXCEPTION')].error.message", "matches", "address", True),
])
def test_operator(path: str, op: str, value: Any, expected: bool) -> None:
    assert compile_leaf(path, op, value)(TRACKING) is expected


@pytest.mark.parametrize(("path", "values"), [
    ("$.status", ["IN_TRANSIT"]),
    ("status", ["IN_TRANSIT"]),
    ("$.steps[1].error.code", ["ADDR"]),
    ("steps[*].status", ["CREATED", "EXCEPTION"]),
    ("$.nope.deeper", []),
    ("$.status.deeper", []),
])
def test_paths_simple_and_full(path: str, values: list[Any]) -> None:
    assert compile_path(path)(TRACKING) == values


@pytest.mark.parametrize(("op", "value", "message"), [
    ("in", "x", "expects a list"),
    ("matches", "(", "not a valid regular expression"),
    ("exists", "yes", "expects true or false"),
    ("gt", [1], "expects a number or a string"),
    ("contains", {"a": 1}, "expects a single value"),
    ("like", "x", "unknown operator 'like'"),
])
def test_bad_operands_are_refused_at_compile_time(op: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_leaf("$.status", op, value)


def _when(cond: Any) -> Any:
    cfg = BridgeConfig.model_validate(
        {"sinks": {"o": {"type": "console"}}, "routes": [{"name": "r", "to": "o", "when": cond}]})
    return predicate_of(cfg.routes[0].when)


def test_combinators() -> None:
    delivered = {"path": "$.status", "equals": "DELIVERED"}
    in_transit = {"path": "$.status", "equals": "IN_TRANSIT"}
    has_error = {"path": "$.steps[*].error", "exists": True}
    assert _when([in_transit, has_error])(TRACKING)
    assert not _when([delivered, has_error])(TRACKING)
    assert _when({"any": [delivered, in_transit]})(TRACKING)
    assert not _when({"not": {"any": [delivered, in_transit]}})(TRACKING)
    assert _when({"all": [{"not": delivered}, {"any": [has_error, delivered]}]})(TRACKING)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4))
items = st.dictionaries(st.sampled_from(["status", "a", "b"]), scalars, max_size=3)


@given(item=items, value=scalars)
def test_not_equals_is_the_negation_of_equals(item: dict[str, Any], value: Any) -> None:
    eq = compile_leaf("$.status", "equals", value)(item)
    ne = compile_leaf("$.status", "not_equals", value)(item)
    assert eq != ne


@given(item=items, options=st.lists(scalars, max_size=4))
def test_in_is_any_equals_and_not_in_its_negation(item: dict[str, Any], options: list[Any]) -> None:
    inside = compile_leaf("$.status", "in", options)(item)
    assert inside == any(compile_leaf("$.status", "equals", o)(item) for o in options)
    assert compile_leaf("$.status", "not_in", options)(item) is not inside


@given(item=items)
def test_simple_path_agrees_with_jsonpath(item: dict[str, Any]) -> None:
    fast = compile_path("$.status")(item)
    full = compile_path("$['status']")(item)  # not a plain dotted path: jsonpath-ng walks it
    assert fast == full


@given(item=items, a=scalars, b=scalars)
def test_any_and_all_follow_boolean_logic(item: dict[str, Any], a: Any, b: Any) -> None:
    pa = {"path": "$.a", "equals": a}
    pb = {"path": "$.b", "equals": b}
    ra, rb = _when(pa)(item), _when(pb)(item)
    assert _when({"all": [pa, pb]})(item) == (ra and rb)
    assert _when({"any": [pa, pb]})(item) == (ra or rb)
    assert _when({"not": pa})(item) == (not ra)


# Nested documents of dicts, lists and scalars over a few keys, so random paths hit often.
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "steps"]), children, max_size=3),
    ),
    max_leaves=12,
)
path_steps = st.lists(
    st.sampled_from([".a", ".b", ".steps", "[*]", "[0]", "[1]"]), min_size=1, max_size=4)


@given(doc=st.dictionaries(st.sampled_from(["a", "b", "steps"]), documents, max_size=3),
       steps=path_steps)
def test_fast_paths_agree_with_jsonpath_ng(doc: dict[str, Any], steps: list[str]) -> None:
    """`$.x[*].y` and `$.x[0]` are walked without jsonpath-ng: they must find exactly what
    jsonpath-ng finds, in the same order, on any shape of document."""
    from jsonpath_ng.ext import parse

    path = "$" + "".join(steps)
    expected = [m.value for m in parse(path).find(doc)]
    assert compile_path(path)(doc) == expected


values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["a", "b"]), scalars, max_size=2))
leaves = st.one_of(
    st.tuples(st.sampled_from(["equals", "not_equals", "contains", "gt", "lte"]),
              st.one_of(st.integers(-5, 5), st.text(max_size=2))),
    st.tuples(st.sampled_from(["in", "not_in"]),
              st.one_of(st.lists(st.text(max_size=2), max_size=4), st.lists(scalars, max_size=4))),
    st.tuples(st.just("exists"), st.booleans()),
    st.tuples(st.just("matches"), st.sampled_from(["^a", "1", "b$"])),
)


@given(item=st.dictionaries(st.sampled_from(["status", "a"]), values, max_size=2), leaf=leaves)
def test_single_key_leaves_agree_with_the_general_walk(
    item: dict[str, Any], leaf: tuple[str, Any]
) -> None:
    """`$.status` leaves take a one-lookup shortcut (and `in` over strings a set): each
    must decide exactly as the same leaf through jsonpath-ng's `$['status']`."""
    op, value = leaf
    assert compile_leaf("$.status", op, value)(item) == compile_leaf("$['status']", op, value)(item)


# ---- conditions on what a snapshot brings against its shipment's state ----------------------

def _seen(before: dict[str, Any] | None, now: dict[str, Any]) -> Any:
    """The observation of `now` after `before` (None: first sight)."""
    from bridge.models import Item
    from bridge.state import observe

    state = None if before is None else observe(None, Item("tracking", "u1", before))[1]
    return observe(state, Item("tracking", "u1", now))[0]


OUT = {"uuid": "u1", "status": "OUT_FOR_DELIVERY", "steps": [
    {"timestamp": "2025-11-04T08:00:00Z", "status": "OUT_FOR_DELIVERY"}]}
DONE = {"uuid": "u1", "status": "DELIVERED", "steps": OUT["steps"] + [
    {"timestamp": "2025-11-04T12:00:00Z", "status": "DELIVERED"}]}
MORE = {**DONE, "steps": DONE["steps"] + [{"timestamp": "2025-11-04T13:00:00Z",
                                           "status": "DELIVERED", "description": "signed"}]}


@pytest.mark.parametrize(("cond", "before", "now", "expected"), [
    ({"transition": {"from": "OUT_FOR_DELIVERY", "to": "DELIVERED"}}, OUT, DONE, True),
    ({"transition": {"to": "DELIVERED"}}, OUT, DONE, True),
    ({"transition": {"to": ["DELIVERED", "RETURNED"]}}, None, DONE, True),  # first sight
    ({"transition": {"from": "OUT_FOR_DELIVERY"}}, None, DONE, False),  # nothing before
    ({"transition": {"from": ["IN_TRANSIT"], "to": "DELIVERED"}}, OUT, DONE, False),
    ({"transition": {"to": "DELIVERED"}}, DONE, MORE, False),  # a new step, same status
    ({"changed": "status"}, OUT, DONE, True),
    ({"changed": "status"}, DONE, MORE, False),
    ({"changed": "status"}, None, OUT, True),  # everything is a change on first sight
    ({"changed": "trackingUrl"}, OUT, {**OUT, "trackingUrl": "https://t/1"}, True),
    ({"first_seen": True}, None, OUT, True),
    ({"first_seen": True}, OUT, DONE, False),
    ({"first_seen": False}, OUT, DONE, True),
    ({"all": [{"first_seen": False}, {"not": {"changed": "status"}}]}, DONE, MORE, True),
])
def test_state_conditions(cond: Any, before: Any, now: Any, expected: bool) -> None:
    assert _when(cond)(now, _seen(before, now)) is expected


def test_state_conditions_without_state_count_as_first_sight() -> None:
    """Where no state is kept (state.enabled: false), a snapshot is all the bridge knows."""
    assert _when({"first_seen": True})(DONE)
    assert _when({"changed": "status"})(DONE)
    assert _when({"transition": {"to": "DELIVERED"}})(DONE)
    assert not _when({"transition": {"from": "OUT_FOR_DELIVERY"}})(DONE)
