"""Secrets are registered once at load and scrubbed from every log line and stored reason."""

from __future__ import annotations

import re
import threading

MASK = "********"

# Names under which credentials travel: header names, URL query keys, environment variable
# names. The same idea as Sentry's default scrubbing list; a name that merely mentions a key
# ("X-Api-Key", "SLACK_TOKEN", "access_token", "sig") counts.
_CREDENTIAL_NAME = re.compile(
    r"auth|token|secret|passw|passwd|pwd|api[-_]?key|apikey|private[-_]?key|credential|"
    r"cookie|session|signature|(^|[-_])sig($|[-_])|(^|[-_])key($|[-_])", re.IGNORECASE)


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
