"""Secrets are registered once at load and scrubbed from every log line and stored reason."""

from __future__ import annotations

import re
import threading

MASK = "********"

# Names under which credentials travel: header names, URL query keys, environment variable
# names; after Sentry's default scrubbing list. `X-Author`, `ISENDU_KEY_ID`, `SESSION_TIMEOUT`,
# `JWT_ISSUER` and `PWD` (a folder) are not among them; `X-Api-Key`, `SHOP_TOKEN`,
# `SMTP_PASS`, `DB_PWD`, `X-Session-Id`, `SENTRY_DSN` and `SLACK_WEBHOOK_URL` are.
_CREDENTIAL_NAME = re.compile(
    r"authori[sz]ation|(^|[-_])auth($|[-_])|token|secret|passw|(^|[-_])pass($|[-_])|"
    r"(^|[-_])pw($|[-_])|[-_]pwd($|[-_])|api[-_]?key|apikey|private[-_]?key|"
    r"(^|[-_])key($|[-_](?!id$))|credential|cookie|session[-_]?(id|token|key)|signature|"
    r"(^|[-_])sig($|[-_])|(^|[-_])(dsn|jwt|hmac)$|hook[-_]?url$",
    re.IGNORECASE)

# Values a guess (a variable's name) must not turn into secrets: `${TOKEN_TTL:-3600}`,
# `${AUTH_ENABLED:-true}` or `${AUTH_TIMEOUT:-120s}` would otherwise mask every "3600",
# "true" or "120s" in every log line.
_PLAIN = re.compile(
    r"[\d\s.:,+-]*|\d+(\.\d+)?\s*(ms|s|m|min|h|d)|\d+(\.\d+)?/(s|m|min|h)|"
    r"true|false|none|null|yes|no|on|off|bearer|basic|token",
    re.IGNORECASE)


def names_a_credential(name: str) -> bool:
    """Whether a header, query parameter or environment variable of this name carries one."""
    return bool(_CREDENTIAL_NAME.search(name))


class Redactor:
    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        # Very short values would blank out ordinary words; four characters is the floor.
        new = {s for s in secrets if s and len(s) >= 4}
        with self._lock:
            merged = set(self._secrets) | new
            self._secrets = tuple(sorted(merged, key=len, reverse=True))

    def add_guessed(self, *values: str | None) -> None:
        """Values that are secrets by the name they came under, not by their declared
        type: numbers and plain words are skipped, and the value is taken stripped."""
        self.add(*(v.strip() for v in values if v and not _PLAIN.fullmatch(v.strip())))

    def clear(self) -> None:
        with self._lock:
            self._secrets = ()

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


REDACTOR = Redactor()


def redact(text: str) -> str:
    return REDACTOR(text)
