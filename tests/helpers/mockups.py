"""Plain-text pictures of what each chat sink's default message looks like, drawn from the
real sinks' render output on the shared isendu samples. The README shows these; a test keeps
them in step with the code. Regenerate with `python -m tests.helpers.mockups`.

Conventions: `┃` is the message's left edge (or a card's), `[label]` is a link, bold and other
styling is dropped, and a Slack/Discord field pair is shown as `Name: value` columns.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from bridge.models import Kind
from bridge.sinks.base import RenderContext, Sink
from bridge.sinks.discord import DiscordSink
from bridge.sinks.email import EmailSink
from bridge.sinks.slack import SlackSink
from bridge.sinks.teams import TeamsSink
from bridge.sinks.telegram import TelegramSink
from tests.helpers.bridge import sample_batch, sample_batches

CONFIGS: dict[str, tuple[type[Sink], dict[str, Any]]] = {
    "slack": (SlackSink, {"type": "slack", "webhook_url": "https://hooks.slack.com/services/T/B/x"}),
    "teams": (TeamsSink, {"type": "teams", "webhook_url": "https://x.example/workflows/1?sig=s"}),
    "discord": (DiscordSink, {"type": "discord",
                              "webhook_url": "https://discord.com/api/webhooks/1/token"}),
    "telegram": (TelegramSink, {"type": "telegram", "chat_id": -1001234567890,
                                "token": "123456789:AAEexampleexampleexample"}),
    "email": (EmailSink, {"type": "email", "host": "smtp.example.com",
                          "from": "bridge@example.com", "to": "ops@example.com"}),
}


def sample_items() -> dict[Kind, dict[str, Any]]:
    """The sample order, and the first sample tracking update whose newest step failed."""
    order = sample_batch()["order"][0]
    failed = next(t for b in sample_batches() for t in b.get("tracking", [])
                  if any(s.get("error") for s in t.get("steps", [])))
    return {"order": order, "tracking": failed}


def render(service: str, kind: Kind) -> dict[str, str]:
    cls, raw = CONFIGS[service]
    sink = cls(service, cls.config_model.model_validate(raw))
    item = sample_items()[kind]
    ctx = RenderContext(item, kind, "2025-11-04T06:00:00Z", json.dumps(item))
    return sink.render(ctx, "orders" if kind == "order" else "shipments", "d1", None)


def _edge(lines: list[str]) -> str:
    return "\n".join(f"┃ {line}".rstrip() for line in lines)


def _columns(pairs: list[tuple[str, str]], per_row: int) -> list[str]:
    cells = [f"{k}: {v}" for k, v in pairs]
    widths = [max(len(c) for c in cells[col::per_row]) + 3 for col in range(per_row)
              if cells[col::per_row]]
    return ["".join(c.ljust(w) for c, w in zip(cells[i:i + per_row], widths, strict=False))
            .rstrip() for i in range(0, len(cells), per_row)]


def _mrkdwn(text: str) -> str:
    text = re.sub(r"<([^|>]+)\|([^>]+)>", r"[\2]", text)
    text = re.sub(r"\*([^*\n]+)\*", r"\1", text)
    return html.unescape(text)


def _markdown(text: str) -> str:
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"[\1]", text)
    text = text.replace("**", "")
    return re.sub(r"\\(.)", r"\1", text)


def slack(payload: dict[str, str]) -> str:
    lines: list[str] = []
    for b in json.loads(payload["blocks"]):
        if b["type"] == "header":
            lines.append(b["text"]["text"])
        elif b["type"] == "section" and "text" in b:
            lines += _mrkdwn(b["text"]["text"]).split("\n")
        elif b["type"] == "section":
            pairs = [tuple(_mrkdwn(f["text"]).split("\n", 1)) for f in b["fields"]]
            lines += _columns([(k, v) for k, v in pairs], 2)
        elif b["type"] == "context":
            lines.append(" ".join(_mrkdwn(e["text"]) for e in b["elements"]))
    return _edge(lines)


def teams(payload: dict[str, str]) -> str:
    card = json.loads(payload["body"])["attachments"][0]["content"]
    lines: list[str] = []
    for b in card["body"]:
        if b["type"] == "TextBlock":
            lines.append(_markdown(b["text"]))
        elif b["type"] == "FactSet":
            width = max(len(f["title"]) for f in b["facts"]) + 3
            lines += [f["title"].ljust(width) + f["value"] for f in b["facts"]]
        elif b["type"] == "Container":
            lines += [f"│ {_markdown(i['text'])} │" for i in b["items"]]
    lines += [f"[ {a['title']} ]" for a in card.get("actions", [])]
    return _edge(lines)


def discord(payload: dict[str, str]) -> str:
    body = json.loads(payload["body"])
    out = [_markdown(body["content"])] if body.get("content") else []
    for e in body["embeds"]:
        lines = [f"[{e['title']}]" if e.get("url") else e["title"]]
        if e.get("description"):
            lines += _markdown(e["description"]).split("\n")
        inline = [(f["name"], _markdown(f["value"])) for f in e["fields"] if f["inline"]]
        lines += _columns(inline, 3)
        for f in e["fields"]:
            if not f["inline"]:
                lines += [f["name"], _markdown(f["value"])]
        lines.append(e["footer"]["text"] + (f" • {e['timestamp']}" if e.get("timestamp")
                                              else ""))
        out.append(_edge(lines))
    return "\n".join(out)


def telegram(payload: dict[str, str]) -> str:
    text = json.loads(payload["body"])["text"]
    text = re.sub(r'<a href="[^"]*">([^<]*)</a>', r"[\1]", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def email(payload: dict[str, str]) -> str:
    return f"Subject: {payload['subject']}\n\n{payload['text']}"


DRAW = {"slack": slack, "teams": teams, "discord": discord, "telegram": telegram,
        "email": email}


def mockup(service: str, kind: Kind) -> str:
    return DRAW[service](render(service, kind))


if __name__ == "__main__":
    for service in DRAW:
        for kind in ("order", "tracking"):
            print(f"--- {service} {kind}\n```text\n{mockup(service, kind)}\n```\n")
