"""`slack`: Block Kit messages through an incoming webhook or a bot token (`chat.postMessage`).

An incoming webhook URL is its own credential and answers with a bare string (`ok`, or an
error such as `invalid_payload` with a 4xx status). The Web API answers HTTP 200 even when it
refuses, with `{"ok": false, "error": "..."}`, so the body decides. Only the bot mode learns
the `ts` of what it posted, so only it can thread: with `thread_by: shipment` the first message
about an item starts a thread whose `ts` is kept in the sink memory of the store (it survives
restarts), and later messages about that item reply to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
from jinja2.runtime import Undefined
from markupsafe import Markup
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField
from bridge.errors import FailureKind, PermanentSinkError, TemplateRenderError, TransientSinkError
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink, dumps, excerpt, post_and_classify
from bridge.sinks.chat import (
    ELLIPSIS,
    Summary,
    cut,
    fit_lines,
    http_url_problem,
    one_line,
    summarize,
    text_of,
    utf16_len,
)
from bridge.templates import ENV, Template

log = logging.getLogger("bridge.sinks.slack")

# Slack's documented limits; over them a message is refused (invalid_blocks, msg_too_long).
TEXT_LIMIT = 40_000
SECTION_LIMIT = 3000
HEADER_LIMIT = 150
MAX_BLOCKS = 50
MAX_FIELDS = 10
# Fields may hold 2,000 characters each, but Slack also refuses messages whose blocks add up
# to more than about 12,000 (msg_blocks_too_long, undocumented); short facts keep us under it.
FIELD_LIMIT = 500
BLOCKS_BUDGET = 12_000
DIGEST_LINES_BUDGET = 11_000  # a digest's item lines; its header and footer fit in the rest
DIGEST_LINE_LIMIT = 500
CHANNEL_KEY = "#channel_id"  # not an item uuid: where the resolved channel ID is remembered

_AUTH = {"not_authed", "invalid_auth", "account_inactive", "token_revoked", "token_expired",
         "no_permission", "missing_scope", "not_allowed_token_type", "ekm_access_denied",
         "access_denied", "org_login_required", "two_factor_setup_required"}
_RATE_LIMITED = {"ratelimited", "rate_limited"}
_TRANSIENT = {"internal_error", "fatal_error", "service_unavailable", "request_timeout",
              "team_added_to_org"}
_HINTS = {
    "not_in_channel": "invite the app to the channel first (/invite @your-app)",
    "channel_not_found": "check `channel`: a channel ID such as C0123456789 or #name",
    "is_archived": "the channel is archived",
    "invalid_auth": "check `token`",
    "not_authed": "check `token`",
    "token_revoked": "the token was revoked or the app removed; install it again",
}
_PARTIAL_MARKUP = re.compile(r"&[a-z]{0,3}$|<[^>]*$")


class SlackSinkConfig(SinkConfigBase):
    type: Literal["slack"]
    webhook_url: SecretStr | None = None  # incoming webhook mode
    token: SecretStr | None = None  # bot mode: a bot token with the chat:write scope
    channel: str | None = Field(None, min_length=1)
    api_url: str = "https://slack.com/api"
    message: TemplateField | None = None  # replaces the text (Slack mrkdwn); values escaped
    thread_by: Literal["shipment"] | None = None
    update_parent: bool = False
    broadcast: list[str] = Field(default_factory=list)
    timeout: PositiveDuration = 10.0
    # Slack allows about one message a second per channel; one at a time keeps the order.
    concurrency: int = Field(1, ge=1, le=1024, description="sends in flight at once")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        if not v.lower().startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL such as https://slack.com/api")
        return v.rstrip("/")

    @field_validator("thread_by", "update_parent", "broadcast")
    @classmethod
    def _bot_only(cls, v: Any, info: ValidationInfo) -> Any:
        # Fields validate in order, so webhook_url is known here when it was given.
        if v and info.data.get("webhook_url") is not None:
            raise ValueError(
                f"{info.field_name} needs the bot mode (token and channel): an incoming webhook "
                "does not return the posted message's ts, so it cannot start or reply to "
                "threads")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> SlackSinkConfig:
        if self.webhook_url is not None and self.token is not None:
            raise ValueError("set either webhook_url (incoming webhook) or token and channel "
                             "(bot), not both")
        if self.webhook_url is not None:
            if self.channel is not None:
                raise ValueError("channel is only used with token: an incoming webhook posts "
                                 "to the channel it was created for")
            problem = http_url_problem(self.webhook_url.get_secret_value(), "webhook_url")
            if problem:
                raise ValueError(problem)
            return self
        if self.token is None:
            raise ValueError("set either webhook_url (incoming webhook) or token and channel "
                             "(bot, needed for threads)")
        if self.channel is None:
            raise ValueError("channel is required with token, e.g. C0123456789 or #shipments")
        if not self.token.get_secret_value().startswith("xox"):
            raise ValueError("token must be a Slack bot token such as xoxb-... "
                             "(the value is not shown)")
        if (self.update_parent or self.broadcast) and self.thread_by is None:
            raise ValueError("update_parent and broadcast need thread_by: shipment")
        return self


# ---- text ----------------------------------------------------------------------------------

def esc(text: str) -> str:
    """Slack's escaping: `&`, `<` and `>` are control characters, everything else is literal."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def link(url: str, label: str) -> str:
    # A `|` would end the URL part early; `%7C` is the same URL.
    return f"<{esc(url).replace('|', '%7C')}|{esc(label)}>"


