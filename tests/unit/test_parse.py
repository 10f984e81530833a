"""Parsing isendu bodies: what is accepted, and what is refused with where and why."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import PayloadError
from bridge.models import Batch
from bridge.parse import Verification, parse_request
from tests.helpers.bridge import sample_batch, sample_batches


def test_verification() -> None:
    assert parse_request(b'{"keyId": "4f1c2a9e-demo-key-id"}') == Verification(
        "4f1c2a9e-demo-key-id")


def test_sample_batches_parse_with_every_item() -> None:
    for doc in [sample_batch(), *sample_batches()]:
        batch = parse_request(json.dumps(doc).encode())
        assert isinstance(batch, Batch)
        assert len(batch.items) == len(doc.get("order", [])) + len(doc.get("tracking", []))
        assert [i.data for i in batch.items] == doc.get("order", []) + doc.get("tracking", [])


@pytest.mark.parametrize("body", [b"{}", b'{"order": []}', b'{"tracking": []}',
                                  b'{"order": null, "tracking": []}'])
def test_empty_batches_are_fine(body: bytes) -> None:
    batch = parse_request(body)
    assert isinstance(batch, Batch) and batch.items == []


@pytest.mark.parametrize(("body", "unknown"), [
    (b"{}", ()), (b'{"orders": []}', ("orders",)), (b'{"order": null}', ("order",)),
    (b'{"order": null, "tracking": null}', ("order", "tracking")),
    (b'{"order": null, "tracking": []}', ()),  # a list of tracking items, empty: no warning
])
def test_a_null_list_is_a_missing_list_and_warned_about_like_an_unknown_key(
        body: bytes, unknown: tuple[str, ...]) -> None:
    batch = parse_request(body)
    assert isinstance(batch, Batch) and batch.items == []
    assert batch.unknown_keys == unknown


@pytest.mark.parametrize(("body", "where", "message"), [
    (b"{bad", "$", "malformed JSON at line 1 column 2"),
    (b"", "$", "empty body; expected a JSON object"),
    (b" \r\n", "$", "empty body; expected a JSON object"),
    (b"\xff\xfe", "$", "not UTF-8"),
    (b"[1, 2]", "$", "expected a JSON object, got an array"),
    (b'"text"', "$", "expected a JSON object, got a string"),
    (b'{"order": {"uuid": "x"}}', "$.order", "expected a list of order items, got an object"),
    (b'{"tracking": "x"}', "$.tracking", "expected a list of tracking items, got a string"),
    (b'{"tracking": [{"uuid": "a"}, 5]}', "$.tracking[1]", "expected an object, got a number"),
    (b'{"order": [{"status": "NEW"}]}', "$.order[0].uuid", "uuid missing"),
    (b'{"order": [{"uuid": ""}]}', "$.order[0].uuid",
     "expected uuid to be a non-empty string, got an empty string"),
    (b'{"order": [{"uuid": "  "}]}', "$.order[0].uuid",
     "expected uuid to be a non-empty string, got only whitespace"),
    (b'{"order": [{"uuid": 42}]}', "$.order[0].uuid",
     "expected uuid to be a non-empty string, got a number"),
    (b'{"keyId": 42}', "$.keyId", "non-empty string"),
])
def test_bad_bodies_say_what_and_where(body: bytes, where: str, message: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_request(body)
    assert info.value.where == where
    assert message in info.value.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8,
)


@given(doc=json_values)
def test_any_json_is_either_parsed_or_refused_cleanly(doc: Any) -> None:
    try:
        parse_request(json.dumps(doc).encode())
    except PayloadError as exc:
        assert exc.where.startswith("$") and exc.message


@given(extra=st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "uuid"),
                             json_values, max_size=4))
def test_unknown_fields_pass_through_untouched(extra: dict[str, Any]) -> None:
    item = {"uuid": "u-1", **extra}
    batch = parse_request(json.dumps({"tracking": [item]}).encode())
    assert isinstance(batch, Batch)
    assert batch.items[0].data == item


@pytest.mark.parametrize("number", [
    123456789012345678901234567890, -9223372036854775809, 18446744073709551616,
    9223372036854775807, -9223372036854775808, 18446744073709551615,
])
def test_integers_beyond_64_bits_pass_through_exactly(number: int) -> None:
    for body in (f'{{"order": [{{"uuid": "a", "n": {number}}}]}}',
                 f'{{"order": [{{"uuid": "a", "l": [1, {number}]}}]}}'):
        batch = parse_request(body.encode())
        assert isinstance(batch, Batch)
        found = batch.items[0].data.get("n", batch.items[0].data.get("l", [0, 0])[-1])
        assert found == number and isinstance(found, int)


@pytest.mark.parametrize("body", [
    b'{"order": [{"uuid": "a", "x": NaN}]}',
    b'{"order": [{"uuid": "a", "x": Infinity, "n": 12345678901234567890123}]}',  # stdlib path
])
def test_nan_and_infinity_are_not_json(body: bytes) -> None:
    with pytest.raises(PayloadError, match="malformed JSON"):
        parse_request(body)


@given(doc=json_values)
def test_canonical_json_is_exact_and_independent_of_key_order(doc: Any) -> None:
    from bridge.canonical import canonical_json

    text = canonical_json(doc)
    assert json.loads(text) == doc
    if isinstance(doc, dict):
        assert canonical_json(dict(reversed(list(doc.items())))) == text


@pytest.mark.parametrize(("body", "long"), [
    (b'{"a": 1234567890123456789}', True),
    (b'{"a":[1,\n -1234567890123456789]}', True),
    (b'{"a": 123456789012345678}', False),  # 18 digits: within 64 bits
    (b'{"trackingNumber": "9400111899223197428490"}', False),  # a quoted run is text
    (b'{"note": "ids: 1, 1234567890123456789"}', True),  # looks like a number: exact path
    (b'{"a": 1.12345678901234567890}', False),  # a fraction: a float either way
])
def test_numbers_needing_the_exact_parser_are_found(body: bytes, long: bool) -> None:
    from bridge.jsontext import has_long_number

    assert has_long_number(body) is long


@given(number=st.integers(), spaces=st.sampled_from(["", " ", "\n  "]))
def test_every_integer_reads_back_exactly(number: int, spaces: str) -> None:
    body = f'{{"order": [{{"uuid": "a", "n":{spaces}{number}, "l": [{number},{number}]}}]}}'
    batch = parse_request(body.encode())
    assert isinstance(batch, Batch)
    data = batch.items[0].data
    assert data["n"] == number and data["l"] == [number, number]
    assert isinstance(data["n"], int)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"order": [{"uuid": "a", "s": "\\ud800", "n": 12345678901234567890123}]}',
     "lone surrogate"),
    (b'{"order": [{"uuid": "a", "s": "\\ud800"}]}', "malformed JSON"),
])
def test_both_parsers_refuse_what_cannot_be_stored(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_request(body)


@pytest.mark.parametrize("depth", [300, 1000])
def test_deeply_nested_items_are_stored_or_refused_never_a_crash(depth: int) -> None:
    from bridge.canonical import canonical_json

    body = ('{"order": [{"uuid": "a", "deep": ' + "[" * depth + "]" * depth + "}]}").encode()
    try:
        batch = parse_request(body)
    except PayloadError as exc:
        assert "nested" in exc.message or "recursion" in exc.message.lower()
        return
    assert isinstance(batch, Batch)
    try:
        assert json.loads(canonical_json(batch.items[0].data)) == batch.items[0].data
    except PayloadError as exc:
        assert "nested too deeply" in exc.message
