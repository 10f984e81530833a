"""routes.yaml: strict pydantic models, loading, and the cross-checks pydantic cannot do alone.

Every problem is reported as `<file>:<line>: <key path>: <what is wrong; what was expected>`,
all problems at once, and the bridge refuses to start.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, Union

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from bridge.config_types import (
    ByteSize,
    PositiveDuration,
    RetryPolicy,
    SinkConfigBase,
    StrictModel,
    TemplateField,
    format_duration,
    what_was_given,
)
from bridge.errors import ConfigError
from bridge.models import Kind
from bridge.outbox.base import LEASE_SECONDS, LEASE_SHARE, lease_for
from bridge.routing import conditions as cond
from bridge.sinks import SINK_TYPES
from bridge.yamlsource import KeyPath, Source, format_path, load_yaml, variables_in

DEFAULT_CONFIG_PATH = "config/routes.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ServerConfig(StrictModel):
    listen: str = "0.0.0.0:8080"
    webhook_path: str = "/isendu/webhook"
    max_body_bytes: ByteSize = 1 << 20
    # Batches being accepted at once; more wait their turn. Every one in progress lengthens
    # the event loop's turns, and a verification request waits for turns.
    # Batches accepted at once. The intake waits for its inbox row's commit, so this is how
    # many rows one commit can carry: at 8, commits of up to 8 rows capped a burst.
    intake_concurrency: int = Field(32, ge=1, le=1024)
    # A client must send a request's headers and body within this (the time its body waits
    # for an intake slot does not count): a slow or stalled sender holds nothing longer.
    read_timeout: PositiveDuration = 30.0
    # An open connection with no request in progress is closed after this.
    keepalive_timeout: PositiveDuration = 75.0
    # Connections open at once; one more is answered 503 and closed.
    max_connections: int = Field(512, ge=1, le=65536)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("webhook_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or " " in v:
            raise ValueError("expected a URL path starting with '/', e.g. /isendu/webhook")
        if v in ("/healthz", "/readyz", "/metrics"):
            raise ValueError(f"{v} is the bridge's own endpoint; choose another webhook_path")
        return v

    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")  # `_`: compose service names


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` -> (host, port). The host is an IPv4 address, a host name or a bracketed
    IPv6 address; none is every address. Refused here rather than by the first bind: an
    address holding a second ':' (`127.0.0.1:${P}` with P=127.0.0.1:8081) is no host."""
    host, colon, port = value.rpartition(":")
    problem = None
    if not colon:
        problem = "no ':' between host and port"
    elif not re.fullmatch(r"\d{1,5}", port):
        problem = "no port after the ':'"
    elif not 0 < int(port) < 65536:
        problem = "the port must be 1 to 65535"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ipv6(host):
            problem = f"{host!r} is not an IPv6 address"
    elif ":" in host:
        problem = (f"the host {host!r} holds a ':' (only an IPv6 address may, in brackets: "
                   "[::1]:8080)")
    elif host and not _is_host(host):
        problem = f"{host!r} is not an IP address or host name"
    if problem:
        raise ValueError("expected host:port such as 0.0.0.0:8080, 127.0.0.1:8080 or "
                         f"[::]:8080, got {value!r}: {problem}")
    return host or "0.0.0.0", int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_host(text: str) -> bool:
    """An IPv4 address, or a host name of letters, digits, '-' and '_'; digits and dots
    alone must make an IPv4 address (999.1.1.1 resolves to nothing)."""
    if re.fullmatch(r"[\d.]+", text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return False
        return True
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


class Integration(StrictModel):
    key_id: str = Field(min_length=1)
    secret: SecretStr

    @field_validator("key_id", mode="before")
    @classmethod
    def _key_id(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        # The verification answers {"response": <secret>}: an empty one is a variable set
        # to nothing (`ISENDU_SECRET=`), not a secret. The value itself is never shown.
        value = v.get_secret_value()
        if not value.strip():
            got = "an empty one" if not value else "only whitespace"
            raise ValueError("expected the API secret isendu gives with this key id, a "
                             f"non-empty string; got {got}")
        return v


class Defaults(StrictModel):
    retry: RetryPolicy = RetryPolicy()
    # How long delivered rows are kept: they let a repeated isendu item be recognised.
    delivered_retention: PositiveDuration = 7 * 86400.0
    # How long a sink's memory of an item (a shipment's Slack thread) is kept once written.
    state_retention: PositiveDuration = 90 * 86400.0
    # How long a sequenced batch is kept in the inbox (`bridge batches`); failed ones stay.
    inbox_retention: PositiveDuration = 7 * 86400.0


# ---- conditions ---------------------------------------------------------------------------

class Leaf(StrictModel):
    path: str
    equals: Any = None
    not_equals: Any = None
    in_: Any = Field(None, alias="in")
    not_in: Any = None
    matches: Any = None
    exists: Any = None
    gt: Any = None
    gte: Any = None
    lt: Any = None
    lte: Any = None
    contains: Any = None
    _predicate: cond.Predicate = PrivateAttr()

    # Field-level checks first, so an error points at the offending key's own line.
    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        cond.compile_path(v)
        return v

    @field_validator("matches")
    @classmethod
    def _regex(cls, v: Any) -> Any:
        cond.compile_leaf("x", "matches", v)
        return v

    @field_validator("in_", "not_in")
    @classmethod
    def _list(cls, v: Any, info: Any) -> Any:
        cond.compile_leaf("x", "in" if info.field_name == "in_" else "not_in", v)
        return v

    @model_validator(mode="after")
    def _compile(self) -> Leaf:
        ops = [f for f in self.model_fields_set if f != "path"]
        names = [("in" if f == "in_" else f) for f in ops]
        if len(ops) != 1:
            got = ", ".join(sorted(names)) or "none"
            raise ValueError(
                f"a condition needs exactly one operator next to `path` (got {got}); "
                f"expected one of: {', '.join(cond.OPS)}"
            )
        op = names[0]
        self._predicate = cond.compile_leaf(self.path, op, getattr(self, ops[0]))
        return self

    def predicate(self) -> cond.Predicate:
        return self._predicate


class AllOf(StrictModel):
    all: list[Condition] = Field(min_length=1)

    def predicate(self) -> cond.Predicate:
        return cond.all_of([predicate_of(c) for c in self.all])


class AnyOf(StrictModel):
    any: list[Condition] = Field(min_length=1)

    def predicate(self) -> cond.Predicate:
        return cond.any_of([predicate_of(c) for c in self.any])


class NotOf(StrictModel):
    not_: Condition = Field(alias="not")

    def predicate(self) -> cond.Predicate:
        return cond.not_(predicate_of(self.not_))


class ChangedOf(StrictModel):
    """`changed: status`: the field differs from the shipment's state (or first sight)."""

    changed: str
    _predicate: cond.Predicate = PrivateAttr()

    @field_validator("changed")
    @classmethod
    def _a_top_level_field(cls, v: str) -> str:
        # The state compares top-level fields, by name: a path or a nested name would be
        # true on first sight only, silently.
        if not v or v.startswith("$") or any(c in v for c in ".[]*"):
            raise ValueError(f"expected the name of a top-level field of the item, such as "
                             f"status or trackingUrl (the state compares those), got {v!r}")
        if v == "steps":
            raise ValueError("expected the name of a top-level field other than steps: "
                             "steps never seen are the snapshot's `new_steps` (a change, "
                             "for the state), not a field it compares")
        return v

    @model_validator(mode="after")
    def _compile(self) -> ChangedOf:
        self._predicate = cond.changed(self.changed)
        return self

    def predicate(self) -> cond.Predicate:
        return self._predicate


class FirstSeenOf(StrictModel):
    first_seen: bool

    def predicate(self) -> cond.Predicate:
        return cond.first_seen(self.first_seen)


class Transition(StrictModel):
    from_: Any = Field(None, alias="from")
    to: Any = None

    @model_validator(mode="after")
    def _check(self) -> Transition:
        if not self.model_fields_set:
            raise ValueError("`transition` needs `from:`, `to:` or both, each a status or a "
                             "list of statuses")
        cond.transition(**self._sides())
        return self

    def _sides(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.model_fields_set}


class TransitionOf(StrictModel):
    """`transition: {from: X, to: Y}`: `status` went from X to Y in this snapshot."""

    transition: Transition

    def predicate(self) -> cond.Predicate:
        return cond.transition(**self.transition._sides())


_TAGS: dict[type, str] = {AllOf: "all", AnyOf: "any", NotOf: "not", ChangedOf: "changed",
                          TransitionOf: "transition", FirstSeenOf: "first_seen", Leaf: "leaf"}


def _condition_tag(v: Any) -> str | None:
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        for key in ("all", "any", "not", "changed", "transition", "first_seen"):
            if key in v:
                return key
        return "leaf"
    return _TAGS.get(type(v))


# A recursive alias: pydantic resolves it lazily, which a plain Annotated alias cannot do.
if TYPE_CHECKING:
    Condition: TypeAlias = Any
else:
    Condition = TypeAliasType(
        "Condition",
        Annotated[
        Union[  # noqa: UP007 - a tagged union needs the explicit form
            Annotated[AllOf, Tag("all")],
            Annotated[AnyOf, Tag("any")],
            Annotated[NotOf, Tag("not")],
            Annotated[ChangedOf, Tag("changed")],
            Annotated[TransitionOf, Tag("transition")],
            Annotated[FirstSeenOf, Tag("first_seen")],
            Annotated[Leaf, Tag("leaf")],
            Annotated[list["Condition"], Tag("list")],
        ],
        Discriminator(
            _condition_tag,
            custom_error_type="condition",
            custom_error_message=(
                "expected a condition: {path: ..., <operator>: ...}, a list of conditions, "
                "one of all: / any: / not:, or changed: / transition: / first_seen:"
            ),
        ),
        ],
    )


def predicate_of(c: Any) -> cond.Predicate:
    if isinstance(c, list):
        return cond.all_of([predicate_of(x) for x in c]) if c else cond.always
    pred: cond.Predicate = c.predicate()
    return pred


# ---- routes and the whole file -------------------------------------------------------------

def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class GroupConfig(StrictModel):
    """Items routed to one sink within `window` go out as one digest message."""

    window: PositiveDuration = 30.0
    max_items: int = Field(20, ge=2, le=500)


class Route(StrictModel):
    name: str = Field(min_length=1)
    kind: Kind | None = None
    when: Condition | None = None
    to: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(min_length=1)
    message: Annotated[
        Union[  # noqa: UP007
            Annotated[TemplateField, Tag("one")],
            Annotated[dict[str, TemplateField], Tag("per_sink")],
        ],
        Discriminator(lambda v: "per_sink" if isinstance(v, dict) else "one"),
    ] | None = None
    group: GroupConfig | None = None
    stop: bool = False
    # What the shipment's state says of a snapshot (README, "What the bridge tells apart"):
    # a repeat brings nothing new and is not routed unless `dedupe: false`; a stale one is
    # older than what was seen and is skipped unless `stale: deliver`.
    dedupe: bool = True
    stale: Literal["skip", "deliver"] = "skip"
    # A shipment's changes sequenced within this window go out as one message (the last
    # one's, with every new step); a step with an error goes at once.
    coalesce: PositiveDuration | None = None

    @field_validator("when", mode="before")
    @classmethod
    def _when_not_empty(cls, v: Any) -> Any:
        # Called only for a `when:` that is written: left empty (its last condition
        # commented out, say) it would route every item, the opposite of what it was for.
        if v is None or v == []:
            raise ValueError("`when:` is empty; expected a condition such as "
                             "{path: $.status, equals: DELIVERED}, or no `when` at all to "
                             "route every item")
        return v

    @field_validator("coalesce")
    @classmethod
    def _coalesce_at_most_an_hour(cls, v: float | None) -> float | None:
        if v is not None and v > 3600:
            raise ValueError(f"expected a window of at most 1h (a shipment's changes held "
                             f"longer are stale news), got {format_duration(v)}")
        return v

    @model_validator(mode="after")
    def _coalesce_or_group(self) -> Route:
        if self.coalesce is not None and self.group is not None:
            raise ValueError("a route cannot both `group` (a digest of many shipments) and "
                             "`coalesce` (one shipment's changes as one message); choose one")
        return self


class StateConfig(StrictModel):
    """The shipment state the sequencer keeps (bridge/state.py)."""

    # false: every snapshot is routed as if seen for the first time (repeats are then only
    # recognised when byte-for-byte the same, by their delivery id).
    enabled: bool = True
    # Where an order carries its version (e.g. $.updatedAt, an ISO time or a number): an
    # order older than the one seen is stale. Unset: orders are never stale.
    order_version_path: str | None = None
    # A shipment's state is forgotten after this long without change.
    retention: PositiveDuration = 90 * 86400.0

    @field_validator("order_version_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None:
            cond.compile_path(v)
        return v


if TYPE_CHECKING:
    SinkConfig = SinkConfigBase
else:  # a union of every registered sink type's model, told apart by `type`
    SinkConfig = Annotated[
        Union[tuple(cls.config_model for cls in SINK_TYPES.values())],  # noqa: UP007
        Field(discriminator="type"),
    ]

STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "memory")
STORAGE_EXPECTED = (
    "expected a storage URL such as sqlite:///data/bridge.db (relative), "
    "sqlite:////var/lib/bridge/bridge.db (absolute), "
    "postgresql://user:password@host:5432/db (replicas) or memory:// (tests only)")


def storage_problem(url: str) -> str | None:
    """What keeps `url` from naming a store `from_url` can open, for people (None: nothing).
    A PostgreSQL URL is never repeated: it may hold a password."""
    scheme, slashes, rest = url.partition("://")
    if not slashes:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        if scheme in STORAGE_SCHEMES:
            shown = repr(url) if scheme in ("sqlite", "memory") else f"a {scheme}: URL"
            return f"{shown}, without // after '{scheme}:'"
    if scheme not in STORAGE_SCHEMES:
        # Only the scheme: what follows may be `user:password@` (from a variable, even).
        if not slashes:
            return "no scheme (nothing before ://)" if "@" in url or ":" in url else (
                f"{url!r}, which is no URL")
        return f"scheme {scheme!r}" if scheme else "an empty scheme (nothing before ://)"
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest  # as from_url reads it
        if not path:
            return f"{url!r}, which names no file"
        if path.endswith("/"):
            return f"{url!r}, which names a folder, not a file"
    return None


class BridgeConfig(StrictModel):
    server: ServerConfig = ServerConfig()
    integrations: list[Integration] = Field(default_factory=list)
    storage: str = "sqlite:///data/bridge.db"
    defaults: Defaults = Defaults()
    state: StateConfig = StateConfig()
    sinks: dict[str, SinkConfig] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        problem = storage_problem(v)
        if problem:
            raise ValueError(f"{STORAGE_EXPECTED}; got {problem}")
        return v

    def retry_for(self, sink: str) -> RetryPolicy:
        own = self.sinks[sink].retry
        return own if own is not None else self.defaults.retry


Leaf.model_rebuild()
AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()
ChangedOf.model_rebuild()
TransitionOf.model_rebuild()
FirstSeenOf.model_rebuild()
Route.model_rebuild()
BridgeConfig.model_rebuild()


@dataclass(frozen=True)
class LoadedConfig:
    config: BridgeConfig
    source: Source


@dataclass(frozen=True)
class _RouteRefs:
    index: int
    name: str | None
    to: list[str | None]  # None: not a name (validation reports it), kept for the indexes
    grouped: bool
    message_for: list[str]
    to_readable: bool = True  # False: `to` is no name or list of names; nothing to compare


@dataclass(frozen=True)
class _References:
    """The names that must refer to each other: taken from a valid config, or read as far
    as it goes from one that failed validation, so both kinds of error come in one round."""
    key_ids: list[tuple[int, str]]
    sink_types: dict[str, str | None] | None  # None: `sinks` is not a mapping; unknown
    routes: list[_RouteRefs]
    storage: str | None = None  # valid configs only, for what follows
    timeouts: dict[str, float] = field(default_factory=dict)  # sink -> one send's timeout

    @classmethod
    def of(cls, cfg: BridgeConfig) -> _References:
        return cls(
            key_ids=list(enumerate(i.key_id for i in cfg.integrations)),
            sink_types={name: sink.type for name, sink in cfg.sinks.items()},
            routes=[_RouteRefs(i, r.name, list(r.to), r.group is not None,
                               list(r.message) if isinstance(r.message, dict) else [])
                    for i, r in enumerate(cfg.routes)],
            storage=cfg.storage,
            timeouts={name: t for name, sink in cfg.sinks.items()
                      if isinstance(t := getattr(sink, "timeout", None), float)},
        )

    @classmethod
    def of_raw(cls, data: dict[str, Any]) -> _References:
        """Only what validation would have read the same way; the rest it reports itself."""
        def names(v: Any) -> list[str | None]:
            v = [v] if isinstance(v, str) else v
            return [x if isinstance(x, str) else None for x in v] if isinstance(v, list) else []

        def key_id(e: Any) -> str | None:
            k = e.get("key_id") if isinstance(e, dict) else None
            k = str(k) if isinstance(k, int) and not isinstance(k, bool) else k  # as validated
            return k if isinstance(k, str) and k else None

        def route(i: int, r: dict[str, Any]) -> _RouteRefs:
            name = r.get("name")
            to = names(r.get("to"))
            message = r.get("message")
            return _RouteRefs(
                i, name if isinstance(name, str) and name else None, to,
                r.get("group") is not None,
                [str(k) for k in message] if isinstance(message, dict) else [],
                to_readable=bool(to) and None not in to)

        integrations = data.get("integrations")
        sinks = data.get("sinks")  # missing or misspelt: say nothing of the names in routes
        routes = data.get("routes")
        return cls(
            key_ids=[(i, k) for i, e in enumerate(integrations) if (k := key_id(e)) is not None]
            if isinstance(integrations, list) else [],
            sink_types={str(name): (v.get("type") if isinstance(v, dict)
                                    and isinstance(v.get("type"), str) else None)
                        for name, v in sinks.items()} if isinstance(sinks, dict) else None,
            routes=[route(i, r) for i, r in enumerate(routes) if isinstance(r, dict)]
            if isinstance(routes, list) else [],
        )


def cross_check(refs: _References) -> list[tuple[KeyPath, str]]:
    """What a single field's validator cannot see: names that must refer to each other, and
    sends that must end within the storage's lease."""
    problems: list[tuple[KeyPath, str]] = []
    if refs.storage is not None:
        lease = lease_for(refs.storage)
        most = lease * LEASE_SHARE
        for name, timeout in refs.timeouts.items():
            if timeout > most:
                engine, again = (("PostgreSQL", "another replica sends it again")
                                 if lease < LEASE_SECONDS else
                                 ("this storage", "it is sent again while the first waits"))
                problems.append((("sinks", name, "timeout"), (
                    f"expected at most {format_duration(most)}, got "
                    f"{format_duration(timeout)}: {engine} leases a claimed delivery for "
                    f"{format_duration(lease)}; a send still waiting then is taken for lost, "
                    f"and {again}")))
    seen_keys: set[str] = set()
    for i, key_id in refs.key_ids:
        if key_id in seen_keys:
            problems.append((("integrations", i, "key_id"),
                             "duplicate key_id; each may appear once"))
        seen_keys.add(key_id)
    sink_types = refs.sink_types if refs.sink_types is not None else {}
    for name in sink_types:
        if not _NAME.match(name):
            problems.append((("sinks", name), "a sink name uses letters, digits, '_', '-', '.'"))
    known = sorted(sink_types)
    seen_routes: dict[str, int] = {}
    for route in refs.routes:
        i = route.index
        if route.name is not None and route.name in seen_routes:
            first = seen_routes[route.name]
            problems.append((("routes", i, "name"),
                             f"route name {route.name!r} is already used by routes[{first}]"))
        if route.name is not None:
            seen_routes.setdefault(route.name, i)
        to = [sink for sink in route.to if sink is not None]
        for j, sink in enumerate(route.to if refs.sink_types is not None else []):
            if sink is not None and sink not in sink_types:
                hint = difflib.get_close_matches(sink, known, n=1)
                expected = f"did you mean {hint[0]!r}?" if hint else (
                    f"expected one of: {', '.join(known)}" if known else "no sinks are defined")
                problems.append((("routes", i, "to", j), f"unknown sink {sink!r}; {expected}"))
        if route.grouped:
            for j, sink in enumerate(route.to):
                kind = sink_types.get(sink) if sink is not None else None
                if kind in SINK_TYPES and not SINK_TYPES[kind].supports_digest:
                    problems.append((("routes", i, "to", j),
                                     f"sink {sink!r} ({kind}) cannot send digests, so "
                                     f"this route cannot use `group`; route the items to it "
                                     f"from a route without `group`"))
        for sink in route.message_for if route.to_readable else []:
            if sink not in to:
                problems.append((("routes", i, "message", sink),
                                 f"message for {sink!r}, but the route does not send to it; "
                                 f"expected one of: {', '.join(to)}"))
    return problems


def _expected_keys(path: KeyPath, data: Any) -> list[str]:
    """Keys allowed at `path`, to tell a person what they could have meant."""
    def fields(model: type[StrictModel]) -> list[str]:
        return [f.alias or n for n, f in model.model_fields.items()]

    if not path:
        return fields(BridgeConfig)
    head = path[0]
    if path == ("server",):
        return fields(ServerConfig)
    if path == ("defaults",):
        return fields(Defaults)
    if path[-1] == "retry":
        return fields(RetryPolicy)
    if head == "integrations" and len(path) == 2:
        return fields(Integration)
    if head == "sinks" and len(path) == 2:
        node = data.get("sinks", {}).get(path[1]) if isinstance(data, dict) else None
        sink_type = node.get("type") if isinstance(node, dict) else None
        if isinstance(sink_type, str) and sink_type in SINK_TYPES:
            return fields(SINK_TYPES[sink_type].config_model)
    if head == "routes" and len(path) == 2:
        return fields(Route)
    if head == "routes" and path[-1] == "transition":
        return ["from", "to"]
    if head == "routes" and "when" in path:
        return ["path", *cond.OPS, "all", "any", "not", "changed", "transition", "first_seen"]
    if path == ("state",):
        return fields(StateConfig)
    return []


def _clean_loc(loc: tuple[Any, ...], data: Any, names_key: bool) -> KeyPath:
    """Drop pydantic's union tags from an error location, keeping real YAML keys."""
    out: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        last = n == len(loc) - 1
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict and not last and loc[n + 1] in node:
            child, nxt = node[part], loc[n + 1]
            # A union's tag that is also a key here (`changed` in {changed: status, path:
            # ...}): the next part is this mapping's own key, not one inside that value. In
            # a condition that holds for a mapping too (`all` in {all: {...}, any: []});
            # elsewhere a mapping is descended (a sink named `slack`, a tag of the sinks'
            # union, holds its own keys).
            scalar = not isinstance(child, dict | list)
            beside = ("when" in out and isinstance(child, dict) and nxt not in child)
            if scalar or beside:
                continue
        if in_dict or in_list:
            out.append(part)
            node = node[part]
        elif last and names_key and isinstance(part, str | int) and isinstance(node, dict):
            out.append(part)  # a missing key: name it
            node = None
    return tuple(out)


def _message(err: Any, path: KeyPath, data: Any) -> str:
    etype = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if etype == "missing":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    if etype == "extra_forbidden":
        allowed = _expected_keys(path[:-1], data)
        key = str(path[-1])
        if key in allowed and "when" in path:
            # A known key in the wrong company: one condition mixes two kinds of test.
            return (f"{key!r} cannot stand beside the other keys of this condition: a "
                    f"condition is ONE of path with an operator, all:, any:, not:, changed:, "
                    f"transition: or first_seen:; to need several, list them under all:")
        if path and path[0] == "routes" and "when" in path and key in Route.model_fields:
            return (f"{key!r} is a key of the route, not of its condition: write it beside "
                    f"`when:` (as `name:` and `to:` are), not inside it")
        hint = difflib.get_close_matches(key, allowed, n=1)
        text = f"unknown key {key!r}"
        if hint:
            text += f"; did you mean {hint[0]!r}?"
        if allowed:
            text += (" Expected" if hint else "; expected") + f" one of: {', '.join(allowed)}"
        return text
    if etype == "union_tag_invalid" and path and path[0] == "sinks":
        return (f"unknown sink type {err['ctx'].get('tag')!r}; expected one of: "
                f"{', '.join(SINK_TYPES)}")
    if etype == "union_tag_not_found" and path and path[0] == "sinks":
        return f"missing required key 'type'; expected one of: {', '.join(SINK_TYPES)}"
    given = err.get("input")
    builtin = not str(err["msg"]).startswith("Value error")
    if builtin and (said := _in_words(etype, err.get("ctx") or {}, path, given)):
        return said
    if (builtin and given is not None and not isinstance(given, dict | list)
            and not _may_hold_a_secret(path) and repr(given) not in msg):
        msg += f" (got {given!r})"
    return msg


def _may_hold_a_secret(path: KeyPath) -> bool:
    # Credentials hide in more than "secret" fields: webhook URLs carry them too.
    return any(w in format_path(path).lower()
               for w in ("secret", "password", "token", "url", "key"))


def _in_words(etype: str, ctx: dict[str, Any], path: KeyPath, given: Any) -> str | None:
    """pydantic's own complaints that say neither what was given nor what was meant
    ("Input should be a valid dictionary"), said as `expected ..., got ...` (None: one
    that says enough already, such as a list of allowed values)."""
    got = what_was_given(given, secret=_may_hold_a_secret(path))
    if etype == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        if options:
            text = f"expected one of: {', '.join(options)}; got {got}"
            if isinstance(given, str) and not _may_hold_a_secret(path):
                lower = {o.lower(): o for o in options}
                hint = difflib.get_close_matches(given.lower(), list(lower), n=1)
                if hint:
                    text += f"; did you mean {lower[hint[0]]!r}?"
            return text
    if etype in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected {_mapping_meant(path)}, got {got}"
    if etype == "list_type":
        return f"expected {_list_meant(path)}, got {got}"
    if etype == "too_short" and ctx.get("field_type") == "List":
        least = ctx["min_length"]
        wanted = f"one {_item_meant(path)}" if least == 1 else f"{least} items"
        actual = ctx["actual_length"]
        return f"expected at least {wanted}, got {actual or 'an empty list'}"
    if etype == "string_too_short":
        if ctx.get("min_length") == 1:
            return "expected a non-empty string, got an empty one"
        return f"expected at least {ctx.get('min_length')} characters, got {got}"
    if etype == "string_too_long":
        return f"expected at most {ctx.get('max_length')} characters, got {len(str(given))}"
    if etype == "string_type":
        return f"expected a string, got {got}"
    if etype == "url_type":
        return f"expected a URL such as https://example.com/hook, got {got}"
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {got}"
    if etype in ("float_type", "float_parsing"):
        return f"expected a number, got {got}"
    if etype in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got}"
    bounds = {"greater_than_equal": ("ge", "of at least"), "less_than_equal": ("le", "of at most"),
              "greater_than": ("gt", "above"), "less_than": ("lt", "below")}
    if etype in bounds:
        name, words = bounds[etype]
        return f"expected a number {words} {ctx.get(name)}, got {got}"
    return None


def _mapping_meant(path: KeyPath) -> str:
    if path == ("sinks",):
        return "a mapping of sink names to sink settings (name: {type: ...})"
    if len(path) == 2 and path[0] == "sinks":
        return "a sink's settings, a mapping such as {type: console}"
    if len(path) == 2 and path[0] == "routes":
        return "a route, a mapping with at least name and to"
    if len(path) == 2 and path[0] == "integrations":
        return "an integration, a mapping of key_id and secret"
    if path and path[-1] == "headers":
        return "a mapping of header names to values"
    return "a mapping of settings (key: value)"


def _list_meant(path: KeyPath) -> str:
    if path == ("integrations",):
        return "a list of integrations (- key_id: ..., secret: ...)"
    if path == ("routes",):
        return "a list of routes (- name: ..., to: ...)"
    if len(path) == 3 and path[0] == "routes" and path[2] == "to":
        return "a sink name or a list of sink names"
    return "a list (one `- item` a line, or [a, b])"


def _item_meant(path: KeyPath) -> str:
    key = path[-1] if path else None
    if path[:1] == ("routes",) and key == "to":
        return "sink name"
    if key in ("all", "any"):
        return "condition"
    if key == "bootstrap_servers":
        return "broker address (host:port)"
    if key == "to":
        return "recipient address"
    if key == "urls":
        return "URL"
    return "item"


def parse_config(source: Source, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """`env`: the variables the source was read with (default: this process's)."""
    data = source.data
    if not isinstance(data, dict):
        raise ConfigError([f"{source.file}:1: (top level): expected a mapping of settings "
                           f"(server, integrations, storage, defaults, sinks, routes)"])
    if not data:
        # Every setting has a default, but a bridge with none answers every verification
        # 403 and sends nothing: an empty file is a wrong path or a failed mount, not a wish.
        raise ConfigError([f"{source.file}: the file holds no settings; expected at least "
                           f"integrations, sinks and routes (config/routes.yaml is a "
                           f"complete example)"])
    read = source.problems
    given = os.environ if env is None else env

    def where(path: KeyPath) -> str:
        """`file:line: key`, and the variable that gave the value if one did: the line
        alone would send a person to a default they are not using."""
        names = [n for n in variables_in(source.raw.get(path, "")) if n in given]
        origin = f" (from {', '.join('$' + n for n in names)})" if names else ""
        return source.where(path) + origin

    def new(path: KeyPath, message: str) -> bool:
        """False for what an unset variable's empty value explains: a complaint about that
        value, or one by the sink or route holding it that names the same field."""
        for bad in source.unset:
            if path[:len(bad)] == bad:
                return False
            if len(bad) > len(path) >= 2 and bad[:len(path)] == path and str(
                    bad[len(path)]) in message:
                return False
        return True

    try:
        cfg = BridgeConfig.model_validate(data)
    except ValidationError as exc:
        problems = list(read)
        for err in exc.errors():
            names_key = err["type"] in ("missing", "extra_forbidden")
            path = _clean_loc(err["loc"], data, names_key)
            if err["type"] == "union_tag_invalid" and path[:1] == ("sinks",):
                path = (*path, "type")  # point at the `type:` line itself
            message = _message(err, path, data)
            if new(path, message):
                problems.append(f"{where(path)}: {message}")
        problems += [f"{where(p)}: {m}"
                     for p, m in cross_check(_References.of_raw(data)) if new(p, m)]
        raise ConfigError(_in_file_order(list(dict.fromkeys(problems)), source.file)) from None
    crossed = read + [f"{where(p)}: {m}"
                      for p, m in cross_check(_References.of(cfg)) if new(p, m)]
    if crossed:
        raise ConfigError(_in_file_order(crossed, source.file))
    return cfg


def _in_file_order(problems: list[str], file: str) -> list[str]:
    """Sorted by line (each starts `file:line: `), so they read top to bottom with the file."""
    def line(problem: str) -> int:
        number = problem[len(file) + 1:].split(":", 1)[0]
        return int(number) if number.isdigit() else 0
    return sorted(problems, key=line)


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get("BRIDGE_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LoadedConfig:
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{file}: config file not found (set --config or BRIDGE_CONFIG)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc}"]) from None
    source = load_yaml(text, file, env)
    return LoadedConfig(config=parse_config(source, env), source=source)
