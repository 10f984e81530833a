"""`email`: a multipart/alternative mail (plain text always, HTML too) over SMTP (aiosmtplib).

Subject, bodies and recipients are rendered at intake, so a recipient taken from the item
(`to: "{{ item.recipient.email }}"`) is fixed with the delivery. SMTP 4xx and connection
failures are worth retrying; 5xx is final. The Message-ID is derived from the delivery id,
so a retried send that did reach the server shows up as a duplicate mail clients can fold.
"""

from __future__ import annotations

import email.utils
import html
import json
import logging
import ssl
from email.message import EmailMessage
from typing import Annotated, Any, Literal

import aiosmtplib
from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField
from bridge.errors import (
    PermanentSinkError,
    SinkError,
    TemplateRenderError,
    TransientSinkError,
    says_unreachable,
)
from bridge.models import Delivery
from bridge.sinks.base import RenderContext, Sink
from bridge.sinks.chat import Summary, burst_problem, cut, one_line, summarize
from bridge.templates import Template, as_html

log = logging.getLogger("bridge.sinks.email")

DEFAULT_PORT = {"none": 25, "starttls": 587, "tls": 465}
SUBJECT_LIMIT = 200


def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


Recipients = Annotated[list[TemplateField], BeforeValidator(_one_or_many)]


def addresses(value: str) -> list[str]:
    """`a@x, "B, C" <b@y>` -> the full addresses; raises ValueError naming a bad one."""
    found = []
    for name, addr in email.utils.getaddresses([value]):
        if not addr:
            continue
        local, at, domain = addr.rpartition("@")
        if not at or not local or "." not in domain:
            raise ValueError(f"{addr!r} is not an e-mail address")
        found.append(email.utils.formataddr((name, addr)))
    return found


class EmailSinkConfig(SinkConfigBase):
    type: Literal["email"]
    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)  # default: 25, 587 or 465 by `security`
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    from_: str = Field(alias="from")
    to: Recipients = Field(min_length=1)
    cc: Recipients = Field(default_factory=list)
    bcc: Recipients = Field(default_factory=list)
    subject: TemplateField | None = None
    text: TemplateField | None = None
    html: TemplateField | None = None  # autoescaped: item values cannot inject markup
    ca_file: str | None = None  # trust this CA bundle (a private relay's own certificate)
    timeout: PositiveDuration = 30.0

    @field_validator("from_")
    @classmethod
    def _from(cls, v: str) -> str:
        found = addresses(v)
        if len(found) != 1:
            raise ValueError("expected one sender address such as Bridge <bridge@example.com>")
        return found[0]

    @model_validator(mode="after")
    def _check(self) -> EmailSinkConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        problem = burst_problem(self, "e-mail")
        if problem:
            raise ValueError(problem)
        for field in ("to", "cc", "bcc"):
            for t in getattr(self, field):
                if t.is_static:
                    addresses(t.source)  # a typo in a fixed address fails at load
        return self


def default_subject(s: Summary) -> str:
    return f"{s.noun} {s.ident}" + (f": {s.status}" if s.status else "")


def default_text(s: Summary) -> str:
    facts = s.facts(with_status=False)
    if s.error:
        facts.append(("Error", s.error))
    if s.url:
        facts.append(("Track it", s.url))
    width = max((len(k) for k, _ in facts), default=0) + 2
    lines = [default_subject(s), ""] + [f"{k + ':':<{width}}{v}" for k, v in facts]
    return "\n".join([*lines, "", "-- ", f"isendu-bridge, route {s.route}"])


def default_html(s: Summary) -> str:
    e = html.escape
    ident = f'<a href="{e(s.url)}">{e(s.ident)}</a>' if s.url else e(s.ident)
    out = ['<!DOCTYPE html><html><body style="font-family:Arial,Helvetica,sans-serif;'
           'color:#222">',
           f'<h2 style="margin:0 0 12px">{e(s.noun)} {ident}'
           + (f": {e(s.status)}" if s.status else "") + "</h2>"]
    if s.error:
        out.append(f'<p style="color:#b00020;font-weight:bold">{e(s.error)}</p>')
    rows = "".join(f'<tr><th align="left" style="padding:4px 16px 4px 0">{e(k)}</th>'
                   f'<td style="padding:4px 0">{e(v)}</td></tr>'
                   for k, v in s.facts(with_status=False))
    if rows:
        out.append(f'<table style="border-collapse:collapse">{rows}</table>')
    if s.url and s.kind == "tracking":
        out.append(f'<p><a href="{e(s.url)}">Track this shipment</a></p>')
    out.append(f'<p style="color:#888;font-size:12px">isendu-bridge, route {e(s.route)}</p>')
    return "\n".join([*out, "</body></html>"])


