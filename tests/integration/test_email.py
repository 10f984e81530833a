"""The email sink against a real SMTP server (aiosmtpd): STARTTLS, TLS, AUTH, 4xx and 5xx."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from bridge.canonical import canonical_json
from bridge.routing.router import delivery_id
from tests.conftest import BridgeFactory, require_service
from tests.helpers.sinks import (
    ORDER,
    TRACKING_FAILED,
    assert_no_leak,
    dead,
    delivered,
    first_retry,
    long_tracking,
)
from tests.helpers.smtp import SmtpServer, make_certificate

PASSWORD = "s3cr3t-SMTP-passw0rd-for-tests"

CONFIG = """
defaults:
  retry: {initial_delay: 50ms, max_delay: 200ms, max_attempts: 4}
sinks:
  mail:
    type: email
    host: 127.0.0.1
    port: ${SMTP_PORT}
    security: ${SMTP_SECURITY:-starttls}
    ca_file: ${CA_FILE:-}
    username: bridge
    password: ${SMTP_PASSWORD}
    from: "isendu bridge <bridge@example.com>"
    to: ["{{ item.recipient.email }}", "ops@example.com"]
    cc: "Team Lead <lead@example.com>"
    bcc: audit@example.com
routes:
  - name: everything
    to: mail
"""

Starter = Callable[..., Coroutine[Any, Any, SmtpServer]]
# Mail to the item's recipient alone (no ops@, cc or bcc), and a second order to another one.
ONE_RECIPIENT = CONFIG.replace('["{{ item.recipient.email }}", "ops@example.com"]',
                               '"{{ item.recipient.email }}"').replace(
    "    cc: \"Team Lead <lead@example.com>\"\n    bcc: audit@example.com\n", "")
ANNA_S_ORDER = {**ORDER, "uuid": "5f0c1d2e-0000-4000-8000-000000000002", "reference": "ORD-2",
                "recipient": {"email": "anna@example.com", "city": "Torino", "country": "IT"}}


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = make_certificate(tmp_path_factory.mktemp("tls"))
    require_service(cert is not None, "the openssl CLI", "install openssl to test TLS")
    assert cert is not None
    return cert


@pytest.fixture
async def smtp(certificate: tuple[Path, Path]) -> AsyncIterator[Starter]:
    servers: list[SmtpServer] = []

    async def start(mode: str = "starttls", users: dict[str, str] | None = None) -> SmtpServer:
        server = SmtpServer(mode, certificate, users)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def env_for(server: SmtpServer, certificate: tuple[Path, Path], **extra: str) -> dict[str, str]:
    return {"SMTP_PORT": str(server.port), "CA_FILE": str(certificate[0]),
            "SMTP_PASSWORD": PASSWORD, **extra}


async def test_starttls_auth_and_the_received_message(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    [mail] = await server.wait_for(1)
    assert mail.tls and mail.login == "bridge"
    assert mail.mail_from == "bridge@example.com"
    # Bcc is in the envelope but in no header.
    assert mail.rcpt_tos == ["marco.bianchi51@example.com", "ops@example.com",
                             "lead@example.com", "audit@example.com"]
    msg = mail.message()
    assert msg["Subject"] == "Order ORD-2025-932194: PROCESSING"
    assert msg["From"] == "isendu bridge <bridge@example.com>"
    assert msg["To"] == "marco.bianchi51@example.com, ops@example.com"
    assert msg["Cc"] == "Team Lead <lead@example.com>"
    assert msg["Bcc"] is None and b"audit@example.com" not in mail.data
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"].startswith("<dlv_") and msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content() == (
        "Order ORD-2025-932194: PROCESSING\n\n"
        "Destination: Roma, IT\n"
        "Total:       258.16 EUR\n\n"
        "-- \n"
        "isendu-bridge, route everything\n")
    assert "<h2" in html.get_content() and "258.16 EUR" in html.get_content()
    await delivered(bridge)


async def test_html_part_escapes_item_text_and_long_bodies_arrive_whole(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = CONFIG.replace('"{{ item.recipient.email }}", ', "")
    bridge = await make_bridge(config, env_for(server, certificate))
    long = long_tracking(10_000)
    await bridge.post({"tracking": [TRACKING_FAILED, long]})
    mails = await server.wait_for(2)
    by_subject = {m.message()["Subject"]: m.message() for m in mails}

    failed = by_subject["Shipment BRT100994275870: EXCEPTION"]
    html = failed.get_body(("html",))
    text = failed.get_body(("plain",))
    assert html is not None and text is not None
    assert "Documents &lt;required&gt; &amp; missing" in html.get_content()
    assert "<required>" not in html.get_content()
    assert ('<a href="https://vas.brt.it/vas/sped_det_show.hsm?Nspediz=BRT100994275870">'
            "BRT100994275870</a>") in html.get_content()
    assert "Error:       CUSTOMS_HOLD: Documents <required> & missing\n" in text.get_content()
    assert "Local time:  2025-11-04 06:57 (Europe/Paris)\n" in text.get_content()

    # Mail has no length limit: a 10,000-character step arrives whole (encoded, not cut).
    whole = by_subject["Shipment GLS821026103283: DELIVERED"].get_body(("plain",))
    assert whole is not None and "x" * 10_000 in whole.get_content()
    await delivered(bridge, 2)


async def test_route_message_and_templates(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = CONFIG.replace("    bcc: audit@example.com\n", """    bcc: audit@example.com
    subject: "[{{ route }}] {{ item.reference }}\\nBcc: injected@example.com"
    html: "<p>{{ item.note }}</p>"
