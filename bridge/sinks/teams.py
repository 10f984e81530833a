"""`teams`: an Adaptive Card posted to a Teams channel through a Workflows webhook.

The URL comes from the Teams Workflows template "Post to a channel when a webhook request is
received" (Power Automate). Its query string carries the signature (`sig=`), so the whole URL
is a secret. The retired Office 365 connector format (MessageCard) is not used.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Literal

import aiohttp
from pydantic import Field, SecretStr, model_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink, dumps, post_and_classify
from bridge.sinks.chat import Summary, cut, fit_lines, http_url_problem, one_line, summarize
from bridge.templates import Template

CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
# Teams refuses messages over 28 KB (28,672 bytes of "message properties"); these caps keep
# any one item well inside that.
TEXT_LIMIT = 2000
FACT_LIMIT = 500
DIGEST_TEXT_BUDGET = 16_000
# A whole digest body, in bytes. Workflows answer 202 at once and only the flow run, later,
# fails with 400 MessageSizeExceeded: the bridge never hears of it, so this keeps a wide
# margin. A 24,453-byte request has been seen to count as 28,897 bytes there
# (MicrosoftDocs/msteams-docs#11274).
DIGEST_BODY_BUDGET = 20_000
_COLOR = {"good": "Good", "bad": "Attention", "active": "Accent", "neutral": "Default"}


class TeamsSinkConfig(SinkConfigBase):
    type: Literal["teams"]
    webhook_url: SecretStr
    message: TemplateField | None = None  # replaces the card's headline text (Teams markdown)
    details: bool = True  # facts, latest step, error and the "Track shipment" button
    timeout: PositiveDuration = 10.0
    # One at a time keeps cards in order and inside the flow's throttling.
    concurrency: int = Field(1, ge=1, le=1024, description="sends in flight at once")

    @model_validator(mode="after")
    def _url(self) -> TeamsSinkConfig:
        problem = http_url_problem(self.webhook_url.get_secret_value(), "webhook_url")
        if problem:
            raise ValueError(problem)
        return self


def text_block(text: str, **style: Any) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "wrap": True, **style}


# One card's whole body, in bytes, as DIGEST_BODY_BUDGET: the caps above are characters,
# and a card of long CJK or emoji values (3-4 bytes each) in every part passes 28 KB.
CARD_BODY_BUDGET = DIGEST_BODY_BUDGET
URL_LIMIT = 2000  # a longer link is left out (a cut one would lead nowhere)


def card_message(s: Summary, headline: str, details: bool, with_status: bool) -> str:
    """The Workflows message of an Adaptive Card 1.4 (headline, latest step, facts, error
    box, footer, track button), its texts cut shorter and shorter until it fits
    CARD_BODY_BUDGET."""
    for share in (1.0, 0.5, 0.25, 0.1):
        body = workflow_message(_card(s, headline, details, with_status,
                                      int(TEXT_LIMIT * share), int(FACT_LIMIT * share)))
        if len(body.encode()) <= CARD_BODY_BUDGET:
            break
    return body


def _card(s: Summary, headline: str, details: bool, with_status: bool, text_limit: int,
          fact_limit: int) -> dict[str, Any]:
    body: list[dict[str, Any]] = [text_block(cut(headline, text_limit), size="Medium",
                                             weight="Bolder", color=_COLOR[s.tone])]
    actions: list[dict[str, Any]] = []
    if details:
        if s.step is not None and s.step.description:
            body.append(text_block(cut(s.step.description, text_limit), spacing="Small"))
        facts = [{"title": cut(k, fact_limit), "value": cut(v, fact_limit)}
                 for k, v in s.facts(with_status=with_status) if k != "Latest step"]
        if facts:
            body.append({"type": "FactSet", "facts": facts})
        if s.error:
            body.append({"type": "Container", "style": "attention", "items": [
                text_block(f"⚠️ {cut(s.error, text_limit)}", weight="Bolder",
                           color="Attention")]})
        body.append(footer(cut(s.route, fact_limit)))
        if s.url and len(s.url) <= URL_LIMIT:
            label = "Track shipment" if s.kind == "tracking" else "Open"
            actions.append({"type": "Action.OpenUrl", "title": label, "url": s.url})
    return adaptive_card(body, actions)


def adaptive_card(body: list[dict[str, Any]], actions: list[dict[str, Any]]) -> dict[str, Any]:
    content: dict[str, Any] = {"type": "AdaptiveCard", "$schema": CARD_SCHEMA, "version": "1.4",
                               "msteams": {"width": "Full"}, "body": body}
    if actions:
        content["actions"] = actions
    return content


def workflow_message(content: dict[str, Any]) -> str:
    """The body the Workflows trigger expects: a message with one Adaptive Card attachment."""
    attachment = {"contentType": "application/vnd.microsoft.card.adaptive", "content": content}
    return dumps({"type": "message", "attachments": [attachment]})


def _block_bytes(line: str) -> int:
    """What one digest line adds to the body: its TextBlock and a comma."""
    return len(dumps(text_block(line, spacing="None")).encode()) + 1


def footer(route: str) -> dict[str, Any]:
    return text_block(f"isendu · route {route}", size="Small", isSubtle=True, spacing="Medium")


def default_headline(s: Summary) -> str:
    """`🚚 Shipment [GLS821026103283](https://...): **OUT_FOR_DELIVERY**` (Teams markdown)."""
    ident = f"[{s.ident}]({s.url})" if s.url else s.ident
    return f"{s.emoji} {s.noun} {ident}" + (f": **{s.status}**" if s.status else "")


class TeamsSink(Sink):
    type_name = "teams"
    config_model = TeamsSinkConfig
    config: TeamsSinkConfig
    default_rate = (4.0, 1)  # Workflows throttle bursts; a few cards a second is safe

    def __init__(self, name: str, config: TeamsSinkConfig) -> None:
        super().__init__(name, config)
        self._url = config.webhook_url.get_secret_value()
        self._session: aiohttp.ClientSession | None = None

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        s = summarize(ctx, route)
        template = message or self.config.message
        headline = (template.render(ctx.vars(route, delivery_id)) if template
                    else default_headline(s))
        return {"body": card_message(s, headline, self.config.details,
                                     with_status=template is not None)}

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """One card: a headline and a bulleted line per item."""
        lines = [one_line(d.payload.get("summary") or d.item_uuid) for d in deliveries]
        # Many lines share the ~28 KB a Teams message may have: shorter lines first, then
        # as many as fit in the body budget, then "…and N more".
        per_line = max(80, min(FACT_LIMIT, DIGEST_TEXT_BUDGET // max(1, len(lines))))
        head = text_block(f"📦 {len(lines)} updates", size="Medium", weight="Bolder")
        skeleton = len(workflow_message(adaptive_card([head, footer(route)], [])).encode())
        shown = fit_lines([f"- {cut(line, per_line)}" for line in lines],
                          DIGEST_BODY_BUDGET - skeleton, _block_bytes)
        body = [head, *(text_block(line, spacing="None") for line in shown), footer(route)]
        return {"body": workflow_message(adaptive_card(body, []))}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self._url).query)
        return [self._url, *query.get("sig", [])]

    async def send(self, delivery: Delivery) -> None:
        if self._session is None:
            await self.start()
        assert self._session is not None
        # 202 Accepted is the usual answer (the flow runs later); 200 is accepted too.
        await post_and_classify(
            self._session, "POST", self._url, data=delivery.payload["body"].encode(),
            headers={"Content-Type": "application/json", "User-Agent": "isendu-bridge"},
            timeout=self.config.timeout, what="Teams workflow",
        )
