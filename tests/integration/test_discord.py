"""The Discord sink against a local Execute Webhook endpoint with Discord's limits and 429s."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import BridgeFactory
from tests.helpers.chat_services import FakeDiscord
from tests.helpers.sinks import (
    ORDER,
    TRACKING_FAILED,
    assert_no_leak,
    dead,
    delivered,
    first_retry,
    long_tracking,
)

WEBHOOK_ID = "1300000000000000001"
TOKEN = "dQw4w9WgXcQ-T0kenForTestsOnly_abcdefghijklmnopqrstuvwxyz0123456789AB"

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  discord:
    type: discord
    webhook_url: ${DISCORD_URL}
routes:
  - name: everything
    to: discord
"""


@pytest.fixture
async def discord(aiohttp_server: Any) -> tuple[FakeDiscord, str]:
    fake = FakeDiscord(WEBHOOK_ID, TOKEN)
    server = await aiohttp_server(fake.app(), access_log=None)
    return fake, f"http://127.0.0.1:{server.port}/api/webhooks/{WEBHOOK_ID}/{TOKEN}"


async def test_failed_step_message_is_exactly_this(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [req] = await fake.wait_for(1)
    assert req.path == f"/api/v10/webhooks/{WEBHOOK_ID}/{TOKEN}"  # the URL named no version
    assert req.query == {"wait": "true"}  # the bridge asks Discord to confirm the message
    assert req.json() == {
        "content": "⚠️ Shipment **BRT100994275870**: EXCEPTION",
        "embeds": [{
            "title": "Shipment BRT100994275870",
            "url": "https://vas.brt.it/vas/sped_det_show.hsm?Nspediz=BRT100994275870",
            "description": "Parcel held at customs",
            "color": 0xE74C3C,
            "fields": [
                {"name": "Status", "value": "EXCEPTION", "inline": True},
                {"name": "Location", "value": "Paris", "inline": True},
                {"name": "Local time", "value": "2025-11-04 06:57 (Europe/Paris)",
                 "inline": True},
                {"name": "⚠️ CUSTOMS_HOLD", "value": "Documents <required> & missing",
                 "inline": False},
            ],
            "footer": {"text": "isendu · route everything"},
            "timestamp": "2025-11-04T05:57:40Z",
        }],
        "allowed_mentions": {"parse": []},
    }
    await delivered(bridge)
    assert fake.accepted == [req]


async def test_limits_cut_with_an_ellipsis_never_rejected(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord
    config = CONFIG + """  - name: loud
    kind: order
    to: discord
    message: "@everyone {{ 'y' * 3000 }}"
"""
    bridge = await make_bridge(config, {"DISCORD_URL": url})
    await bridge.post({"tracking": [long_tracking(10_000)], "order": [ORDER]})
    got = await fake.wait_for(3)  # tracking via `everything`; the order via both routes
    await delivered(bridge, 3)
    assert len(fake.accepted) == 3  # Discord would have refused anything over its limits
    bodies = [r.json() for r in got]
    [tracking] = [b for b in bodies if b["embeds"][0]["title"] == "Shipment GLS821026103283"]
    description = tracking["embeds"][0]["description"]
    assert description == "x" * 4095 + "…"
    assert tracking["embeds"][0]["color"] == 0x2ECC71  # delivered
    [loud] = [b for b in bodies if b["content"].startswith("@everyone")]
    assert loud["content"] == "@everyone " + "y" * 1989 + "…"
    assert len(loud["content"]) == 2000
    assert loud["allowed_mentions"] == {"parse": []}  # shown, but pings nobody


async def test_an_embed_of_many_long_fields_is_cut_to_discord_s_total(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    """Each field within its 1,024 but all of them over the embed's 6,000: the longest
    values are cut (a step without a description leaves nothing else to cut)."""
    fake, url = discord

    def snapshot(status: str, minute: int) -> dict[str, Any]:
        step = {"datetime": "2025-11-05 10:15:00", "timestamp": f"2025-11-05T09:{minute}:00Z",
                "timezone": "Europe/Rome", "status": "DELIVERED", "location": "L" * 5000,
                "error": {"code": "E1", "message": "M" * 5000}}
        return {**long_tracking(), "trackingNumber": "T" * 500, "status": status,
                "recipient": {"city": "C" * 3000, "country": "IT"},
                "total": {"amount": 1, "currency": "U" * 3000}, "steps": [step]}

    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url})
    await bridge.post({"tracking": [snapshot("A" * 5000, 10)]})
    await bridge.post({"tracking": [snapshot("B" * 5000, 20)]})  # adds a "Was" field
    await fake.wait_for(2)
    await delivered(bridge, 2)
    assert len(fake.accepted) == 2  # the fake refuses an embed over 6,000, as Discord does
    [embed] = fake.accepted[1].json()["embeds"]
    assert "description" not in embed
    assert "Was" in [f["name"] for f in embed["fields"]]
    total = (len(embed["title"]) + len(embed.get("footer", {}).get("text", ""))
             + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"]))
    assert 5_900 < total <= 6_000, total


async def test_markdown_in_item_text_is_shown_literally(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url})
    item = {**TRACKING_FAILED, "steps": [{"description": "**urgent** [click](http://x.test)",
                                          "timestamp": "2025-11-04T05:57:40Z"}]}
    await bridge.post({"tracking": [item]})
    [req] = await fake.wait_for(1)
    assert req.json()["embeds"][0]["description"] == r"\*\*urgent\*\* \[click\](http://x.test)"


async def test_429_json_retry_after_is_honoured(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord  # as Discord hands it out: no API version in it
    fake.rate_limit(1.25)
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    row, delay = await first_retry(bridge, "discord", "everything", "tracking", TRACKING_FAILED)
    # The float seconds from the body, not the header's 2; on version 10, where they are
    # seconds (without a version Discord gives milliseconds: the wait would be 1,250 s).
    assert fake.requests[0].path == f"/api/v10/webhooks/{WEBHOOK_ID}/{TOKEN}"
    assert delay == pytest.approx(1.25)
    assert row.last_error is not None and "HTTP 429" in row.last_error
    first, second = await fake.wait_for(2, timeout=15)
    assert second.at - first.at >= 1.25
    await delivered(bridge)


async def test_exhausted_bucket_waits_without_spending_a_request(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord
    fake.remaining, fake.reset_after = 0, 1.5  # X-RateLimit-Remaining: 0 on the first answer
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED], "order": [ORDER]})
    first, second = await fake.wait_for(2, timeout=15)
    assert second.at - first.at >= 1.5
    await delivered(bridge, 2)
    assert len(fake.requests) == 2  # no request was thrown at the exhausted bucket


