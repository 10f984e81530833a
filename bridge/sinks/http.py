"""`http`: POST each delivery to a URL, optionally signed per the Standard Webhooks spec."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Literal

import aiohttp
from pydantic import AnyHttpUrl, Field, SecretStr, model_validator

from bridge.config_types import PositiveDuration, SinkConfigBase, TemplateField
from bridge.errors import TemplateRenderError
from bridge.models import Delivery
from bridge.redact import is_plain, names_a_credential, url_credentials, url_path_tokens
from bridge.sinks.base import RenderContext, Sink, post_and_classify
from bridge.sinks.chat import burst_problem
from bridge.templates import Template, envelope

# What a header value cannot hold (RFC 9110 field values: no control character but tab).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpSinkConfig(SinkConfigBase):
    type: Literal["http"]
    url: AnyHttpUrl
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, TemplateField] = Field(default_factory=dict)
    timeout: PositiveDuration = 10.0
    body: TemplateField | None = None  # default: the JSON envelope
    signing_secret: SecretStr | None = None

    @model_validator(mode="after")
    def _burst(self) -> HttpSinkConfig:
        problem = burst_problem(self, "an HTTP endpoint")
        if problem:
            raise ValueError(problem)
        return self


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_<base64>`; any other string is used as raw bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, as the spec defines it."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class HttpSink(Sink):
    type_name = "http"
    config_model = HttpSinkConfig
    config: HttpSinkConfig

    def __init__(self, name: str, config: HttpSinkConfig) -> None:
        super().__init__(name, config)
        self._url = str(config.url)
        self._static_headers = {
            k: v.source for k, v in config.headers.items() if v.is_static
        }
        self._templated_headers = {k: v for k, v in config.headers.items() if not v.is_static}
        self._key = (
            signing_key(config.signing_secret.get_secret_value()) if config.signing_secret else None
        )
        self._session: aiohttp.ClientSession | None = None

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        template = message or self.config.body
        if template is None:
            body = envelope(delivery_id, ctx.kind, route, ctx.received_at, ctx.item_json)
            out = {"body": body}
        else:
            out = {"body": template.render(ctx.vars(route, delivery_id))}
        if self._templated_headers:
            variables = ctx.vars(route, delivery_id)
            headers = {k: t.render(variables) for k, t in self._templated_headers.items()}
            for name, value in headers.items():
                if bad := _CONTROL.search(value):
                    # aiohttp refuses it at send time, on every retry: fail once, here.
                    raise TemplateRenderError(
                        f"template failed: header {name}: the value holds the control "
                        f"character U+{ord(bad[0]):04X}, which a header cannot carry; expected "
                        "one line of text (e.g. `| replace('\\n', ' ')` in the template)")
            out["headers"] = json.dumps(headers)
        return out

    supports_digest = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """`{"kind": "digest", "route", "count", "items": [<each item's own body>]}`."""
        bodies = [d.payload["body"] for d in deliveries]
        try:
            for body in bodies:
                json.loads(body)
        except ValueError:  # custom non-JSON bodies: one per line
            return {"body": "\n".join(bodies)}
        head = json.dumps({"kind": "digest", "route": route, "count": len(bodies)})
        return {"body": head[:-1] + ',"items":[' + ",".join(bodies) + "]}"}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.concurrency * 2)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        """The signing secret, and what carries a credential by its name: a header such as
        `Authorization` or `X-Api-Key` (its value, and the token after `Bearer `), a
        password in the URL, URL query values such as `?access_token=` or Azure's
        `?code=` (as written and decoded), and a token in the URL's path or host (Zapier's
        `/hooks/catch/...`, Make's, n8n's: redact.url_path_tokens). A receiver's error
        page that echoes them must not carry them into logs or dead-letter reasons."""
        out = [self.config.signing_secret.get_secret_value()] if self.config.signing_secret else []
        for name, value in self._static_headers.items():
            if names_a_credential(name):
                out.append(value.strip())
                # `<scheme> <credential>` (Bearer, Basic, Splunk, ...): the credential alone.
                token = value.strip().partition(" ")[2].strip()
                if token and " " not in token:
                    out.append(token)
        out += url_credentials(self._url)
        # A literal value under a credential's name is one even if all digits, but never a
        # word like `true` or a lone scheme (`Bearer ${TOKEN:-}` leaves "Bearer"). A token
        # from the URL's path is one whatever it reads like (a Zapier hook `123456h`).
        return ([v for v in out if v and (v.isdigit() or not is_plain(v))]
                + url_path_tokens(self._url))

    def build_headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "isendu-bridge"}
        headers.update(self._static_headers)
        if "headers" in delivery.payload:
            headers.update(json.loads(delivery.payload["headers"]))
        # The delivery id is stable across retries, so receivers can drop repeats.
        headers["webhook-id"] = delivery.id
        headers["Idempotency-Key"] = delivery.id
        if self._key is not None:
            ts = int(time.time())
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = sign(self._key, delivery.id, ts, body)
        return headers

    async def send(self, delivery: Delivery) -> None:
        if self._session is None:
            await self.start()
        assert self._session is not None
        body = delivery.payload["body"].encode()
        await post_and_classify(
            self._session, self.config.method, self._url, data=body,
            headers=self.build_headers(delivery, body), timeout=self.config.timeout,
        )