def cut_mrkdwn(text: str, limit: int) -> str:
    """`cut` that never leaves half an entity (`&am…`) or half a link (`<https://…`)."""
    out = cut(text, limit)
    if out == text:
        return text
    return _PARTIAL_MARKUP.sub("", out.removesuffix(ELLIPSIS)).rstrip() + ELLIPSIS


def _finalize(value: Any) -> Any:
    if isinstance(value, Markup | Undefined):  # `| safe` opts a value out of escaping
        return value
    return esc(str(value))


# Every `{{ value }}` is escaped, the template's own text (links, *bold*) is not.
_MRKDWN_ENV = ENV.overlay(finalize=_finalize)


@functools.lru_cache(maxsize=256)
def as_mrkdwn(template: Template) -> Template:
    if template.is_static:
        return template
    return Template(template.source, _MRKDWN_ENV.from_string(template.source), False)


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": cut_mrkdwn(text, SECTION_LIMIT)}}


def pack(lines: list[str], size: int, most: int) -> list[str]:
    """Lines joined into at most `most` chunks of at most `size` characters; what does not
    fit is counted in a last "…and N more" line."""
    chunks: list[str] = []
    for n, line in enumerate(lines):
        line = cut_mrkdwn(line, size)
        if chunks and utf16_len(chunks[-1]) + 1 + utf16_len(line) <= size:
            chunks[-1] += "\n" + line
        elif len(chunks) < most:
            chunks.append(line)
        else:
            more = f"\n…and {len(lines) - n} more"
            chunks[-1] = cut_mrkdwn(chunks[-1], size - len(more)) + more
            break
    return chunks


def default_text(s: Summary) -> str:
    """The notification text (and what clients without blocks show), in mrkdwn."""
    ident = link(s.url, s.ident) if s.url else esc(s.ident)
    lines = [f"{s.emoji} {s.noun} {ident}" + (f": {esc(s.status)}" if s.status else "")]
    if s.step is not None:
        if s.step.description:
            lines.append(cut_mrkdwn(esc(s.step.description), SECTION_LIMIT))
        where = [f"📍 {esc(s.step.location)}" if s.step.location else "",
                 f"🕒 {esc(s.step.local_time)}" if s.step.local_time else ""]
    else:
        where = [f"📍 {esc(s.destination)}" if s.destination else "",
                 f"💰 {esc(s.total)}" if s.total else ""]
    if any(where):
        lines.append(" · ".join(w for w in where if w))
    if s.error:
        lines.append(f"⚠️ {esc(s.error)}")
    return cut_mrkdwn("\n".join(lines), TEXT_LIMIT)


def default_blocks(s: Summary) -> list[dict[str, Any]]:
    """Header, latest step, facts, error, footer."""
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {
        "type": "plain_text", "text": cut(s.headline, HEADER_LIMIT), "emoji": True}}]
    if s.step is not None and s.step.description:
        blocks.append(section(esc(s.step.description)))
    facts: list[tuple[str, str]] = []
    if s.url:
        facts.append(("Tracking" if s.kind == "tracking" else "Link", link(s.url, s.ident)))
    facts += [(k, esc(v)) for k, v in s.facts(with_status=False) if k != "Latest step"]
    if facts:
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": cut_mrkdwn(f"*{k}*\n{v}", FIELD_LIMIT)}
            for k, v in facts[:MAX_FIELDS]]})
    if s.step is not None and s.error:
        if s.step.error_code and s.step.error_message:
            blocks.append(section(f"⚠️ *{esc(s.step.error_code)}*: {esc(s.step.error_message)}"))
        else:
            blocks.append(section(f"⚠️ {esc(s.error)}"))
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": cut_mrkdwn(f"isendu · route {esc(s.route)}", SECTION_LIMIT)}]})
    return blocks[:MAX_BLOCKS]


