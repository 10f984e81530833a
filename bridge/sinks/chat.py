"""What the message sinks (email, Teams, Discord, Telegram) share.

A `Summary` reads an item once, defensively: isendu documents few fields, so every field is
optional and any status string must work. Each sink lays the summary out in its own format.
Also: length-safe cutting (chat services reject, not trim, an over-long message) and a raw
HTTP request for services whose answer body decides what an error means.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDictProxy

from bridge.config_types import SinkConfigBase
from bridge.errors import TransientSinkError
from bridge.models import Kind
from bridge.sinks.base import RenderContext, proxy_for, read_answer

Tone = Literal["good", "bad", "active", "neutral"]
ELLIPSIS = "…"

# Matched against the upper-cased status; the first hit wins, so problems beat "DELIVERED"
# in e.g. NOT_DELIVERED. Unknown statuses fall through to a neutral parcel.
_STATUS_LOOK: tuple[tuple[tuple[str, ...], str, Tone], ...] = (
    (("CANCEL",), "❌", "bad"),
    (("EXCEPTION", "FAIL", "ERROR", "UNDELIVER", "NOT_DELIVER", "REFUS", "DAMAGE", "LOST",
      "RETURN", "HOLD"), "⚠️", "bad"),
    (("DELIVERED",), "✅", "good"),
    (("OUT_FOR_DELIVERY",), "🚚", "active"),
    (("TRANSIT", "SHIPPED", "DISPATCH"), "🚛", "active"),
    (("PICKED",), "📤", "active"),
    (("READY",), "📦", "active"),
    (("PAID",), "💳", "active"),
    (("PROCESSING",), "⚙️", "active"),
    (("CREATED", "NEW"), "🆕", "neutral"),
)


def text_of(value: Any) -> str | None:
    """A displayable string for a scalar field, or None for absent/empty/structured values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | Decimal):  # Decimal: 1e999, as isendu wrote it
        return str(value)
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else None


@dataclass(frozen=True, slots=True)
class Step:
    description: str | None
    location: str | None
    local_time: str | None  # "2025-11-03 20:12 (Europe/Paris)"
    utc: str | None  # ISO 8601, only if it parses
    error_code: str | None
    error_message: str | None

    @property
    def error(self) -> str | None:
        if self.error_code and self.error_message:
            return f"{self.error_code}: {self.error_message}"
        return self.error_code or self.error_message


@dataclass(frozen=True, slots=True)
class Summary:
    kind: Kind
    noun: str  # "Shipment" | "Order"
    ident: str  # tracking number, else order reference, else uuid
    status: str | None
    emoji: str
    tone: Tone
    url: str | None  # trackingUrl, only http(s)
    step: Step | None
    destination: str | None  # "Roma, IT"
    total: str | None  # "258.16 EUR"
    route: str
    new_steps: int = 0  # steps this snapshot brings that no earlier one did
    was: str | None = None  # the status before this snapshot, when it changed
    # What changed, when that is neither a new step nor the status (a new trackingUrl).
    changed: tuple[str, ...] = ()

    @property
    def error(self) -> str | None:
        return self.step.error if self.step else None

    @property
    def headline(self) -> str:
        """Plain one-liner: `🚚 Shipment GLS821026103283: OUT_FOR_DELIVERY`."""
        return f"{self.emoji} {self.noun} {self.ident}" + (f": {self.status}" if self.status
                                                            else "")

    def facts(self, *, with_status: bool = True) -> list[tuple[str, str]]:
        """Label/value pairs in display order; absent values are left out."""
        pairs: list[tuple[str, str | None]] = [("Status", self.status)] if with_status else []
        if self.step is not None:
            pairs += [("Latest step", self.step.description), ("Location", self.step.location),
                      ("Local time", self.step.local_time)]
        if self.was:
            pairs.append(("Was", self.was))
        if self.new_steps > 1:
            pairs.append(("New steps", str(self.new_steps)))
        if self.changed:
            pairs.append(("Changed", ", ".join(self.changed)))
        pairs += [("Destination", self.destination), ("Total", self.total)]
        return [(k, v) for k, v in pairs if v]


