"""The sink registry: a new sink type is one module plus one line here."""

from __future__ import annotations

from bridge.sinks.base import Sink
from bridge.sinks.console import ConsoleSink
from bridge.sinks.http import HttpSink

SINK_TYPES: dict[str, type[Sink]] = {
    "console": ConsoleSink,
    "http": HttpSink,
}
