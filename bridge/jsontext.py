"""JSON numbers that no float holds, kept as written, and the encoders that write them back.

`{"total": 1e999}` is valid JSON; a float would make it infinity, which JSON cannot write.
The parser turns such a number into a `BigNumber`: a Decimal (so conditions compare it
exactly) that remembers its text (so every sink gets the digits isendu sent). Every
encoder the bridge writes item data with goes through here; values without a BigNumber
are encoded exactly as before, so ordinary items keep their encoding and delivery ids.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

# Python refuses to turn longer digit strings into ints (CVE-2020-10735); past this, an
# integer stays a BigNumber too, and whatever would expand one into all its digits
# (int(), round(), format(x, "f")) is refused instead of filling memory.
MAX_INT_DIGITS = 4000


class BigNumber(Decimal):
    """A number as isendu wrote it: `str()` gives the text, comparisons use its value.

    Arithmetic on it gives a plain Decimal (rounded to 28 digits), as Decimal does."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> BigNumber:
        try:
            self = super().__new__(cls, text)
        except InvalidOperation:  # an exponent beyond even Decimal's (1e99999999999999999999)
            self = super().__new__(cls, "-Infinity" if text.startswith("-") else "Infinity")
        self.text = text
        return self

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        # What a template printing a whole object (`{{ item }}`) shows: the number.
        return self.text

    def __reduce__(self) -> tuple[type[BigNumber], tuple[str]]:
        return BigNumber, (self.text,)

    def __copy__(self) -> BigNumber:
        return self

    def __deepcopy__(self, memo: Any) -> BigNumber:
        return self

    def _too_long(self) -> bool:
        return self.is_finite() and self.adjusted() > MAX_INT_DIGITS

    def _refuse(self) -> OverflowError:
        return OverflowError(f"number {self.text[:20]}... has too many digits to write out; "
                             "use it as it is, or compare it")

    def __int__(self) -> int:
        if self._too_long():
            raise self._refuse()
        return super().__int__()

    def __trunc__(self) -> int:
        return self.__int__()

    def __floor__(self) -> int:
        if self._too_long():
            raise self._refuse()
        return super().__floor__()

    def __ceil__(self) -> int:
        if self._too_long():
            raise self._refuse()
        return super().__ceil__()

    def __round__(self, ndigits: Any = None) -> Any:
        if ndigits is None and self._too_long():
            raise self._refuse()
        return super().__round__() if ndigits is None else super().__round__(ndigits)

    def __format__(self, spec: str, *args: Any) -> str:
        if not spec:
            return self.text
        if not self.is_finite() or abs(self.adjusted()) > MAX_INT_DIGITS:
            return format(float(self), spec)  # "inf" / "0.00", never a million zeros
        return super().__format__(spec, *args)


def parse_float(text: str) -> float | BigNumber:
    """The stdlib parser's `parse_float`: a float, or a BigNumber where a float overflows."""
    value = float(text)
    return BigNumber(text) if math.isinf(value) else value


def parse_int(text: str) -> int | BigNumber:
    return int(text) if len(text) <= MAX_INT_DIGITS else BigNumber(text)


# orjson parses ~3x faster than the stdlib, but turns integers beyond 64 bits into floats
# and refuses numbers beyond a float's range (1e999): a body holding a number of 19 or more
# digits, or one that orjson finds out of range, takes the exact stdlib path.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def has_long_number(body: bytes) -> bool:
    """A run of 19+ digits that is a number literal, i.e. whose nearest character before it
    (past spaces and a minus) is `:`, `[` or `,`. A run inside a string (a quoted tracking
    number) is not; when in doubt the answer is yes, which costs only speed."""
    flat = body.translate(_DIGITS_TO_ZERO)
    pos = flat.find(_LONG_RUN)
    while pos != -1:
        i = pos - 1
        while i >= 0 and flat[i] in b" \t\r\n-0":
            i -= 1
        if i < 0 or flat[i] in b":[,":
            return True
        pos = flat.find(_LONG_RUN, pos + len(_LONG_RUN))
    return False