def text_to_html(text: str) -> str:
    """The HTML part for a custom plain text: the same words, escaped, lines kept."""
    return ('<!DOCTYPE html><html><body><div style="white-space:pre-wrap;font-family:Arial,'
            f'Helvetica,sans-serif">{html.escape(text)}</div></body></html>')


class EmailSink(Sink):
    type_name = "email"
    config_model = EmailSinkConfig
    config: EmailSinkConfig

    def __init__(self, name: str, config: EmailSinkConfig) -> None:
        super().__init__(name, config)
        self._html = as_html(config.html) if config.html else None
        self._domain = config.from_.rpartition("@")[2].rstrip(">") or "isendu-bridge"
        self._tls: ssl.SSLContext | None = None
        if config.ca_file and config.security != "none":
            self._tls = ssl.create_default_context(cafile=config.ca_file)

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        variables = ctx.vars(route, delivery_id)
        s = summarize(ctx, route)
        out = {"to": json.dumps(self._recipients("to", variables))}
        for field in ("cc", "bcc"):
            if getattr(self.config, field):
                out[field] = json.dumps(self._recipients(field, variables, required=False))
        subject = self.config.subject.render(variables) if self.config.subject else None
        out["subject"] = cut(one_line(subject or default_subject(s)), SUBJECT_LIMIT)
        custom = message or self.config.text
        if custom is not None:
            out["text"] = custom.render(variables)
        else:
            out["text"] = default_text(s)
        if self._html is not None and message is None:
            out["html"] = self._html.render(variables)
        elif custom is not None:
            out["html"] = text_to_html(out["text"])  # the parts must say the same thing
        else:
            out["html"] = default_html(s)
        return out

    def _recipients(self, field: str, variables: dict[str, Any], required: bool = True
                    ) -> list[str]:
        found: list[str] = []
        for template in getattr(self.config, field):
            try:
                found += addresses(one_line(template.render(variables)))
            except ValueError as exc:
                raise TemplateRenderError(f"email `{field}`: {exc}") from None
        if required and not found:
            raise TemplateRenderError(f"email `{field}` rendered no address")
        return list(dict.fromkeys(found))

    def secrets(self) -> list[str]:
        return [self.config.password.get_secret_value()] if self.config.password else []

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """One mail per distinct recipient set, listing its items one line each.

        Recipients may come from the item (a customer's address), so items are never listed
        to someone who would not have got them one by one.
        """
        groups: dict[tuple[str | None, ...], list[Delivery]] = {}
        for d in deliveries:
            key = tuple(d.payload.get(f) for f in ("to", "cc", "bcc"))
            groups.setdefault(key, []).append(d)
        mails = []
        for (to, cc, bcc), members in groups.items():
            lines = [one_line(d.payload.get("summary") or d.item_uuid) for d in members]
            subject = f"{len(lines)} updates (route {route})"
            text = "\n".join([subject, "", *(f"- {line}" for line in lines), "", "-- ",
                              f"isendu-bridge, route {route}"])
            items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
            body = ('<!DOCTYPE html><html><body style="font-family:Arial,Helvetica,sans-serif">'
                    f"<h2>{html.escape(subject)}</h2><ul>{items}</ul></body></html>")
            mail = {"subject": subject, "text": text, "html": body, "to": to, "cc": cc,
                    "bcc": bcc}
            mails.append({k: v for k, v in mail.items() if v is not None})
        return {"mails": json.dumps(mails)}

    def build(self, p: dict[str, str], message_id: str) -> tuple[EmailMessage, list[str]]:
        """The message (no Bcc header) and every envelope recipient (Bcc included)."""
        to, cc, bcc = (json.loads(p[f]) if f in p else [] for f in ("to", "cc", "bcc"))
        msg = EmailMessage()
        msg["From"] = self.config.from_
        msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(cc)
        msg["Subject"] = p["subject"]
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = f"<{message_id}@{self._domain}>"
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
        msg.set_content(p["text"])
        msg.add_alternative(p["html"], subtype="html")
        envelope = [a for _, a in email.utils.getaddresses(to + cc + bcc)]
        return msg, list(dict.fromkeys(envelope))

    async def send(self, delivery: Delivery) -> None:
        if "mails" not in delivery.payload:
            await self._submit(*self.build(delivery.payload, delivery.id), delivery.id)
            return
        # A digest: one mail per group of recipients. A group refused does not keep the
        # others from theirs; a retry (after a transient failure) sends every mail again,
        # and their stable Message-IDs make mail clients show each once.
        mails = json.loads(delivery.payload["mails"])
        failed: list[SinkError] = []
        tried = 0
        for i, mail in enumerate(mails):
            tried += 1
            try:
                await self._submit(*self.build(mail, f"{delivery.id}.{i}"), delivery.id)
            except SinkError as exc:
                failed.append(exc)
                if says_unreachable(exc):  # the server is away: the others would wait too
                    break
        if not failed:
            return
        sent = f"{tried - len(failed)} of the digest's {len(mails)} mails were sent"
        first = next((e for e in failed if isinstance(e, TransientSinkError)), failed[0])
        reason = f"{first.reason} ({sent})"
        if isinstance(first, TransientSinkError):
            raise TransientSinkError(reason, first.kind, first.retry_after, status=first.status)
        raise PermanentSinkError(reason, first.kind)

    async def _submit(self, msg: EmailMessage, recipients: list[str], delivery_id: str
                      ) -> None:
        c = self.config
        try:
            refused, _ = await aiosmtplib.send(
                msg, sender=email.utils.parseaddr(c.from_)[1], recipients=recipients,
                hostname=c.host, port=c.port or DEFAULT_PORT[c.security],
                username=c.username,
                password=c.password.get_secret_value() if c.password else None,
                use_tls=c.security == "tls", start_tls=c.security == "starttls",
                tls_context=self._tls, timeout=c.timeout,
            )
        except aiosmtplib.SMTPException as exc:
            raise smtp_error(exc) from None
        except ssl.SSLError as exc:
            raise TransientSinkError(f"TLS with the SMTP server failed: {exc.reason}",
                                     "connection_error") from None
        except OSError as exc:
            raise TransientSinkError(f"cannot reach the SMTP server: {exc.__class__.__name__}",
                                     "connection_error") from None
        if refused:
            # Some recipients refused while others accepted: resending would duplicate the
            # mail to those who got it, so it counts as sent, and the refusals are said.
            log.warning("SMTP server refused some recipients; the mail went to the others",
                        extra={"sink": self.name, "delivery_id": delivery_id,
                               "refused": len(refused), "recipients": len(recipients),
                               "answers": sorted({f"{code} {cut(one_line(text), 120)}"
                                                  for code, text in refused.values()})})


