"""A real `bridge serve`, killed with SIGKILL mid-delivery and restarted: nothing is lost."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.outbox.sqlite import id_of_stored
from tests.helpers.bridge import eventually, sample_batches
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.shipments import notified_items

CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN}}
defaults:
  retry: {{initial_delay: 100ms, max_delay: 500ms}}
sinks:
  hook:
    type: http
    url: {url}/in
    concurrency: 2
routes:
  - name: every-item
    to: hook
"""

pytestmark = pytest.mark.slow


def _db_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    finally:
        conn.close()


def _db_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        # Read straight from the file, as an operator would; ids are stored as 16 bytes.
        return {id_of_stored(row[0]) for row in conn.execute("SELECT id FROM deliveries")}
    finally:
        conn.close()


async def _post_all(url: str, batches: list[dict[str, Any]]) -> list[str]:
    """POST every batch; the batch ids isendu was answered 200 with."""
    ids = []
    async with aiohttp.ClientSession() as session:
        for batch in batches:
            async with session.post(f"{url}/isendu/webhook", data=json.dumps(batch)) as resp:
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["batch_id"])
    return ids


async def test_kill_9_mid_delivery_loses_nothing(tmp_path: Path, aiohttp_server: Any) -> None:
    receiver = Receiver(default=Answer(200, "ok", delay=0.05))  # slow enough to leave a backlog
    server = await aiohttp_server(receiver.app())
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=db, url=f"http://127.0.0.1:{server.port}"))

    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        await bridge.start(free_port())
        await _post_all(bridge.url, sample_batches())
        accepted = notified_items(sample_batches())
        assert accepted > 100
        await receiver.wait_for(10, timeout=30)
        bridge.kill()

    counts = _db_counts(db)
    assert counts.get("pending", 0) > 0, f"nothing was pending at the kill: {counts}"

    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        await bridge.start(free_port())

        async def all_delivered() -> bool:
            return _db_counts(db).get("delivered", 0) == accepted
        await eventually(all_delivered, timeout=120, what="every accepted delivery delivered")
        assert await bridge.terminate() == 0

    received = {r.headers["webhook-id"] for r in receiver.requests}
    assert received >= _db_ids(db)  # at least once, each one
    assert len(received) == accepted


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_sigterm_finishes_in_flight_sends_and_keeps_the_rest(
    tmp_path: Path, aiohttp_server: Any, sig: signal.Signals
) -> None:
    """SIGHUP (a closed terminal; a `reload` out of habit) stops it the same way: by default
    it would end the process at once."""
    receiver = Receiver(default=Answer(200, "ok", delay=1.0))
    server = await aiohttp_server(receiver.app())
    db = tmp_path / "bridge.db"
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=db, url=f"http://127.0.0.1:{server.port}"))

    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        await bridge.start(free_port())
        await _post_all(bridge.url, sample_batches()[:5])
        accepted = notified_items(sample_batches()[:5])
        await receiver.wait_for(2, timeout=30)  # two sends in flight (concurrency 2)
        assert await bridge.terminate(sig=sig) == 0
        log = (tmp_path / "bridge.log").read_text()

    counts = _db_counts(db)
    assert counts.get("delivered", 0) >= 2  # in-flight sends were allowed to finish
    assert counts.get("pending", 0) > 0 and counts.get("dead", 0) == 0
    # The rest stays: deliveries pending, and batches not yet sequenced waiting in the inbox.
    conn = sqlite3.connect(db)
    try:
        inbox = dict(conn.execute("SELECT status, COUNT(*) FROM inbox GROUP BY status"))
    finally:
        conn.close()
    assert sum(inbox.values()) == 5 and set(inbox) <= {"sequenced", "waiting"}
    if inbox.get("waiting", 0) == 0:
        assert sum(counts.values()) == accepted
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("msg") == "stopped" for line in lines)
    [stopping] = [line for line in lines if line.get("msg", "").startswith("stopping")]
    assert stopping["signal"] == sig.name
    assert ("does not reload its config" in stopping.get("note", "")) == (sig is signal.SIGHUP)
    # The startup heap was frozen out of the cyclic GC's rescans (see cmd_serve).
    serving = next(line for line in lines if line.get("msg") == "bridge serving")
    assert serving["gc_frozen_objects"] > 10_000


async def test_under_nohup_sighup_is_ignored(tmp_path: Path) -> None:
    """`nohup bridge serve &` must outlive its terminal: a SIGHUP inherited as ignored stays
    ignored (the bridge's own SIGHUP stop is for a plain start)."""
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=tmp_path / "bridge.db", url="http://127.0.0.1:9"))
    async with BridgeProcess(config, tmp_path / "bridge.log", wrap=("nohup",)) as bridge, \
            aiohttp.ClientSession() as session:
        await bridge.start(free_port())
        assert bridge.proc is not None
        bridge.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert bridge.proc.poll() is None, "SIGHUP stopped a bridge started with nohup"
        async with session.get(bridge.url + "/healthz") as resp:
            assert resp.status == 200
        assert await bridge.terminate() == 0


async def test_a_request_aiohttp_cannot_parse_is_one_quiet_refusal(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """Anyone who reaches the port can send broken HTTP; each such request gets a JSON 400
    and the log one info line, like every refusal, not an error with a traceback."""
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=tmp_path / "bridge.db",
                                    url=f"http://127.0.0.1:{server.port}"))
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        await bridge.start(free_port())
        for head in (b"Content-Length: -1", b"Content-Length: 2\r\nTransfer-Encoding: chunked"):
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"POST /isendu/webhook HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n{}")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
            assert b"application/json" in answer and b'{"error": ' in answer
            writer.close()
        # Well-formed HTTP, but not gzip inside.
        async with aiohttp.ClientSession() as session, session.post(
                f"{bridge.url}/isendu/webhook", data=b"not gzip at all",
                headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 400
            assert "Content-Encoding gzip" in (await resp.json())["error"]
        assert await bridge.terminate() == 0
    lines = [json.loads(line) for line in (tmp_path / "bridge.log").read_text().splitlines()
             if line.startswith("{")]
    refused = [line for line in lines if "refused" in line["msg"]]
    assert [line["msg"] for line in refused] == ["refused request"] * 3
    assert all(line["level"] == "info" and line["status"] == 400 for line in refused)
    assert refused[0]["error"].startswith("malformed HTTP request: Invalid character in "
                                          "Content-Length")
    assert "Content-Length and Transfer-Encoding" in refused[1]["error"]
    assert "Content-Encoding gzip" in refused[2]["error"]
    assert not [line for line in lines if line["level"] == "error" or "exc" in line]