""") + """    message: "Note: {{ item.note }}"
"""
    bridge = await make_bridge(config, env_for(server, certificate))
    await bridge.post({"order": [{**ORDER, "note": "<b>fragile</b>"}]})
    [mail] = await server.wait_for(1)
    msg = mail.message()
    # A newline in a rendered subject cannot add a header.
    assert msg["Subject"] == "[everything] ORD-2025-932194 Bcc: injected@example.com"
    assert "injected@example.com" not in mail.rcpt_tos
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content() == "Note: <b>fragile</b>\n"
    # The route's message replaces the text, and the HTML part says the same, escaped.
    assert "Note: &lt;b&gt;fragile&lt;/b&gt;" in html.get_content()


async def test_sink_html_template_is_autoescaped(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = CONFIG.replace("    bcc: audit@example.com\n", """    bcc: audit@example.com
    html: "<p>{{ item.note }}</p>"
""")
    bridge = await make_bridge(config, env_for(server, certificate))
    await bridge.post({"order": [{**ORDER, "note": "<script>x</script>"}]})
    [mail] = await server.wait_for(1)
    html = mail.message().get_body(("html",))
    assert html is not None
    assert html.get_content().strip() == "<p>&lt;script&gt;x&lt;/script&gt;</p>"


async def test_implicit_tls(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("tls", {"bridge": PASSWORD})
    bridge = await make_bridge(CONFIG, env_for(server, certificate, SMTP_SECURITY="tls"))
    await bridge.post({"order": [ORDER]})
    [mail] = await server.wait_for(1)
    assert mail.tls and mail.login == "bridge"
    await delivered(bridge)


async def test_451_is_retried_then_delivered(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    server.handler.data_answers.append("451 4.3.0 Mail server temporarily rejected message")
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    await server.wait_for(1)
    await delivered(bridge)
    assert server.handler.attempts == 2
    row = await bridge.rt.store.get(
        delivery_id("mail", "everything", "order", canonical_json(ORDER)))
    assert row is not None and row.attempts == 2


async def test_421_is_the_server_away_and_spends_no_attempt(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    """421: service not available, closing the channel (a relay restarting). Like a 503 it
    says the server is away, not that this mail failed: more 421s than max_attempts (4)
    dead-letter nothing, and the mail goes once the relay takes it."""
    server = await smtp("starttls", {"bridge": PASSWORD})
    server.handler.data_answers.extend(["421 4.3.2 Service shutting down"] * 6)
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    await server.wait_for(1, timeout=30)
    await delivered(bridge, timeout=30)
    assert server.handler.attempts == 7 and await bridge.rt.store.list_dead() == []


async def test_a_server_without_starttls_is_a_config_error_at_once(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    """`security: starttls` against a server that offers no STARTTLS: no outage to ride out
    but a setting to fix, said in aiosmtplib's words."""
    server = await smtp("plain")
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error == ("SMTP server does not support what the sink needs: SMTP "
                              "STARTTLS extension not supported by server.")


