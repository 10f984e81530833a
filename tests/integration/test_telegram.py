"""The Telegram sink against a local Bot API that parses HTML and answers like Telegram."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from tests.conftest import BridgeFactory
from tests.helpers.chat_services import FakeTelegram, telegram_error, telegram_parse
from tests.helpers.receiver import Answer
from tests.helpers.sinks import (
    ORDER,
    TRACKING_FAILED,
    assert_no_leak,
    dead,
    delivered,
    first_retry,
    long_tracking,
)

TOKEN = "7012345678:AAH3xq-T0kenForTestsOnly_abcdefghijklmno"
CHAT = -1001234567890
BLOCKED = 99887766

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 5}
sinks:
  telegram:
    type: telegram
    token: ${TELEGRAM_TOKEN}
    chat_id: ${CHAT_ID:--1001234567890}
    api_url: ${TELEGRAM_API}
routes:
  - name: everything
    to: telegram
"""


@pytest.fixture
async def telegram(aiohttp_server: Any) -> tuple[FakeTelegram, dict[str, str]]:
    fake = FakeTelegram(TOKEN, chats={CHAT}, blocked={BLOCKED})
    server = await aiohttp_server(fake.app(), access_log=None)
    return fake, {"TELEGRAM_TOKEN": TOKEN, "TELEGRAM_API": f"http://127.0.0.1:{server.port}"}


async def test_failed_step_message_is_exactly_this(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]]
) -> None:
    fake, env = telegram
    bridge = await make_bridge(CONFIG, env)
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [req] = await fake.wait_for(1)
    assert req.path == f"/bot{TOKEN}/sendMessage"
    link = "https://vas.brt.it/vas/sped_det_show.hsm?Nspediz=BRT100994275870"
    assert req.json() == {
        "chat_id": CHAT,
        "text": f'⚠️ <b>Shipment <a href="{link}">BRT100994275870</a></b>: EXCEPTION\n'
                "Parcel held at customs\n"
                "📍 Paris · 🕒 2025-11-04 06:57 (Europe/Paris)\n"
                "⚠️ <b>CUSTOMS_HOLD</b>: Documents &lt;required&gt; &amp; missing",
        "parse_mode": "HTML",
        "link_preview_options": {"is_disabled": True},
    }
    await delivered(bridge)
    assert fake.accepted == [req]  # Telegram's HTML parser took it


async def test_order_message(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]]
) -> None:
    fake, env = telegram
    bridge = await make_bridge(CONFIG, env)
    await bridge.post({"order": [ORDER]})
    [req] = await fake.wait_for(1)
    assert req.json()["text"] == ("⚙️ <b>Order ORD-2025-932194</b>: PROCESSING\n"
                                  "📍 Roma, IT · 💰 258.16 EUR")
    await delivered(bridge)


async def test_long_text_is_cut_to_4096_and_still_parses(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]]
) -> None:
    fake, env = telegram
    config = CONFIG + """  - name: custom
    kind: order
    to: telegram
    message: "<b>{{ item.reference }}</b> <i>{{ item.note }}</i>"
"""
    bridge = await make_bridge(config, env)
    order = {**ORDER, "note": "<script>&" + "z" * 10_000}
    await bridge.post({"tracking": [long_tracking(10_000)], "order": [order]})
    got = await fake.wait_for(3)  # the order goes through both routes
    await delivered(bridge, 3)
    assert len(fake.accepted) == 3  # none was "message is too long" or "can't parse entities"
    texts = [r.json()["text"] for r in got]

    [tracking] = [t for t in texts if "GLS821026103283" in t]
    lines = tracking.split("\n")
    assert lines[1] == "x" * 2999 + "…"  # the default message keeps room for where and when
    assert lines[2] == "📍 Roma · 🕒 2025-11-05 10:15 (Europe/Rome)"

    [custom] = [t for t in texts if t.startswith("<b>ORD")]
    assert custom.startswith("<b>ORD-2025-932194</b> <i>&lt;script&gt;&amp;zzz")
    assert custom.endswith("z…</i>")  # the open tag was closed after the cut
    visible, error = telegram_parse(custom)
    assert error is None
    assert len(visible) == 4096 and visible.endswith("…")


