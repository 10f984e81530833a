"""Route conditions, compiled once into plain Python predicates.

A leaf is `{path: <JSONPath>, <op>: <value>}`. A path that yields several values satisfies a
leaf when any of them does; the negative ops (`not_equals`, `not_in`) are the negation of
their positive op, so `steps[*].status not_equals EXCEPTION` means "no step is EXCEPTION".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext import parse as jsonpath_parse  # type: ignore[attr-defined]

from bridge.state import Observation


class Predicate(Protocol):
    """`item` is the snapshot's data; `seen` what it brings against its shipment's state
    (bridge/state.py), None where no state is kept: then it counts as seen for the first
    time, the only thing one snapshot alone can tell."""

    def __call__(self, item: dict[str, Any], seen: Observation | None = None, /) -> bool: ...


Getter = Callable[[dict[str, Any]], list[Any]]

OPS = (
    "equals", "not_equals", "in", "not_in", "matches", "exists",
    "gt", "gte", "lt", "lte", "contains",
)

# Dotted keys, `[*]` and `[n]` (`$.status`, `$.total.amount`, `$.steps[*].error.code`) are
# walked with plain dict and list operations: most routes use only these, and that is ~20x
# cheaper than a jsonpath-ng walk. Anything else (filters, slices, recursion) uses jsonpath-ng.
_STEP = r"(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\*\]|\[[0-9]+\])"
_FAST_PATH = re.compile(r"^(?:\$" + _STEP + r"+|[A-Za-z_][A-Za-z0-9_]*" + _STEP + r"*)$")
_STEP_TOKEN = re.compile(_STEP)
_EVERY = object()  # the `[*]` step


class _NotAList(Exception):
    """A `[*]`/`[n]` step met something other than a list: jsonpath-ng has rules of its own
    for that, so the walk hands the item to it rather than guess."""


def compile_path(path: str) -> Getter:
    """Return a function item -> list of values found at `path`. Raises ValueError."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("expected a JSONPath such as $.status or $.steps[*].status")
    try:
        expr = jsonpath_parse(path)
    except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
        raise ValueError(f"not a valid JSONPath: {path!r} ({exc})") from None

    def find(item: dict[str, Any]) -> list[Any]:
        return [match.value for match in expr.find(item)]

    if _FAST_PATH.match(path):
        return _fast_getter(_steps(path), find)
    return find


def single_key(path: str) -> str | None:
    """`status` for `$.status` or `status`: the path most leaves use, tested with one dict
    lookup instead of a list of found values."""
    if not isinstance(path, str) or not _FAST_PATH.match(path):
        return None
    steps = _steps(path)
    return steps[0] if len(steps) == 1 and isinstance(steps[0], str) else None


def _steps(path: str) -> tuple[str | int | object, ...]:
    body = path[1:] if path.startswith("$") else "." + path
    steps: list[str | int | object] = []
    for token in _STEP_TOKEN.findall(body):
        if token == "[*]":
            steps.append(_EVERY)
        elif token.startswith("["):
            steps.append(int(token[1:-1]))
        else:
            steps.append(token[1:])
    return tuple(steps)


def _fast_getter(steps: tuple[str | int | object, ...], slow: Getter) -> Getter:
    if all(isinstance(s, str) for s in steps):
        keys = tuple(str(s) for s in steps)
        if len(keys) == 1:
            key = keys[0]

            def one(item: dict[str, Any]) -> list[Any]:
                return [item[key]] if key in item else []

            return one

        def walk(item: dict[str, Any]) -> list[Any]:
            node: Any = item
            for key in keys:
                if isinstance(node, dict) and key in node:
                    node = node[key]
                else:
                    return []
            return [node]

        return walk

    def walk_lists(item: dict[str, Any]) -> list[Any]:
        try:
            return _walk(steps, [item])
        except _NotAList:
            return slow(item)

    return walk_lists


def _walk(steps: tuple[str | int | object, ...], nodes: list[Any]) -> list[Any]:
    for step in steps:
        found: list[Any] = []
        for node in nodes:
            if isinstance(step, str):
                if isinstance(node, dict) and step in node:
                    found.append(node[step])
            elif not isinstance(node, list):
                raise _NotAList
            elif step is _EVERY:
                found.extend(node)
            elif isinstance(step, int) and step < len(node):
                found.append(node[step])
        nodes = found
        if not nodes:
            break
    return nodes