async def test_recipients_refused_beside_accepted_ones_are_logged_and_the_mail_sent(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = await smtp("starttls", {"bridge": PASSWORD})
    server.handler.rcpt_answers.append("450 4.2.1 Mailbox busy, try again later")
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    [mail] = await server.wait_for(1)
    await delivered(bridge)
    assert mail.rcpt_tos == ["ops@example.com", "lead@example.com", "audit@example.com"]
    [warning] = [r for r in caplog.records if "refused some recipients" in r.getMessage()]
    assert (warning.__dict__["refused"], warning.__dict__["recipients"]) == (1, 4)
    assert warning.__dict__["answers"] == ["450 4.2.1 Mailbox busy, try again later"]


async def test_a_digest_group_refused_does_not_keep_the_others_from_their_mail(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = ONE_RECIPIENT + "    group: {window: 300ms}\n"
    server.handler.rcpt_answers.append("550 5.1.1 User unknown")  # the first group's only one
    bridge = await make_bridge(config, env_for(server, certificate))
    other = ANNA_S_ORDER
    await bridge.post({"order": [ORDER, other]})
    [mail] = await server.wait_for(1)
    dead_rows = await dead(bridge, 2)  # the digest's members, with the reason
    assert mail.rcpt_tos == ["anna@example.com"]
    assert all(r.last_error is not None and r.last_error.startswith(
        "SMTP server refused every recipient: marco.bianchi51@example.com: 550")
        and r.last_error.endswith("(1 of the digest's 2 mails were sent)") for r in dead_rows)


async def test_a_digest_stops_at_a_server_that_is_away_and_goes_whole_later(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    """A 421 for the first group's mail: the other groups' wait for the server too (not a
    timeout each), and the whole digest goes once it is back."""
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = ONE_RECIPIENT + "    group: {window: 300ms}\n"
    server.handler.data_answers.append("421 4.3.2 Service shutting down")
    bridge = await make_bridge(config, env_for(server, certificate))
    other = ANNA_S_ORDER
    await bridge.post({"order": [ORDER, other]})
    mails = await server.wait_for(2, timeout=30)
    await delivered(bridge, 2, timeout=30)
    assert server.handler.attempts == 3  # the refused one, then both: none tried meanwhile
    assert sorted(m.rcpt_tos[0] for m in mails) == ["anna@example.com",
                                                     "marco.bianchi51@example.com"]


async def test_550_recipient_is_dead_at_once(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = ONE_RECIPIENT
    server.handler.rcpt_answers.append("550 5.1.1 <marco.bianchi51@example.com>: "
                                       "Recipient address rejected: User unknown")
    bridge = await make_bridge(config, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error is not None
    assert row.last_error.startswith("SMTP server refused every recipient: "
                                     "marco.bianchi51@example.com: 550")
    assert server.handler.mails == []


async def test_wrong_password_is_dead_and_never_leaks(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await smtp("starttls", {"bridge": "the-right-one"})
    bridge = await make_bridge(CONFIG, env_for(server, certificate))
    await bridge.post({"order": [ORDER]})
    [row] = await dead(bridge)
    assert row.attempts == 1
    assert row.last_error is not None and row.last_error.startswith("SMTP server answered 535")
    ours = [r for r in caplog.records if not r.name.startswith("mail.")]  # not the server's
    assert_no_leak([PASSWORD], ours, row.last_error)


async def test_untrusted_certificate_and_server_down_are_transient(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await smtp("starttls", {"bridge": PASSWORD})
    bridge = await make_bridge(CONFIG, env_for(server, certificate, CA_FILE=""))
    await bridge.post({"order": [ORDER]})
    row, _ = await first_retry(bridge, "mail", "everything", "order", ORDER)
    assert row.last_error is not None and "CERTIFICATE_VERIFY_FAILED" in row.last_error
    await server.stop()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = await make_bridge(CONFIG, {**env_for(server, certificate), "SMTP_PORT": str(port),
                                      "STORAGE": "memory://"})  # a second bridge, own outbox
    await down.post({"order": [ORDER]})
    row, _ = await first_retry(down, "mail", "everything", "order", ORDER)
    assert row.last_error is not None and row.last_error.startswith("cannot reach the SMTP")
    assert_no_leak([PASSWORD], caplog.records, row.last_error)


async def test_to_rendering_no_address_is_dead_at_intake(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = CONFIG.replace('["{{ item.recipient.email }}", "ops@example.com"]',
                            '"{{ item.recipient.email }}"')
    bridge = await make_bridge(config, env_for(server, certificate))
    status, _ = await bridge.post({"tracking": [TRACKING_FAILED]})  # no recipient.email
    assert status == 200
    [row] = await dead(bridge)
    assert row.attempts == 0 and row.last_error == "email `to` rendered no address"


async def test_digest_never_shows_an_item_to_another_items_recipient(
    make_bridge: BridgeFactory, smtp: Starter, certificate: tuple[Path, Path]
) -> None:
    server = await smtp("starttls", {"bridge": PASSWORD})
    config = CONFIG.replace('["{{ item.recipient.email }}", "ops@example.com"]',
                            '"{{ item.recipient.email }}"') + """    group: {window: 300ms}
"""
    bridge = await make_bridge(config, env_for(server, certificate))
    other = ANNA_S_ORDER
    third = {**ORDER, "uuid": "5f0c1d2e-0000-4000-8000-000000000003", "reference": "ORD-3"}
    await bridge.post({"order": [ORDER, other, third]})
    mails = await server.wait_for(2)
    await delivered(bridge, 3)
    by_to = {m.message()["To"]: m for m in mails}
    assert set(by_to) == {"marco.bianchi51@example.com", "anna@example.com"}
    marco = by_to["marco.bianchi51@example.com"].message()
    assert marco["Subject"] == "2 updates (route everything)"
    marco_text = marco.get_body(("plain",))
    assert marco_text is not None
    assert "ORD-2025-932194" in marco_text.get_content() and "ORD-3" in marco_text.get_content()
    assert "ORD-2:" not in marco_text.get_content()
    anna = by_to["anna@example.com"]
    assert anna.rcpt_tos == ["anna@example.com", "lead@example.com", "audit@example.com"]
    assert b"ORD-2025-932194" not in anna.data
