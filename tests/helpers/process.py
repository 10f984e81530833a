"""A real `bridge serve` process, for tests where crashes and signals matter."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import aiohttp

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BridgeProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 wrap: tuple[str, ...] = ()) -> None:
        """`wrap`: a command that execs the bridge's (its arguments follow), e.g. one that
        mounts a filesystem for it first; the process's pid must stay the bridge's."""
        self.config = config
        self.log = log
        self.env = env or {}
        self.wrap = wrap
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, port: int, timeout: float = 20.0) -> None:
        self.port = port
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                [*self.wrap, sys.executable, "-m", "bridge", "serve", "--config",
                 str(self.config)],
                cwd=self.config.parent, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "BRIDGE_LISTEN": f"127.0.0.1:{port}",
                     "PYTHONPATH": str(ROOT)},
            )
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"bridge exited early:\n{self.log.read_text()}")
                try:
                    async with session.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"bridge not ready in {timeout}s:\n{self.log.read_text()}")
                await asyncio.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush; what survives is what was committed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, timeout: float = 20.0, sig: signal.Signals = signal.SIGTERM
                        ) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def __aenter__(self) -> BridgeProcess:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
