"""Local stand-ins for Teams Workflows, Discord webhooks and the Telegram Bot API.

Each one checks requests the way the real service does (its URL shape, its secret, its
payload rules and length limits) and answers with that service's own success and error
bodies. Tests can also queue scripted answers (429s, 5xx) ahead of the normal behaviour.
"""

from __future__ import annotations

import json
import math
import re
import time
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

from tests.helpers.receiver import Answer, Received, Receiver


class FakeService(Receiver):
    """Records every request; answers queued `Answer`s first, then `respond()`."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: list[Received] = []  # what the real service would have shown

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.script:
            return await super().handle(request)
        body = await request.read()
        self.requests.append(Received(request.method, request.path, dict(request.query),
                                      dict(request.headers), body, time.monotonic()))
        async with self.arrived:
            self.arrived.notify_all()
        return self.respond(request, body)

    def respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        raise NotImplementedError

    def accept(self) -> None:
        self.accepted.append(self.requests[-1])


# ---- Teams Workflows ----------------------------------------------------------------------

# Teams' message cap: 28 KB. What a Workflows webhook does with a bigger body is not
# documented. Reports (MicrosoftDocs/msteams-docs#11274) show the trigger answering 202 and
# the flow run failing afterwards with 400 BadRequest "MessageSizeExceeded ... max allowed
# size is 28672 bytes", a failure the sender never sees. The fake refuses at once with that
# 400 instead, so a test that sends too much fails loudly rather than passing unnoticed.
TEAMS_MAX_BYTES = 28_672


class FakeTeams(FakeService):
    """`POST /workflows/<id>/triggers/manual/paths/invoke?...&sig=<sig>` -> 202 Accepted
    (or `status`: 200 is also a success some flows answer)."""

    def __init__(self, sig: str, status: int = 202) -> None:
        super().__init__()
        self.sig = sig
        self.status = status

    def respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.query.get("sig") != self.sig:
            return web.json_response({"error": {
                "code": "DirectApiAuthorizationRequired",
                "message": "The request must be authenticated only by Shared Access scheme."}},
                status=401)
        if len(body) > TEAMS_MAX_BYTES:
            return web.json_response({"error": {
                "code": "BadRequest", "message": "InvalidParameter", "innerError": {
                    "code": "1", "message": "MessageSizeExceeded-Message properties size "
                    f"exceeded. Actual message properties size: {len(body)} bytes, whereas "
                    f"max allowed size is {TEAMS_MAX_BYTES} bytes"}}}, status=400)
        try:
            data = json.loads(body)
            attachment = data["attachments"][0]
            ok = (data["type"] == "message"
                  and attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
                  and attachment["content"]["type"] == "AdaptiveCard")
        except (ValueError, KeyError, IndexError, TypeError):
            ok = False
        if not ok:
            return web.json_response({"error": {
                "code": "TriggerInputSchemaMismatch",
                "message": "The input body for trigger 'manual' of type 'Request' did not "
                           "match its schema definition."}}, status=400)
        self.accept()
        return web.Response(status=self.status)


# ---- Discord ------------------------------------------------------------------------------

def _discord_form_errors(data: dict[str, Any]) -> list[str]:
    """The limits Discord enforces on Execute Webhook (each a 400 Invalid Form Body)."""
    problems = []
    if len(data.get("content") or "") > 2000:
        problems.append("content: Must be 2000 or fewer in length.")
    embeds = data.get("embeds") or []
    if len(embeds) > 10:
        problems.append("embeds: Must be 10 or fewer in length.")
    for i, e in enumerate(embeds):
        total = 0
        for key, limit in (("title", 256), ("description", 4096)):
            total += len(e.get(key) or "")
            if len(e.get(key) or "") > limit:
                problems.append(f"embeds.{i}.{key}: Must be {limit} or fewer in length.")
        fields = e.get("fields") or []
        if len(fields) > 25:
            problems.append(f"embeds.{i}.fields: Must be 25 or fewer in length.")
        for j, f in enumerate(fields):
            total += len(f.get("name") or "") + len(f.get("value") or "")
            if not f.get("name") or not f.get("value"):
                problems.append(f"embeds.{i}.fields.{j}: This field is required")
            if len(f.get("name") or "") > 256 or len(f.get("value") or "") > 1024:
                problems.append(f"embeds.{i}.fields.{j}: too long")
        footer = (e.get("footer") or {}).get("text") or ""
        total += len(footer)
        if len(footer) > 2048:
            problems.append(f"embeds.{i}.footer.text: Must be 2048 or fewer in length.")
        if total > 6000:
            problems.append(f"embeds.{i}: Embed size exceeds maximum size of 6000")
    return problems


class FakeDiscord(FakeService):
    """`POST /api/[v<N>/]webhooks/<id>/<token>?wait=true` -> 200 with the created message.

    A path without a version speaks Discord's default version, 6, whose 429s give
    `retry_after` and `Retry-After` in milliseconds (discord/discord-api-docs#2360); from
    version 8 on they are seconds (`retry_after` a float, the header whole seconds)."""

    def __init__(self, webhook_id: str, token: str, remaining: int = 4) -> None:
        super().__init__()
        self.webhook_id, self.token = webhook_id, token
        self.remaining = remaining  # what X-RateLimit-Remaining says after the next success
        self.reset_after = 1.0
        self.limits: list[tuple[float, str]] = []  # (seconds, scope): the next answers 429

    def rate_limit(self, seconds: float, scope: str = "user") -> None:
        """The next request is answered 429, in the units of the API version it used."""
        self.limits.append((seconds, scope))

    def rate_headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": f"{time.time() + self.reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{self.reset_after:g}",
                "X-RateLimit-Bucket": "3b9c6b1b0e0f6b3c2a0f4e5d6c7b8a9f"}

    def respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        version = 6
        if len(parts) > 1 and re.fullmatch(r"v\d+", parts[1]):
            version = int(parts.pop(1)[1:])
        if parts[:2] != ["api", "webhooks"] or len(parts) != 4 or parts[2] != self.webhook_id:
            return web.json_response({"message": "Unknown Webhook", "code": 10015}, status=404)
        if self.limits:  # the limit is met before the token is looked at
            seconds, scope = self.limits.pop(0)
            limited = discord_429(seconds, scope, version)
            return web.json_response(limited.body, status=429, headers=limited.headers)
        if parts[3] != self.token:
            return web.json_response({"message": "Invalid Webhook Token", "code": 50027},
                                     status=401)
        data = json.loads(body)
        problems = _discord_form_errors(data)
        if problems:
            return web.json_response({"code": 50035, "message": "Invalid Form Body",
                                      "errors": problems}, status=400)
        if not data.get("content") and not data.get("embeds"):
            return web.json_response({"message": "Cannot send an empty message", "code": 50006},
                                     status=400)
        self.accept()
        headers = self.rate_headers()
        if request.query.get("wait") != "true":
            return web.Response(status=204, headers=headers)
        message = {"id": str(1_300_000_000_000_000_000 + len(self.requests)), "type": 0,
                   "content": data.get("content", ""), "embeds": data.get("embeds", []),
                   "channel_id": "1299999999999999999", "webhook_id": self.webhook_id}
        return web.json_response(message, headers=headers)


def discord_429(retry_after: float, scope: str = "user", version: int = 10) -> Answer:
    """Discord's 429: JSON `retry_after` plus the rate-limit headers; seconds (a float, the
    header rounded up) from API version 8 on, milliseconds before."""
    if version >= 8:
        said: float = retry_after
        header = str(math.ceil(retry_after))
    else:
        said = round(retry_after * 1000)
        header = str(said)
    return Answer(
        429,
        {"message": "You are being rate limited.", "retry_after": said,
         "global": scope == "global"},
        {"Retry-After": header, "X-RateLimit-Limit": "5",
         "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": f"{retry_after:g}",
         "X-RateLimit-Bucket": "3b9c6b1b0e0f6b3c2a0f4e5d6c7b8a9f", "X-RateLimit-Scope": scope},
    )


# ---- Telegram -----------------------------------------------------------------------------

TELEGRAM_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre",
                 "span", "tg-spoiler", "tg-emoji", "blockquote"}


class _TelegramHtml(HTMLParser):
    """Telegram's HTML mode: a few tags, properly nested; the rest is an error."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.error: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in TELEGRAM_TAGS:
            self.error = self.error or f'Unsupported start tag "{tag}"'
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.error = self.error or f'Can\'t find end tag corresponding to start tag "{tag}"'
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def telegram_parse(text: str) -> tuple[str, str | None]:
    """(visible text, error) as Telegram's HTML parse mode would see them."""
    parser = _TelegramHtml()
    parser.feed(text)
    parser.close()
    if parser.stack and not parser.error:
        parser.error = f'Can\'t find end tag corresponding to start tag "{parser.stack[-1]}"'
    return "".join(parser.text), parser.error


