"""The Apprise sink for real: Apprise's `json://` service posting to local HTTP servers."""

from __future__ import annotations

import base64
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.models import Status
from tests.conftest import BridgeFactory
from tests.helpers.bridge import eventually
from tests.helpers.receiver import Answer, Receiver
from tests.helpers.sinks import ORDER, TRACKING_FAILED, assert_no_leak, delivered

USER, PASSWORD = "bridge", "pa55-w0rd-Zq8xLm3"
PATH_TOKEN = "tok3n1n7h3p47h5h0uldn0tl34k"

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  notify:
    type: apprise
    urls:
      - json://${USER}:${PASSWORD}@${HOST_A}/hooks/${PATH_TOKEN}
    rate_limit: 100/s
routes:
  - name: to-apprise
    to: notify
"""

FAILED_BODY = (
    "Latest step: Parcel held at customs\n"
    "Location: Paris\n"
    "Local time: 2025-11-04 06:57 (Europe/Paris)\n"
    "Error: CUSTOMS_HOLD: Documents <required> & missing\n"
    f"Track: {TRACKING_FAILED['trackingUrl']}"
)


def env(*hosts: str) -> dict[str, str]:
    out = {"USER": USER, "PASSWORD": PASSWORD, "PATH_TOKEN": PATH_TOKEN}
    for name, host in zip(("HOST_A", "HOST_B"), hosts, strict=False):
        out[name] = host.removeprefix("http://")
    return out


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The bridge's and Apprise's records; the local servers' access logs name their paths."""
    return [r for r in caplog.records if r.name != "aiohttp.access"]