async def test_bad_token_is_dead_and_the_token_never_leaks(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = discord
    wrong = "Wr0ngT0kenForTestsOnly_zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVU"
    fake.rate_limit(0.1, scope="global")
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url.replace(TOKEN, wrong)})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1  # the 429 did not count as an attempt
    assert len(fake.requests) == 2
    assert row.last_error is not None
    assert "HTTP 401" in row.last_error and "Invalid Webhook Token" in row.last_error
    assert_no_leak([wrong], caplog.records, row.last_error)


async def test_unknown_webhook_is_dead_at_once(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    _, url = discord
    bridge = await make_bridge(CONFIG, {"DISCORD_URL": url.replace(WEBHOOK_ID, "42")})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1 and row.last_error and "Unknown Webhook" in row.last_error


async def test_digest_lists_the_items_in_an_embed(
    make_bridge: BridgeFactory, discord: tuple[FakeDiscord, str]
) -> None:
    fake, url = discord
    config = CONFIG.replace("    to: discord\n", "    to: discord\n    group: {window: 300ms}\n")
    bridge = await make_bridge(config, {"DISCORD_URL": url})
    await bridge.post({"order": [ORDER, {**ORDER, "uuid": "u-2", "reference": "ORD-*2*"}]})
    [req] = await fake.wait_for(1)
    assert req.json() == {
        "content": "📦 **2 updates** on route everything",
        "embeds": [{"title": "2 updates",
                    "description": "• order ORD-2025-932194: PROCESSING -> Roma, IT\n"
                                   "• order ORD-\\*2\\*: PROCESSING -> Roma, IT",
                    "color": 0x95A5A6, "footer": {"text": "isendu · route everything"}}],
        "allowed_mentions": {"parse": []},
    }
    await delivered(bridge, 2)