def loads(data: bytes) -> Any:
    """JSON the bridge wrote itself (a shipment's state), numbers as they were written."""
    if not has_long_number(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if not exc.msg.startswith("number is infinity"):
                raise
    return json.loads(data.decode("utf-8"), parse_float=parse_float, parse_int=parse_int)


def dumps_exact(value: Any) -> bytes:
    """orjson_dumps where it can; integers beyond 64 bits (which orjson refuses) by the
    stdlib, which writes them exactly."""
    try:
        return orjson_dumps(value)
    except TypeError:
        return dumps(value).encode()


def number_text(value: Decimal) -> str:
    """A Decimal as a JSON number: a BigNumber's own text; another Decimal (from template
    arithmetic) in its shortest exact form. Infinity and NaN are no JSON."""
    if isinstance(value, BigNumber):
        return value.text
    if not value.is_finite():
        raise ValueError(f"{value} is not a JSON number")
    return str(value)


def _fragment(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(number_text(value).encode())
    raise TypeError(f"{type(value).__name__} is not JSON")


def orjson_dumps(value: Any, option: int = 0) -> bytes:
    """orjson.dumps that writes BigNumbers as written; other types raise TypeError as before."""
    return orjson.dumps(value, default=_fragment, option=option)


class _HasDecimal(Exception):
    pass


@functools.lru_cache(maxsize=16)
def _no_decimal(default: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, Decimal):
            raise _HasDecimal
        if default is None:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        return default(value)

    return check


def dumps(value: Any, *, sort_keys: bool = False, ensure_ascii: bool = False,
          separators: tuple[str, str] = (",", ":"), indent: int | str | None = None,
          default: Callable[[Any], Any] | None = None) -> str:
    """json.dumps, byte for byte, for anything without a Decimal; with one, the same text
    (on one line) with the number written as it came: stdlib json cannot write a number
    of its own."""
    try:
        return json.dumps(value, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                          separators=separators, indent=indent, default=_no_decimal(default))
    except _HasDecimal:
        pass
    out: list[str] = []
    _Writer(out, sort_keys, ensure_ascii, separators, default).write(value)
    return "".join(out)


def stdlib_dumps(value: Any, **kwargs: Any) -> str:
    """`dumps` with json.dumps's own defaults (ASCII, `", "`), for Jinja's `tojson`."""
    kwargs.setdefault("ensure_ascii", True)
    kwargs.setdefault("separators", (", ", ": ") if kwargs.get("indent") is None else (",", ": "))
    return dumps(value, **kwargs)


class _Writer:
    """The stdlib encoder's output, written by hand for the rare value holding a Decimal."""

    def __init__(self, out: list[str], sort_keys: bool, ensure_ascii: bool,
                 separators: tuple[str, str], default: Callable[[Any], Any] | None) -> None:
        self.out = out
        self.sort_keys = sort_keys
        self.item_sep, self.key_sep = separators
        self.quote = (json.encoder.encode_basestring_ascii if ensure_ascii
                      else json.encoder.encode_basestring)
        self.default = default

    def write(self, value: Any) -> None:
        out = self.out
        if isinstance(value, str):
            out.append(self.quote(value))
        elif value is None or isinstance(value, bool | int | float):
            out.append(json.dumps(value))
        elif isinstance(value, Decimal):
            out.append(number_text(value))
        elif isinstance(value, list | tuple):
            out.append("[")
            for i, v in enumerate(value):
                if i:
                    out.append(self.item_sep)
                self.write(v)
            out.append("]")
        elif isinstance(value, dict):
            out.append("{")
            pairs = [(self._key(k), v) for k, v in value.items()]
            if self.sort_keys:
                pairs.sort(key=lambda pair: pair[0])
            for i, (k, v) in enumerate(pairs):
                if i:
                    out.append(self.item_sep)
                out.append(self.quote(k) + self.key_sep)
                self.write(v)
            out.append("}")
        elif self.default is not None:
            self.write(self.default(value))
        else:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    @staticmethod
    def _key(key: Any) -> str:
        if isinstance(key, str):
            return key
        if key is None or isinstance(key, bool | int | float):
            return json.dumps(key)
        raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