def summarize(ctx: RenderContext, route: str) -> Summary:
    item = ctx.item
    status = text_of(item.get("status"))
    step = _step(ctx.last_step) if ctx.kind == "tracking" else None
    if ctx.kind == "tracking":
        noun, ident = "Shipment", text_of(item.get("trackingNumber"))
    else:
        noun, ident = "Order", text_of(item.get("reference"))
    url = text_of(item.get("trackingUrl"))
    if url is not None and not url.lower().startswith(("https://", "http://")):
        url = None  # never a javascript: or data: link in someone's mail or chat
    emoji, tone = status_look(status, failed=bool(step and step.error),
                              delivered=item.get("delivered") is True)
    recipient = item.get("recipient")
    where = [text_of(_field(recipient, "city")), text_of(_field(recipient, "country"))]
    return Summary(
        kind=ctx.kind, noun=noun, ident=ident or text_of(item.get("uuid")) or "(no id)",
        status=status, emoji=emoji, tone=tone, url=url, step=step,
        destination=", ".join(w for w in where if w) or None,
        total=_money(item.get("total")), route=route,
        new_steps=len(ctx.seen.new_steps)
        if ctx.kind == "tracking" and not ctx.seen.first_seen else 0,
        was=_was(ctx, status),
        changed=_only_changed(ctx, status),
    )


def _only_changed(ctx: RenderContext, status: str | None) -> tuple[str, ...]:
    """The fields a change changed, when it brings no new step and keeps the status: the
    message would otherwise read like the one before."""
    seen = ctx.seen
    previous = seen.previous
    if previous is None or seen.new_steps or not seen.changed:
        return ()
    return seen.changed if text_of(previous.get("status")) == status else ()


def _was(ctx: RenderContext, status: str | None) -> str | None:
    previous = ctx.seen.previous
    was = text_of(previous.get("status")) if previous else None
    return was if was and was != status else None


def status_look(status: str | None, *, failed: bool = False,
                delivered: bool = False) -> tuple[str, Tone]:
    """Emoji and tone for any status string; a failed latest step always reads as a problem."""
    if failed:
        return "⚠️", "bad"
    key = (status or "").upper().replace(" ", "_").replace("-", "_")
    for words, emoji, tone in _STATUS_LOOK:
        if any(w in key for w in words):
            return emoji, tone
    if delivered:
        return "✅", "good"
    return "📦", "neutral"


def _step(step: dict[str, Any] | None) -> Step | None:
    if step is None:
        return None
    error = step.get("error")
    return Step(
        description=text_of(step.get("description")),
        location=text_of(step.get("location")),
        local_time=local_time(step),
        utc=_utc(step.get("timestamp")),
        error_code=text_of(_field(error, "code")),
        error_message=text_of(_field(error, "message")),
    )


def local_time(step: Mapping[str, Any]) -> str | None:
    """The step's local time as isendu gives it (`datetime` in `timezone`), minutes precision.

    Falls back to converting the UTC `timestamp` into `timezone`, then to plain UTC.
    """
    zone = text_of(step.get("timezone"))
    raw = text_of(step.get("datetime"))
    if raw is not None:
        parsed = _parse(raw)
        shown = _shown(parsed) if parsed else raw
        return f"{shown} ({zone})" if zone else shown
    utc = _utc(step.get("timestamp"))
    if utc is None:
        return None
    when = dt.datetime.fromisoformat(utc)
    if zone:
        try:
            return f"{_shown(when.astimezone(zoneinfo.ZoneInfo(zone)))} ({zone})"
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OverflowError):
            pass  # an unknown zone, or one taking the time past year 1 or 9999: UTC
    return f"{_shown(when)} UTC"


def _shown(when: dt.datetime) -> str:
    return f"{when.year:04d}-{when:%m-%d %H:%M}"  # %Y writes the year 1 as "1"


