"""`bridge check` and `bridge dry-run` beside an Apprise sink: its credentials are masked,
and nothing else is (a host, an address, a word that is a URL's parameter name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bridge.redact import MASK
from tests.helpers.bridge import SHARED

ROOT = Path(__file__).parents[2]
MAILTO = "mailtos://user:pw-s3cret@smtp.example.com?to=ops@example.com"
TOKEN = "abcdefghijklmnop"


def bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ), timeout=60)


def config(tmp_path: Path, urls: str, message: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
storage: sqlite:///{tmp_path}/bridge.db
sinks:
  notify: {{type: apprise, urls: [{urls}]}}
  mail: {{type: email, host: smtp.example.com, from: "Shop <shop@example.com>",
          to: [ops@example.com]}}
  ops: {{type: console}}
routes:
  - name: shown
    kind: tracking
    to: ops
    message: {message}
""")
    return path


def test_check_shows_an_email_sink_s_host_and_sender_beside_a_mailto_url(
        tmp_path: Path) -> None:
    out = bridge("check", "--config", str(config(tmp_path, f'"{MAILTO}"', '"x"')))
    assert out.returncode == 0, out.stderr
    assert ('mail (email): host=smtp.example.com, from=Shop <shop@example.com>, '
            'to=["ops@example.com"]') in out.stdout
    assert "pw-s3cret" not in out.stdout + out.stderr


def test_dry_run_shows_a_link_in_a_message_exactly_beside_a_mailto_url(
        tmp_path: Path) -> None:
    path = config(tmp_path, f'"{MAILTO}"', '"see https://track.example.com/x pw-s3cret"')
    out = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(path))
    assert out.returncode == 0, out.stderr
    # The password in a message is still masked; the link beside it is not touched.
    assert f"text: see https://track.example.com/x {MASK}\n" in out.stdout


def test_dry_run_shows_a_word_that_is_only_a_query_parameter_s_name(tmp_path: Path) -> None:
    path = config(tmp_path, f'"json://host/ap?token={TOKEN}"',
                  f'"token {{{{ item.trackingNumber }}}} {TOKEN}"')
    out = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert f"text: token GLS821026103283 {MASK}\n" in out.stdout
    assert TOKEN not in out.stdout + out.stderr


def test_check_and_dry_run_mask_telegram_and_discord_credentials(tmp_path: Path) -> None:
    discord_id, discord_token = "123456789012345678", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    secrets = ["123456:ABC-token", "ABC-token", discord_id, discord_token]
    path = config(tmp_path, f'"tgram://123456:ABC-token/chat", '
                            f'"discord://{discord_id}/{discord_token}"',
                  '"' + " ".join(["via", *secrets]) + '"')
    checked = bridge("check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    shown = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(path))
    assert shown.returncode == 0, shown.stderr
    assert f"text: via {MASK} {MASK} {MASK} {MASK}\n" in shown.stdout
    for secret in secrets:
        assert secret not in checked.stdout + checked.stderr + shown.stdout + shown.stderr


def test_an_ntfy_topic_is_masked_in_apprise_s_own_debug_lines(tmp_path: Path) -> None:
    """Apprise logs each URL it loads at debug level in its privacy form, which shows the
    topic and hides the password: the topic must already be a known secret then."""
    topic = "mytopicsecret12345"
    path = config(tmp_path, f'"ntfy://ntfyuser:NtfyPass123@127.0.0.1:1/{topic}"', "x")
    checked = bridge("--log-level", "DEBUG", "check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "Loaded ntfy URL" in checked.stderr  # the line that showed it
    for secret in (topic, "NtfyPass123"):
        assert secret not in checked.stdout + checked.stderr
