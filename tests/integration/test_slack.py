"""The Slack sink against a local stand-in for Slack's incoming webhooks and Web API.

The stand-in answers as Slack does: a webhook says `ok` or an error string with a 4xx status;
the Web API says HTTP 200 with `{"ok": false, "error": ...}` when it refuses, checks the
bearer token, Block Kit limits and channel membership, and hands out `ts` values that threads
and `chat.update` refer to.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge.models import Status
from bridge.sinks.slack import KeyedLocks, pack
from tests.conftest import BridgeFactory
from tests.helpers.bridge import Bridge
from tests.helpers.chat_services import FakeService
from tests.helpers.receiver import Answer
from tests.helpers.sinks import (
    ORDER,
    TRACKING_FAILED,
    assert_no_leak,
    dead,
    delivered,
    long_tracking,
)

HOOK_SECRET = "Qm9vbXNoYWthbGFrYTEyMzQ1Njc4"
TOKEN = "xoxb-1234567890-0987654321-Zm9vYmFyYmF6cXV4cXV1eA"
CHANNEL_ID = "C0SHIP01"
SCOPE = "slack:chat:#shipments"


def _block_problems(blocks: Any) -> list[str]:
    """The Block Kit rules Slack enforces on the blocks we use (any breach: invalid_blocks)."""
    if not isinstance(blocks, list) or not 0 < len(blocks) <= 50:
        return ["blocks: 1 to 50 blocks"]
    problems = []
    for i, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "header":
            if b["text"]["type"] != "plain_text" or not 0 < len(b["text"]["text"]) <= 150:
                problems.append(f"[{i}] header: plain_text of 1-150 characters")
        elif kind == "section":
            text, fields = b.get("text"), b.get("fields")
            if text is None and not fields:
                problems.append(f"[{i}] section: text or fields required")
            if text is not None and not 0 < len(text["text"]) <= 3000:
                problems.append(f"[{i}] section.text: 1-3000 characters")
            if fields is not None and (len(fields) > 10
                                       or any(not 0 < len(f["text"]) <= 2000 for f in fields)):
                problems.append(f"[{i}] section.fields: up to 10 of 1-2000 characters")
        elif kind == "context":
            if not 0 < len(b["elements"]) <= 10:
                problems.append(f"[{i}] context: 1-10 elements")
        else:
            problems.append(f"[{i}] unexpected block type {kind!r}")
    return problems


def _blocks_chars(blocks: Any) -> int:
    """Every text in the blocks, added up: Slack refuses a message over about 12,000
    (msg_blocks_too_long; not in Slack's reference, seen in practice)."""
    total = 0
    for b in blocks if isinstance(blocks, list) else []:
        texts = [b.get("text"), *(b.get("fields") or []), *(b.get("elements") or [])]
        total += sum(len(t["text"]) for t in texts if isinstance(t, dict))
    return total


class FakeSlack(FakeService):
    """`POST /services/T…/B…/<secret>` (incoming webhook) and `POST /api/<method>`."""

    def __init__(self) -> None:
        super().__init__()
        self.channels = {CHANNEL_ID: "shipments", "C0OTHER1": "elsewhere"}
        self.members = {CHANNEL_ID}  # channels the app was invited to
        self.messages: dict[str, dict[str, Any]] = {}  # ts -> the message as Slack keeps it
        self.delay = 0.0
        self.posted = 0
        self.answer_bytes = 0  # of the last chat.postMessage answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)  # keeps concurrent sends overlapping
        return await super().handle(request)

    def respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.startswith("/services/"):
            return self.webhook(request, body)
        if request.headers.get("Authorization") is None:
            return self.fail("not_authed")
        if request.headers["Authorization"] != f"Bearer {TOKEN}":
            return self.fail("invalid_auth")
        if not request.headers.get("Content-Type", "").startswith("application/json"):
            return self.fail("invalid_post_type")
        data = json.loads(body)
        if request.path == "/api/chat.postMessage":
            return self.post_message(data)
        if request.path == "/api/chat.update":
            return self.update(data)
        return self.fail("unknown_method")

    @staticmethod
    def fail(error: str) -> web.Response:
        return web.json_response({"ok": False, "error": error})

    def webhook(self, request: web.Request, body: bytes) -> web.Response:
        if request.path != f"/services/T0001/B0001/{HOOK_SECRET}":
            return web.Response(status=404, text="no_service")
        try:
            data = json.loads(body)
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        if "blocks" in data and _block_problems(data["blocks"]):
            return web.Response(status=400, text="invalid_blocks")
        if _blocks_chars(data.get("blocks")) > 12_000:
            return web.Response(status=400, text="invalid_blocks")
        if not data.get("text") and not data.get("blocks"):
            return web.Response(status=400, text="no_text")
        self.accept()
        return web.Response(text="ok")

    def channel_id(self, channel: str, ids_only: bool = False) -> str | None:
        if channel in self.channels:
            return channel
        if ids_only:  # chat.update takes IDs only
            return None
        by_name = {name: cid for cid, name in self.channels.items()}
        return by_name.get(channel.removeprefix("#"))

    def post_message(self, data: dict[str, Any]) -> web.Response:
        channel = self.channel_id(str(data.get("channel", "")))
        if channel is None:
            return self.fail("channel_not_found")
        if channel not in self.members:
            return self.fail("not_in_channel")
        if not data.get("text") and not data.get("blocks"):
            return self.fail("no_text")
        if len(data.get("text") or "") > 40_000:
            return self.fail("msg_too_long")
        if "blocks" in data and _block_problems(data["blocks"]):
            return self.fail("invalid_blocks")
        if _blocks_chars(data.get("blocks")) > 12_000:
            return self.fail("msg_blocks_too_long")
        self.accept()
        self.posted += 1
        ts = f"1700000000.{100 * self.posted:06d}"
        kept = {**data, "channel": channel}
        thread: dict[str, str] = {}
        parent = self.messages.get(str(data.get("thread_ts")))
        if "thread_ts" in data and (parent is None or parent["channel"] != channel):
            # As Slack does for a parent deleted before any reply: no error, the message is
            # posted at the channel's root, and its answer names no thread.
            del kept["thread_ts"]
        elif "thread_ts" in data:
            thread = {"thread_ts": data["thread_ts"]}
        self.messages[ts] = kept
        # As Slack does: the message posted comes back whole, its blocks too.
        answer = web.json_response({"ok": True, "channel": channel, "ts": ts, "message": {
            "type": "message", "subtype": "bot_message", "bot_id": "B0BRIDGE",
            "text": data.get("text"), "blocks": data.get("blocks"), "ts": ts, **thread}})
        assert answer.body is not None
        self.answer_bytes = len(bytes(answer.body))  # type: ignore[arg-type]
        return answer

    def update(self, data: dict[str, Any]) -> web.Response:
        channel = self.channel_id(str(data.get("channel", "")), ids_only=True)
        if channel is None:
            return self.fail("channel_not_found")
        message = self.messages.get(str(data.get("ts")))
        if message is None or message["channel"] != channel:
            return self.fail("message_not_found")
        if "blocks" in data and _block_problems(data["blocks"]):
            return self.fail("invalid_blocks")
        self.accept()
        message.update(text=data.get("text"), blocks=data.get("blocks"))
        return web.json_response({"ok": True, "channel": channel, "ts": data["ts"],
                                  "text": data.get("text"), "message": {"text": data.get("text")}})

    def posts(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.accepted if r.path == "/api/chat.postMessage"]

    def updates(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.accepted if r.path == "/api/chat.update"]


@pytest.fixture
async def slack(aiohttp_server: Any) -> AsyncIterator[tuple[FakeSlack, str]]:
    fake = FakeSlack()
    server = await aiohttp_server(fake.app())
    yield fake, f"http://127.0.0.1:{server.port}"


WEBHOOK_CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  chat:
    type: slack
    webhook_url: ${SLACK}/services/T0001/B0001/${HOOK_SECRET}
    rate_limit: 100/s
routes:
  - name: to-slack
    to: chat
"""


def bot_config(extra: str = "", concurrency: int = 1) -> str:
    return f"""
defaults:
  retry: {{initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}}
sinks:
  chat:
    type: slack
    token: ${{TOKEN}}
    channel: "#shipments"
    api_url: ${{SLACK}}/api
    rate_limit: 100/s
    concurrency: {concurrency}
{extra}
routes:
  - name: to-slack
    to: chat
"""


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Log records of the bridge; the stand-in's own access log shows the URL it was called on
    (`serve` turns aiohttp's access log off)."""
    return [r for r in caplog.records if r.name != "aiohttp.access"]


def env(url: str) -> dict[str, str]:
    return {"SLACK": url, "HOOK_SECRET": HOOK_SECRET, "TOKEN": TOKEN}


URL = TRACKING_FAILED["trackingUrl"]
FAILED_TEXT = (
    f"⚠️ Shipment <{URL}|BRT100994275870>: EXCEPTION\n"
    "Parcel held at customs\n"
    "📍 Paris · 🕒 2025-11-04 06:57 (Europe/Paris)\n"
    "⚠️ CUSTOMS_HOLD: Documents &lt;required&gt; &amp; missing"
)
FAILED_BLOCKS = [
    {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                "text": "⚠️ Shipment BRT100994275870: EXCEPTION"}},
    {"type": "section", "text": {"type": "mrkdwn", "text": "Parcel held at customs"}},
    {"type": "section", "fields": [
        {"type": "mrkdwn", "text": f"*Tracking*\n<{URL}|BRT100994275870>"},
        {"type": "mrkdwn", "text": "*Location*\nParis"},
        {"type": "mrkdwn", "text": "*Local time*\n2025-11-04 06:57 (Europe/Paris)"}]},
    {"type": "section", "text": {
        "type": "mrkdwn", "text": "⚠️ *CUSTOMS_HOLD*: Documents &lt;required&gt; &amp; missing"}},
    {"type": "context", "elements": [{"type": "mrkdwn", "text": "isendu · route to-slack"}]},
]