def _parse(value: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _utc(value: Any) -> str | None:
    text = text_of(value)
    parsed = _parse(text) if text else None
    if parsed is None or parsed.tzinfo is None:
        return None
    try:
        return parsed.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:  # its offset takes it past year 1 or 9999 in UTC: no moment
        return None


_EXACT_IN_FLOAT = 2**53


def _money(total: Any) -> str | None:
    if isinstance(total, Mapping):
        amount, currency = total.get("amount"), text_of(total.get("currency"))
    else:
        amount, currency = total, None
    if isinstance(amount, int) and abs(amount) > _EXACT_IN_FLOAT:
        shown = str(amount)  # `:.2f` goes through a float, which would change the digits
    elif isinstance(amount, int | float) and not isinstance(amount, bool):
        shown = f"{amount:.2f}"
    elif isinstance(amount, Decimal):  # beyond a float's range: as written, not "inf"
        shown = str(amount)
    else:
        shown = text_of(amount) or ""
    return " ".join(p for p in (shown, currency) if p) or None


# ---- lengths -------------------------------------------------------------------------------

def utf16_len(text: str) -> int:
    """Length as JavaScript and the chat services count it: astral characters count twice."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` UTF-16 units, else its head and an ellipsis."""
    if len(text) <= limit // 2 or utf16_len(text) <= limit:
        return text
    budget, out = limit - 1, []
    for ch in text:
        budget -= 2 if ord(ch) > 0xFFFF else 1
        if budget < 0:
            break
        out.append(ch)
    return "".join(out).rstrip() + ELLIPSIS


def one_line(text: str) -> str:
    return " ".join(text.split())


def more_line(count: int) -> str:
    return f"{ELLIPSIS}and {count} more"


def fit_lines(lines: list[str], budget: int, measure: Callable[[str], int] = utf16_len,
              sep: int = 1) -> list[str]:
    """A digest's lines within one message's total `budget` (each line costs `measure(line)`,
    plus `sep` between lines): whole lines in order, and if some do not fit, a last
    "…and N more" line counting them, within the budget too."""
    sizes = [measure(line) for line in lines]
    if sum(sizes) + sep * max(0, len(lines) - 1) <= budget:
        return list(lines)
    reserve = measure(more_line(len(lines))) + sep  # N is at most len(lines): an upper bound
    kept: list[str] = []
    used = 0
    for line, size in zip(lines, sizes, strict=True):
        cost = size + (sep if kept else 0)
        if used + cost + reserve > budget:
            break
        kept.append(line)
        used += cost
    return [*kept, more_line(len(lines) - len(kept))]


# ---- HTTP ----------------------------------------------------------------------------------

async def request(
    session: aiohttp.ClientSession,
    url: str,
    *,
    json_body: str,
    timeout: float,
    what: str,
) -> tuple[int, CIMultiDictProxy[str], str]:
    """POST JSON and return (status, headers, body) for the caller to judge.

    Network failures are transient and described without the URL, which carries the secret.
    """
    try:
        async with session.post(
            url, data=json_body.encode(), headers={"Content-Type": "application/json",
                                                   "User-Agent": "isendu-bridge"},
            timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
            proxy=proxy_for(url),
        ) as resp:
            return resp.status, resp.headers, await read_answer(resp)
    except TimeoutError:
        raise TransientSinkError(f"{what} did not answer within {timeout:g}s", "timeout") from None
    except aiohttp.ClientConnectionError as exc:
        raise TransientSinkError(
            f"cannot connect to {what}: {exc.__class__.__name__}", "connection_error") from None
    except aiohttp.ClientError as exc:
        raise TransientSinkError(f"{what} request failed: {exc.__class__.__name__}",
                                 "connection_error") from None


def burst_problem(config: SinkConfigBase, service: str) -> str | None:
    """`burst` sizes the token bucket of `rate_limit`; for a sink with no default pace it
    would do nothing without one, so say so at load instead of ignoring it. (`burst` with
    `rate_limit: off` is refused for every sink type, by SinkConfigBase.)"""
    if config.burst is not None and "rate_limit" not in config.model_fields_set:
        return (f"burst needs rate_limit: {service} has no fixed pace of its own for the "
                "bridge to apply it to; set e.g. rate_limit: 5/s next to burst")
    return None


def http_url_problem(url: str, what: str) -> str | None:
    """Why a secret URL is unusable, without quoting it (it would land in `check` output)."""
    if not url.lower().startswith(("https://", "http://")) or len(url.split("/", 3)) < 4:
        return (f"{what}: expected the service's https:// URL with its path (http:// is taken "
                "too, for a local receiver); the value is not shown: it holds a secret")
    return None
