"""Shared fixtures: a real bridge app on a temporary SQLite outbox, and a recording receiver."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from bridge.http.app import create_app
from bridge.runtime import build_runtime
from tests.helpers.bridge import Bridge, write_config
from tests.helpers.receiver import Receiver

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(available: bool, what: str, how: str) -> None:
    """Skip outside CI when a machine service is missing; in CI a missing service fails."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available in CI: {how}")
    pytest.skip(f"{what} is not available; {how}")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[tuple[Receiver, str]]:
    """A recording HTTP receiver and its base URL."""
    rec = Receiver()
    server: TestServer = await aiohttp_server(rec.app())
    yield rec, f"http://127.0.0.1:{server.port}"


BridgeFactory = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def make_bridge(aiohttp_client: Any, tmp_path: Path) -> BridgeFactory:
    """`await make_bridge(yaml_text)` -> a running bridge (dispatcher included) on SQLite."""
    async def make(text: str, env: dict[str, str] | None = None) -> Bridge:
        env = {"STORAGE": f"sqlite:///{tmp_path}/bridge.db", **(env or {})}
        if "storage:" not in text:
            text = "storage: ${STORAGE}\n" + text
        cfg = write_config(tmp_path, text, env)
        rt = build_runtime(cfg)
        client = await aiohttp_client(create_app(rt))
        return Bridge(client=client, rt=rt)

    return make
