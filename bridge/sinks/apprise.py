"""`apprise`: any service Apprise speaks (ntfy, Pushover, Gotify, Matrix, Mattermost, ...) by URL.

Apprise is an optional extra (`pip install 'isendu-bridge[apprise]'`), imported only when an
apprise sink is configured. Apprise URLs carry their service's credentials, so they are secrets:
registered for redaction before Apprise can log anything, and Apprise's own log records are
scrubbed too. Apprise reports only success or failure, so every failure is transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
import time
import traceback
from collections import OrderedDict
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple
from urllib.parse import unquote, unquote_plus

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from bridge.config_types import SinkConfigBase, TemplateField
from bridge.errors import PermanentSinkError, TemplateRenderError, TransientSinkError
from bridge.models import Delivery
from bridge.redact import REDACTOR, is_plain, names_a_credential, redact
from bridge.sinks.base import RenderContext, Sink
from bridge.sinks.chat import Summary, burst_problem, cut, summarize
from bridge.templates import Template, as_html

if TYPE_CHECKING:
    import apprise as apprise_module

log = logging.getLogger("bridge.sinks.apprise")

INSTALL_HINT = "the apprise sink needs the apprise package: pip install 'isendu-bridge[apprise]'"
DESCRIPTION_LIMIT = 3000
_NOTIFY_TYPE = {"good": "success", "bad": "warning", "active": "info", "neutral": "info"}
_MIN_PIECE = 6  # a shorter "secret" is more often a word (`ops`, `chat`) than a token
_TAIL_MASK = re.compile(r".\.\.\..", re.S)  # how Apprise hides a token: first...last
_END_MASK = re.compile(r"\.\.\.([^.]{2,})", re.S)  # or by its end only (a Twilio SID: ...5678)
_HOST = (r"(localhost|[a-z0-9-]+(\.[a-z0-9-]+)*\.([a-z]{2,63}|xn--[a-z0-9-]+)"
         r"|\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\])")
_HOST_NAME = re.compile(_HOST + r"(:\d{1,5})?", re.IGNORECASE)
_EMAIL = re.compile(r"[^\s@<>]+@" + _HOST, re.IGNORECASE)
_REMEMBERED = 10_000  # deliveries whose partly successful fan-out is remembered


class _ScrubSecrets(logging.Filter):
    """Apprise logs hosts, paths and (at debug level) request details: scrub the records
    themselves, as every handler (not only the bridge's JSON one) may see them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(text), None
        return True


_SCRUB = _ScrubSecrets()


def load_apprise() -> Any:
    """The apprise module, with its logger scrubbed; ImportError names the extra to install."""
    try:
        import apprise
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    # urllib3 (under requests, under Apprise) logs request lines, path and all, at debug.
    for name in ("apprise", "urllib3.connectionpool"):
        logging.getLogger(name).addFilter(_SCRUB)  # a no-op when already added
    return apprise


def _parsable(url: SecretStr) -> SecretStr:
    try:
        apprise = load_apprise()
    except ImportError:
        return url  # reported once, for the whole list, below
    raw = url.get_secret_value()
    if not raw.strip():  # Apprise would log "Unsupported URL" at error level for nothing
        raise ValueError("an Apprise URL is empty; expected one such as ntfys://ntfy.sh/topic")
    # Apprise may log a URL it cannot parse; make sure that line is scrubbed.
    REDACTOR.add(*url_secrets(raw, None))  # its password, an ntfy topic: all of them
    if apprise.Apprise.instantiate(raw, asset=_asset(apprise)) is None:
        raise ValueError("Apprise does not understand this URL; see Apprise's list of "
                         "services for its syntax (the value is not shown: it holds "
                         "credentials)")
    return url


def _asset(apprise: Any) -> Any:
    # Memory only: the bridge keeps its state in the outbox, not in Apprise's cache files.
    try:
        return apprise.AppriseAsset(storage_mode="memory")
    except TypeError:  # Apprise before 1.9 has no persistent storage at all
        return apprise.AppriseAsset()


class AppriseSinkConfig(SinkConfigBase):
    type: Literal["apprise"]
    urls: list[Annotated[SecretStr, AfterValidator(_parsable)]] = Field(min_length=1)
    title: TemplateField | None = None
    body: TemplateField | None = None  # a route's `message` replaces it
    format: Literal["text", "markdown", "html"] = "text"  # what title and body are written in
    # One at a time keeps the notifications of a shipment in order.
    concurrency: int = Field(1, ge=1, le=1024, description="sends in flight at once")

    @field_validator("urls")
    @classmethod
    def _installed(cls, v: list[SecretStr]) -> list[SecretStr]:
        try:
            load_apprise()
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _burst(self) -> AppriseSinkConfig:
        problem = burst_problem(self, "Apprise")
        if problem:
            raise ValueError(problem)
        if self.probe_interval is not None:
            raise ValueError("probe_interval has no effect on an apprise sink: Apprise does not "
                             "tell an outage from a refusal, so the sink never goes down; "
                             "remove it")
        return self


class _Pieces(NamedTuple):
    """An Apprise URL taken apart by hand: Apprise reads `#channel` as a path segment and
    `tgram://123:token` as a token, where urllib sees a fragment and a bad port."""
    user: str
    password: str | None
    hostport: str
    path: list[str]
    query: list[tuple[str, str]]

    @classmethod
    def of(cls, url: str) -> _Pieces:
        rest = url.partition("://")[2] or url
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        netloc, tail = rest[:cut], rest[cut:]
        userinfo, at, hostport = netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        path, _, query = tail.partition("?")
        pairs = [(k, v) for k, _, v in (p.partition("=") for p in query.split("&") if p)]
        return cls(user, password if at and colon else None, hostport,
                   [s for s in path.split("/") if s], pairs)

    def shown(self) -> list[str]:
        """Every value, decoded: what a privacy form lets through (or its masks)."""
        host = self.hostport.partition(":")[0]
        return [unquote(p) for p in (self.user, self.password or "", self.hostport, host,
                                     *self.path, *(v for _, v in self.query)) if p]


def url_secrets(url: str, private_form: str | None) -> list[str]:
    """The URL and its credentials, each as written and decoded: the password; query values
    under a credential's name (`?token=`, `+Authorization=`); each piece Apprise's privacy
    form hides; and long path segments (an ntfy topic, a token in a json:// path), which
    Apprise shows. Every secret is masked in all the bridge prints, so never a scheme, a
    parameter name, a host name or an address, nor a piece shorter than _MIN_PIECE."""
    mine = _Pieces.of(url)
    out = {url, *_forms(mine.password)}
    for key, value in mine.query:
        if value and _credential_name(key):
            out.update(_credential_forms(value))
    if private_form is not None:
        out.update(*(_forms(p) for p in _hidden(mine, _Pieces.of(private_form))))
    out.update(*(_forms(s) for s in mine.path
                 if len(unquote(s)) >= 12 and not _public(unquote(s))))
    return sorted(out)


def _hidden(mine: _Pieces, private: _Pieces) -> list[str]:
    """Pieces of the URL its privacy form does not repeat but masks: `a...z` (first and last
    character shown), `...5678` (the end only) or `****`. The form may be another spelling
    of the same URL (discord's https:// link becomes discord://id/token), so pieces are
    matched by value, not place."""
    shown = private.shown()
    seen = {p.casefold() for p in shown} | {p.lstrip("#@+").casefold() for p in shown}
    tails = {(p[0], p[-1]) for p in shown if _TAIL_MASK.fullmatch(p)}
    ends = [m.group(1) for p in shown if (m := _END_MASK.fullmatch(p))]
    # A `****` stands for the password or a value under a credential's name (both taken
    # already); any other for a key shown only as stars.
    stars = shown.count("****") - (mine.password is not None) - sum(
        1 for k, v in mine.query if v and _credential_name(k))
    out: list[str] = []
    host, _, port = mine.hostport.partition(":")
    for piece in (mine.user, mine.hostport, host, *mine.path, *(v for _, v in mine.query)):
        plain = unquote(piece)
        if len(plain) < _MIN_PIECE or plain.lstrip("#@+").casefold() in seen:
            continue
        if ((plain[0], plain[-1]) in tails or (stars > 0 and not _public(plain))
                or any(plain.endswith(end) and plain != end for end in ends)):
            out.append(piece)
            # A bot token `id:secret` in the host's place: its secret half leaks alone too.
            if piece == mine.hostport and len(port) >= _MIN_PIECE and not port.isdigit():
                out.append(port)
    return out


def _credential_name(key: str) -> bool:
    # Apprise's prefixes: `+` a header, `-` a GET parameter, `:` a payload field.
    name = unquote(key).lstrip("+-:")
    return names_a_credential(name) or name.lower() == "code"  # `code`: Azure's function key


def _credential_forms(value: str) -> set[str]:
    """A value under a credential's name, and the token after a scheme word (`Bearer x`);
    kept if all digits, but never a plain word (ntfy's `?auth=token` names a mode)."""
    out: set[str] = set()
    for v in _forms(value):
        out |= {v, v.partition(" ")[2].strip()} if " " in v.strip() else {v}
    return {v for v in out if v and (v.isdigit() or not is_plain(v))}


def _forms(piece: str | None) -> set[str]:
    return {piece, unquote(piece), unquote_plus(piece)} if piece else set()


def _public(piece: str) -> bool:
    """A host name, an IP address or an e-mail address: said in plenty of ordinary text."""
    return bool(_HOST_NAME.fullmatch(piece) or _EMAIL.search(piece))


def default_title(s: Summary) -> str:
    return s.headline


def default_body(s: Summary) -> str:
    lines = [f"{k}: {cut(v, DESCRIPTION_LIMIT)}" for k, v in s.facts(with_status=False)]
    if s.error:
        lines.append(f"Error: {s.error}")
    if s.url:
        lines.append(f"{'Track' if s.kind == 'tracking' else 'Link'}: {s.url}")
    return "\n".join(lines) or s.headline


class AppriseSink(Sink):
    type_name = "apprise"
    reports_unreachable = False  # Apprise says only that a notification failed
    config_model = AppriseSinkConfig
    config: AppriseSinkConfig

    def __init__(self, name: str, config: AppriseSinkConfig) -> None:
        super().__init__(name, config)
        self._urls = [u.get_secret_value() for u in config.urls]
        self._targets: list[apprise_module.Apprise] | None = None
        self._services: list[str] = ["?"] * len(self._urls)
        self._secrets = list(self._urls)
        with contextlib.suppress(ImportError):  # validation reports it; `send` says it again
            self._load()
        REDACTOR.add(*self._secrets)
        # delivery id -> indexes of URLs already notified, so a retry skips them
        self._done: OrderedDict[str, set[int]] = OrderedDict()
        self._scope = f"apprise:{name}"

    def _load(self) -> list[apprise_module.Apprise]:
        if self._targets is None:
            apprise = load_apprise()
            targets, secrets = [], []
            for i, url in enumerate(self._urls):
                obj = apprise.Apprise(asset=_asset(apprise))
                plugin = obj[0] if obj.add(url) else None
                self._services[i] = getattr(plugin, "service_name", None) or "?"
                secrets += url_secrets(url, plugin.url(privacy=True) if plugin else None)
                targets.append(obj)
            self._targets, self._secrets = targets, secrets
        return self._targets

    def render(
        self, ctx: RenderContext, route: str, delivery_id: str, message: Template | None
    ) -> dict[str, str]:
        s = summarize(ctx, route)
        html_out = self.config.format == "html"
        body_t = message or self.config.body
        variables = ctx.vars(route, delivery_id)
        if body_t is not None:
            body = (as_html(body_t) if html_out else body_t).render(variables)
        else:
            body = default_body(s)
            body = html.escape(body, quote=False).replace("\n", "<br/>\n") if html_out else body
        if self.config.title is not None:
            title = (as_html(self.config.title) if html_out else self.config.title).render(
                variables)
        else:
            title = html.escape(default_title(s), quote=False) if html_out else default_title(s)
        if not body.strip():
            raise TemplateRenderError("apprise: the body rendered empty; Apprise sends nothing "
                                      "without a body")
        return {"title": title.strip(), "body": body, "type": _NOTIFY_TYPE[s.tone]}

    def secrets(self) -> list[str]:
        return self._secrets

    async def send(self, delivery: Delivery) -> None:
        try:
            targets = self._load()
        except ImportError as exc:
            raise PermanentSinkError(str(exc), "config_error") from None
        done = await self._already_notified(delivery)
        todo = [i for i in range(len(targets)) if i not in done]
        results = await asyncio.gather(*(self._notify(targets[i], delivery) for i in todo))
        failed = [i for i, ok in zip(todo, results, strict=True) if not ok]
        if not failed:
            self._done.pop(delivery.id, None)
            return
        done = done | (set(todo) - set(failed))
        self._done[delivery.id] = done
        self._done.move_to_end(delivery.id)
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)
        if self.memory is not None and done:
            # Kept in storage too: a restarted bridge must not notify those URLs again.
            await self.memory.remember(self._scope, delivery.id, json.dumps(sorted(done)),
                                       time.time())
        which = ", ".join(f"urls[{i}] ({self._services[i]})" for i in failed)
        raise TransientSinkError(
            f"apprise: {len(failed)} of {len(targets)} notifications failed: {which}; "
            "Apprise's log lines say why", "server_error")

    async def _already_notified(self, delivery: Delivery) -> set[int]:
        """URLs (by index) an earlier attempt of this delivery reached."""
        if delivery.id in self._done:
            return self._done[delivery.id]
        if delivery.attempts <= 1 or self.memory is None:
            return set()  # a first attempt: nothing reached yet, nothing to look up
        stored = await self.memory.recall(self._scope, delivery.id)
        return set(json.loads(stored)) if stored else set()

    async def _notify(self, target: apprise_module.Apprise, delivery: Delivery) -> bool:
        p = delivery.payload
        kwargs: dict[str, Any] = {"body": p["body"], "title": p.get("title", ""),
                                  "notify_type": p.get("type", "info"),
                                  "body_format": self.config.format}
        try:
            # async_notify runs each service's blocking send in the loop's executor; old
            # Apprise versions without it get a thread of their own.
            if hasattr(target, "async_notify"):
                ok = await target.async_notify(**kwargs)
            else:
                ok = await asyncio.to_thread(target.notify, **kwargs)
        except Exception as exc:  # a plugin's bug must not escape as an unexpected error
            log.warning("apprise raised", extra={"sink": self.name, "delivery_id": delivery.id,
                                                 "error": redact(repr(exc))})
            return False
        return ok is True
