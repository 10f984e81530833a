"""Logs: one JSON object a line, every line scrubbed of registered secrets."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from bridge.errors import StorageUnwritable
from bridge.redact import redact

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(out, default=str).decode()
        except TypeError:  # an integer past 64 bits, say
            line = json.dumps(out, ensure_ascii=False, default=str)
        return redact(line)


class MalformedRequests(logging.Filter):
    """aiohttp logs an HTTP request it cannot even parse (`Content-Length: -1`, chunked plus
    a length) as an error with a traceback: anyone who can reach the port could fill the
    log with them. They become one info line saying what was wrong; the client got a 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # RequestPayloadError: a body it could not decompress, met again while aiohttp
        # drains what is left of it after our 400.
        if (isinstance(exc, HttpProcessingError) and exc.code == 400) or isinstance(
                exc, RequestPayloadError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "refused malformed HTTP request", ()
            record.error = " ".join(str(getattr(exc, "message", exc)).split())[:200]
            record.status = 400
            record.exc_info = record.exc_text = None
            # Checked again: the level was checked as ERROR before this filter ran.
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class Repeats(logging.Filter):
    """A driver retrying in a loop logs the same line on every turn: aiokafka, while a
    broker is away, several lines every retry_backoff_ms (100 ms). Of such a library's
    identical lines one passes per `window`; the next to pass says in `repeated` how many
    were left out. The bridge's own lines pass, but for POSTs to an unknown path
    (`bridge.http.paths`): anyone can send those, even to a bridge whose webhook path holds
    a secret, and one a minute is enough to show that isendu is posting to the wrong place;
    and for batches refused while storage takes no writes (`bridge.http.storage`), which
    isendu sends again and again until it does."""

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka", "bridge.http.paths",
                                                    "bridge.http.storage"),
                 window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, remembered: int = 256) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window = window
        self.clock = clock
        self.remembered = remembered
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.getMessage())
        now = self.clock()
        with self._lock:
            passed_at, left_out = self._seen.get(key, (-float("inf"), 0))
            if now - passed_at < self.window:
                self._seen[key] = (passed_at, left_out + 1)
                return False
            if left_out:
                record.repeated = left_out
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > self.remembered:
                self._seen.popitem(last=False)
        return True


def log_failure(logger: logging.Logger, message: str, exc: BaseException,
                extra: dict[str, Any] | None = None) -> None:
    """An error line for an operation that failed (called in its `except`): with the
    traceback, unless storage cannot take writes now (a full disk, a lost file). That is no
    bug, and its reason says all; a traceback a second would bury it."""
    if isinstance(exc, StorageUnwritable):
        logger.error(message, extra={**(extra or {}), "error": str(exc)})
    else:
        logger.error(message, exc_info=exc, extra=extra)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # it would log the secret webhook path
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests())
