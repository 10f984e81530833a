"""The Teams sink against a local Workflows webhook: the card it posts and how it rides errors."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bridge.sinks.teams import CARD_BODY_BUDGET
from tests.conftest import BridgeFactory
from tests.helpers.chat_services import TEAMS_MAX_BYTES, FakeTeams
from tests.helpers.receiver import Answer
from tests.helpers.sinks import (
    ORDER,
    TRACKING_BARE,
    TRACKING_FAILED,
    assert_no_leak,
    dead,
    delivered,
    long_tracking,
)

SIG = "Qm9nVXNTaWduYXR1cmVGb3JUZXN0c09ubHkxMjM0NTY"
PATH = "/workflows/8a6c0e1f2b3d4c5e/triggers/manual/paths/invoke"
QUERY = "api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig="

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  teams:
    type: teams
    webhook_url: ${TEAMS_URL}
routes:
  - name: everything
    to: teams
"""


@pytest.fixture
async def teams(aiohttp_server: Any) -> tuple[FakeTeams, str]:
    fake = FakeTeams(SIG)
    server = await aiohttp_server(fake.app(), access_log=None)
    return fake, f"http://127.0.0.1:{server.port}{PATH}?{QUERY}{SIG}"


def text(t: str, **style: Any) -> dict[str, Any]:
    return {"type": "TextBlock", "text": t, "wrap": True, **style}


FOOTER = text("isendu · route everything", size="Small", isSubtle=True, spacing="Medium")


def message(card_body: list[dict[str, Any]], actions: list[Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {
        "type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4", "msteams": {"width": "Full"}, "body": card_body}
    if actions:
        content["actions"] = actions
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "content": content}]}