def snapshot(status: str, n: int, uuid: str = TRACKING_FAILED["uuid"]) -> dict[str, Any]:
    """The n-th snapshot of one shipment: one step more each time, the newest first."""
    item = copy.deepcopy(TRACKING_FAILED)
    item.update(uuid=uuid, status=status, delivered=status == "DELIVERED")
    item["steps"] = [{"datetime": f"2025-11-0{n} 10:00:00", "timestamp": f"2025-11-0{n}T09:00:00Z",
                      "timezone": "Europe/Rome", "description": f"step {n}: {status}",
                      "location": "Milano", "status": status}]
    return item


# ---- incoming webhook ----------------------------------------------------------------------

async def test_webhook_posts_text_and_block_kit(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(WEBHOOK_CONFIG, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    [req] = fake.accepted
    assert req.headers["Content-Type"].startswith("application/json")
    assert "Authorization" not in req.headers
    assert req.json() == {"text": FAILED_TEXT, "blocks": FAILED_BLOCKS,
                          "unfurl_links": False, "unfurl_media": False}


async def test_webhook_order_message(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(WEBHOOK_CONFIG, env(url))
    await bridge.post({"order": [ORDER], "tracking": []})
    await delivered(bridge)
    assert fake.accepted[0].json() == {
        "text": "⚙️ Order ORD-2025-932194: PROCESSING\n📍 Roma, IT · 💰 258.16 EUR",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                        "text": "⚙️ Order ORD-2025-932194: PROCESSING"}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Destination*\nRoma, IT"},
                                           {"type": "mrkdwn", "text": "*Total*\n258.16 EUR"}]},
            {"type": "context", "elements": [{"type": "mrkdwn",
                                              "text": "isendu · route to-slack"}]}],
        "unfurl_links": False, "unfurl_media": False}


