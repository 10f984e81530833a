"""Parse an isendu request body: a verification, or a batch of items. Refuse, never guess."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from bridge import jsontext
from bridge.errors import PayloadError
from bridge.jsontext import has_long_number, parse_float, parse_int
from bridge.models import KINDS, Batch, Item


@dataclass(frozen=True, slots=True)
class Verification:
    key_id: str


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_decode(body: bytes) -> Any:
    """The stdlib path: integers exact, numbers beyond a float's range kept as written
    (BigNumber), and refusing what orjson refuses: NaN, Infinity, and lone surrogate
    escapes (\\ud800), which no UTF-8 text can hold."""
    # Decoded explicitly: json.loads(bytes) would guess UTF-16/32 from the first bytes.
    doc = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant,
                     parse_float=parse_float, parse_int=parse_int)
    try:
        json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError("a string holds a lone surrogate escape such as \\ud800; "
                           "expected valid Unicode text") from None
    return doc


def _decode(body: bytes) -> Any:
    try:
        if not has_long_number(body):
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                if not exc.msg.startswith("number is infinity"):
                    raise
        return _exact_decode(body)
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8 text; expected a JSON object") from None
    except json.JSONDecodeError as exc:  # orjson's error is a subclass
        if "not valid UTF-8" in exc.msg:
            raise PayloadError("body is not UTF-8 text; expected a JSON object") from None
        raise PayloadError(
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:  # NaN / Infinity on the stdlib path
        raise PayloadError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("JSON nested too deeply") from None


def parse_request(body: bytes, received_at: str | None = None, batch_id: str | None = None
                  ) -> Verification | Batch:
    """Turn a request body into a Verification or a Batch; PayloadError says what and where."""
    if not body.strip():
        raise PayloadError("empty body; expected a JSON object")
    doc = _decode(body)
    if not isinstance(doc, dict):
        raise PayloadError(f"expected a JSON object, got {_json_type(doc)}")
    if "keyId" in doc and "order" not in doc and "tracking" not in doc:
        key_id = doc["keyId"]
        if not isinstance(key_id, str) or not key_id:
            raise PayloadError("expected keyId to be a non-empty string", "$.keyId")
        return Verification(key_id)
    items: list[Item] = []
    for kind in KINDS:
        entries = doc.get(kind)
        if entries is None:  # absent, or `"order": null`: no items of this kind
            continue
        if not isinstance(entries, list):
            raise PayloadError(f"expected a list of {kind} items, got {_json_type(entries)}",
                               f"$.{kind}")
        for i, entry in enumerate(entries):
            where = f"$.{kind}[{i}]"
            if not isinstance(entry, dict):
                raise PayloadError(f"expected an object, got {_json_type(entry)}", where)
            item_uuid = entry.get("uuid")
            if not isinstance(item_uuid, str) or not item_uuid.strip():
                got = (_json_type(item_uuid) if not isinstance(item_uuid, str)
                       else "only whitespace" if item_uuid else "an empty string")
                problem = ("uuid missing" if "uuid" not in entry
                           else f"expected uuid to be a non-empty string, got {got}")
                raise PayloadError(problem, f"{where}.uuid")
            items.append(Item(kind=kind, uuid=item_uuid, data=entry))
    _refuse_too_deep(body, doc, items)
    # As random as a uuid4's hex, without building the UUID object (a cost per batch).
    # A body with neither list is odd enough to name its keys in a warning (not an error:
    # isendu may send an empty batch, and anything but 200 would only make it retry).
    # `{"order": null}` has no list either: the same warning, naming `order`.
    unknown = () if any(doc.get(kind) is not None for kind in KINDS) else tuple(doc)
    return Batch(batch_id=batch_id or os.urandom(16).hex(), received_at=received_at or utc_now(),
                 items=items, unknown_keys=unknown)


# orjson writes up to this many levels; deeper items take the stdlib encoder, whose limit is
# Python's recursion limit. Fewer brackets than this in the whole body: nothing to check.
_ORJSON_DEPTH = 254


def _refuse_too_deep(body: bytes, doc: Any, items: list[Item]) -> None:
    """An item too deeply nested to be encoded again (for its delivery id, for a sink) is
    refused here, before it is stored, not found later by the sequencer."""
    if body.count(b"[") + body.count(b"{") <= _ORJSON_DEPTH:
        return
    try:
        jsontext.orjson_dumps(doc)
        return
    except TypeError:  # too deep for orjson, or an integer beyond 64 bits: look closer
        pass
    counters = dict.fromkeys(KINDS, 0)
    for item in items:
        where = f"$.{item.kind}[{counters[item.kind]}]"
        counters[item.kind] += 1
        try:
            jsontext.dumps(item.data)  # what the router's canonical_json falls back to
        except RecursionError:
            raise PayloadError("an item is nested too deeply to store; expected at most a "
                               "few hundred levels of objects and arrays", where) from None


def utc_now() -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as `received_at` is shown everywhere."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Decimal):
        return "a number"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
