"""The shipped examples keep working: every config/examples/*.yaml and every routes.yaml
snippet in the README loads, and the README's pictures of the default messages are what the
sinks render today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.models import Kind
from tests.helpers.mockups import DRAW, mockup

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))

# Plausible values for every variable the examples and snippets read without a default.
ENV = {
    "BRIDGE_LISTEN": "127.0.0.1:8080",
    "INGEST_TOKEN": "in-9f2c4e7a1b3d5f60",
    "ISENDU_KEY_ID": "shop-1",
    "ISENDU_SECRET": "isendu-secret-123456",
    "ERP_TOKEN": "erp-token-123456",
    "ERP_SIGNING_SECRET": "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU=",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXX",
    "SLACK_BOT_TOKEN": "xoxb-1-2-abc",
    "SLACK_CHANNEL": "C0123456789",
    "TEAMS_WEBHOOK_URL": "https://prod.example.logic.azure.com/workflows/1/triggers/manual/"
                         "paths/invoke?api-version=1&sig=abc",
    "DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/123/tokentokentoken",
    "TELEGRAM_BOT_TOKEN": "123456789:AAEexampleexampleexample",
    "TELEGRAM_CHAT_ID": "-1001234567890",
    "SMTP_HOST": "smtp.example.com",
    "SMTP_USERNAME": "bridge",
    "SMTP_PASSWORD": "smtp-password",
    "NTFY_URL": "ntfys://ntfy.sh/isendu-bridge-example",
    "KAFKA_BOOTSTRAP": "kafka-1.example.com:9092",
    "KAFKA_USERNAME": "bridge",
    "KAFKA_PASSWORD": "kafka-password",
    "APPRISE_URL": "ntfys://ntfy.example.com/shop-parcels",
}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)\}")  # only those without a `:-default`


def _needs(text: str) -> set[str]:
    return set(_VAR.findall(text))


def test_there_is_an_example_per_chat_sink() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"slack", "teams", "discord", "telegram", "email", "apprise"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_file_loads(path: Path) -> None:
    missing = _needs(path.read_text()) - ENV.keys()
    assert not missing, f"{path.name} reads {sorted(missing)}: add plausible values to ENV"
    loaded = load_config(path, env=ENV)
    assert loaded.config.sinks and loaded.config.routes


def _readme_yaml() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)


def test_readme_has_a_snippet_per_sink_type() -> None:
    types = {t for block in _readme_yaml() for t in re.findall(r"type: (\w+)", block)}
    assert {"slack", "teams", "discord", "telegram", "email", "apprise", "http",
            "console"} <= types


@pytest.mark.parametrize("n", range(len(_readme_yaml())))
def test_every_readme_snippet_loads(n: int, tmp_path: Path) -> None:
    text = _readme_yaml()[n]
    missing = _needs(text) - ENV.keys()
    assert not missing, f"README snippet {n} reads {sorted(missing)}: add values to ENV"
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    loaded = load_config(path, env=ENV)
    assert loaded.config.sinks


@pytest.mark.parametrize("service", sorted(DRAW))
@pytest.mark.parametrize("kind", ["order", "tracking"])
def test_readme_shows_each_default_message_as_rendered(service: str, kind: Kind) -> None:
    picture = mockup(service, kind)
    assert f"```text\n{picture}\n```" in README.read_text(), (
        f"README.md's {service} {kind} message is out of date; it now looks like:\n{picture}\n"
        "(python -m tests.helpers.mockups prints them all)")