async def test_failed_step_card_is_exactly_this_and_202_is_delivered(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    status, _ = await bridge.post({"tracking": [TRACKING_FAILED]})
    assert status == 200
    [req] = await fake.wait_for(1)
    assert req.method == "POST" and req.path == PATH and req.query["sig"] == SIG
    assert req.headers["Content-Type"] == "application/json"
    link = "https://vas.brt.it/vas/sped_det_show.hsm?Nspediz=BRT100994275870"
    assert req.json() == message([
        text(f"⚠️ Shipment [BRT100994275870]({link}): **EXCEPTION**",
             size="Medium", weight="Bolder", color="Attention"),
        text("Parcel held at customs", spacing="Small"),  # the newest step, not the first
        {"type": "FactSet", "facts": [
            {"title": "Location", "value": "Paris"},
            {"title": "Local time", "value": "2025-11-04 06:57 (Europe/Paris)"}]},
        {"type": "Container", "style": "attention", "items": [
            text("⚠️ CUSTOMS_HOLD: Documents <required> & missing", weight="Bolder",
                 color="Attention")]},
        FOOTER,
    ], [{"type": "Action.OpenUrl", "title": "Track shipment", "url": link}])
    await delivered(bridge)  # Workflows answer 202 Accepted
    assert fake.accepted == [req]


async def test_order_card_and_bare_item_fall_back_gracefully(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    await bridge.post({"order": [ORDER], "tracking": [TRACKING_BARE]})
    got = await fake.wait_for(2)
    cards = {r.json()["attachments"][0]["content"]["body"][0]["text"]: r.json() for r in got}
    assert cards["⚙️ Order ORD-2025-932194: **PROCESSING**"] == message([
        text("⚙️ Order ORD-2025-932194: **PROCESSING**", size="Medium", weight="Bolder",
             color="Accent"),
        {"type": "FactSet", "facts": [{"title": "Destination", "value": "Roma, IT"},
                                      {"title": "Total", "value": "258.16 EUR"}]},
        FOOTER,
    ])
    # Only the documented uuid: no status, no steps, no link; still a sensible card.
    assert cards["📦 Shipment 0b8f3c1e-2f6d-4c1a-9a57-3a4be1f0c2d9"] == message([
        text("📦 Shipment 0b8f3c1e-2f6d-4c1a-9a57-3a4be1f0c2d9", size="Medium",
             weight="Bolder", color="Default"),
        FOOTER,
    ])
    await delivered(bridge, 2)


async def test_route_message_replaces_the_headline_and_details_can_be_off(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    config = CONFIG.replace("    to: teams\n", """    to: [teams, plain]
    message: "Parcel {{ item.trackingNumber }} needs attention"
""").replace("routes:", """  plain:
    type: teams
    webhook_url: ${TEAMS_URL}
    details: false
routes:""")
    bridge = await make_bridge(config, {"TEAMS_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    got = [r.json()["attachments"][0]["content"] for r in await fake.wait_for(2)]
    full = next(c for c in got if "actions" in c)
    plain = next(c for c in got if "actions" not in c)
    headline = text("Parcel BRT100994275870 needs attention", size="Medium", weight="Bolder",
                    color="Attention")
    assert full["body"][0] == headline
    # The headline no longer carries the status, so the facts do.
    assert full["body"][2]["facts"][0] == {"title": "Status", "value": "EXCEPTION"}
    assert plain["body"] == [headline]


async def test_ten_thousand_character_description_is_cut(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    await bridge.post({"tracking": [long_tracking(10_000)]})
    [req] = await fake.wait_for(1)
    step = req.json()["attachments"][0]["content"]["body"][1]["text"]
    assert step == "x" * 1999 + "…"
    assert len(req.body) < 28_000  # Teams' message size limit
    await delivered(bridge)


async def test_a_card_long_in_every_part_fits_a_teams_message(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    """Each part within its cap of characters, but CJK text (3 bytes each) and quotes
    (escaped, 2 bytes) in all of them: the texts are cut shorter until the whole message is
    within CARD_BODY_BUDGET, well inside the 28,672 bytes Teams counts (more than the body:
    Workflows fail such a message after answering 202, unseen)."""
    fake, url = teams
    han, quotes = "運" * 6000, '"' * 6000

    def snapshot(status: str, minute: int) -> dict[str, Any]:
        step = {"datetime": "2025-11-05 10:15:00", "timestamp": f"2025-11-05T09:{minute}:00Z",
                "timezone": "Europe/Rome", "status": "DELIVERED", "description": quotes,
                "location": han, "error": {"code": "E1", "message": han}}
        return {**long_tracking(), "trackingNumber": han, "status": status,
                "trackingUrl": "https://track.example.com/?q=" + "a" * 3000,
                "recipient": {"city": han, "country": han},
                "total": {"amount": 1, "currency": han}, "steps": [step]}

    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    await bridge.post({"tracking": [snapshot(han + "A", 10)]})
    await bridge.post({"tracking": [snapshot(han + "B", 20)]})  # a "Was" fact too
    got = await fake.wait_for(2)
    await delivered(bridge, 2)
    assert len(fake.accepted) == 2
    assert all(len(r.body) <= CARD_BODY_BUDGET for r in got), [len(r.body) for r in got]
    content = got[1].json()["attachments"][0]["content"]
    texts = [b.get("text", "") for b in content["body"]]
    assert texts[0].startswith("⚠️ Shipment [運") and texts[0].endswith("…")
    assert "actions" not in content  # a link too long to show whole is left out


async def test_429_retry_after_then_202(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    fake.answer(Answer(429, {"error": {"code": "TooManyRequests", "message": "Rate limit is "
                       "exceeded. Try again in 1 seconds."}}, {"Retry-After": "1"}))
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    first, second = await fake.wait_for(2, timeout=15)
    assert second.at - first.at >= 1.0
    assert first.body == second.body
    await delivered(bridge)


async def test_bad_signature_is_dead_and_the_url_never_leaks(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = teams
    wrong_sig = "V3JvbmdTaWduYXR1cmVGb3JUZXN0c09ubHk5ODc2NTQ"
    bad_url = url.replace(SIG, wrong_sig)
    fake.answer(Answer(502, "<html>Bad Gateway</html>"))
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": bad_url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    # The 502 was retried without spending an attempt (no answer from Teams yet since the
    # start: it may be an outage); the 401 was final.
    assert row.attempts == 1
    assert row.last_error is not None
    assert "HTTP 401" in row.last_error and "DirectApiAuthorizationRequired" in row.last_error
    assert fake.accepted == []
    assert_no_leak([wrong_sig, bad_url], caplog.records, row.last_error)


async def test_digest_card_lists_the_items(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    fake, url = teams
    config = CONFIG.replace("    to: teams\n", "    to: teams\n    group: {window: 300ms}\n")
    bridge = await make_bridge(config, {"TEAMS_URL": url})
    await bridge.post({"order": [ORDER, {**ORDER, "uuid": "u-2", "reference": "ORD-2"}]})
    [req] = await fake.wait_for(1)
    assert req.json() == message([
        text("📦 2 updates", size="Medium", weight="Bolder"),
        text("- order ORD-2025-932194: PROCESSING -> Roma, IT", spacing="None"),
        text("- order ORD-2: PROCESSING -> Roma, IT", spacing="None"),
        FOOTER,
    ])
    await delivered(bridge, 2)


async def test_200_is_accepted_too(make_bridge: BridgeFactory, aiohttp_server: Any) -> None:
    """Some flows answer 200 OK instead of 202 Accepted; both mean the message was taken."""
    fake = FakeTeams(SIG, status=200)
    server = await aiohttp_server(fake.app(), access_log=None)
    url = f"http://127.0.0.1:{server.port}{PATH}?{QUERY}{SIG}"
    bridge = await make_bridge(CONFIG, {"TEAMS_URL": url})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    assert len(fake.requests) == 1 and len(fake.accepted) == 1
    assert await bridge.rt.store.list_dead() == []


async def test_a_500_item_digest_fits_in_one_teams_message(
    make_bridge: BridgeFactory, teams: tuple[FakeTeams, str]
) -> None:
    """The fake refuses bodies over 28 KB as Teams does; a digest of 500 shows what fits and
    counts the rest, and every member is delivered (none dead-lettered by a 400)."""
    fake, url = teams
    config = CONFIG.replace("    to: teams\n",
                            "    to: teams\n    group: {window: 500ms, max_items: 500}\n")
    bridge = await make_bridge(config, {"TEAMS_URL": url})
    items = [{**TRACKING_BARE, "uuid": f"00000000-0000-4000-8000-{n:012d}",
              "trackingNumber": f"GLS{n:012d}", "status": "IN_TRANSIT"} for n in range(500)]
    status, body = await bridge.post({"tracking": items})
    assert status == 200 and body["deliveries"] == 500
    [req] = await fake.wait_for(1, timeout=20)
    assert fake.accepted == [req] and len(req.body) <= TEAMS_MAX_BYTES
    blocks = req.json()["attachments"][0]["content"]["body"]
    assert blocks[0]["text"] == "📦 500 updates"
    lines = [b["text"] for b in blocks[1:-1]]
    shown = [line for line in lines if line.startswith("- ")]
    assert lines[-1] == f"…and {500 - len(shown)} more" and len(shown) > 50
    await delivered(bridge, 500, timeout=30)
    assert await bridge.rt.store.list_dead() == []


async def test_a_body_over_28_kb_is_refused_by_the_fake_like_teams(
    teams: tuple[FakeTeams, str]
) -> None:
    """The fake's limit is real: a card past 28,672 bytes gets Teams' MessageSizeExceeded."""
    import aiohttp

    fake, url = teams
    card = message([text("x" * 29_000)])
    async with aiohttp.ClientSession() as session, session.post(url, json=card) as resp:
        assert resp.status == 400
        assert "MessageSizeExceeded" in await resp.text()
    assert fake.accepted == []
