"""`telegram`: a Bot API `sendMessage` in HTML parse mode.

The bot token is part of the URL path (`/bot<token>/sendMessage`), so no URL is ever put in
an error. Telegram answers `{"ok": false, "error_code", "description", "parameters"}`; the
body, not only the status, decides: `parameters.retry_after` on 429, and a group that became
a supergroup names its new id in `parameters.migrate_to_chat_id`: the message is sent there
at once, and so is every later one (the new id is kept in the store's sink memory, so a
restart keeps it too), with a warning that says which chat_id to put in the config.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from typing import Any, Literal

import aiohttp
from pydantic import Field, SecretStr, field_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField, what_was_given
from bridge.errors import PermanentSinkError, TemplateRenderError, TransientSinkError
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink, classify_http, dumps, excerpt
from bridge.sinks.chat import ELLIPSIS, Summary, cut, fit_lines, one_line, request, summarize
from bridge.sinks.chat import utf16_len as _utf16
from bridge.templates import Template, as_html

log = logging.getLogger("bridge.sinks.telegram")

TEXT_LIMIT = 4096  # characters after entity parsing, per the Bot API
MOVED_KEY = "#moved_to"  # sink memory: the supergroup the configured group became
DESCRIPTION_LIMIT = 3000  # in the default message, so location, time and error still fit
_TOKEN = re.compile(r"^\d+:[A-Za-z0-9_-]{20,}$")
_HTML_PIECE = re.compile(r"<[^>]*>|&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z]+);|[^<&]+|[<&]")
_TAG = re.compile(r"<\s*(/?)\s*([A-Za-z][A-Za-z0-9-]*)")


class TelegramSinkConfig(SinkConfigBase):
    type: Literal["telegram"]
    token: SecretStr
    chat_id: int | str  # a numeric id (groups are negative) or "@channelusername"
    message: TemplateField | None = None  # Telegram HTML; item values are escaped for you
    api_url: str = "https://api.telegram.org"
    message_thread_id: int | None = None  # a forum topic
    disable_notification: bool = False
    timeout: PositiveDuration = 10.0
    # Telegram allows about one message a second per chat; one at a time keeps the order.
    concurrency: int = Field(1, ge=1, le=1024, description="sends in flight at once")

    @field_validator("chat_id", mode="before")
    @classmethod
    def _chat_id(cls, v: Any) -> Any:
        # `${CHAT_ID}` substitutes a string; Telegram's numeric ids are sent as numbers.
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            return int(v)
        if isinstance(v, bool) or not isinstance(v, int | str):
            # One complaint, where `int | str` would make pydantic give one per type.
            raise ValueError("chat_id must be a chat id such as -1001234567890 or @channel, "
                             f"got {what_was_given(v, secret=False)}")
        return v

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        if not v.lower().startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL such as https://api.telegram.org")
        return v.rstrip("/")

    # Field validators, not one for the model: the error then points at the key's own line.
    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if not _TOKEN.match(v.get_secret_value()):
            raise ValueError("token must look like 123456789:AAE... as @BotFather gives it "
                             "(the value is not shown)")
        return v

    @field_validator("chat_id")
    @classmethod
    def _chat_id_given(cls, v: int | str) -> int | str:
        if isinstance(v, str) and not v.strip():
            raise ValueError("chat_id must be a chat id such as -1001234567890 or @channel")
        return v


def esc(text: str) -> str:
    return html.escape(text, quote=False)


def default_text(s: Summary) -> str:
    """Telegram HTML: headline with the linked tracking number, step, where/when, error."""
    ident = (f'<a href="{html.escape(s.url, quote=True)}">{esc(s.ident)}</a>' if s.url
             else esc(s.ident))
    lines = [f"{s.emoji} <b>{s.noun} {ident}</b>" + (f": {esc(s.status)}" if s.status else "")]
    if s.step is not None:
        if s.step.description:
            lines.append(esc(cut(s.step.description, DESCRIPTION_LIMIT)))
        where = [f"📍 {esc(s.step.location)}" if s.step.location else "",
                 f"🕒 {esc(s.step.local_time)}" if s.step.local_time else ""]
        if any(where):
            lines.append(" · ".join(w for w in where if w))
        if s.step.error_code and s.step.error_message:
            lines.append(f"⚠️ <b>{esc(s.step.error_code)}</b>: {esc(s.step.error_message)}")
        elif s.error:
            lines.append(f"⚠️ {esc(s.error)}")
    else:
        where = [f"📍 {esc(s.destination)}" if s.destination else "",
                 f"💰 {esc(s.total)}" if s.total else ""]
        if any(where):
            lines.append(" · ".join(w for w in where if w))
    return "\n".join(lines)


def visible_len(text: str) -> int:
    """What Telegram counts: the text once tags are dropped and entities decoded."""
    return _utf16(html.unescape(re.sub(r"<[^>]*>", "", text)))


def cut_html(text: str, limit: int = TEXT_LIMIT) -> str:
    """Cut Telegram HTML to `limit` visible characters without breaking a tag or an entity;
    tags left open by the cut are closed, so Telegram can still parse the message."""
    if visible_len(text) <= limit:
        return text
    budget = limit - 1  # room for the ellipsis
    out: list[str] = []
    open_tags: list[str] = []
    for m in _HTML_PIECE.finditer(text):
        piece = m.group()
        tag = _TAG.match(piece) if piece.startswith("<") and piece.endswith(">") else None
        if tag:
            name = tag.group(2).lower()
            if tag.group(1) != "/":
                open_tags.append(name)
            elif name in open_tags:
                del open_tags[len(open_tags) - 1 - open_tags[::-1].index(name)]
            out.append(piece)
            continue
        cost = _utf16(html.unescape(piece))
        if cost <= budget:
            out.append(piece)
            budget -= cost
            continue
        if not piece.startswith("&"):  # a text run: keep the head that fits
            head = cut(piece, budget + 1)[:-1] if budget > 0 else ""
            out.append(head)
        break
    return "".join(out).rstrip() + ELLIPSIS + "".join(f"</{n}>" for n in reversed(open_tags))


class TelegramSink(Sink):
    type_name = "telegram"
    config_model = TelegramSinkConfig
    config: TelegramSinkConfig

    def __init__(self, name: str, config: TelegramSinkConfig) -> None:
        super().__init__(name, config)
        self._token = config.token.get_secret_value()
        self._url = f"{config.api_url}/bot{self._token}/sendMessage"
        self._session: aiohttp.ClientSession | None = None
        self._scope = f"telegram:{name}:{config.chat_id}"
        self._moved_to: int | None = None  # recalled from memory once, then kept
        self._recalled = False

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        template = message or self.config.message
        if template is not None:
            text = as_html(template).render(ctx.vars(route, delivery_id))
        else:
            text = default_text(summarize(ctx, route))
        text = cut_html(text.strip())
        if visible_len(text) == 0:
            raise TemplateRenderError("telegram: the message rendered empty; Telegram refuses "
                                      "an empty message")
        return {"body": self._body(text)}

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """A headline and one line per item."""
        lines = [f"• {esc(one_line(d.payload.get('summary') or d.item_uuid))}"
                 for d in deliveries]
        head = f"📦 <b>{len(lines)} updates</b> · route {esc(route)}"
        # Whole lines within the 4,096 visible characters, then "…and N more".
        shown = fit_lines([cut_html(line, 500) for line in lines],
                          TEXT_LIMIT - visible_len(head) - 1, visible_len)
        return {"body": self._body(cut_html("\n".join([head, *shown])))}

    def rate_limit(self) -> tuple[float, int] | None:
        if "rate_limit" in self.config.model_fields_set:
            return super().rate_limit()
        # Telegram's pace: about 1 message/s in a private chat, 20/min in a group or channel.
        chat = self.config.chat_id
        group = (isinstance(chat, int) and chat < 0) or str(chat).startswith("@")
        return (20 / 60 if group else 1.0), self.config.burst or 1

    def _body(self, text: str) -> str:
        body: dict[str, Any] = {"chat_id": self.config.chat_id, "text": text,
                                "parse_mode": "HTML",
                                "link_preview_options": {"is_disabled": True}}
        if self.config.message_thread_id is not None:
            body["message_thread_id"] = self.config.message_thread_id
        if self.config.disable_notification:
            body["disable_notification"] = True
        return dumps(body)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        return [self._token, self._token.split(":", 1)[-1]]

    async def send(self, delivery: Delivery) -> None:
        body = delivery.payload["body"]
        moved = await self._moved()
        if moved is not None:
            body = _to_chat(body, moved)
        answer, status = await self._post(body)
        if answer.get("ok") is True and 200 <= status < 300:
            return
        migrated = _migrated_to(answer)
        if migrated is None or migrated == moved:
            raise telegram_error(status, answer)
        # The group became a supergroup: Telegram refused the message and named the new
        # chat, where it (and every later one) goes now.
        await self._remember_move(migrated)
        answer, status = await self._post(_to_chat(body, migrated))
        if not (answer.get("ok") is True and 200 <= status < 300):
            raise telegram_error(status, answer)

    async def _post(self, body: str) -> tuple[dict[str, Any], int]:
        if self._session is None:
            await self.start()
        assert self._session is not None
        status, headers, text = await request(
            self._session, self._url, json_body=body, timeout=self.config.timeout,
            what="Telegram")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # e.g. a proxy's HTML error page
            classify_http(status, headers, text, "Telegram")
            raise TransientSinkError(f"Telegram answered HTTP {status} without a JSON body",
                                     "server_error")
        return answer, status

    async def _moved(self) -> int | None:
        if not self._recalled and self.memory is not None:
            kept = await self.memory.recall(self._scope, MOVED_KEY)
            self._moved_to = int(kept) if kept is not None and _is_chat_id(kept) else None
            self._recalled = True
        return self._moved_to

    async def _remember_move(self, chat_id: int) -> None:
        self._moved_to, self._recalled = chat_id, True
        log.warning("Telegram group became a supergroup; sending to its new chat_id from now "
                    "on: set chat_id to it in the config", extra={
                        "sink": self.name, "chat_id": self.config.chat_id,
                        "new_chat_id": chat_id})
        if self.memory is not None:
            await self.memory.remember(self._scope, MOVED_KEY, str(chat_id), time.time())


def _migrated_to(answer: dict[str, Any]) -> int | None:
    params = answer.get("parameters")
    moved = params.get("migrate_to_chat_id") if isinstance(params, dict) else None
    return moved if isinstance(moved, int) and not isinstance(moved, bool) else None


def _is_chat_id(text: str) -> bool:
    return re.fullmatch(r"-?\d{1,20}", text) is not None


def _to_chat(body: str, chat_id: int) -> str:
    """A rendered sendMessage body, addressed to `chat_id` instead."""
    doc = json.loads(body)
    doc["chat_id"] = chat_id
    return dumps(doc)


def telegram_error(status: int, answer: dict[str, Any]) -> TransientSinkError | PermanentSinkError:
    """Map Telegram's `ok: false` answer (which may come with any HTTP status) to an error."""
    code = answer.get("error_code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else status
    description = excerpt(str(answer.get("description") or "no description"))
    params = answer.get("parameters")
    params = params if isinstance(params, dict) else {}
    reason = f"Telegram answered {code}: {description}"
    retry = params.get("retry_after")
    if code == 429 or isinstance(retry, int | float):
        hint = float(retry) if isinstance(retry, int | float) else None  # checked by the error
        return TransientSinkError(reason, "rate_limited", hint)
    migrated = params.get("migrate_to_chat_id")
    if isinstance(migrated, int):
        return PermanentSinkError(f"{reason}; set chat_id to {migrated}", "client_error")
    if code in (401, 403):  # a revoked token; a bot blocked by the user or removed from the chat
        return PermanentSinkError(reason, "auth_error")
    if code >= 500:
        return TransientSinkError(reason, "server_error", status=code)
    if code == 408:
        return TransientSinkError(reason, "timeout", status=code)
    return PermanentSinkError(reason, "client_error")
