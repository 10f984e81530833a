"""Numbers no float holds (1e999, integers of 30 or 5000 digits): accepted, written back as
isendu wrote them by every encoder, compared exactly by conditions; ordinary items encode
exactly as they did before."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.canonical import canonical_json
from bridge.errors import TemplateRenderError
from bridge.jsontext import BigNumber, dumps
from bridge.models import Batch
from bridge.parse import parse_request
from bridge.routing.conditions import compile_leaf
from bridge.templates import compile_template

WIDE = [
    "1e999", "-1e999", "1.0E+309", "2.5e400", "-7.25E+1000", "1E400",
    "1e99999999999999999999999",  # beyond even Decimal's exponents: compares as infinity
    "9" * 5000,  # past Python's 4300-digit limit for int()
]


def _item(body: bytes) -> dict[str, Any]:
    batch = parse_request(body)
    assert isinstance(batch, Batch)
    return batch.items[0].data


@pytest.mark.parametrize("text", WIDE)
@pytest.mark.parametrize("long_int", [False, True], ids=["orjson-first", "exact-path"])
def test_a_number_beyond_a_float_is_accepted_and_written_back_as_written(
        text: str, long_int: bool) -> None:
    extra = ', "n": 123456789012345678901234567890' if long_int else ""
    data = _item(f'{{"order": [{{"uuid": "n1", "total": {text}{extra}}}]}}'.encode())
    total = data["total"]
    assert isinstance(total, BigNumber) and str(total) == text
    encoded = canonical_json(data)
    assert f'"total":{text}' in encoded
    if long_int:
        assert '"n":123456789012345678901234567890' in encoded
    assert _item(b'{"order": [' + encoded.encode() + b"]}") == data  # and reads back the same
    assert canonical_json(_item(b'{"order": [' + encoded.encode() + b"]}")) == encoded


def test_wide_numbers_inside_lists_and_objects_and_negative() -> None:
    body = b'{"order": [{"uuid": "n1", "lines": [{"qty": 1e999}, -1E+400, 1.5]}]}'
    data = _item(body)
    assert canonical_json(data) == '{"lines":[{"qty":1e999},-1E+400,1.5],"uuid":"n1"}'


@pytest.mark.parametrize("template", [
    "{{ item.total }}", "{{ item.total | json }}", "{{ item | json }}", "{{ item | tojson }}",
    "{{ item.total | string }}", "{{ '%s' % item.total }}",
])
def test_templates_write_the_digits_as_written(template: str) -> None:
    data = _item(b'{"order": [{"uuid": "n1", "total": 1.0E+999, '
                 b'"n": 123456789012345678901234567890}]}')
    out = compile_template(template).render({"item": data})
    assert "1.0E+999" in out
    if "item |" in template:
        assert json.loads(out.replace("1.0E+999", "0"))["n"] == 123456789012345678901234567890


@pytest.mark.parametrize("template", [
    "{{ item.total | int }}", "{{ item.total | round | int }}", "{{ '{:f}'.format(item.total) }}",
    "{{ item.total * 2 }}", "{{ item.total | float }}",
])
def test_a_template_cannot_turn_a_huge_exponent_into_a_huge_string(template: str) -> None:
    """`1e999999999` is 12 bytes: writing out its digits would be a gigabyte. A template
    either gets something short or fails (dead-lettered with the reason), never hangs."""
    data = _item(b'{"order": [{"uuid": "n1", "total": 1e999999999}]}')
    try:
        out = compile_template(template).render({"item": data})
    except TemplateRenderError as exc:
        assert "template failed" in str(exc)
    else:
        assert len(out) < 100


def test_template_arithmetic_gives_a_json_number() -> None:
    data = _item(b'{"order": [{"uuid": "n1", "total": 1e999}]}')
    assert compile_template("{{ (item.total * 2) | json }}").render({"item": data}) == "2E+999"


# ---- ordinary values encode exactly as before ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=10,
)


def _old_canonical_json(data: object) -> str:
    """canonical_json as it was before numbers beyond a float were accepted."""
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@given(doc=json_values)
def test_ordinary_values_encode_as_they_always_did(doc: Any) -> None:
    """Delivery ids hash this text: it must not change for any item without a BigNumber."""
    assert canonical_json(doc) == _old_canonical_json(doc)
    assert dumps(doc) == json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert dumps(doc, sort_keys=True, ensure_ascii=True, separators=(", ", ": ")) == json.dumps(
        doc, sort_keys=True)


@given(doc=json_values, texts=st.lists(st.sampled_from(WIDE[:6]), min_size=1, max_size=3))
def test_with_a_wide_number_the_rest_is_written_as_json_dumps_writes_it(
        doc: Any, texts: list[str]) -> None:
    value = {"doc": doc, "wide": [BigNumber(t) for t in texts]}
    shown = "[" + ",".join(texts) + "]"
    expected = json.dumps({"doc": doc, "wide": 0}, sort_keys=True, ensure_ascii=False,
                          separators=(",", ":")).replace('"wide":0', f'"wide":{shown}')
    assert dumps(value, sort_keys=True) == expected
    assert canonical_json(value).endswith(f'"wide":{shown}}}')


# ---- conditions compare numerically ---------------------------------------------------------

def _exact(value: Any) -> Fraction:
    return Fraction(Decimal(str(value))) if isinstance(value, BigNumber) else Fraction(value)


# What isendu may send: integers of any size, floats, and numbers beyond a float's range.
wide_texts = st.builds(lambda m, e: f"{m}e{e}", st.integers(-(10**6), 10**6).filter(bool),
                       st.integers(309, 2000))
item_numbers = (st.integers().map(str) | st.integers(min_value=10**18, max_value=10**40).map(str)
                | st.floats(allow_nan=False, allow_infinity=False).map(repr) | wide_texts)
# What a routes.yaml may compare with: YAML gives ints and floats (`1.0e+999` is inf).
thresholds = (st.integers() | st.integers(min_value=10**18, max_value=10**40)
              | st.floats(allow_nan=False))


@given(text=item_numbers, threshold=thresholds,
       op=st.sampled_from(["gt", "gte", "lt", "lte", "equals", "not_equals"]))
def test_conditions_compare_any_number_exactly(text: str, threshold: Any, op: str) -> None:
    data = _item(f'{{"order": [{{"uuid": "n1", "total": {text}}}]}}'.encode())
    value = data["total"]
    match = compile_leaf("$.total", op, threshold)(data)
    a = _exact(value)
    b: Any = Fraction(threshold) if math.isfinite(threshold) else threshold  # inf compares
    expected = {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b, "equals": a == b,
                "not_equals": a != b}[op]
    assert match is expected, (text, op, threshold)


@given(text=wide_texts, offset=st.integers(-3, 3))
def test_wide_numbers_order_among_themselves(text: str, offset: int) -> None:
    """1e999 and 1e1000 are both infinity as floats; kept exact, they are not equal."""
    mantissa, exponent = text.split("e")
    other = f"{mantissa}e{int(exponent) + offset}"
    data = _item(f'{{"order": [{{"uuid": "n1", "a": {text}, "b": {other}}}]}}'.encode())
    assert (data["a"] == data["b"]) is (offset == 0)
    assert (data["a"] < data["b"]) is (_exact(data["a"]) < _exact(data["b"]))


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("equals", 123456789012345678901234567890, True),
    ("equals", 123456789012345678901234567891, False),
    ("gt", 123456789012345678901234567889, True),
    ("in", [1, 123456789012345678901234567890], True),
    ("matches", "^1234567890123456789012345678", True),
])
def test_a_30_digit_integer_is_compared_exactly(op: str, value: Any, expected: bool) -> None:
    data = _item(b'{"order": [{"uuid": "n1", "n": 123456789012345678901234567890}]}')
    assert compile_leaf("$.n", op, value)(data) is expected


def test_matches_sees_a_wide_number_as_written() -> None:
    data = _item(b'{"order": [{"uuid": "n1", "total": 1.0E+999, "lines": [{"q": 1e999}]}]}')
    assert compile_leaf("$.total", "matches", r"^1\.0E\+999$")(data)
    assert compile_leaf("$.total", "gt", 1.7e308)(data)
    assert not compile_leaf("$.total", "gt", float("inf"))(data)
    assert compile_leaf("$.lines[*].q", "gte", 10**999)(data)
    assert not compile_leaf("$.lines[*].q", "lt", 10**999)(data)


def test_a_comparison_with_nan_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="nan"):
        compile_leaf("$.total", "gt", float("nan"))
