"""An item's canonical JSON: what its delivery ids hash, and what tells its snapshots apart."""

from __future__ import annotations

import zlib

import orjson

from bridge import jsontext
from bridge.errors import PayloadError


def canonical_json(data: object) -> str:
    """Sorted keys, no spaces: the same item always encodes (and hashes) the same way.

    orjson is ~10x faster than the stdlib here; it refuses integers beyond 64 bits, which
    the stdlib writes exactly (each item always takes the same one of the two paths).
    Numbers beyond a float's range (BigNumber) are written as isendu wrote them."""
    try:
        return jsontext.orjson_dumps(data, orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # also orjson's limit of 254 levels of nesting
        pass
    try:
        return jsontext.dumps(data, sort_keys=True)
    except RecursionError:
        raise PayloadError("an item is nested too deeply to store; expected at most a few "
                           "hundred levels of objects and arrays") from None


def digest(item_json: str) -> str:
    """A short, stable name for one snapshot's content, among the few a shipment's state
    remembers. CRC-32, not a cryptographic hash (~5x cheaper per item): two contents that
    collide only give a change an id of its own that it did not need, never one of another
    content (ids hash the content itself too)."""
    return format(zlib.crc32(item_json.encode()), "08x")
