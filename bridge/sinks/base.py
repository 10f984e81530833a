"""What every sink shares: the interface, the render context and the HTTP answer classifier."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import time
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import aiohttp

from bridge.config_types import SinkConfigBase
from bridge.errors import PermanentSinkError, SinkError, TransientSinkError
from bridge.models import Delivery, Kind
from bridge.redact import MASK, redact, url_credentials, url_path_tokens
from bridge.state import Observation, first_sight
from bridge.templates import Template, last_step


class RenderContext:
    """Everything a template may see about one item on one route; built once per item.

    `seen`: what the item brings against its shipment's state; None where no state is kept,
    and then the item is shown as seen for the first time."""

    __slots__ = ("_last_step", "_seen", "item", "item_json", "kind", "received_at")

    def __init__(self, item: dict[str, Any], kind: Kind, received_at: str, item_json: str,
                 seen: Observation | None = None) -> None:
        self.item = item
        self.kind = kind
        self.received_at = received_at
        self.item_json = item_json
        self._last_step: Any = ...
        self._seen = seen

    @property
    def seen(self) -> Observation:
        if self._seen is None:
            self._seen = first_sight(self.item, self.kind)
        return self._seen

    @property
    def last_step(self) -> dict[str, Any] | None:
        if self._last_step is ...:
            self._last_step = last_step(self.item) if self.kind == "tracking" else None
        result: dict[str, Any] | None = self._last_step
        return result

    def vars(self, route: str, delivery_id: str) -> dict[str, Any]:
        return {
            "item": self.item,
            "kind": self.kind,
            "route": route,
            "received_at": self.received_at,
            "last_step": self.last_step,
            "delivery_id": delivery_id,
            "new_steps": list(self.seen.new_steps),
            "previous": self.seen.previous,
            "changed": list(self.seen.changed),
            "first_seen": self.seen.first_seen,
        }


class Memory(Protocol):
    """Durable key-value memory a sink may keep (the store provides it)."""

    async def recall(self, scope: str, key: str) -> str | None: ...

    async def remember(self, scope: str, key: str, value: str, now: float) -> None: ...


class Sink(ABC):
    """A destination. `send` returns on success and raises Transient/PermanentSinkError."""

    type_name: ClassVar[str]
    config_model: ClassVar[type[SinkConfigBase]]
    # >1: the dispatcher hands `send_many` up to this many deliveries at once (e.g. Kafka,
    # whose producer batches them); a concurrency slot then holds one such batch.
    batch_size: int = 1
    # The service's documented pace, (messages per second, burst); None: no limit.
    default_rate: ClassVar[tuple[float, int] | None] = None

    def __init__(self, name: str, config: SinkConfigBase) -> None:
        self.name = name
        self.config = config
        self.memory: Memory | None = None  # set by the runtime before the first send
        self.paused_until = 0.0  # time.monotonic(); the dispatcher sends nothing before it

    def pause_for(self, seconds: float) -> None:
        """The service asked for quiet (429, or rate-limit headers saying none is left):
        obeyed up to MAX_PAUSE. A value that is no time (inf, nan) is ignored, so no answer
        can silence a sink until the next restart."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        self.paused_until = max(self.paused_until,
                                time.monotonic() + min(seconds, MAX_PAUSE))

    @abstractmethod
    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        """The rendered fields stored with the delivery; `message` is a route's override."""

    @abstractmethod
    async def send(self, delivery: Delivery) -> None: ...

    async def send_many(self, deliveries: list[Delivery]) -> list[SinkError | None]:
        """One outcome per delivery, in order: None for sent, or the error it failed with."""
        results = await asyncio.gather(*(self.send(d) for d in deliveries),
                                       return_exceptions=True)
        out: list[SinkError | None] = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, SinkError):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                out.append(TransientSinkError(f"unexpected {r.__class__.__name__} in sink"))
            else:
                out.append(r)
        return out

    async def start(self) -> None:
        """Open connections; called once before the first send."""

    async def close(self) -> None:
        """Flush and release connections; called on shutdown."""

    async def drop_connections(self) -> None:
        """The receiver is away (the sink went down, or a probe found it still away): let go
        of whatever would keep retrying in the background until the next send, the probe,
        which starts afresh. Sends still in flight may fail for it; they are retried."""

    def secrets(self) -> list[str]:
        """Secret values this sink holds, so logs and stored reasons can be scrubbed."""
        return []

    def rate_limit(self) -> tuple[float, int] | None:
        """(messages per second, burst) this sink must keep to; None: unlimited."""
        cfg = self.config
        if "rate_limit" in cfg.model_fields_set:
            return None if cfg.rate_limit is None else (cfg.rate_limit, cfg.burst or 1)
        if self.default_rate is None:
            return None
        rate, burst = self.default_rate
        return rate, cfg.burst or burst

    supports_digest: ClassVar[bool] = False
    # False: its failures never say that the receiver is away (bridge/errors.py
    # says_unreachable), so the sink never goes down and every failure counts.
    reports_unreachable: ClassVar[bool] = True

    def render_digest(self, route: str, deliveries: list[Delivery]) -> dict[str, str]:
        """One message listing several grouped deliveries (routes with `group:`).

        Each delivery's payload carries `summary`, a one-line description of its item."""
        raise NotImplementedError(f"{self.type_name} sinks cannot send digests")


