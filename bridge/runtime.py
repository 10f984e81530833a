"""Wires a loaded config into the running parts: sinks, router, store, sequencer, dispatcher,
metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bridge.config import BridgeConfig
from bridge.dispatch.dispatcher import Dispatcher
from bridge.metrics import Metrics
from bridge.outbox import Store, from_url
from bridge.pressure import Pressure
from bridge.redact import REDACTOR, TOKEN_SEGMENT, url_credentials
from bridge.routing.router import Router, compile_routes
from bridge.sequencer import Sequencer, StateKeeping, state_book
from bridge.sinks import SINK_TYPES
from bridge.sinks.base import Sink, proxies


def build_sinks(config: BridgeConfig) -> dict[str, Sink]:
    sinks: dict[str, Sink] = {}
    for name, sink_config in config.sinks.items():
        cls = SINK_TYPES[sink_config.type]
        sinks[name] = cls(name, sink_config)
    return sinks


def register_secrets(config: BridgeConfig, sinks: dict[str, Sink]) -> None:
    REDACTOR.add(*(i.secret.get_secret_value() for i in config.integrations))
    # A PostgreSQL password, in the URL's user part or its query (?password=).
    REDACTOR.add(*url_credentials(config.storage))
    for proxy in proxies().values():  # HTTP(S)_PROXY=http://user:password@proxy:3128
        REDACTOR.add(*url_credentials(proxy))
    for sink in sinks.values():
        REDACTOR.add(*sink.secrets())
    # A token in the webhook path is a secret too: access to intake is access to isendu data.
    path = config.server.webhook_path
    for segment in path.strip("/").split("/")[1:]:
        if len(segment) >= TOKEN_SEGMENT:
            REDACTOR.add(segment)


def keeping(config: BridgeConfig, store: Store) -> StateKeeping | None:
    book = state_book(config.state)
    return None if book is None else StateKeeping(store, book, config.state.retention)


@dataclass
class Runtime:
    config: BridgeConfig
    sinks: dict[str, Sink]
    router: Router
    store: Store
    sequencer: Sequencer
    dispatcher: Dispatcher
    metrics: Metrics
    secrets_by_key: dict[str, str]
    intake_slots: asyncio.Semaphore  # server.intake_concurrency
    pressure: Pressure  # requests in flight: the stages after the 200 give way to them
    # Where config.storage came from, for the error when it cannot be opened.
    storage_origin: str = "storage in the config"


def build_runtime(config: BridgeConfig, store: Store | None = None) -> Runtime:
    sinks = build_sinks(config)
    register_secrets(config, sinks)
    metrics = Metrics()
    metrics.add_sinks(sinks)
    store = store or from_url(config.storage)
    for sink in sinks.values():
        sink.memory = store
    router = Router(compile_routes(config, sinks))
    pressure = Pressure()
    dispatcher = Dispatcher(store, sinks, config, metrics, memory=store, pressure=pressure)
    return Runtime(
        config=config,
        sinks=sinks,
        router=router,
        store=store,
        sequencer=Sequencer(store, router, metrics, dispatcher.wake,
                            config.defaults.inbox_retention, pressure,
                            state=keeping(config, store)),
        dispatcher=dispatcher,
        metrics=metrics,
        secrets_by_key={i.key_id: i.secret.get_secret_value() for i in config.integrations},
        intake_slots=asyncio.Semaphore(config.server.intake_concurrency),
        pressure=pressure,
    )
