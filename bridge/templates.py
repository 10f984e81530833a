"""Jinja2 in a sandbox: templates compiled once at load, rendered per delivery.

Users write templates in routes.yaml, so they run sandboxed; unknown fields render
empty (isendu sends whatever fields it has, and a missing one must not kill a message).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from bridge import jsontext
from bridge.errors import TemplateRenderError
from bridge.moments import moment


def _json_filter(value: Any) -> str:
    return jsontext.dumps(value, default=str)


def _make_env(autoescape: bool = False) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.ChainableUndefined,
        autoescape=autoescape,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["json"] = _json_filter
    # Jinja's own `tojson` too: a number beyond a float's range is written as it came.
    env.policies["json.dumps_function"] = jsontext.stdlib_dumps
    return env


ENV = _make_env()
# What every template can use (RenderContext.vars), besides Jinja's own globals (range...).
CONTEXT_NAMES = ("item", "kind", "route", "received_at", "last_step", "delivery_id",
                 "new_steps", "previous", "changed", "first_seen")
KNOWN_NAMES = frozenset(CONTEXT_NAMES) | frozenset(ENV.globals)
# For templates whose output is HTML (e-mail bodies, Telegram): values are escaped, the
# template's own tags are not.
HTML_ENV = _make_env(autoescape=True)


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template that remembers its source (for `check` and error messages)."""

    source: str
    compiled: jinja2.Template
    is_static: bool  # no `{{`/`{%`: rendering is just returning the source

    def render(self, ctx: dict[str, Any]) -> str:
        if self.is_static:
            return self.source
        try:
            return self.compiled.render(ctx)
        except jinja2.TemplateError as exc:
            raise TemplateRenderError(f"template failed: {exc.__class__.__name__}: {exc}") from exc
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
            raise TemplateRenderError(f"template failed: {exc.__class__.__name__}: {exc}") from exc

    def __str__(self) -> str:
        return self.source


def compile_template(source: str) -> Template:
    """Parse now, so a broken template is a config error at load, not a surprise later."""
    if not isinstance(source, str):
        raise ValueError(f"expected a template string, got {type(source).__name__}")
    try:
        compiled = ENV.from_string(source)
        unknown = meta.find_undeclared_variables(ENV.parse(source)) - KNOWN_NAMES
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"template does not parse: {exc.message} (template line {exc.lineno})"
        ) from None
    if unknown:
        # Undefined values render empty (a field isendu left out must not kill a message),
        # so a misspelt name like `itme.uuid` would otherwise print nothing, silently.
        # Every one named at once: fixing them one load at a time would be a chore.
        names = sorted(unknown)
        hints = [difflib.get_close_matches(n, CONTEXT_NAMES, n=1) for n in names]
        if len(names) == 1:
            hint = f"did you mean {hints[0][0]!r}? " if hints[0] else ""
            used = f"{names[0]!r}, which no message has; {hint}"
        else:
            each = [f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                    for n, h in zip(names, hints, strict=True)]
            used = f"{', '.join(each[:-1])} and {each[-1]}, which no message has; "
        raise ValueError(f"template uses {used}expected one of: {', '.join(CONTEXT_NAMES)}")
    static = "{{" not in source and "{%" not in source and "{#" not in source
    return Template(source=source, compiled=compiled, is_static=static)


@functools.lru_cache(maxsize=256)
def as_html(template: Template) -> Template:
    """The same template compiled with HTML autoescape (it parsed once, so it parses again)."""
    if template.is_static:
        return template
    return Template(template.source, HTML_ENV.from_string(template.source), False)


def last_step(item: dict[str, Any]) -> dict[str, Any] | None:
    """The newest step by UTC `timestamp`; isendu does not promise steps are sorted."""
    steps = item.get("steps")
    if not isinstance(steps, list):
        return None
    best: dict[str, Any] | None = None
    best_at = ""
    for step in steps:
        if not isinstance(step, dict):
            continue
        at = moment(step.get("timestamp"))  # by the moment, not the text (bridge/moments.py)
        if best is None or at >= best_at:
            best, best_at = step, at
    return best


def envelope(delivery_id: str, kind: str, route: str, received_at: str, item_json: str) -> str:
    """The default JSON body: {"id","kind","route","received_at","data"}.

    Spliced from the item's already-serialised JSON, so the item is encoded once per batch
    however many routes and sinks it goes to.
    """
    return ('{"id":' + _quote(delivery_id) + _envelope_middle(kind, route)
            + _quote(received_at) + ',"data":' + item_json + "}")


_quote = json.encoder.encode_basestring_ascii  # what json.dumps does to a str, without the call


@functools.lru_cache(maxsize=1024)
def _envelope_middle(kind: str, route: str) -> str:
    return ',"kind":' + _quote(kind) + ',"route":' + _quote(route) + ',"received_at":'


# A change that brings no new step and keeps the status (a new trackingUrl, a new total)
# would read like the message before it: the line names what changed.
_ONLY_CHANGED = (
    "{% if previous and not new_steps and changed and previous.status == item.status %}"
    " (changed: {{ changed | join(', ') }}){% endif %}"
)
# One line per item: the digest's list entries, and (prefixed with the route) the default
# message of the console sink and the fallback text of chat sinks.
_ORDER_LINE = (
    "order {{ item.reference or item.uuid }}"
    "{% if item.status %}: {{ item.status }}{% endif %}"
    "{% if item.recipient and item.recipient.city %} -> {{ item.recipient.city }}"
    "{% if item.recipient.country %}, {{ item.recipient.country }}{% endif %}{% endif %}"
    + _ONLY_CHANGED
)
_TRACKING_LINE = (
    "{{ item.trackingNumber or item.uuid }}: {{ item.status or 'UNKNOWN' }}"
    "{% if last_step %}"
    "{% if last_step.description %} - {{ last_step.description }}{% endif %}"
    "{% if last_step.location %} ({{ last_step.location }}){% endif %}"
    "{% if last_step.datetime %} at {{ last_step.datetime }}{% endif %}"
    "{% if last_step.error %} [error {{ last_step.error.code }}: "
    "{{ last_step.error.message }}]{% endif %}"
    "{% endif %}"
    "{% if not first_seen and new_steps|length > 1 %}"
    " ({{ new_steps|length }} new steps){% endif %}"
    "{% if previous and previous.status and previous.status != item.status %}"
    " (was {{ previous.status }}){% endif %}"
    + _ONLY_CHANGED
)
DEFAULT_SUMMARY = {
    "order": compile_template(_ORDER_LINE),
    "tracking": compile_template(_TRACKING_LINE),
}
DEFAULT_TEXT = {
    "order": compile_template("[{{ route }}] " + _ORDER_LINE),
    "tracking": compile_template(
        "[{{ route }}] " + _TRACKING_LINE
        + "{% if item.trackingUrl %} {{ item.trackingUrl }}{% endif %}"
    ),
}
