"""A TCP proxy that can play a network outage: refuse new connections and reset open ones,
or play a peer that stops answering: connections stay open, but no byte passes.

Put in front of a broker whose advertised listener is the proxy's port, so that every
connection a client makes (bootstrap and the ones metadata points it to) passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class TcpProxy:
    def __init__(self, target_port: int, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted while up, for tests to see traffic went through
        self._flowing = asyncio.Event()
        self._flowing.set()

    def stall(self) -> None:
        """Hold every byte from now on (connections are still accepted and kept)."""
        self._flowing.clear()

    def flow(self) -> None:
        """Let bytes pass again; what was held passes now, late."""
        self._flowing.set()

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen; with port 0, on a port the system picks, kept for every later start.
        Started before what needs its port is configured, it holds that port from then on:
        a port found free and bound later can be taken in between (CI saw it happen)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, reuse_address=True)
            if self.port == 0:
                self.port = self._server.sockets[0].getsockname()[1]

    async def go_down(self) -> None:
        """From now on connecting is refused, and every open connection is reset."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def come_back(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.go_down()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            _reset(writer)
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what a peer sees when a host or link dies."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
