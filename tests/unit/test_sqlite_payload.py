"""The SQLite outbox's payload encoding: whatever a sink renders comes back unchanged."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.outbox.sqlite import _pack, _unpack, id_of_stored, stored_id


@given(st.dictionaries(st.text(), st.text(), max_size=5))
def test_packed_payloads_round_trip(payload: dict[str, str]) -> None:
    assert _unpack(_pack(payload)) == payload


def test_rows_written_as_json_before_packing_still_read() -> None:
    old = {"body": '{"id":"dlv_1","data":{"a":"x:1"}}', "headers": "{}"}
    assert _unpack(json.dumps(old)) == old


@given(st.text())
def test_ids_round_trip_through_their_stored_form(text: str) -> None:
    assert id_of_stored(stored_id(text)) == text


def test_delivery_ids_are_stored_as_16_bytes() -> None:
    stored = stored_id("dlv_" + "0123456789abcdef" * 2)
    assert stored == bytes.fromhex("0123456789abcdef" * 2)
    for other in ("dlv_" + "z" * 32, "dlv_" + "AB" * 16, "dlv_" + "ab " * 10 + "ab"):
        assert stored_id(other) == other  # not lower-case hex: kept as text, so it reads back