@pytest.mark.parametrize(("status", "error"), [
    (400, "invalid_payload"), (403, "action_prohibited"), (404, "channel_not_found"),
    (410, "channel_is_archived"),
])
async def test_webhook_refusals_are_dead_at_once_with_slacks_reason(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str], caplog: pytest.LogCaptureFixture,
    status: int, error: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = slack
    fake.answer(Answer(status, error))
    bridge = await make_bridge(WEBHOOK_CONFIG, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error is not None
    assert f"HTTP {status}" in row.last_error and error in row.last_error
    assert_no_leak([HOOK_SECRET, f"{url}/services"], ours(caplog), row.last_error)


async def test_webhook_429_waits_for_retry_after(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    fake.answer(Answer(429, "rate_limited", {"Retry-After": "1"}))
    bridge = await make_bridge(WEBHOOK_CONFIG, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    first, second = fake.requests
    assert second.at - first.at >= 1.0
    assert first.body == second.body


# ---- Web API (bot token) -------------------------------------------------------------------

async def test_bot_posts_to_chat_post_message_with_bearer_token(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(bot_config(), env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    [req] = fake.accepted
    assert req.path == "/api/chat.postMessage"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"
    assert req.json() == {"channel": "#shipments", "text": FAILED_TEXT, "blocks": FAILED_BLOCKS,
                          "unfurl_links": False, "unfurl_media": False}


async def test_bot_with_a_wrong_token_is_dead_with_invalid_auth(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = slack
    wrong = "xoxb-1111111111-2222222222-d3JvbmcgdG9rZW4gaGVyZQ"
    bridge = await make_bridge(bot_config(), {**env(url), "TOKEN": wrong})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1 and fake.accepted == []
    assert row.last_error == "Slack chat.postMessage failed: invalid_auth (check `token`)"
    assert_no_leak([wrong], ours(caplog), row.last_error)


@pytest.mark.parametrize(("error", "expected"), [
    ("not_in_channel", "Slack chat.postMessage failed: not_in_channel (invite the app"),
    ("msg_too_long", "Slack chat.postMessage failed: msg_too_long"),
    ("token_revoked", "Slack chat.postMessage failed: token_revoked (the token was revoked"),
    ("brand_new_error", "Slack chat.postMessage failed: brand_new_error"),
])
async def test_bot_ok_false_answers_are_permanent(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str], caplog: pytest.LogCaptureFixture,
    error: str, expected: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = slack
    fake.answer(Answer(200, {"ok": False, "error": error}))
    bridge = await make_bridge(bot_config(), env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1 and row.last_error is not None
    assert row.last_error.startswith(expected)
    assert_no_leak([TOKEN], ours(caplog), row.last_error)


async def test_not_a_member_of_the_channel_is_reported(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    fake.members.clear()
    bridge = await make_bridge(bot_config(), env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.last_error is not None and "not_in_channel" in row.last_error


@pytest.mark.parametrize("answer", [
    Answer(200, {"ok": False, "error": "ratelimited"}),
    Answer(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"}),
    Answer(500, "<html>upstream connect error</html>"),
    Answer(200, {"ok": False, "error": "internal_error"}),
], ids=["ok-false-ratelimited", "http-429", "http-500", "internal_error"])
async def test_bot_transient_answers_are_retried(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str], answer: Answer
) -> None:
    fake, url = slack
    fake.answer(answer)
    bridge = await make_bridge(bot_config(), env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    first, second = fake.requests
    assert len(fake.accepted) == 1 and first.body == second.body
    if "Retry-After" in answer.headers:
        assert second.at - first.at >= 1.0


async def test_long_content_is_cut_never_refused(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(bot_config(), env(url))
    await bridge.post({"tracking": [long_tracking(10_000)]})
    await delivered(bridge)
    sent = fake.accepted[0].json()
    description = sent["blocks"][1]["text"]["text"]
    assert len(description) == 3000 and description == "x" * 2999 + "…"
    assert len(sent["text"]) <= 40_000 and "x" * 2999 + "…" in sent["text"]


async def test_a_post_answered_with_a_long_message_is_posted_once(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    """chat.postMessage answers with the message posted, escaped as JSON: for a long one
    with accents, ~250 KB. Cut at 64 KiB it did not parse, and the post was retried."""
    fake, url = slack
    config = bot_config().replace(
        "    to: chat\n", "    to: chat\n    message: \"{{ item.note }}\"\n")
    bridge = await make_bridge(config, env(url))
    await bridge.post({"tracking": [{**long_tracking(), "note": "é" * 30_000}]})
    await delivered(bridge)
    await asyncio.sleep(0.3)  # no retry follows
    assert fake.posted == 1 and fake.answer_bytes > 64 * 1024, fake.answer_bytes


async def test_message_template_replaces_text_and_blocks_with_escaped_values(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = bot_config().replace(
        "    to: chat\n",
        "    to: chat\n"
        "    message: \"*{{ item.trackingNumber }}* <{{ item.trackingUrl }}|track> "
        "{{ last_step.error.message }}{{ item.note }}\"\n")
    bridge = await make_bridge(config, env(url))
    long_note = {**TRACKING_FAILED, "note": "y" * 45_000}
    await bridge.post({"tracking": [TRACKING_FAILED, long_note]})
    await delivered(bridge, 2)
    short, long = sorted((r.json() for r in fake.accepted), key=lambda m: len(m["text"]))
    expected = (f"*BRT100994275870* <{URL}|track> Documents &lt;required&gt; &amp; missing")
    assert short["text"] == expected
    assert short["blocks"] == [{"type": "section", "text": {"type": "mrkdwn", "text": expected}}]
    assert len(long["text"]) == 40_000 and long["text"].endswith("y…")
    assert len(long["blocks"][0]["text"]["text"]) == 3000


# ---- threads -------------------------------------------------------------------------------

async def _post_one(bridge: Bridge, item: dict[str, Any]) -> None:
    """Post one snapshot and wait until it was delivered, so the order of sends is known."""
    before = (await bridge.rt.store.counts())[Status.DELIVERED.value]
    status, _ = await bridge.post({"tracking": [item]})
    assert status == 200
    await delivered(bridge, before + 1)


async def test_updates_of_one_shipment_share_a_thread_across_restarts(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = bot_config("    thread_by: shipment")
    bridge = await make_bridge(config, env(url))
    for n, status in enumerate(["PICKED_UP", "IN_TRANSIT", "OUT_FOR_DELIVERY"], start=1):
        await _post_one(bridge, snapshot(status, n))
    parent, *replies = fake.posts()
    assert "thread_ts" not in parent and "step 1: PICKED_UP" in parent["text"]
    assert [r["thread_ts"] for r in replies] == ["1700000000.000100"] * 2
    assert [r["text"].split("\n")[1] for r in replies] == ["step 2: IN_TRANSIT",
                                                           "step 3: OUT_FOR_DELIVERY"]
    assert all("reply_broadcast" not in r for r in replies)
    assert await bridge.rt.store.recall(SCOPE, TRACKING_FAILED["uuid"]) == \
        "1700000000.000100"

    await bridge.client.close()  # a restart: a new runtime on the same SQLite file
    again = await make_bridge(config, env(url))
    await _post_one(again, snapshot("DELIVERED", 4))
    last = fake.posts()[-1]
    assert last["thread_ts"] == "1700000000.000100" and "step 4: DELIVERED" in last["text"]


async def test_two_shipments_never_share_a_thread(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(bot_config("    thread_by: shipment"), env(url))
    other = "5a0d3f6e-1b2c-4d3e-8f4a-5b6c7d8e9f00"
    await _post_one(bridge, snapshot("PICKED_UP", 1))
    await _post_one(bridge, snapshot("PICKED_UP", 1, other))
    await _post_one(bridge, snapshot("IN_TRANSIT", 2, other))
    await _post_one(bridge, snapshot("IN_TRANSIT", 2))
    a_parent, b_parent, b_reply, a_reply = fake.posts()
    assert "thread_ts" not in a_parent and "thread_ts" not in b_parent
    assert b_reply["thread_ts"] == "1700000000.000200"  # b's parent, the second message
    assert a_reply["thread_ts"] == "1700000000.000100"


async def test_concurrent_updates_of_one_shipment_start_one_thread(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    fake.delay = 0.2  # each call takes a while, so the three sends overlap
    bridge = await make_bridge(bot_config("    thread_by: shipment", concurrency=4), env(url))
    items = [snapshot(s, n) for n, s in enumerate(["PICKED_UP", "IN_TRANSIT", "DELIVERED"], 1)]
    await bridge.post({"tracking": items})
    await delivered(bridge, 3)
    posts = fake.posts()
    assert len(posts) == 3
    assert sum("thread_ts" not in p for p in posts) == 1
    assert {p.get("thread_ts") for p in posts} == {None, "1700000000.000100"}


async def test_update_parent_edits_the_first_message_by_channel_id(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = bot_config("    thread_by: shipment\n    update_parent: true")
    bridge = await make_bridge(config, env(url))
    await _post_one(bridge, snapshot("PICKED_UP", 1))
    await _post_one(bridge, snapshot("IN_TRANSIT", 2))
    assert [r.path for r in fake.accepted] == ["/api/chat.postMessage", "/api/chat.update",
                                               "/api/chat.postMessage"]
    [update] = fake.updates()
    reply = fake.posts()[1]
    # chat.update wants the channel's ID; the config names the channel "#shipments".
    assert update == {"channel": CHANNEL_ID, "ts": "1700000000.000100",
                      "text": reply["text"], "blocks": reply["blocks"]}
    assert fake.messages["1700000000.000100"]["text"] == reply["text"]

    await bridge.client.close()  # the channel's ID is remembered across a restart too
    again = await make_bridge(config, env(url))
    await _post_one(again, snapshot("DELIVERED", 3))
    assert fake.updates()[-1]["channel"] == CHANNEL_ID
    assert fake.messages["1700000000.000100"]["text"].split("\n")[1] == "step 3: DELIVERED"


async def test_a_deleted_parent_starts_a_new_thread(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    bridge = await make_bridge(bot_config("    thread_by: shipment\n    update_parent: true"),
                               env(url))
    await _post_one(bridge, snapshot("PICKED_UP", 1))
    del fake.messages["1700000000.000100"]  # someone deleted the thread's first message
    await _post_one(bridge, snapshot("IN_TRANSIT", 2))
    new_parent = fake.posts()[-1]
    assert "thread_ts" not in new_parent and "step 2: IN_TRANSIT" in new_parent["text"]
    assert await bridge.rt.store.recall(SCOPE, TRACKING_FAILED["uuid"]) == \
        "1700000000.000200"


async def test_a_parent_deleted_before_any_reply_starts_a_new_thread_without_edits(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    """Without update_parent nothing asks Slack about the parent: the reply to a deleted one
    is posted at the channel's root (Slack says so only by leaving thread_ts out of its
    answer), and becomes the thread's first message for the updates after it."""
    fake, url = slack
    bridge = await make_bridge(bot_config("    thread_by: shipment"), env(url))
    await _post_one(bridge, snapshot("PICKED_UP", 1))
    del fake.messages["1700000000.000100"]  # deleted before any reply
    await _post_one(bridge, snapshot("IN_TRANSIT", 2))
    await _post_one(bridge, snapshot("DELIVERED", 3))
    _, to_the_deleted, last = fake.posts()
    assert to_the_deleted["thread_ts"] == "1700000000.000100"  # landed at the root
    assert "thread_ts" not in fake.messages["1700000000.000200"]
    assert last["thread_ts"] == "1700000000.000200"  # under the message that did
    assert await bridge.rt.store.recall(SCOPE, TRACKING_FAILED["uuid"]) == \
        "1700000000.000200"


async def test_broadcast_only_for_listed_statuses(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = bot_config("    thread_by: shipment\n    broadcast: [DELIVERED, EXCEPTION]")
    bridge = await make_bridge(config, env(url))
    for n, status in enumerate(["IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED"], start=1):
        await _post_one(bridge, snapshot(status, n))
    parent, plain, loud = fake.posts()
    assert "reply_broadcast" not in parent and "reply_broadcast" not in plain
    assert loud["reply_broadcast"] is True and loud["thread_ts"] == "1700000000.000100"


async def test_thread_state_failure_is_retried_not_duplicated(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    """A 5xx on a reply retries the reply into the same thread; no second parent appears."""
    fake, url = slack
    bridge = await make_bridge(bot_config("    thread_by: shipment"), env(url))
    await _post_one(bridge, snapshot("PICKED_UP", 1))
    fake.answer(Answer(503, "service unavailable"))
    await _post_one(bridge, snapshot("IN_TRANSIT", 2))
    assert [p.get("thread_ts") for p in fake.posts()] == [None, "1700000000.000100"]
    rows = await bridge.rt.store.list_dead()
    assert rows == []
    assert (await bridge.rt.store.counts())[Status.DELIVERED.value] == 2


async def test_keyed_locks_serialise_per_key_and_forget_idle_keys() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def hold_a_until_released() -> None:
        async with locks.hold("a"):
            order.append("a1+")
            await release.wait()
            order.append("a1-")

    async def work(key: str, tag: str) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            order.append(f"{tag}-")

    a1 = asyncio.create_task(hold_a_until_released())
    await asyncio.sleep(0)  # a1 takes "a"
    a2 = asyncio.create_task(work("a", "a2"))
    b1 = asyncio.create_task(work("b", "b1"))
    # Another key is not held up: b1 runs to the end while a1 still holds "a" ...
    await asyncio.wait_for(b1, timeout=2)
    await asyncio.sleep(0.05)
    # ... and a2, on the same key, has not started.
    assert order == ["a1+", "b1+", "b1-"]
    assert len(locks) == 1  # "b" was forgotten once free; "a" is held and waited for
    release.set()
    await asyncio.wait_for(asyncio.gather(a1, a2), timeout=2)
    assert order == ["a1+", "b1+", "b1-", "a1-", "a2+", "a2-"]  # a2 only after a1 let go
    assert len(locks) == 0


async def test_a_digest_is_one_top_level_message_even_with_threads(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = bot_config("    thread_by: shipment").replace(
        "    to: chat\n", "    to: chat\n    group: {window: 300ms}\n")
    bridge = await make_bridge(config, env(url))
    uuids = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(3)]
    await bridge.post({"tracking": [snapshot("IN_TRANSIT", 2, u) for u in uuids]})
    await delivered(bridge, 3)
    [digest] = fake.posts()
    assert "thread_ts" not in digest
    assert digest["text"].startswith("📦 3 updates on route to-slack\n• BRT100994275870: ")
    header, items, footer = digest["blocks"]
    assert header["text"]["text"] == "📦 3 updates"
    assert items["text"]["text"].count("• BRT100994275870: IN_TRANSIT - step 2") == 3
    assert footer["elements"][0]["text"] == "isendu · route to-slack"
    for u in uuids:  # no thread was started for any of them
        assert await bridge.rt.store.recall(SCOPE, u) is None


async def test_a_500_item_digest_fits_slacks_total_blocks_budget(
    make_bridge: BridgeFactory, slack: tuple[FakeSlack, str]
) -> None:
    fake, url = slack
    config = WEBHOOK_CONFIG.replace(
        "    to: chat\n", "    to: chat\n    group: {window: 500ms, max_items: 500}\n")
    bridge = await make_bridge(config, env(url))
    uuids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(500)]
    status, _ = await bridge.post({"tracking": [snapshot("IN_TRANSIT", 2, u) for u in uuids]})
    assert status == 200
    await delivered(bridge, 500, timeout=30)
    [req] = fake.accepted
    digest = req.json()
    assert _blocks_chars(digest["blocks"]) <= 12_000
    lines = [line for b in digest["blocks"][1:-1] for line in b["text"]["text"].split("\n")]
    shown = [line for line in lines if line.startswith("• BRT100994275870: IN_TRANSIT")]
    assert len(shown) > 50 and lines[-1] == f"…and {500 - len(shown)} more"
    assert digest["text"].endswith(lines[-1])


def test_digest_sections_stay_within_block_kit_limits() -> None:
    lines = [f"• item {n:03d} " + "z" * 390 for n in range(500)]  # 200,000 characters
    chunks = pack(lines, 3000, 48)
    assert len(chunks) == 48 and all(len(c) <= 3000 for c in chunks)
    shown = sum(c.count("• item") for c in chunks)
    assert chunks[-1].endswith(f"…and {500 - shown} more")
    assert chunks[0].startswith("• item 000 ")