async def test_429_retry_after_from_parameters_is_honoured(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]]
) -> None:
    fake, env = telegram
    fake.answer(Answer(429, telegram_error(429, "Too Many Requests: retry after 1",
                                           retry_after=1)))
    bridge = await make_bridge(CONFIG, env)
    await bridge.post({"tracking": [TRACKING_FAILED]})
    row, delay = await first_retry(bridge, "telegram", "everything", "tracking",
                                   TRACKING_FAILED)
    assert delay == pytest.approx(1.0)
    assert row.last_error == "Telegram answered 429: Too Many Requests: retry after 1"
    first, second = await fake.wait_for(2, timeout=15)
    assert second.at - first.at >= 1.0
    await delivered(bridge)


async def test_a_group_that_became_a_supergroup_is_followed_and_remembered(
    make_bridge: BridgeFactory, aiohttp_server: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """Telegram refuses a message to a group upgraded to a supergroup and names the new
    chat: the message goes there at once, later ones (after a restart too) go straight
    there, and one warning says which chat_id to configure."""
    caplog.set_level(logging.INFO)
    old_group = -4001234567
    fake = FakeTelegram(TOKEN, chats={CHAT}, migrated={old_group: CHAT})
    server = await aiohttp_server(fake.app(), access_log=None)
    env = {"TELEGRAM_TOKEN": TOKEN, "TELEGRAM_API": f"http://127.0.0.1:{server.port}",
           "CHAT_ID": str(old_group)}
    bridge = await make_bridge(CONFIG, env)
    await bridge.post({"tracking": [TRACKING_FAILED]})
    await delivered(bridge)
    assert [r.json()["chat_id"] for r in fake.requests] == [old_group, CHAT]
    await bridge.client.close()

    again = await make_bridge(CONFIG, env)  # the same store: a restart
    await again.post({"order": [ORDER]})
    await delivered(again, 2)
    assert [r.json()["chat_id"] for r in fake.requests] == [old_group, CHAT, CHAT]
    assert len(fake.accepted) == 2 and not await again.rt.store.list_dead()
    [warning] = [r for r in caplog.records if "supergroup" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert (warning.__dict__["chat_id"], warning.__dict__["new_chat_id"]) == (old_group, CHAT)


@pytest.mark.parametrize(("chat", "token", "expected"), [
    (str(CHAT + 1), TOKEN, "Telegram answered 400: Bad Request: chat not found"),
    (str(BLOCKED), TOKEN, "Telegram answered 403: Forbidden: bot was blocked by the user"),
    (str(CHAT), "7012345678:AAWr0ngT0kenForTestsOnly_zyxwvutsrqp", "Telegram answered 401: "
     "Unauthorized"),
])
async def test_permanent_answers_are_dead_at_once_without_the_token(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]],
    caplog: pytest.LogCaptureFixture, chat: str, token: str, expected: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, env = telegram
    bridge = await make_bridge(CONFIG, {**env, "CHAT_ID": chat, "TELEGRAM_TOKEN": token})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error == expected
    assert_no_leak([token, token.split(":")[1]], caplog.records, row.last_error)


async def test_unreachable_api_is_retried_and_the_url_is_not_told(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge = await make_bridge(CONFIG, {"TELEGRAM_TOKEN": TOKEN,
                                        "TELEGRAM_API": f"http://127.0.0.1:{port}"})
    await bridge.post({"tracking": [TRACKING_FAILED]})
    row, _ = await first_retry(bridge, "telegram", "everything", "tracking", TRACKING_FAILED)
    assert row.last_error == "cannot connect to Telegram: ClientConnectorError"
    assert_no_leak([TOKEN, TOKEN.split(":")[1]], caplog.records, row.last_error)


async def test_digest_lists_one_escaped_line_per_item(
    make_bridge: BridgeFactory, telegram: tuple[FakeTelegram, dict[str, str]]
) -> None:
    fake, env = telegram
    config = CONFIG.replace("    to: telegram\n", """    to: telegram
    group: {window: 300ms, max_items: 20}
""")
    bridge = await make_bridge(config, env)
    second = {**ORDER, "uuid": "5f0c1d2e-0000-4000-8000-000000000002",
              "reference": "ORD-<2>", "status": "PAID"}
    await bridge.post({"order": [ORDER, second]})
    [req] = await fake.wait_for(1)
    text = req.json()["text"]
    assert text.split("\n") == [
        "📦 <b>2 updates</b> · route everything",
        "• order ORD-2025-932194: PROCESSING -&gt; Roma, IT",
        "• order ORD-&lt;2&gt;: PAID -&gt; Roma, IT",
    ]
    await delivered(bridge, 2)
    assert fake.accepted == [req]
