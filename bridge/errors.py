"""One hierarchy for everything the bridge refuses or fails at."""

from __future__ import annotations

import math
from typing import Literal

# A closed set, so dashboards and dead-letter reasons stay comparable across sinks.
FailureKind = Literal[
    "auth_error", "rate_limited", "client_error", "server_error", "timeout", "connection_error",
    "template_error", "config_error", "broker_error",
]


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """routes.yaml is wrong. Holds every problem found, each speaking to a person."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class PayloadError(BridgeError):
    """An isendu request the bridge refuses (HTTP 400); nothing of it is stored."""

    def __init__(self, message: str, where: str = "$") -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}")


class TemplateRenderError(BridgeError):
    """A template failed for one item; that one delivery is dead-lettered."""


class SinkError(BridgeError):
    """A send failed. The message must never contain a secret."""

    def __init__(self, reason: str, kind: FailureKind = "client_error") -> None:
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


class TransientSinkError(SinkError):
    """Worth retrying later. `retry_after` (seconds) is the receiver's own hint, if any."""

    def __init__(
        self, reason: str, kind: FailureKind = "server_error", retry_after: float | None = None,
        *, status: int | None = None,
    ) -> None:
        super().__init__(reason, kind)
        # A hint that is no time (inf, nan, below zero) is no hint: backoff applies.
        usable = retry_after is not None and math.isfinite(retry_after) and retry_after >= 0
        self.retry_after = retry_after if usable else None
        self.status = status  # the receiver's HTTP status (or a service's code), if it answered


class PermanentSinkError(SinkError):
    """Retrying cannot help; the delivery goes to the dead-letter queue at once."""


# A gateway in front of the receiver saying the receiver is away (Bad Gateway, Service
# Unavailable, Gateway Timeout); a plain 500 is the receiver itself failing one request.
GATEWAY_STATUSES = frozenset({502, 503, 504})


def says_unreachable(error: SinkError) -> bool:
    """Whether `error` says the receiver as a whole is away, not that it failed this one send:
    no connection (refused, reset, DNS), no answer in time, or a gateway's 502/503/504.

    The one place the circuit breaker (bridge/dispatch/breaker.py) learns this from: a sink
    reports failures with these kinds, and whatever it does not classify so counts as the
    receiver answering.
    """
    if not isinstance(error, TransientSinkError):
        return False
    if error.kind == "connection_error":
        return True
    if error.kind == "timeout":
        return error.status is None  # a 408 is an answer: the receiver is there
    return error.kind == "server_error" and error.status in GATEWAY_STATUSES


class StorageError(BridgeError):
    """Storage cannot be used; the message names the setting, the cause and what to do."""


class StorageInUse(StorageError):
    """Another process serves this storage."""


class StorageUnavailable(StorageError):
    """The storage could not be opened (a missing folder, an unreachable PostgreSQL...)."""


class StorageUnwritable(StorageError):
    """Storage is open but cannot take writes now. The message is for anyone (it is the
    intake's 503 and /readyz's reason): it names no path or host. `uncertain`: the write
    may have been done all the same (a connection lost while the server committed)."""

    def __init__(self, message: str, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain


class StorageFull(StorageUnwritable):
    """The disk, or the database's own size limit, is full: writes fail until room is made."""


class StorageFileGone(StorageUnwritable):
    """The SQLite file the bridge has open is no longer the file at its path (deleted, or
    replaced): what is written now would be lost at the next start."""
