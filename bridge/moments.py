"""When a step happened, as a key that sorts in time order, whatever way `timestamp` is written.

isendu's docs say a step's `timestamp` is UTC, not how it is written. Compared as text,
`2025-11-03T10:00:00+01:00` would sort after `2025-11-03T09:30:00Z` (it is half an hour
before), and `10:00:00.5Z` before `10:00:00Z`. So a timestamp is compared by its moment: ISO
8601 with any offset (none: UTC, as the docs say; a lower-case `z` too, as RFC 3339 allows;
the basic forms such as `20251103T074013Z` and the date `20251103`), or a number of seconds
(milliseconds when it is that large) since 1970. Text that is neither is compared as it
is, after every moment.

The common case is one fixed format (`2025-11-03T07:40:13Z` in isendu's samples). Written
like that, text order is time order already, and nothing is parsed: the state's observation
runs this for every step of every snapshot.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import UTC, datetime
from typing import Any

_MS_FROM = 1e11  # a number this large counts milliseconds (1e11 s is in the year 5138)


def is_plain(ts: str) -> bool:
    """`YYYY-MM-DDTHH:MM:SSZ`: of all its kind, text order is time order."""
    return len(ts) == 20 and ts[19] == "Z" and ts[10] == "T"


def moment(ts: Any) -> str:
    """A key that sorts like the moment `ts` names: `YYYY-MM-DDTHH:MM:SS[.ffffff]` in UTC,
    the same as a plain timestamp without its `Z`; "~" before text that names no moment, so
    such text sorts after every moment and among its own kind as written; no timestamp at
    all (None, ""), "": before everything."""
    if isinstance(ts, str):
        text = ts
    elif isinstance(ts, int | float) and not isinstance(ts, bool):
        text = str(ts)
    else:
        text = ""  # None, or not a time at all (an object, true)
    if is_plain(text):
        return text[:19]
    return _parsed(text) if text else ""  # none at all: before every moment


@functools.lru_cache(maxsize=4096)  # the same few timestamps come back in every snapshot
def _parsed(text: str) -> str:
    when = _as_datetime(text)
    if when is None:
        return "~" + text
    key = when.strftime("%Y-%m-%dT%H:%M:%S")
    return key + f".{when.microsecond:06d}".rstrip("0") if when.microsecond else key


def _as_datetime(text: str) -> datetime | None:
    if len(text) == 8 and text.isdigit():
        # `20251103`: ISO 8601's basic form of a date. As seconds since 1970 it would be a
        # day in 1970, which no shipment's step is.
        with contextlib.suppress(ValueError):
            return datetime.strptime(text, "%Y%m%d").replace(tzinfo=UTC)
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if number != number or abs(number) > 1e15:  # NaN, or past any datetime
            return None
        seconds = number / 1000 if abs(number) >= _MS_FROM else number
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return iso_time(text)


def iso_time(text: str) -> datetime | None:
    """An ISO 8601 time in UTC: without an offset it is UTC (as isendu's docs say), and a
    lower-case z is Z (RFC 3339 allows it; fromisoformat does not). None if it is none.
    Step timestamps and order versions (state.py) are both read with it."""
    if text[-1:] == "z":
        text = text[:-1] + "Z"
    try:
        when = datetime.fromisoformat(text)
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):  # an offset taking it past year 1 or 9999 in UTC
        return None


def earlier(a: str, b: str) -> bool:
    """Whether timestamp `a` names an earlier moment than `b`."""
    if is_plain(a) and is_plain(b):
        return a < b
    return moment(a) < moment(b)
