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
from bridge.models import BatchInfo, BatchStatus
from bridge.runtime import Runtime

WEBHOOK = "/isendu/webhook"
SHARED = Path(__file__).resolve().parents[1] / "data" / "isendu"  # copies of shared/isendu


def sample_batch() -> dict[str, Any]:
    batch: dict[str, Any] = json.loads((SHARED / "batch.json").read_text())
    return batch


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

    async def post(self, body: Any, path: str = WEBHOOK, *, settle: bool = True,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST to the intake. `settle`: an accepted batch is then waited for until the
        sequencer has settled it, and the answer gains what the inbox row says of it
        (`deliveries`, `duplicates`, `status`, and per item its `verdicts` against its
        shipment's state): what the intake answered before it moved
        routing after the 200."""
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        resp = await self.client.post(path, data=data, headers=headers)
        text = await resp.text()
        try:
            answer = json.loads(text)
        except ValueError:
            return resp.status, text
        if settle and resp.status == 200 and isinstance(answer, dict) and "batch_id" in answer:
            answer.update(await self.settled(answer["batch_id"]))
        return resp.status, answer

    async def settled(self, batch_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the sequencer settled `batch_id`; what the inbox says of it."""
        store = self.rt.store
        found: list[BatchInfo] = []

        async def done() -> bool:
            info = await store.batch(batch_id)
            if info is not None and info.status is not BatchStatus.WAITING:
                found.append(info)
                return True
            return False

        await eventually(done, timeout=timeout, what=f"batch {batch_id} sequenced")
        info = found[-1]
        items = json.loads(info.summary) if info.summary else []
        return {"deliveries": info.deliveries, "duplicates": info.duplicates,
                "status": info.status.value,
                "verdicts": [i.get("verdict") for i in items],
                # The ids the sequencer made: from a shipment's second change on they hash
                # the change's number too, which the item alone does not tell.
                "delivery_ids": [d for i in items for d in i.get("deliveries", [])]}


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
