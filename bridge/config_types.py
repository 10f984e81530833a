"""Small typed building blocks of routes.yaml, shared by config.py and each sink's config.

They live apart from config.py so that a sink module can declare its own config model
without importing the whole config (which imports the sink registry).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
)

from bridge.templates import Template, compile_template

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`500ms`, `30s`, `10m`, `24h`, `7d` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 30s, 10m, 24h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(
            f"expected a duration like 500ms, 30s, 10m, 24h or a number of seconds, got {value!r}"
        )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20,
               "GB": 10**9, "GiB": 2**30}


def parse_size(value: Any) -> int:
    """`1048576`, `512KiB`, `1MiB`, `2MB` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"expected a size in bytes such as 1048576, 512KiB or 1MiB, got {value!r}")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds}s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _template(value: Any) -> Template:
    if isinstance(value, Template):
        return value
    return compile_template(value)


TemplateField = Annotated[Template, BeforeValidator(_template), PlainSerializer(str)]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in routes.yaml must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any) -> float | None:
    """`1/s`, `20/min`, `4/s`, `100/10s`, `off` -> messages per second (None: unlimited)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, str) and (m := _RATE.match(value)):
        count, per, unit = float(m.group(1)), float(m.group(2) or 1), _RATE_UNITS[m.group(3)]
        if count > 0:
            return count / (per * unit)
    raise ValueError(f"expected a rate such as 1/s, 20/min or 100/10s (or off), got {value!r}")


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "off"
    if rate >= 1 and rate == int(rate):
        return f"{int(rate)}/s"
    per_minute = rate * 60
    return f"{per_minute:g}/min"


Rate = Annotated[float | None, BeforeValidator(parse_rate), PlainSerializer(format_rate)]


class RetryPolicy(StrictModel):
    max_attempts: int = Field(10, ge=1, description="attempts before a delivery is dead")
    initial_delay: Duration = 1.0
    max_delay: Duration = 600.0
    max_age: Duration = 86400.0


MAX_PROBE_INTERVAL = 3600.0


class SinkConfigBase(StrictModel):
    """Options every sink type has."""

    type: str  # each sink type narrows this to its Literal name
    concurrency: int = Field(8, ge=1, le=1024, description="sends in flight at once")
    retry: RetryPolicy | None = None  # overrides defaults.retry for this sink
    # Unset: the service's documented pace (each sink type knows it); `off`: no limit.
    rate_limit: Rate = Field(None, validate_default=False)
    burst: int | None = Field(None, ge=1, le=10_000)
    # While the sink is down (bridge/dispatch/breaker.py): one probe send this often. Unset:
    # from the retry policy's initial_delay, doubling up to its max_delay. At most an hour,
    # so a receiver that came back never waits longer than that for its backlog.
    probe_interval: Duration | None = None

    @field_validator("probe_interval")
    @classmethod
    def _probe_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= MAX_PROBE_INTERVAL:
            raise ValueError(f"expected a duration above 0 and at most "
                             f"{format_duration(MAX_PROBE_INTERVAL)}, got "
                             f"{format_duration(v) if v else '0s'}")
        return v