# ---- sending -------------------------------------------------------------------------------

class SlackApiError(PermanentSinkError):
    """A Web API `ok: false` that retrying cannot fix; `code` is Slack's error string."""

    def __init__(self, reason: str, kind: FailureKind, code: str) -> None:
        super().__init__(reason, kind)
        self.code = code


def api_error(method: str, answer: dict[str, Any]) -> TransientSinkError | SlackApiError:
    code = excerpt(str(answer.get("error") or "unknown_error"), 100)
    reason = f"Slack {method} failed: {code}"
    hint = _HINTS.get(code)
    if code == "missing_scope" and isinstance(answer.get("needed"), str):
        hint = f"the token needs the {excerpt(answer['needed'], 100)} scope"
    if hint:
        reason += f" ({hint})"
    if code in _RATE_LIMITED:
        return TransientSinkError(reason, "rate_limited")
    if code in _TRANSIENT:
        return TransientSinkError(reason, "server_error")
    return SlackApiError(reason, "auth_error" if code in _AUTH else "client_error", code)


class KeyedLocks:
    """One asyncio.Lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class SlackSink(Sink):
    type_name = "slack"
    config_model = SlackSinkConfig
    config: SlackSinkConfig
    default_rate = (1.0, 1)  # chat.postMessage and webhooks: about one message a second
    supports_digest = True

    def __init__(self, name: str, config: SlackSinkConfig) -> None:
        super().__init__(name, config)
        self._webhook = config.webhook_url.get_secret_value() if config.webhook_url else None
        self._token = config.token.get_secret_value() if config.token else None
        self._scope = f"slack:{name}:{config.channel}"
        self._broadcast = {s.upper() for s in config.broadcast}
        self._locks = KeyedLocks()
        self._channel_id: str | None = None  # chat.update wants the ID, not a #name
        self._session: aiohttp.ClientSession | None = None

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        template = message or self.config.message
        if template is not None:
            rendered = as_mrkdwn(template).render(ctx.vars(route, delivery_id)).strip()
            if not rendered:
                raise TemplateRenderError("slack: the message rendered empty; Slack refuses "
                                          "a message without text (no_text)")
            text, blocks = cut_mrkdwn(rendered, TEXT_LIMIT), [section(rendered)]
        else:
            s = summarize(ctx, route)
            text, blocks = default_text(s), default_blocks(s)
        out = {"text": text, "blocks": dumps(blocks)}
        status = text_of(ctx.item.get("status"))
        if status:
            out["status"] = status  # for `broadcast`, decided at send time
        return out

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """A header and the items' one-line summaries, packed into as few sections as fit."""
        lines = [cut_mrkdwn(f"• {esc(one_line(d.payload.get('summary') or d.item_uuid))}",
                            DIGEST_LINE_LIMIT) for d in deliveries]
        head = f"📦 {len(lines)} updates"
        # Whole lines within the blocks' ~12,000 characters in total, then "…and N more".
        shown = fit_lines(lines, DIGEST_LINES_BUDGET)
        blocks: list[dict[str, Any]] = [{"type": "header", "text": {
            "type": "plain_text", "text": head, "emoji": True}}]
        for chunk in pack(shown, SECTION_LIMIT, MAX_BLOCKS - 2):
            blocks.append(section(chunk))
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": cut_mrkdwn(f"isendu · route {esc(route)}",
                                                  HEADER_LIMIT)}]})
        text = cut_mrkdwn(f"{head} on route {esc(route)}\n" + "\n".join(shown), TEXT_LIMIT)
        # A digest is about many items: it never goes into one item's thread.
        return {"text": text, "blocks": dumps(blocks), "digest": "1"}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        if self._webhook is not None:
            return [self._webhook, self._webhook.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]]
        return [self._token] if self._token else []

    async def send(self, delivery: Delivery) -> None:
        message: dict[str, Any] = {
            "text": delivery.payload["text"], "blocks": json.loads(delivery.payload["blocks"]),
            # A tracking page's preview would dwarf the message itself.
            "unfurl_links": False, "unfurl_media": False,
        }
        if self._webhook is not None:
            await self._post(self._webhook, message, {}, "Slack webhook")
            return
        if self.config.thread_by is None or "digest" in delivery.payload:
            await self._call("chat.postMessage", {"channel": self.config.channel, **message})
            return
        # Two deliveries for one item at once would otherwise both start a thread. A sink
        # posts to one channel, so the item's uuid is the (channel, uuid) key.
        async with self._locks.hold(delivery.item_uuid):
            await self._send_threaded(delivery, message)

    async def _send_threaded(self, delivery: Delivery, message: dict[str, Any]) -> None:
        if self.memory is None:
            raise PermanentSinkError("slack: threads need the store's sink memory, which this "
                                     "runtime did not provide", "config_error")
        parent = await self.memory.recall(self._scope, delivery.item_uuid)
        # The parent is edited before the reply is posted: if the edit fails, the retry
        # repeats only an idempotent edit, never a reply.
        if parent is not None and self.config.update_parent:
            parent = await self._update_parent(parent, message, delivery)
        if parent is None:
            answer = await self._call("chat.postMessage",
                                      {"channel": self.config.channel, **message})
            ts = answer.get("ts")
            if isinstance(ts, str) and ts:
                await self.memory.remember(self._scope, delivery.item_uuid, ts, time.time())
            await self._remember_channel(answer.get("channel"))
            return
        body = {"channel": self.config.channel, **message, "thread_ts": parent}
        if delivery.payload.get("status", "").upper() in self._broadcast:
            body["reply_broadcast"] = True
        answer = await self._call("chat.postMessage", body)
        posted, ts = answer.get("message"), answer.get("ts")
        if (isinstance(posted, dict) and posted.get("thread_ts") != parent
                and isinstance(ts, str) and ts):
            # The parent was deleted before any reply: Slack posted this one at the
            # channel's root without a word. It is the thread's first message now, or every
            # later update would land at the root too.
            await self.memory.remember(self._scope, delivery.item_uuid, ts, time.time())
            log.info("the thread's first message is gone; this update starts a new thread",
                     extra={"sink": self.name, "delivery_id": delivery.id})
        await self._remember_channel(answer.get("channel"))

    async def _update_parent(self, parent: str, message: dict[str, Any],
                             delivery: Delivery) -> str | None:
        """Show the latest status on the thread's first message; None if it was deleted."""
        body = {"channel": await self._channel(), "ts": parent,
                "text": message["text"], "blocks": message["blocks"]}
        try:
            await self._call("chat.update", body)
        except SlackApiError as exc:
            if exc.code == "message_not_found":
                return None  # someone deleted it: a new thread is better than none
            if exc.kind == "auth_error" or exc.code not in ("cant_update_message",
                                                            "edit_window_closed"):
                raise
            # The workspace forbids edits: the reply still tells the news.
            log.warning("cannot update the thread's first message", extra={
                "sink": self.name, "delivery_id": delivery.id, "reason": exc.reason})
        return parent

    async def _channel(self) -> str:
        if self._channel_id is None and self.memory is not None:
            self._channel_id = await self.memory.recall(self._scope, CHANNEL_KEY)
        return self._channel_id or str(self.config.channel)

    async def _remember_channel(self, channel_id: Any) -> None:
        if isinstance(channel_id, str) and channel_id and channel_id != self._channel_id:
            self._channel_id = channel_id
            if self.memory is not None and channel_id != self.config.channel:
                await self.memory.remember(self._scope, CHANNEL_KEY, channel_id, time.time())

    async def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """One Web API call; returns the `ok: true` answer, raises on anything else."""
        headers = {"Authorization": f"Bearer {self._token}"}
        what = f"Slack {method}"
        status, text = await self._post(f"{self.config.api_url}/{method}", body, headers, what)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # e.g. a proxy's HTML page
            raise TransientSinkError(f"{what} answered HTTP {status} without a JSON body",
                                     "server_error")
        if answer.get("ok") is True:
            return answer
        raise api_error(method, answer)

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str],
                    what: str) -> tuple[int, str]:
        if self._session is None:
            await self.start()
        assert self._session is not None
        # HTTP errors (webhook 4xx with Slack's error string, 429 + Retry-After, 5xx) are
        # classified the common way; the reasons carry the error string, never the URL.
        return await post_and_classify(
            self._session, "POST", url, data=dumps(body).encode(),
            headers={"Content-Type": "application/json; charset=utf-8",
                     "User-Agent": "isendu-bridge", **headers},
            timeout=self.config.timeout, what=what)
