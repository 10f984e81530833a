"""`console`: one line per message on stdout; the shipped config's sink, and handy for trials."""

from __future__ import annotations

import sys
from typing import Literal, TextIO

from pydantic import model_validator

from bridge.config_types import SinkConfigBase, TemplateField
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink
from bridge.sinks.chat import burst_problem
from bridge.templates import DEFAULT_TEXT, Template


class ConsoleSinkConfig(SinkConfigBase):
    type: Literal["console"]
    message: TemplateField | None = None  # default: a one-line summary per kind

    @model_validator(mode="after")
    def _burst(self) -> ConsoleSinkConfig:
        problem = burst_problem(self, "the console")
        if problem:
            raise ValueError(problem)
        return self


class ConsoleSink(Sink):
    type_name = "console"
    config_model = ConsoleSinkConfig
    config: ConsoleSinkConfig

    def __init__(self, name: str, config: ConsoleSinkConfig, stream: TextIO | None = None) -> None:
        super().__init__(name, config)
        self._stream = stream

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        template = message or self.config.message or DEFAULT_TEXT[ctx.kind]
        return {"text": template.render(ctx.vars(route, delivery_id))}

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        lines = " | ".join(d.payload.get("summary") or d.item_uuid for d in deliveries)
        return {"text": f"[{route}] {len(deliveries)} updates: {lines}"}

    async def send(self, delivery: Delivery) -> None:
        line = " ".join(delivery.payload["text"].splitlines())
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
