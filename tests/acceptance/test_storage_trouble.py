"""A real `bridge serve` whose SQLite storage goes away or fills up under it: no batch is
answered 200 that the next start would not find, the refusal is a 503 that says why, and so
does /readyz."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import require_service
from tests.helpers.process import BridgeProcess, free_port

CONFIG = """
storage: sqlite:///{db}
server:
  listen: ${{BRIDGE_LISTEN}}
sinks:
  out: {{type: console}}
routes: []
"""
WEBHOOK = "/isendu/webhook"

pytestmark = pytest.mark.slow


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "bridge.log").read_text().splitlines()
            if line.startswith("{")]


async def post(session: aiohttp.ClientSession, bridge: BridgeProcess, uuid: str
               ) -> tuple[int, Any, str | None]:
    async with session.post(bridge.url + WEBHOOK, json={"tracking": [{"uuid": uuid}]}) as r:
        return r.status, await r.json(), r.headers.get("Retry-After")


def delete_folder(db: Path) -> None:
    shutil.rmtree(db.parent)


def replace_file(db: Path) -> None:
    """A copy moved over it, as a restore from a backup would be."""
    shutil.copy(db, db.with_suffix(".copy"))
    db.with_suffix(".copy").replace(db)


@pytest.mark.parametrize("lose", [delete_folder, replace_file])
async def test_a_storage_file_gone_from_its_path_is_noticed_before_the_next_200(
    tmp_path: Path, lose: Callable[[Path], None],
) -> None:
    """The file stays open, unlinked: batches committed to it were answered 200, /readyz
    said ready, and after a restart they were gone."""
    data = tmp_path / "data"
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=data / "bridge.db"))
    async with BridgeProcess(config, tmp_path / "bridge.log") as bridge, \
            aiohttp.ClientSession() as session:
        await bridge.start(free_port())
        assert (await post(session, bridge, "before"))[0] == 200
        lose(data / "bridge.db")
        for uuid in ("after", "again"):
            status, answer, retry_after = await post(session, bridge, uuid)
            assert status == 503, answer
            assert answer == {"error": "the SQLite storage file was deleted or replaced while "
                                       "the bridge had it open; nothing was accepted"}
            assert retry_after is not None
        async with session.get(bridge.url + "/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {
                "status": "not ready",
                "storage": "not writable: the SQLite storage file was deleted or replaced "
                           "while the bridge had it open"}
        assert await bridge.terminate() == 0
    lines = log_lines(tmp_path)
    gone = [line for line in lines if line["msg"].startswith("storage file")]
    assert len(gone) == 1 and gone[0]["level"] == "error", gone  # once, not per request
    assert gone[0]["path"] == str(data / "bridge.db")
    refused = [line for line in lines if line["msg"].startswith("batch not accepted")]
    assert len(refused) == 1 and refused[0]["status"] == 503  # the second within the minute
    assert not [line for line in lines if "exc" in line]


# Mounts a tmpfs of 4 MiB on $1 in a mount namespace of the bridge's own (no root needed
# where unprivileged user namespaces are allowed), fills most of it, then execs the bridge.
IN_SMALL_TMPFS = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  'mount -t tmpfs -o size=4m tmpfs "$1" && head -c 3400000 /dev/zero > '
                  '"$1/ballast" && shift && exec "$@"', "sh")


def can_mount_tmpfs(folder: Path) -> bool:
    try:
        subprocess.run([*IN_SMALL_TMPFS, str(folder), "true"], check=True,
                       capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


async def test_a_full_disk_is_a_503_and_not_ready_until_there_is_room(tmp_path: Path) -> None:
    """A real full disk (ENOSPC on a tmpfs): batches get 503 with Retry-After and the reason,
    /readyz is not ready while writes fail for room and ready once there is some again, and
    the log says why without a traceback. (It was a 500 "internal error" with a traceback,
    and /readyz stayed ready.)"""
    data = tmp_path / "data"
    data.mkdir()
    require_service(can_mount_tmpfs(data), "a small tmpfs in a user namespace (unshare -rm)",
                    "allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1)")
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(db=data / "bridge.db"))
    pad = "p" * 200_000
    async with BridgeProcess(config, tmp_path / "bridge.log",
                             wrap=(*IN_SMALL_TMPFS, str(data))) as bridge, \
            aiohttp.ClientSession() as session:
        await bridge.start(free_port())
        assert bridge.proc is not None
        answers = []
        for i in range(20):
            async with session.post(bridge.url + WEBHOOK, json={
                    "tracking": [{"uuid": f"u{i}", "pad": pad}]}) as resp:
                answers.append((resp.status, await resp.json(), resp.headers.get("Retry-After")))
            if resp.status != 200:
                break
        status, answer, retry_after = answers[-1]
        assert status == 503, answers
        assert answer == {"error": "storage is full (SQLite: database or disk is full); "
                                   "nothing was accepted"}
        assert retry_after is not None and int(retry_after) > 0
        async with session.get(bridge.url + "/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {
                "status": "not ready",
                "storage": "not writable: storage is full (SQLite: database or disk is full)"}
        # Room made, inside the bridge's own mount namespace.
        (Path(f"/proc/{bridge.proc.pid}/root") / data.relative_to("/") / "ballast").unlink()
        async with session.get(bridge.url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(bridge.url + WEBHOOK, json={
                "tracking": [{"uuid": "later", "pad": pad}]}) as resp:
            assert resp.status == 200
        assert await bridge.terminate() == 0
    lines = log_lines(tmp_path)
    refused = [line for line in lines if line["msg"].startswith("batch not accepted")]
    assert len(refused) == 1 and refused[0]["level"] == "warning"
    assert refused[0]["error"] == "storage is full (SQLite: database or disk is full)"
    assert not [line for line in lines if "exc" in line]
