"""The sink registry: a new sink type is one module plus one line here."""

from __future__ import annotations

from bridge.sinks.apprise import AppriseSink
from bridge.sinks.base import Sink
from bridge.sinks.console import ConsoleSink
from bridge.sinks.discord import DiscordSink
from bridge.sinks.email import EmailSink
from bridge.sinks.http import HttpSink
from bridge.sinks.kafka import KafkaSink
from bridge.sinks.slack import SlackSink
from bridge.sinks.teams import TeamsSink
from bridge.sinks.telegram import TelegramSink

SINK_TYPES: dict[str, type[Sink]] = {
    "apprise": AppriseSink,
    "console": ConsoleSink,
    "discord": DiscordSink,
    "email": EmailSink,
    "http": HttpSink,
    "kafka": KafkaSink,
    "slack": SlackSink,
    "teams": TeamsSink,
    "telegram": TelegramSink,
}
