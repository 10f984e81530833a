"""The shipped examples keep working: every config/examples/*.yaml and every ```yaml snippet
in README.md and docs/*.md loads, and the README's pictures of the default messages are what the
sinks render today."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.models import Kind
from tests.conftest import BridgeFactory
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
    "PUSHOVER_URL": "pover://user-key-0123@app-token-0123",
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


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```yaml\n(.*?)^```$", re.S | re.M)
TOP_LEVEL = {"server", "integrations", "storage", "defaults", "state", "sinks", "routes"}


def _readme_yaml() -> list[str]:
    return [m.group(1) for m in _FENCE.finditer(README.read_text())]


def _snippets() -> list[tuple[str, str]]:
    """(`file:line`, text) of every ```yaml block in README.md and docs/*.md."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in _FENCE.finditer(text):
            out.append((f"{doc.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 2}",
                        m.group(1)))
    return out


def test_no_yaml_block_escapes_the_snippet_test() -> None:
    """Every fence that says YAML in any spelling is one the snippet test loads."""
    for doc in DOCS:
        text = doc.read_text()
        opened = re.findall(r"^```\s*(?:yaml|yml)\b.*$", text, re.M | re.I)
        assert len(opened) == len(_FENCE.findall(text)), (
            f"{doc.name}: a YAML block is fenced in a way the snippet test does not read; "
            "write it as ```yaml")
    assert len(_snippets()) >= 25


def as_config(text: str) -> str:
    """A snippet as a loadable routes.yaml, wrapped as little as it needs, by text (so the
    snippet is parsed exactly as written, quoting and all):
    - a whole config (its keys are top-level keys) loads as it is; one without `sinks:`
      (a `routes:` or `integrations:` example) gets a console sink for each name its
      routes send to, since the example is about something else;
    - a condition (`when:` alone) becomes the `when` of a route to a console sink.
    Anything else fails: the test must be taught how to load it, never skip it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # loading it reports the YAML error with its line
    keys = set(data) if isinstance(data, dict) else set()
    if keys and keys <= TOP_LEVEL:
        if "sinks" in keys or "routes" not in keys:
            return text
        names = sorted({name for route in data["routes"] for name in
                        ([route["to"]] if isinstance(route["to"], str) else route["to"])})
        return text + "\nsinks:\n" + "".join(f"  {n}: {{type: console}}\n" for n in names)
    if keys == {"when"}:
        indented = "".join("    " + line + "\n" for line in text.splitlines())
        return ("sinks:\n  snippet-console: {type: console}\nroutes:\n  - name: snippet\n"
                "    to: snippet-console\n" + indented)
    raise AssertionError(f"a YAML snippet with keys {sorted(keys)} is neither a routes.yaml "
                         "nor a `when:` condition: teach as_config how to load it")


def test_readme_has_a_snippet_per_sink_type() -> None:
    types = {t for block in _readme_yaml() for t in re.findall(r"type: (\w+)", block)}
    assert {"slack", "teams", "discord", "telegram", "email", "apprise", "http",
            "console"} <= types


@pytest.mark.parametrize(("where", "text"), _snippets(), ids=[w for w, _ in _snippets()])
def test_every_yaml_snippet_in_the_docs_loads(where: str, text: str, tmp_path: Path) -> None:
    missing = _needs(text) - ENV.keys()
    assert not missing, f"{where} reads {sorted(missing)}: add plausible values to ENV"
    path = tmp_path / "routes.yaml"
    path.write_text(as_config(text))
    try:
        loaded = load_config(path, env=ENV)
    except ConfigError as exc:
        raise AssertionError(f"{where}: the snippet does not load:\n{exc}") from None
    data = yaml.safe_load(text)
    # What the snippet sets is what loaded (not a default in its place).
    for key in set(data) & TOP_LEVEL:
        assert key in loaded.config.model_fields_set, f"{where}: {key} did not load"
    if set(data) == {"when"}:
        assert loaded.config.routes[0].when is not None


@pytest.mark.parametrize("text", [
    "routes:\n  - {name: a, kind: tracking, when: {path: $.steps[*].error, exists: true}, "
    "to: out}\n",
    "when:\n  not: {path: $.steps[*].status, equals: IN_TRANSIT}\n",
])
def test_a_snippet_that_does_not_parse_fails_the_test(text: str, tmp_path: Path) -> None:
    """The wrapping keeps the snippet's text: an unquoted `$.steps[*]` still fails, with
    the hint to quote it."""
    path = tmp_path / "routes.yaml"
    path.write_text(as_config(text))
    hint = 'quote a JSONPath with brackets: path: "$.steps'
    with pytest.raises(ConfigError, match=re.escape(hint)):
        load_config(path, env=ENV)


@pytest.mark.parametrize("service", sorted(DRAW))
@pytest.mark.parametrize("kind", ["order", "tracking"])
def test_readme_shows_each_default_message_as_rendered(service: str, kind: Kind) -> None:
    picture = mockup(service, kind)
    assert f"```text\n{picture}\n```" in README.read_text(), (
        f"README.md's {service} {kind} message is out of date; it now looks like:\n{picture}\n"
        "(python -m tests.helpers.mockups prints them all)")


async def test_the_sample_verification_is_answered_by_the_shipped_config(
        make_bridge: BridgeFactory) -> None:
    """A newcomer posting tests/data/isendu/verification-request.json to `make run` gets the
    demo secret, not a 403: the sample names the shipped demo pair."""
    text = (ROOT / "config" / "routes.yaml").read_text()
    bridge = await make_bridge(text.replace("storage:", "# storage:"), {})
    sample = json.loads((ROOT / "tests" / "data" / "isendu" / "verification-request.json")
                        .read_text())
    status, answer = await bridge.post(sample)
    assert (status, answer) == (200, {"response": "demo-secret-change-me"})