def telegram_error(code: int, description: str, **parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        out["parameters"] = parameters
    return out


class FakeTelegram(FakeService):
    """`POST /bot<token>/sendMessage` -> `{"ok": true, "result": <Message>}`."""

    def __init__(self, token: str, chats: set[int | str], blocked: set[int | str] | None = None,
                 migrated: dict[int | str, int] | None = None) -> None:
        super().__init__()
        self.token, self.chats, self.blocked = token, chats, blocked or set()
        self.migrated = migrated or {}  # a group that became a supergroup -> the new id

    def respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        def fail(code: int, description: str) -> web.Response:
            return web.json_response(telegram_error(code, description), status=code)

        if request.path != f"/bot{self.token}/sendMessage":
            return fail(401, "Unauthorized") if request.path.endswith("/sendMessage") \
                else fail(404, "Not Found")
        data = json.loads(body)
        if data.get("chat_id") in self.blocked:
            return fail(403, "Forbidden: bot was blocked by the user")
        if data.get("chat_id") in self.migrated:
            return web.json_response(telegram_error(
                400, "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=self.migrated[data["chat_id"]]), status=400)
        if data.get("chat_id") not in self.chats:
            return fail(400, "Bad Request: chat not found")
        text = data.get("text") or ""
        visible, error = telegram_parse(text) if data.get("parse_mode") == "HTML" else (text, None)
        if error:
            return fail(400, f"Bad Request: can't parse entities: {error}")
        if not visible.strip():
            return fail(400, "Bad Request: message text is empty")
        if len(visible.encode("utf-16-le")) // 2 > 4096:
            return fail(400, "Bad Request: message is too long")
        self.accept()
        return web.json_response({"ok": True, "result": {
            "message_id": len(self.requests), "date": int(time.time()),
            "chat": {"id": data["chat_id"], "type": "supergroup"}, "text": visible}})
