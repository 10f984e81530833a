"""A local HTTP receiver that records what it gets and answers from a script.

Used as the far end of HTTP-based sinks: tests queue the answers the real service gives
(500, 429 + Retry-After, 400 ...) and assert on the exact requests that arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Answer:
    status: int = 200
    body: str | bytes | dict[str, Any] | list[Any] = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Receiver:
    """Answers queued `Answer`s in order, then `default` forever."""

    def __init__(self, default: Answer | None = None) -> None:
        self.requests: list[Received] = []
        self.script: deque[Answer] = deque()
        self.default = default or Answer(200, "ok")
        self.arrived = asyncio.Condition()

    def answer(self, *answers: Answer) -> None:
        self.script.extend(answers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.method, request.path, dict(request.query),
                                      dict(request.headers), body, time.monotonic()))
        async with self.arrived:
            self.arrived.notify_all()
        ans = self.script.popleft() if self.script else self.default
        if ans.delay:
            await asyncio.sleep(ans.delay)
        if isinstance(ans.body, dict | list):
            return web.json_response(ans.body, status=ans.status, headers=ans.headers)
        return web.Response(status=ans.status, body=ans.body, headers=ans.headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` requests arrived; fail loudly otherwise."""
        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.requests) >= count)

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {count} requests within {timeout}s, got {len(self.requests)}"
            ) from None
        return self.requests
