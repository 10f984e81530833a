"""The PostgreSQL outbox without a server: its payload encoding (orjson writes what the
stdlib wrote before, so rows of earlier releases and of this one are the same text, and
every one reads back), and how it says the server cannot take a write."""

from __future__ import annotations

import json
import socket
import ssl

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
    # Only the encoding is tested: a lone surrogate is never rendered (the parser refuses
    # it), and PostgreSQL would refuse the text (DataError), as it did before orjson.
    payload = {"body": "\ud800"}
    assert json.loads(_payload_text(delivery(payload))) == payload


def test_out_of_reach_and_out_of_room_are_said_without_the_servers_text() -> None:
    from asyncpg import exceptions as pg

    from bridge.errors import StorageFull, StorageUnwritable
    from bridge.outbox.postgres import _unwritable

    full = _unwritable(pg.DiskFullError('could not extend file "base/16384/2619"'))
    assert isinstance(full, StorageFull) and "16384" not in str(full)
    refused = _unwritable(ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 5432)"))
    assert str(refused) == "PostgreSQL cannot take writes now (connection refused)"
    for exc, why in ((pg.AdminShutdownError("terminating connection"), "shutting down"),
                     (pg.ReadOnlySQLTransactionError("read-only"), "read-only"),
                     (pg.TooManyConnectionsError("sorry"), "too many connections"),
                     (TimeoutError(), "no answer in time")):
        said = _unwritable(exc)
        assert isinstance(said, StorageUnwritable) and why in str(said), (exc, said)
    for exc, why in ((socket.gaierror(-2, "Name or service not known"), "host name cannot"),
                     (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS"),
                     (OSError(1, "Operation not permitted"), "the connection failed")):
        said = _unwritable(exc)
        assert isinstance(said, StorageUnwritable) and why in str(said), (exc, said)
        assert "not permitted" not in str(said) and "unknown error" not in str(said)
    # Refused before the statement went out: certainly not stored. Lost while it was out:
    # perhaps stored, and the intake's answer says so.
    assert refused is not None and not refused.uncertain
    lost = _unwritable(pg.ConnectionDoesNotExistError("connection was closed in the middle"))
    assert lost is not None and lost.uncertain
    # A bug, a constraint or a protocol violation is not the server being away: it stays.
    assert _unwritable(pg.UniqueViolationError("duplicate key")) is None
    assert _unwritable(pg.ProtocolViolationError("unexpected message")) is None
    assert _unwritable(pg.InterfaceError("pool is closed")) is None
    assert _unwritable(KeyError("x")) is None
