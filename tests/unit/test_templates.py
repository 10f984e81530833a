"""Templates: sandboxed, compiled once, lenient with missing fields, strict with bad syntax."""

from __future__ import annotations

import json

import pytest

from bridge.errors import TemplateRenderError
from bridge.sinks.base import RenderContext
from bridge.templates import CONTEXT_NAMES, DEFAULT_TEXT, compile_template, envelope, last_step
from tests.helpers.bridge import sample_batch

STEPS = [
    {"timestamp": "2025-11-03T19:12:51Z", "description": "Picked up", "status": "PICKED_UP"},
    {"timestamp": "2025-11-04T08:00:00Z", "description": "Out for delivery", "location": "Roma",
     "status": "OUT_FOR_DELIVERY"},
    {"timestamp": "2025-11-03T10:50:09Z", "description": "Created", "status": "CREATED"},
]


def test_last_step_is_the_newest_by_timestamp_not_the_last_in_the_list() -> None:
    assert last_step({"steps": STEPS}) == STEPS[1]
    assert last_step({"steps": []}) is None
    assert last_step({}) is None


def test_missing_fields_render_empty_instead_of_failing() -> None:
    t = compile_template("{{ item.recipient.city }}|{{ item.nope }}|{{ last_step.location }}")
    assert t.render({"item": {}, "last_step": None}) == "||"


def test_syntax_error_is_reported_at_compile_time() -> None:
    with pytest.raises(ValueError, match="template does not parse"):
        compile_template("{% if %}")


def test_runtime_failure_is_a_render_error() -> None:
    t = compile_template("{{ item.total.amount / 0 }}")
    with pytest.raises(TemplateRenderError, match="ZeroDivisionError"):
        t.render({"item": {"total": {"amount": 5}}})


