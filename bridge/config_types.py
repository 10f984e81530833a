"""Small typed building blocks of routes.yaml, shared by config.py and each sink's config.

They live apart from config.py so that a sink module can declare its own config model
without importing the whole config (which imports the sink registry).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from bridge.templates import Template, compile_template

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`500ms`, `30s`, `10m`, `24h`, `7d` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 30s, 10m, 24h or a number of seconds")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    # YAML's .nan and .inf are floats, and so is a string of 309 digits: no time to wait.
    if seconds is None or not math.isfinite(seconds):
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
    """`1048576`, `512KiB`, `1MiB`, `2MB` -> bytes, above 0: every size the config has is a
    limit, and a limit of 0 refuses everything (a max_body_bytes of 0 answers every request
    413). The rule holds however 0 is spelt: `0`, `"0"`, `"0KiB"`, a variable holding 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(
            f"expected a size in bytes such as 1048576, 512KiB or 1MiB, got {value!r}")
    if size <= 0:
        raise ValueError(
            f"expected a size above 0 bytes, such as 1048576, 512KiB or 1MiB; got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds}s"


def _above_zero(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("expected a duration above 0, such as 30s, 10m or 24h; got 0s")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
# For a time that must pass before something happens or is forgotten: 0 would mean at once,
# which no such setting means (a timeout of 0 is none at all to aiohttp, a retention of 0
# forgets what it keeps for, a max_age of 0 dead-letters at the first failure).
PositiveDuration = Annotated[Duration, AfterValidator(_above_zero)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _template(value: Any) -> Template:
    if isinstance(value, Template):
        return value
    return compile_template(value)


TemplateField = Annotated[Template, BeforeValidator(_template), PlainSerializer(str)]


def refuse_each(problems: list[str]) -> None:
    """Raise every problem a validator found as an error of its own, so each is its own
    line of the config errors (pydantic takes a ValidationError raised in a validator as
    that many errors, at the validator's place); a ValueError would carry only one."""
    if problems:
        raise ValidationError.from_exception_data("config", [
            InitErrorDetails(type="value_error", loc=(), input=None,
                             ctx={"error": ValueError(problem)})
            for problem in problems])


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
    # YAML reads an unquoted `off` (or `no`) as false: what was written is off. `true`
    # names no rate and stays an error.
    if value is False:
        return None
    if isinstance(value, str) and (m := _RATE.match(value)):
        count, per, unit = float(m.group(1)), float(m.group(2) or 1), _RATE_UNITS[m.group(3)]
        if count > 0 and per > 0:  # `5/0s` is no rate: it would divide by zero
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


DEFAULT_INITIAL_DELAY = 1.0
DEFAULT_MAX_DELAY = 600.0


class RetryPolicy(StrictModel):
    max_attempts: int = Field(10, ge=1, description="attempts before a delivery is dead")
    # 0 is allowed: retried at once, every time (the breaker keeps its probes apart).
    initial_delay: Duration = DEFAULT_INITIAL_DELAY
    # Checked even when left out (validate_default), against an initial_delay written longer.
    max_delay: Duration = Field(DEFAULT_MAX_DELAY, validate_default=True)
    max_age: PositiveDuration = 86400.0

    @model_validator(mode="before")
    @classmethod
    def _default_follows_the_written(cls, data: Any) -> Any:
        """One delay written, the other left to its default: the default gives way
        (`initial_delay: 15m` alone waits 15m each time; `max_delay: 0` alone retries at
        once), where only two written ones that contradict each other are refused."""
        if not isinstance(data, dict) or ("initial_delay" in data) == ("max_delay" in data):
            return data
        try:
            written = parse_duration(data.get("initial_delay", data.get("max_delay")))
        except (ValueError, TypeError):
            return data  # its own check says what is wrong
        if "initial_delay" in data and written > DEFAULT_MAX_DELAY:
            return {**data, "max_delay": data["initial_delay"]}
        if "max_delay" in data and written < DEFAULT_INITIAL_DELAY:
            return {**data, "initial_delay": data["max_delay"]}
        return data

    @field_validator("max_delay")
    @classmethod
    def _delays(cls, v: float, info: ValidationInfo) -> float:
        # A field validator, not a model one: it runs beside max_age's own check, so both
        # are reported at once. tenacity caps every wait at max_delay: an initial_delay
        # above it would never be waited.
        initial = info.data.get("initial_delay")  # absent: it failed its own check
        if initial is not None and initial > v:
            raise ValueError(
                f"initial_delay {format_duration(initial)} is longer than max_delay "
                f"{format_duration(v) if v else '0s'}; expected initial_delay at most "
                "max_delay (a wait starts at initial_delay and doubles up to max_delay), "
                "e.g. initial_delay: 1s, max_delay: 10m")
        return v


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

    @model_validator(mode="after")
    def _burst_beside_off(self) -> SinkConfigBase:
        # Here, for every sink type: `off` replaces a service's own pace too (Slack's 1/s),
        # so a burst has no bucket to size. Whether a sink without `rate_limit` has a pace
        # for `burst` to widen, each type says (chat.burst_problem).
        if (self.burst is not None and "rate_limit" in self.model_fields_set
                and self.rate_limit is None):
            raise ValueError("burst has no effect with rate_limit: off; remove one of them")
        return self

    @field_validator("probe_interval")
    @classmethod
    def _probe_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= MAX_PROBE_INTERVAL:
            raise ValueError(f"expected a duration above 0 and at most "
                             f"{format_duration(MAX_PROBE_INTERVAL)}, got "
                             f"{format_duration(v) if v else '0s'}")
        return v


def what_was_given(value: Any, secret: bool) -> str:
    """What was written, for `got ...` in config errors: the value, or only its kind where
    it may be a credential."""
    if value is None:
        return "no value"  # `key:` with nothing after it
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, bool):
        return str(value).lower()
    if secret:
        return "a number" if isinstance(value, int | float) else "a string"
    return repr(value)
