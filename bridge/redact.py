"""Secrets are registered once at load and scrubbed from every log line and stored reason."""

from __future__ import annotations

import base64
import itertools
import re
import threading
from urllib.parse import unquote, unquote_plus, urlsplit

MASK = "********"
# A webhook path segment this long is taken for a token (a secret), and masked as one.
TOKEN_SEGMENT = 16

# Names under which credentials travel: header names, URL query keys, environment variable
# names; after Sentry's default scrubbing list. `X-Author`, `ISENDU_KEY_ID`, `SESSION_TIMEOUT`,
# `JWT_ISSUER` and `PWD` (a folder) are not among them; `X-Api-Key`, `SHOP_TOKEN`,
# `SMTP_PASS`, `DB_PWD`, `X-Session-Id`, `SENTRY_DSN` and `SLACK_WEBHOOK_URL` are.
_CREDENTIAL_NAME = re.compile(
    r"authori[sz]ation|(^|[-_])auth($|[-_])|token|secret|passw|(^|[-_])pass($|[-_])|"
    r"(^|[-_])pw($|[-_])|[-_]pwd($|[-_])|api[-_]?key|private[-_]?key|(^|[-_])key($|[-_])|"
    r"credential|cookie|session[-_]?(id|token|key)|signature|(^|[-_])sig($|[-_])|"
    r"(^|[-_])(dsn|jwt|hmac)$|hook[-_]?url$",
    re.IGNORECASE)
# ...unless the name says it holds something about the credential, not the credential:
# `ISENDU_API_KEY_ID`, `X-Signature-Algorithm`, `X-Auth-Enabled`, `SMTP_AUTH_USER`, `TOKEN_TTL`.
_ABOUT_A_CREDENTIAL = re.compile(
    r"[-_](id|algorithm|alg|enabled|version|type|method|scheme|header|name|user|username|"
    r"login|email|mail|from|host|port|ttl|timeout|expires?|lifetime|rate|limit|url)$",
    re.IGNORECASE)
# ...yet a session id and a webhook URL are credentials themselves (`TOKEN_URL` is not).
_CREDENTIAL_ITSELF = re.compile(r"session[-_]?id$|hook[-_]?url$", re.IGNORECASE)

# Values a guess (a variable's name) must not turn into secrets: `${TOKEN_TTL:-3600}`,
# `${AUTH_ENABLED:-true}`, `${AUTH_TIMEOUT:-120s}` or `${TOKEN_RATE:-100/10s}` would
# otherwise mask every "3600", "true", "120s" or "100/10s" in every log line. A long run of
# digits (a numeric token) is not plain.
_PLAIN = re.compile(
    r"\s*(\d{1,8}|[\d\s,+-]*[.:][\d\s.:,+-]*|"
    r"\d+(\.\d+)?\s*(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?)|"
    r"\d+(\.\d+)?\s*/\s*(\d+(\.\d+)?\s*)?[a-z]+|"
    r"true|false|none|null|yes|no|on|off|bearer|basic|token)?\s*",
    re.IGNORECASE)


def names_a_credential(name: str) -> bool:
    """Whether a header, query parameter or environment variable of this name carries one."""
    if not _CREDENTIAL_NAME.search(name):
        return False
    return not _ABOUT_A_CREDENTIAL.search(name) or bool(_CREDENTIAL_ITSELF.search(name))


def url_credentials(url: str) -> list[str]:
    """A URL's password and its query values under credential names (or `code`, Azure's
    function key), each as written and decoded: both forms can turn up in an error."""
    parts = urlsplit(url)
    out = [parts.password, unquote(parts.password)] if parts.password else []
    if parts.password:
        # aiohttp sends `user:password` from the URL as `Authorization: Basic <base64>`: a
        # receiver echoing its request headers shows that form (aiohttp encodes latin-1).
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password)}"
        out.append(base64.b64encode(pair.encode("latin-1", "replace")).decode())
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if value and (names_a_credential(unquote_plus(key)) or key.lower() == "code"):
            out += [value, unquote_plus(value)]
    return out