def test_sandbox_refuses_unsafe_calls() -> None:
    t = compile_template("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateRenderError):
        t.render({})
    assert compile_template("{{ item.__class__ }}").render({"item": {}}) == ""


def test_json_filter_and_static_fast_path() -> None:
    t = compile_template('{"n": {{ item.n | json }}}')
    assert json.loads(t.render({"item": {"n": "a\"b"}})) == {"n": 'a"b'}
    static = compile_template("plain text")
    assert static.is_static and static.render({}) == "plain text"


def test_envelope_is_valid_json_with_the_item_verbatim() -> None:
    item = {"uuid": "u", "weird": ["ü", {"x": None}]}
    out = json.loads(envelope("dlv_1", "order", "r", "2025-01-01T00:00:00Z", json.dumps(item)))
    assert out == {"id": "dlv_1", "kind": "order", "route": "r",
                   "received_at": "2025-01-01T00:00:00Z", "data": item}


def test_default_text_for_the_sample_items() -> None:
    batch = sample_batch()
    order = batch["order"][0]
    ctx = RenderContext(order, "order", "t", json.dumps(order))
    text = DEFAULT_TEXT["order"].render(ctx.vars("orders", "d"))
    assert text == "[orders] order ORD-2025-932194: PROCESSING -> Roma, IT"
    track = batch["tracking"][2]
    ctx = RenderContext(track, "tracking", "t", json.dumps(track))
    text = DEFAULT_TEXT["tracking"].render(ctx.vars("ship", "d"))
    assert text.startswith("[ship] GLS516003660605: PICKED_UP - Parcel picked up from sender "
                           "(Lyon) at 2025-11-03 20:12:51")


def test_default_text_without_any_invented_field() -> None:
    ctx = RenderContext({"uuid": "only-uuid"}, "order", "t", "{}")
    assert DEFAULT_TEXT["order"].render(ctx.vars("r", "d")) == "[r] order only-uuid"
    error_step = {"timestamp": "t", "description": "Failed", "status": "EXCEPTION",
                  "error": {"code": "ADDR", "message": "address not found"}}
    item = {"uuid": "u", "status": "EXCEPTION", "steps": [error_step]}
    ctx = RenderContext(item, "tracking", "t", "{}")
    assert DEFAULT_TEXT["tracking"].render(ctx.vars("r", "d")) == (
        "[r] u: EXCEPTION - Failed [error ADDR: address not found]")


def test_the_names_templates_may_use_are_exactly_what_rendering_gives() -> None:
    ctx = RenderContext({"uuid": "u"}, "order", "2025-11-03T10:00:00.000Z", '{"uuid":"u"}')
    assert set(ctx.vars("r", "dlv_x")) == set(CONTEXT_NAMES)


def test_names_a_template_sets_or_loops_over_and_jinja_globals_are_not_unknown() -> None:
    t = compile_template("{% for s in item.steps %}{{ loop.index }} {{ s.status }}{% endfor %}"
                         "{% set n = namespace(x=1) %}{{ n.x }}{{ range(2) | list }}")
    assert t.render({"item": {"steps": [{"status": "A"}]}}) == "1 A1[0, 1]"


def test_default_messages_say_what_an_update_brings() -> None:
    """After an IN_TRANSIT snapshot, one bringing two steps up to DELIVERED says so, in the
    one-line text and in the chat sinks' facts; on first sight neither is said."""
    from bridge.models import Item
    from bridge.sinks.base import RenderContext
    from bridge.sinks.chat import summarize
    from bridge.state import observe
    from bridge.templates import DEFAULT_TEXT

    def snap(*steps: tuple[str, str]) -> dict[str, object]:
        return {"uuid": "u1", "trackingNumber": "GLS1", "status": steps[-1][1],
                "steps": [{"timestamp": t, "status": s, "description": s.lower()}
                          for t, s in steps]}

    before = snap(("2025-11-04T08:00:00Z", "IN_TRANSIT"))
    after = snap(("2025-11-04T08:00:00Z", "IN_TRANSIT"),
                 ("2025-11-04T10:00:00Z", "OUT_FOR_DELIVERY"),
                 ("2025-11-04T12:00:00Z", "DELIVERED"))
    _, state = observe(None, Item("tracking", "u1", before))
    seen, _ = observe(state, Item("tracking", "u1", after))
    ctx = RenderContext(after, "tracking", "2025-11-04T12:00:01Z", "{}", seen)
    text = DEFAULT_TEXT["tracking"].render(ctx.vars("r", "d1"))
    assert text.endswith("(2 new steps) (was IN_TRANSIT)")
    facts = dict(summarize(ctx, "r").facts())
    assert facts["Was"] == "IN_TRANSIT" and facts["New steps"] == "2"

    first = RenderContext(after, "tracking", "2025-11-04T12:00:01Z", "{}")
    assert "new steps" not in DEFAULT_TEXT["tracking"].render(first.vars("r", "d1"))
    assert {"Was", "New steps"}.isdisjoint(dict(summarize(first, "r").facts()))
    assert "Changed" not in facts  # the status changed: "Was" says it

    # A new trackingUrl alone: no step, the same status; the chat message says what changed.
    _, state = observe(state, Item("tracking", "u1", after))
    moved = {**after, "trackingUrl": "https://example.com/new"}
    seen, _ = observe(state, Item("tracking", "u1", moved))
    ctx = RenderContext(moved, "tracking", "2025-11-04T12:00:02Z", "{}", seen)
    facts = dict(summarize(ctx, "r").facts())
    assert facts["Changed"] == "trackingUrl" and "Was" not in facts


def test_a_step_time_past_year_9999_in_its_zone_is_shown_in_utc() -> None:
    """Times whose zone or offset takes them out of datetime's range: the chat sinks' default
    message shows them in UTC or as written, where it raised OverflowError."""
    from bridge.sinks.chat import local_time

    assert local_time({"timestamp": "9999-12-31T23:30:00Z", "timezone": "Asia/Tokyo"}
                      ) == "9999-12-31 23:30 UTC"
    assert local_time({"timestamp": "0001-01-01T00:30:00Z", "timezone": "America/New_York"}
                      ) == "0001-01-01 00:30 UTC"
    assert local_time({"timestamp": "0001-01-01T00:00:00+01:00"}) is None  # no moment in UTC
