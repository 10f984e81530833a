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


@pytest.mark.parametrize(("body", "where", "message"), [
    (b"{bad", "$", "malformed JSON at line 1 column 2"),
    (b"", "$", "malformed JSON"),
    (b"\xff\xfe", "$", "not UTF-8"),
    (b"[1, 2]", "$", "expected a JSON object, got an array"),
    (b'"text"', "$", "expected a JSON object, got a string"),
    (b'{"order": {"uuid": "x"}}', "$.order", "expected a list of order items, got an object"),
    (b'{"tracking": "x"}', "$.tracking", "expected a list of tracking items, got a string"),
    (b'{"tracking": [{"uuid": "a"}, 5]}', "$.tracking[1]", "expected an object, got a number"),
    (b'{"order": [{"status": "NEW"}]}', "$.order[0].uuid", "uuid missing"),
    (b'{"order": [{"uuid": ""}]}', "$.order[0].uuid", "expected a non-empty string"),
    (b'{"order": [{"uuid": 42}]}', "$.order[0].uuid", "expected a non-empty string"),
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