# A path segment that reads as a generated token, not a name: 16 or more of the characters
# tokens are written with (base64url, hex, UUIDs), a digit and a letter among them, and at
# least one of its `-`/`_`-separated parts not a word (letters, then at most 4 digits) nor a
# number of at most 4 digits. Make's `hook.eu1.make.com/<token>`, n8n's `/webhook/<uuid>`,
# Mattermost's `/hooks/<id>`, Discord's token are tokens; `isendu-events-v2`,
# `shipment_updates_2026` and `tracking-webhook-prod1` are names (the redactor would mask
# a sink or route called the same in every log line).
_TOKEN_CHARS = re.compile(r"(?=[A-Za-z_-]*\d)(?=[\d_-]*[A-Za-z])[A-Za-z0-9_-]{16,}")
_NAME_PART = re.compile(r"[A-Za-z]+\d{0,4}|\d{1,4}")


def _is_token(segment: str) -> bool:
    return bool(_TOKEN_CHARS.fullmatch(segment)) and not all(
        _NAME_PART.fullmatch(part) for part in re.split(r"[-_]+", segment) if part)


def url_path_tokens(url: str) -> list[str]:
    """The parts of a webhook URL that are its credential, beyond its query: a capability
    URL (whoever knows it may post) carries its secret in the path or the host. Segments
    shaped like tokens, and those of services known for theirs, whatever their shape:
    Slack's `/services/<team>/<bot>/<token>`, Zapier's `/hooks/catch/<account>/<hook>/`
    (the hook, 6-8 characters), IFTTT's `/with/key/<key>` and Pipedream's
    `<endpoint>.m.pipedream.net`. Each as written and decoded. A name chosen by hand (an
    n8n path such as `/webhook/isendu-parcels`) cannot be told from any other path."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    out = [s for s in segments if _is_token(unquote(s))]
    host = (parts.hostname or "").lower()
    if host == "hooks.slack.com" and len(segments) >= 4 and segments[0] == "services":
        out.append(segments[3])
    if host == "hooks.zapier.com" and len(segments) >= 4 and segments[0] == "hooks":
        out.append(segments[3])  # /hooks/catch/... and /hooks/catch/.../silent/
    if host == "maker.ifttt.com":
        out += [b for a, b in itertools.pairwise(segments) if a == "key"]
    if host.endswith(".m.pipedream.net"):
        out.append(host.split(".", 1)[0])
    return list(dict.fromkeys(v for s in out for v in (s, unquote(s))))


def is_plain(value: str) -> bool:
    """A number, duration, rate, boolean or scheme word: never a secret by itself."""
    return bool(_PLAIN.fullmatch(value))


class Redactor:
    """Masks every registered secret in any letter case: receivers echo what they were
    sent lower-cased (`bearer secrettoken123abc`) or upper-cased, and a mask that needs
    the exact case would let those through."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        # (each secret case-folded, one case-blind pattern), swapped in as one object so a
        # log line written meanwhile sees both old or both new.
        self._matcher: tuple[tuple[str, ...], re.Pattern[str]] | None = None
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        # Very short values would blank out ordinary words; four characters is the floor.
        new = {s for s in secrets if s and len(s) >= 4}
        with self._lock:
            merged = set(self._secrets) | new
            # Longest first: of `Bearer tok` and `tok`, the whole is masked, not `Bearer `
            # left in front of the mask.
            self._secrets = tuple(sorted(merged, key=lambda s: (-len(s), s)))
            self._matcher = (
                tuple({s.casefold() for s in self._secrets}),
                re.compile("|".join(map(re.escape, self._secrets)), re.IGNORECASE),
            ) if self._secrets else None

    def add_guessed(self, *values: str | None) -> None:
        """Values that are secrets by the name they came under, not by their declared
        type: numbers and plain words are skipped, and the value is taken stripped."""
        self.add(*(v.strip() for v in values if v and not is_plain(v)))

    def clear(self) -> None:
        with self._lock:
            self._secrets = ()
            self._matcher = None

    def __call__(self, text: str) -> str:
        # Every log line passes here: a case-folded substring test per secret is ~10x
        # cheaper than the case-blind regex, which runs only when one may be present.
        # casefold maps character by character, so an exact-case match is always found.
        matcher = self._matcher
        if matcher is None:
            return text
        folded, pattern = matcher
        lowered = text.casefold()
        if not any(secret in lowered for secret in folded):
            return text
        return pattern.sub(MASK, text)


REDACTOR = Redactor()


def redact(text: str) -> str:
    return REDACTOR(text)
