"""A digest of many items stays inside each chat service's size limits, and says how many
items it could not show ("…and N more") instead of dropping them silently."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from bridge.models import Delivery, Status
from bridge.sinks.base import RenderContext, Sink
from bridge.sinks.chat import fit_lines, utf16_len
from bridge.sinks.discord import DiscordSink, DiscordSinkConfig
from bridge.sinks.slack import SlackSink, SlackSinkConfig
from bridge.sinks.teams import TeamsSink, TeamsSinkConfig
from bridge.sinks.telegram import TelegramSink, TelegramSinkConfig, visible_len
from bridge.templates import DEFAULT_SUMMARY

MORE = re.compile(r"^…and (\d+) more$")


def tracking(n: int) -> dict[str, Any]:
    return {"uuid": f"00000000-0000-4000-8000-{n:012d}", "status": "IN_TRANSIT",
            "trackingNumber": f"GLS{n:012d}", "trackingUrl": f"https://gls.example/t/{n}",
            "steps": [{"timestamp": "2025-11-03T10:00:00Z", "status": "IN_TRANSIT",
                       "description": "Parcel scanned at the hub; on its way to the depot "
                                      "nearest to the recipient", "location": "Milano Linate"}]}


def deliveries(sink: Sink, count: int) -> list[Delivery]:
    """What the router stores for grouped items: the sink's payload plus a summary line."""
    out = []
    for n in range(count):
        item = tracking(n)
        ctx = RenderContext(item, "tracking", "2025-11-03T10:00:01Z", json.dumps(item))
        payload = sink.render(ctx, "updates", f"d{n}", None)
        payload["summary"] = DEFAULT_SUMMARY["tracking"].render(ctx.vars("updates", f"d{n}"))
        out.append(Delivery(
            id=f"d{n}", sink=sink.name, route="updates", item_uuid=item["uuid"],
            kind="tracking", payload=payload, status=Status.PENDING, attempts=1,
            next_attempt_at=0.0, created_at=0.0, updated_at=0.0, enqueued_at=0.0,
            group_key="updates>chat"))
    return out


def shown_and_more(lines: list[str], marker: str) -> tuple[int, int]:
    """(item lines shown, N of the "…and N more" line, which must come last)."""
    *items, last = lines
    m = MORE.match(last)
    assert m, f"no '…and N more' line at the end: {last!r}"
    assert all(line.startswith(marker) and "GLS0" in line for line in items), items[:3]
    return len(items), int(m.group(1))


@pytest.mark.parametrize("count", [1, 20, 500])
def test_teams_digest_stays_under_28_kb(count: int) -> None:
    sink = TeamsSink("chat", TeamsSinkConfig.model_validate(
        {"type": "teams", "webhook_url": "https://x.example/workflows/1?sig=s"}))
    body = sink.render_digest("updates", deliveries(sink, count))["body"]
    assert len(body.encode()) <= 20_000  # Teams' cap is 28,672 bytes; see teams.py
    blocks = json.loads(body)["attachments"][0]["content"]["body"]
    texts = [b["text"] for b in blocks[1:-1]]
    assert blocks[0]["text"] == f"📦 {count} updates"
    if count < 100:
        assert len(texts) == count and not any(MORE.match(t) for t in texts)
        return
    shown, more = shown_and_more(texts, "- ")
    assert shown > 50 and shown + more == count


@pytest.mark.parametrize("count", [1, 20, 500])
def test_slack_digest_blocks_stay_under_12000_characters(count: int) -> None:
    sink = SlackSink("chat", SlackSinkConfig.model_validate(
        {"type": "slack", "webhook_url": "https://hooks.slack.com/services/T/B/x"}))
    payload = sink.render_digest("updates", deliveries(sink, count))
    blocks = json.loads(payload["blocks"])
    texts = [b["text"]["text"] for b in blocks if "text" in b]
    texts += [e["text"] for b in blocks for e in b.get("elements", [])]
    assert sum(utf16_len(t) for t in texts) <= 12_000
    assert len(blocks) <= 50 and all(utf16_len(t) <= 3000 for t in texts)
    assert utf16_len(payload["text"]) <= 40_000
    lines = [line for b in blocks[1:-1] for line in b["text"]["text"].split("\n")]
    if count < 100:
        assert len(lines) == count
        return
    shown, more = shown_and_more(lines, "• ")
    assert shown > 50 and shown + more == count
    assert payload["text"].endswith(f"…and {more} more")


@pytest.mark.parametrize("count", [1, 20, 500])
def test_discord_digest_says_what_it_left_out(count: int) -> None:
    sink = DiscordSink("chat", DiscordSinkConfig.model_validate(
        {"type": "discord", "webhook_url": "https://discord.com/api/webhooks/1/tok"}))
    body = json.loads(sink.render_digest("updates", deliveries(sink, count))["body"])
    [embed] = body["embeds"]
    assert utf16_len(embed["description"]) <= 4096
    total = sum(utf16_len(embed[k]) for k in ("title", "description")) + utf16_len(
        embed["footer"]["text"])
    assert total <= 6000 and utf16_len(body["content"]) <= 2000
    lines = embed["description"].split("\n")
    if count < 100:
        assert len(lines) == count
        return
    shown, more = shown_and_more(lines, "• ")
    assert shown > 10 and shown + more == count


@pytest.mark.parametrize("count", [1, 500])
def test_telegram_digest_says_what_it_left_out(count: int) -> None:
    sink = TelegramSink("chat", TelegramSinkConfig.model_validate(
        {"type": "telegram", "token": "123456789:AAEexampleexampleexample", "chat_id": 1}))
    text = json.loads(sink.render_digest("updates", deliveries(sink, count))["body"])["text"]
    assert visible_len(text) <= 4096
    lines = text.split("\n")[1:]
    if count == 1:
        assert len(lines) == 1
        return
    shown, more = shown_and_more(lines, "• ")
    assert shown > 10 and shown + more == count


def test_fit_lines_keeps_whole_lines_and_counts_the_rest() -> None:
    lines = [f"line {n:02d}" for n in range(10)]  # 7 characters each
    assert fit_lines(lines, 79) == lines  # 10 * 7 + 9 separators
    kept = fit_lines(lines, 40)
    assert kept[-1] == f"…and {10 - len(kept) + 1} more"
    assert sum(len(x) for x in kept) + len(kept) - 1 <= 40
    assert kept[:-1] == lines[:len(kept) - 1]
