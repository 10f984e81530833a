"""The PostgreSQL outbox's payload encoding: orjson writes what the stdlib wrote before, so
rows stored by earlier releases and by this one are the same text, and every one reads back."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.models import NewDelivery
from bridge.outbox.postgres import _payload_text

# What a rendered payload can hold: the parser refuses lone surrogates (tests/unit/test_parse.py).
TEXT = st.text(st.characters(codec="utf-8"))  # no surrogates


def delivery(payload: dict[str, str]) -> NewDelivery:
    return NewDelivery(id="dlv_1", sink="s", route="r", item_uuid="u", kind="tracking",
                       payload=payload, batch_id="b")


@given(st.dictionaries(TEXT, TEXT, max_size=5))
def test_payload_text_is_the_stdlib_text(payload: dict[str, str]) -> None:
    text = _payload_text(delivery(payload))
    assert text == json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(text) == payload


def test_control_characters_quotes_and_line_separators_are_escaped_as_before() -> None:
    payload = {"body": 'a"b\\c\n\t\x00\x1f\u2028\u2029é😀', "headers": "{}"}
    assert _payload_text(delivery(payload)) == json.dumps(payload, ensure_ascii=False,
                                                          separators=(",", ":"))


def test_what_orjson_refuses_is_written_by_the_stdlib() -> None:
    payload = {"body": "\ud800"}  # never rendered from parsed data, but never a crash here
    assert json.loads(_payload_text(delivery(payload))) == payload
