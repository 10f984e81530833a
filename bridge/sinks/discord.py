"""`discord`: a message with an embed, posted through a channel webhook (Execute Webhook).

The webhook URL's last path segment is its token, so the URL is a secret. The bridge adds
`?wait=true` so that Discord confirms the message was created (or says why not) instead of
answering 204 before it checks anything, and posts to API version 10 (`/api/v10/webhooks/`):
the URL Discord hands out names no version, and the default version it then speaks gives a
429's `retry_after` and `Retry-After` in milliseconds. Rate limits are honoured from both
the 429 answer (`retry_after`, seconds) and the `X-RateLimit-*` headers of every answer, so
an exhausted bucket waits instead of spending requests that Discord counts against the IP.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp
import yarl
from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField
from bridge.errors import TemplateRenderError, TransientSinkError
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink, classify_http, dumps, parse_retry_after
from bridge.sinks.chat import (
    Summary,
    burst_problem,
    cut,
    fit_lines,
    http_url_problem,
    one_line,
    request,
    summarize,
    utf16_len,
)
from bridge.templates import Template

# Discord's documented limits; over any of them the whole message is refused with a 400.
CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELDS_LIMIT = 25
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
FOOTER_LIMIT = 2048
EMBED_TOTAL_LIMIT = 6000

_COLOR = {"good": 0x2ECC71, "bad": 0xE74C3C, "active": 0x3498DB, "neutral": 0x95A5A6}
_MARKDOWN = re.compile(r"([\\*~`|\[\]])|^([>#-])", re.MULTILINE)


class DiscordSinkConfig(SinkConfigBase):
    type: Literal["discord"]
    webhook_url: SecretStr
    message: TemplateField | None = None  # replaces `content` (Discord markdown)
    details: bool = True  # the embed with status, latest step, location, time and error
    username: str | None = Field(None, min_length=1, max_length=80)
    timeout: PositiveDuration = 10.0
    # A webhook allows a few requests a second; one at a time also keeps messages in order.
    concurrency: int = Field(1, ge=1, le=1024, description="sends in flight at once")

    @field_validator("username")
    @classmethod
    def _username_allowed(cls, v: str | None) -> str | None:
        # Discord refuses such a name on every message (400 Invalid Form Body).
        if v is not None and any(word in v.lower() for word in ("discord", "clyde")):
            raise ValueError(f"expected a name without 'discord' or 'clyde' in it (Discord "
                             f"refuses those for webhooks), got {v!r}")
        return v

    @model_validator(mode="after")
    def _url(self) -> DiscordSinkConfig:
        problem = http_url_problem(self.webhook_url.get_secret_value(), "webhook_url") or \
            burst_problem(self, "Discord (the bridge follows its X-RateLimit headers)")
        if problem:
            raise ValueError(problem)
        return self


def escape(text: str) -> str:
    """Item text shown literally: no accidental bold, code, spoilers, quotes or masked links."""
    return _MARKDOWN.sub(lambda m: "\\" + (m.group(1) or m.group(2)), text)


def default_content(s: Summary) -> str:
    """`🚚 Shipment **GLS821026103283**: OUT_FOR_DELIVERY`."""
    line = f"{s.emoji} {s.noun} **{escape(s.ident)}**"
    return line + (f": {escape(s.status)}" if s.status else "")


def embed(s: Summary) -> dict[str, Any]:
    e: dict[str, Any] = {"title": cut(f"{s.noun} {s.ident}", TITLE_LIMIT)}
    if s.url:
        e["url"] = s.url
    if s.step is not None and s.step.description:
        e["description"] = cut(escape(s.step.description), DESCRIPTION_LIMIT)
    e["color"] = _COLOR[s.tone]
    fields = [{"name": k, "value": cut(escape(v), FIELD_VALUE_LIMIT), "inline": True}
              for k, v in s.facts() if k != "Latest step"]
    if s.step is not None and s.error:
        name = f"⚠️ {s.step.error_code}" if s.step.error_code else "⚠️ Error"
        fields.append({"name": cut(name, FIELD_NAME_LIMIT),
                       "value": cut(escape(s.step.error_message or s.error), FIELD_VALUE_LIMIT),
                       "inline": False})
    e["fields"] = fields[:FIELDS_LIMIT]
    e["footer"] = {"text": cut(f"isendu · route {s.route}", FOOTER_LIMIT)}
    if s.step is not None and s.step.utc:
        e["timestamp"] = s.step.utc
    return fit_total(e)


def fit_total(e: dict[str, Any]) -> dict[str, Any]:
    """Keep the embed's characters, all counted together, within Discord's 6000."""
    parts = [e.get("title", ""), e.get("description", ""), e.get("footer", {}).get("text", "")]
    parts += [f["name"] + f["value"] for f in e.get("fields", [])]
    excess = sum(utf16_len(p) for p in parts) - EMBED_TOTAL_LIMIT
    if excess > 0 and "description" in e:
        before = utf16_len(e["description"])
        e["description"] = cut(e["description"], max(1, before - excess))
        excess -= before - utf16_len(e["description"])
    # Still over (long values in several fields): the longest values are cut, one by one.
    for f in sorted(e.get("fields", []), key=lambda f: -utf16_len(f["value"])):
        if excess <= 0:
            break
        before = utf16_len(f["value"])
        f["value"] = cut(f["value"], max(1, before - excess))
        excess -= before - utf16_len(f["value"])
    return e


class DiscordSink(Sink):
    type_name = "discord"
    config_model = DiscordSinkConfig
    config: DiscordSinkConfig
    # No fixed default: Discord's buckets differ per webhook and are announced per answer.
    rate_note = "follows Discord's X-RateLimit headers and 429 retry_after"

    def __init__(self, name: str, config: DiscordSinkConfig) -> None:
        super().__init__(name, config)
        raw = config.webhook_url.get_secret_value()
        self._token = raw.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        self._url = str(versioned(yarl.URL(raw)).update_query(wait="true"))
        self._session: aiohttp.ClientSession | None = None

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        s = summarize(ctx, route)
        template = message or self.config.message
        content = template.render(ctx.vars(route, delivery_id)) if template else default_content(s)
        body: dict[str, Any] = {}
        if content.strip():
            body["content"] = cut(content, CONTENT_LIMIT)
        body["embeds"] = [embed(s)] if self.config.details else []
        if not body["embeds"] and "content" not in body:
            raise TemplateRenderError(
                "discord: the message rendered empty and `details` is off; Discord refuses "
                "an empty message")
        # Item text must never ping @everyone, a role or a user.
        body["allowed_mentions"] = {"parse": []}
        if self.config.username:
            body["username"] = self.config.username
        return {"body": dumps(body)}

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """A headline and an embed listing one line per item."""
        lines = [f"• {cut(escape(one_line(d.payload.get('summary') or d.item_uuid)), 300)}"
                 for d in deliveries]
        # Whole lines up to the description's limit, then "…and N more" (title and footer are
        # short, so the embed's 6,000 in total holds too).
        shown = fit_lines(lines, DESCRIPTION_LIMIT)
        e = {"title": f"{len(lines)} updates", "description": "\n".join(shown),
             "color": _COLOR["neutral"], "footer": {"text": cut(f"isendu · route {route}",
                                                                FOOTER_LIMIT)}}
        body = {"content": cut(f"📦 **{len(lines)} updates** on route {escape(route)}",
                               CONTENT_LIMIT),
                "embeds": [e], "allowed_mentions": {"parse": []}}
        if self.config.username:
            body["username"] = self.config.username
        return {"body": dumps(body)}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        return [self.config.webhook_url.get_secret_value(), self._url, self._token]

    async def send(self, delivery: Delivery) -> None:
        wait = self.paused_until - time.monotonic()
        if wait > 0:  # a send that was already claimed when the bucket ran dry
            raise TransientSinkError(
                f"Discord rate limit: the webhook's bucket resets in {wait:.2f}s",
                "rate_limited", wait)
        if self._session is None:
            await self.start()
        assert self._session is not None
        status, headers, text = await request(
            self._session, self._url, json_body=delivery.payload["body"],
            timeout=self.config.timeout, what="Discord")
        self._note_bucket(headers)
        if status == 429:
            retry = retry_after(text, headers)
            self.pause_for(retry)
            scope = headers.get("X-RateLimit-Scope") or (
                "global" if headers.get("X-RateLimit-Global") else "webhook")
            raise TransientSinkError(
                f"Discord answered HTTP 429 ({scope} rate limit); retry in {retry:g}s",
                "rate_limited", retry)
        classify_http(status, headers, text, "Discord")

    def _note_bucket(self, headers: Mapping[str, str]) -> None:
        if headers.get("X-RateLimit-Remaining") == "0":
            reset = parse_retry_after(headers.get("X-RateLimit-Reset-After"))
            if reset is not None:
                self.pause_for(reset)  # the dispatcher claims nothing for this sink till then


API_VERSION = "v10"
_WEBHOOKS_PATH = re.compile(r"^/api/(?:v\d+/)?webhooks/")


def versioned(url: yarl.URL) -> yarl.URL:
    """The webhook URL on API_VERSION: `/api/webhooks/...` (as Discord hands it out) and
    `/api/v<N>/webhooks/...` alike. Another path is left as it is (Discord answers it 404,
    which says what is wrong)."""
    path = _WEBHOOKS_PATH.sub(f"/api/{API_VERSION}/webhooks/", url.raw_path, count=1)
    if path == url.raw_path:
        return url
    return url.with_path(path, encoded=True).with_query(url.query)  # with_path drops it


def retry_after(body: str, headers: Mapping[str, str]) -> float:
    """Seconds to wait after a 429: the JSON `retry_after`, else the headers, else 1s."""
    header = parse_retry_after(headers.get("Retry-After"))
    try:
        value = json.loads(body).get("retry_after")
    except (ValueError, AttributeError):
        value = None
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0):
        # Very old API versions gave milliseconds; the Retry-After header is always seconds.
        if header is not None and value > 100 * (header + 1):
            return header
        return float(value)
    if header is not None:
        return header
    return parse_retry_after(headers.get("X-RateLimit-Reset-After")) or 1.0