# The longest a sink holds back on a service's word (Retry-After, rate-limit headers).
MAX_PAUSE = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds or an HTTP date -> seconds from now (None if absent/garbage)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "inf" or "nan" is no answer to "when?"
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def excerpt(text: str, limit: int = 200) -> str:
    # Scrubbed before it is cut: a cut through a secret would leave its first characters.
    one_line = redact(" ".join(text.split()))
    return one_line[:limit] + ("..." if len(one_line) > limit else "")


def classify_http(
    status: int, headers: Mapping[str, str], body: str, what: str = "receiver"
) -> None:
    """One rule for every HTTP-based sink: 2xx ok; 408/429/5xx transient; other 4xx permanent."""
    if 200 <= status < 300:
        return
    detail = f"{what} answered HTTP {status}"
    if body:
        detail += f": {excerpt(body)}"
    if status == 429:
        hint = parse_retry_after(headers.get("Retry-After"))
        raise TransientSinkError(detail, "rate_limited", hint)
    if status == 408:
        raise TransientSinkError(detail, "timeout", status=status)
    if status >= 500:
        hint = parse_retry_after(headers.get("Retry-After"))
        raise TransientSinkError(detail, "server_error", hint, status=status)
    if status in (401, 403):
        raise PermanentSinkError(detail, "auth_error")
    if 300 <= status < 400 and (location := headers.get("Location")):
        # Redirects are not followed (a POST's body and method would not survive every
        # kind): say where the receiver went, its credentials masked, so the url can be set.
        shown = location
        for secret in url_credentials(location) + url_path_tokens(location):
            shown = shown.replace(secret, MASK)
        raise PermanentSinkError(f"{detail} (redirected to {excerpt(shown)}; set the sink's "
                                 f"url to where it points)", "client_error")
    raise PermanentSinkError(detail, "client_error")


# What is read of a receiver's answer. An error page is kept as a 200-character excerpt:
# read whole, a 400 MB one held the event loop for seconds (verification answers with it)
# and took 1.2 GB of memory on every attempt. A success may be parsed, and Slack's
# chat.postMessage answers with the whole message posted (a digest's 40,000 characters of
# text and its blocks): cut short, it would not parse, and a message posted would be
# retried and posted again. So a success is read much further.
ERROR_ANSWER_BYTES = 64 * 1024
ANSWER_BYTES = 8 * 1024 * 1024


async def read_answer(resp: aiohttp.ClientResponse, limit: int | None = None) -> str:
    """The first bytes of `resp`'s body as text (`limit`, or by default 8 MiB of a 2xx answer
    and 64 KiB of any other); the rest is never read (the connection is closed instead of
    reused)."""
    if limit is None:
        limit = ANSWER_BYTES if 200 <= resp.status < 300 else ERROR_ANSWER_BYTES
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    try:
        return b"".join(chunks).decode(resp.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return b"".join(chunks).decode("utf-8", errors="replace")


def proxies() -> dict[str, str]:
    """HTTP_PROXY / HTTPS_PROXY (either case) by scheme, from the environment."""
    return urllib.request.getproxies_environment()


@functools.lru_cache(maxsize=1024)  # a sink's few URLs: read once, not at every send
def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` goes through: HTTPS_PROXY or HTTP_PROXY by its scheme,
    unless NO_PROXY names its host. aiohttp reads none of them unless told to trust the
    environment, which would also send ~/.netrc credentials to the receivers it names."""
    found = proxies()
    if not found:
        return None
    parts = urllib.parse.urlsplit(url)
    proxy = found.get(parts.scheme)
    if proxy is None or urllib.request.proxy_bypass(parts.hostname or ""):  # NO_PROXY
        return None
    return proxy


async def post_and_classify(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: bytes | str,
    headers: Mapping[str, str],
    timeout: float,
    what: str = "receiver",
) -> tuple[int, str]:
    """Send one request; map network failures to transient errors without leaking the URL.

    URLs of chat webhooks carry their secret, so errors describe the failure, not the target.
    """
    try:
        async with session.request(
            method, url, data=data, headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
            proxy=proxy_for(url),
        ) as resp:
            text = await read_answer(resp)
            classify_http(resp.status, resp.headers, text, what)
            return resp.status, text
    except TimeoutError:
        raise TransientSinkError(f"{what} did not answer within {timeout:g}s", "timeout") from None
    except aiohttp.ClientConnectionError as exc:
        raise TransientSinkError(
            f"cannot connect to {what}: {exc.__class__.__name__}", "connection_error"
        ) from None
    except aiohttp.ClientError as exc:
        raise TransientSinkError(f"{what} request failed: {exc.__class__.__name__}",
                                 "connection_error") from None


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