def smtp_error(exc: aiosmtplib.SMTPException) -> SinkError:
    """4xx and connection trouble are transient; 5xx and unusable settings are permanent."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {one_line(r.message)}"
                           for r in exc.recipients)
        reason = f"SMTP server refused every recipient: {cut(detail, 300)}"
        if any(400 <= code < 500 for code in codes):
            return TransientSinkError(reason, "server_error")
        return PermanentSinkError(reason, "client_error")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reason = f"SMTP server answered {exc.code} {cut(one_line(exc.message), 200)}"
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and exc.code >= 500:
            return PermanentSinkError(reason, "auth_error")
        if exc.code == 421:
            # Service not available, closing the channel (shutting down, restarting,
            # overloaded): the server is away as a whole, as with a 503.
            return TransientSinkError(reason, "connection_error")
        if 400 <= exc.code < 500:
            return TransientSinkError(reason, "server_error")
        if exc.code >= 500:
            return PermanentSinkError(reason, "client_error")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return TransientSinkError("SMTP server did not answer in time", "timeout")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        detail = cut(one_line(exc.message), 200)
        return TransientSinkError(f"cannot reach the SMTP server: {detail}", "connection_error")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return TransientSinkError("the SMTP server closed the connection", "connection_error")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # e.g. `security: starttls` but the server offers no STARTTLS, or AUTH without TLS.
        return PermanentSinkError(f"SMTP server does not support what the sink needs: "
                                  f"{one_line(exc.message)}", "config_error")
    if "not supported by server" in str(exc):
        # aiosmtplib raises a plain SMTPException when STARTTLS or AUTH is not offered.
        return PermanentSinkError(f"SMTP server does not support what the sink needs: "
                                  f"{cut(one_line(str(exc)), 200)}", "config_error")
    return TransientSinkError(f"SMTP error: {exc.__class__.__name__}", "connection_error")
