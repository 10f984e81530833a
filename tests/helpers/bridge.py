"""Build a real bridge (config -> runtime -> aiohttp app) from YAML text, for in-process tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from bridge.config import BridgeConfig, load_config
from bridge.runtime import Runtime

WEBHOOK = "/isendu/webhook"
SHARED = Path(__file__).resolve().parents[1] / "data" / "isendu"  # copies of shared/isendu


def sample_batch() -> dict[str, Any]:
    return json.loads((SHARED / "batch.json").read_text())


def sample_batches() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SHARED / "batches.jsonl").read_text().splitlines()]


def write_config(folder: Path, text: str, env: dict[str, str] | None = None) -> BridgeConfig:
    path = folder / "routes.yaml"
    path.write_text(text)
    return load_config(path, env or {}).config


@dataclass
class Bridge:
    client: TestClient[Any, Any]
    rt: Runtime

    async def post(self, body: Any, path: str = WEBHOOK) -> tuple[int, Any]:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        resp = await self.client.post(path, data=data)
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll `check` until it is true; fail with `what` if it never is."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)
