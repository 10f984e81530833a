"""A real SMTP server (aiosmtpd) on the test's own event loop, and a self-signed certificate.

The server speaks plain SMTP, STARTTLS or implicit TLS, can require AUTH, records every
envelope and can be scripted to answer RCPT or DATA with a 4xx/5xx the way real relays do.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import ssl
import subprocess
import warnings
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


def make_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1/localhost via the openssl CLI (None if absent)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None

    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data.replace(b"\r\n", b"\n"),
                                        policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class SmtpHandler:
    """aiosmtpd handler hooks; scripted answers are used once each, in order."""

    mails: list[Mail] = field(default_factory=list)
    rcpt_answers: deque[str] = field(default_factory=deque)
    data_answers: deque[str] = field(default_factory=deque)
    attempts: int = 0  # DATA commands seen, accepted or not

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.rcpt_answers:
            return self.rcpt_answers.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.data_answers:
            return self.data_answers.popleft()
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        tls = server.transport is not None and bool(
            server.transport.get_extra_info("ssl_object"))
        self.mails.append(Mail(str(envelope.mail_from), list(envelope.rcpt_tos), content,
                               tls=tls, login=login))
        return "250 Message accepted for delivery"


class SmtpServer:
    def __init__(self, mode: Literal["plain", "starttls", "tls"], cert: tuple[Path, Path] | None,
                 users: dict[str, str] | None = None) -> None:
        self.mode = mode
        self.handler = SmtpHandler()
        self.users = users or {}
        self._ctx: ssl.SSLContext | None = None
        if mode != "plain":
            assert cert is not None
            self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _protocol(self) -> SMTP:
        with warnings.catch_warnings():
            # Implicit TLS: AUTH without STARTTLS is fine, the connection is encrypted.
            warnings.simplefilter("ignore", UserWarning)
            return self._smtp()

    def _smtp(self) -> SMTP:
        return SMTP(
            self.handler, hostname="localhost",
            tls_context=self._ctx if self.mode == "starttls" else None,
            require_starttls=self.mode == "starttls",
            authenticator=self._authenticate if self.users else None,
            auth_required=bool(self.users),
            # aiosmtpd cannot tell that an implicit-TLS connection is encrypted.
            auth_require_tls=self.mode == "starttls",
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, "127.0.0.1", 0, ssl=self._ctx if self.mode == "tls" else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Mail]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.handler.mails) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} mails, got {len(self.handler.mails)}")
            await asyncio.sleep(0.05)
        return self.handler.mails