async def test_json_url_receives_title_message_and_credentials(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    bridge = await make_bridge(CONFIG, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    [req] = rec.requests
    assert req.method == "POST" and req.path == f"/hooks/{PATH_TOKEN}"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(
        f"{USER}:{PASSWORD}".encode()).decode()
    assert req.json() == {"version": "1.0", "title": "⚠️ Shipment BRT100994275870: EXCEPTION",
                          "message": FAILED_BODY, "attachments": [], "type": "warning"}


async def test_templates_replace_title_and_body(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    config = CONFIG.replace(
        "    rate_limit: 100/s\n",
        "    rate_limit: 100/s\n    title: \"Order {{ item.reference }}\"\n").replace(
        "    to: notify\n", "    to: notify\n    message: \"{{ item.status }} for "
        "{{ item.recipient.name }} ({{ item.nowhere }})\"\n")
    bridge = await make_bridge(config, env(url))
    await bridge.post({"order": [ORDER], "tracking": []})
    await delivered(bridge)
    body = rec.requests[0].json()
    assert body["title"] == "Order ORD-2025-932194"
    assert body["message"] == "PROCESSING for Marco Bianchi ()"
    assert body["type"] == "info"


async def test_a_500_is_retried_and_nothing_secret_is_logged(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # Apprise's debug lines name the request it makes
    rec, url = receiver
    rec.answer(Answer(500, "boom"))
    bridge = await make_bridge(CONFIG, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    first, second = rec.requests
    assert first.body == second.body
    [row] = [await bridge.rt.store.get(d) for d in await _ids(bridge)]
    assert row is not None and row.status is Status.DELIVERED and row.attempts == 2
    retried = [r for r in caplog.records if r.getMessage() == "will retry"]
    assert retried and "urls[0] (JSON)" in retried[0].__dict__["reason"]
    assert any(r.name == "apprise" for r in caplog.records)  # Apprise did log, scrubbed
    secrets = [PASSWORD, PATH_TOKEN, f"{USER}:{PASSWORD}"]
    assert_no_leak(secrets, ours(caplog), retried[0].__dict__["reason"])


async def test_only_the_failed_url_is_notified_again(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], aiohttp_server: Any
) -> None:
    rec_a, url_a = receiver
    rec_b = Receiver()
    server_b = await aiohttp_server(rec_b.app())
    rec_b.answer(Answer(503, "down for a moment"))
    config = CONFIG.replace("/hooks/${PATH_TOKEN}\n",
                            "/hooks/${PATH_TOKEN}\n      - json://${HOST_B}/other\n")
    bridge = await make_bridge(config, env(url_a, f"127.0.0.1:{server_b.port}"))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    assert len(rec_b.requests) == 2
    assert len(rec_a.requests) == 1  # it had its notification; the retry did not repeat it


async def test_urls_already_notified_stay_skipped_across_a_restart(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str], aiohttp_server: Any
) -> None:
    rec_a, url_a = receiver
    rec_b = Receiver(default=Answer(503, "down for a while"))
    server_b = await aiohttp_server(rec_b.app())
    config = CONFIG.replace("/hooks/${PATH_TOKEN}\n",
                            "/hooks/${PATH_TOKEN}\n      - json://${HOST_B}/other\n")
    hosts = env(url_a, f"127.0.0.1:{server_b.port}")
    first = await make_bridge(config, hosts)
    await first.post({"tracking": [TRACKING_FAILED]})
    await rec_b.wait_for(2, timeout=10)  # B refused twice; A had its notification
    await first.client.close()  # the bridge stops with the delivery still pending
    assert len(rec_a.requests) == 1

    rec_b.default = Answer(200, "back")
    second = await make_bridge(config, hosts)  # same storage, a new process's memory
    await delivered(second)
    assert len(rec_a.requests) == 1  # not notified again after the restart
    assert rec_b.requests[-1].body and len(rec_b.requests) >= 3


async def test_a_timeout_is_retried(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    config = CONFIG.replace("json://${USER}:${PASSWORD}@${HOST_A}/hooks/${PATH_TOKEN}",
                            "json://${HOST_A}/hooks/${PATH_TOKEN}?rto=0.5&cto=0.5")
    rec.answer(Answer(200, "late", delay=2.0))  # longer than Apprise's read timeout
    bridge = await make_bridge(config, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})

    async def retried() -> bool:
        [d] = await _ids(bridge)
        row = await bridge.rt.store.get(d)
        return row is not None and row.attempts >= 2
    await eventually(retried, what="a retry after Apprise's read timeout")
    await delivered(bridge)


def test_an_url_apprise_cannot_read_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  notify:\n    type: apprise\n    urls:\n"
                    "      - json://127.0.0.1/ok\n      - nosuchservice://s3cr3t-v4lue@x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert f"{path}:6: sinks.notify.urls[1]: Apprise does not understand this URL" in str(
        info.value)
    assert "s3cr3t-v4lue" not in str(info.value)


def test_without_apprise_installed_the_config_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # `import apprise` now fails
    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  notify:\n    type: apprise\n    urls: [json://127.0.0.1/x]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (f"{path}:4: sinks.notify.urls: the apprise sink needs the apprise package: "
            "pip install 'isendu-bridge[apprise]'") in str(info.value)


async def _ids(bridge: Any) -> list[str]:
    from bridge.canonical import canonical_json
    from bridge.routing.router import delivery_id

    return [delivery_id("notify", "to-apprise", "tracking", canonical_json(TRACKING_FAILED))]


async def test_html_format_escapes_values_and_apprise_converts_for_the_service(
    make_bridge: BridgeFactory, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    config = CONFIG.replace("    rate_limit: 100/s\n", "    rate_limit: 100/s\n    format: html\n"
                            ).replace("    to: notify\n", "    to: notify\n    message: "
                                      "\"<b>{{ item.trackingNumber }}</b> "
                                      "{{ last_step.error.message }}\"\n")
    bridge = await make_bridge(config, env(url))
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    [row] = [await bridge.rt.store.get(d) for d in await _ids(bridge)]
    assert row is not None
    assert row.payload["body"] == ("<b>BRT100994275870</b> Documents &lt;required&gt; &amp; "
                                   "missing")
    # The json:// service takes text: Apprise turned the HTML back into what it says.
    assert rec.requests[0].json()["message"] == ("BRT100994275870 Documents <required> & "
                                                 "missing")