def _same(a: Any, b: Any) -> bool:
    # YAML `true` must not equal isendu's 1, nor `1` equal true.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _is_number(v: Any) -> bool:
    # Decimal: a number beyond a float's range, kept exact (bridge.jsontext.BigNumber); it
    # compares exactly with ints and floats.
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def _comparable(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


def compile_leaf(path: str, op: str, value: Any) -> Predicate:
    """Compile one leaf. Raises ValueError with a message for people."""
    get = compile_path(path)
    key = single_key(path)
    test: Callable[[Any], bool]
    negate = False
    if op in ("equals", "not_equals"):
        negate = op == "not_equals"

        def test(v: Any) -> bool:
            return _same(v, value)
    elif op in ("in", "not_in"):
        if not isinstance(value, list):
            raise ValueError(f"`{op}` expects a list of values, got {type(value).__name__}")
        negate = op == "not_in"
        options = list(value)
        if options and all(isinstance(o, str) for o in options):
            strings = frozenset(options)

            def test(v: Any) -> bool:
                return isinstance(v, str) and v in strings
        else:

            def test(v: Any) -> bool:
                return any(_same(v, o) for o in options)
    elif op == "matches":
        if not isinstance(value, str):
            raise ValueError("`matches` expects a regular expression string")
        try:
            rx = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {value!r} ({exc})") from None

        def test(v: Any) -> bool:
            if isinstance(v, str):
                return rx.search(v) is not None
            if _is_number(v):
                return rx.search(str(v)) is not None
            return False
    elif op == "exists":
        if not isinstance(value, bool):
            raise ValueError("`exists` expects true or false")
        want = value
        if key is not None:
            return lambda item, seen=None: (key in item) is want

        def exists(item: dict[str, Any], seen: Observation | None = None) -> bool:
            return bool(get(item)) is want

        return exists
    elif op in ("gt", "gte", "lt", "lte"):
        if not (_is_number(value) or isinstance(value, str)):
            raise ValueError(f"`{op}` expects a number or a string (e.g. an ISO timestamp)")
        if isinstance(value, float) and math.isnan(value):
            # Nothing is greater or less than NaN: the route could never match.
            raise ValueError(f"`{op}` expects a number, got .nan, which nothing compares to")
        cmp: Callable[[Any], bool] = {
            "gt": lambda a: a > value,
            "gte": lambda a: a >= value,
            "lt": lambda a: a < value,
            "lte": lambda a: a <= value,
        }[op]

        def test(v: Any) -> bool:
            return _comparable(v, value) and bool(cmp(v))
    elif op == "contains":
        if isinstance(value, dict | list):
            raise ValueError("`contains` expects a single value (a substring or a list element)")

        def test(v: Any) -> bool:
            if isinstance(v, str) and isinstance(value, str):
                return value in v
            if isinstance(v, list):
                return any(_same(e, value) for e in v)
            return False
    else:
        raise ValueError(f"unknown operator {op!r}; expected one of: {', '.join(OPS)}")

    if key is not None:
        if negate:
            return lambda item, seen=None: not (key in item and test(item[key]))
        return lambda item, seen=None: key in item and test(item[key])

    if negate:

        def negative(item: dict[str, Any], seen: Observation | None = None) -> bool:
            return not any(test(v) for v in get(item))

        return negative

    def positive(item: dict[str, Any], seen: Observation | None = None) -> bool:
        return any(test(v) for v in get(item))

    return positive


# ---- conditions on what a snapshot brings (its shipment's state) ---------------------------

def changed(field: str) -> Predicate:
    """True when top-level `field` differs from the shipment's state, and on first sight."""
    if not isinstance(field, str) or not field:
        raise ValueError("`changed` expects the name of a top-level field, e.g. status")

    def test(item: dict[str, Any], seen: Observation | None = None) -> bool:
        return seen is None or seen.first_seen or field in seen.changed

    return test


def first_seen(want: bool) -> Predicate:
    if not isinstance(want, bool):
        raise ValueError("`first_seen` expects true or false")
    return lambda item, seen=None: (seen is None or seen.first_seen) is want


_NOTHING = object()


def transition(from_: Any = _NOTHING, to: Any = _NOTHING) -> Predicate:
    """True when `status` changed (first sight counts as a change from nothing) from one of
    `from_` to one of `to`; a side left out matches any status. First sight has no status
    before it, so it never matches a `from`."""
    before = _status_set("from", from_)
    after = _status_set("to", to)

    def test(item: dict[str, Any], seen: Observation | None = None) -> bool:
        now = item.get("status")
        previous = seen.previous if seen is not None else None
        was = previous.get("status") if previous is not None else _NOTHING
        if previous is not None and _same(was, now):
            return False  # the status did not change: no transition
        if before is not None and (was is _NOTHING or not _one_of(was, before)):
            return False
        return after is None or _one_of(now, after)

    return test


def _status_set(side: str, value: Any) -> tuple[Any, ...] | None:
    if value is _NOTHING:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, dict | list) for v in values):
        raise ValueError(f"`transition.{side}` expects a status or a list of statuses, "
                         "e.g. OUT_FOR_DELIVERY or [IN_TRANSIT, OUT_FOR_DELIVERY]")
    return tuple(values)


def _one_of(value: Any, options: tuple[Any, ...]) -> bool:
    return any(_same(value, o) for o in options)


def all_of(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    return lambda item, seen=None: all(p(item, seen) for p in preds)


def any_of(preds: list[Predicate]) -> Predicate:
    return lambda item, seen=None: any(p(item, seen) for p in preds)


def not_(pred: Predicate) -> Predicate:
    return lambda item, seen=None: not pred(item, seen)


def always(item: dict[str, Any], seen: Observation | None = None) -> bool:
    return True
