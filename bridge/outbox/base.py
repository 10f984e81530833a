"""The outbox interface. Every backend passes tests/integration/test_outbox_contract.py.

Retries are decisions stored here (`next_attempt_at`, or dead), never sleeps in memory, so a
restart resumes exactly where the last process stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from bridge.models import Delivery, NewDelivery
from bridge.redact import MASK, names_a_credential, redact


class StorageInUse(RuntimeError):
    """Another process serves this storage; the message says which and what to do."""


class StorageUnavailable(RuntimeError):
    """The storage could not be opened; the message names the setting and the cause."""


async def open_explained(outbox: Outbox, url: str, *, recover: bool = False) -> None:
    """`outbox.open()`, with any failure but StorageInUse turned into one sentence that
    names the `storage` setting (a missing folder, an unreachable PostgreSQL...)."""
    try:
        await outbox.open(recover=recover)
    except StorageInUse:
        raise
    except Exception as exc:
        detail = redact(str(exc)) or exc.__class__.__name__
        raise StorageUnavailable(
            f"cannot open storage {storage_label(url)} (storage in the config): {detail}; "
            "expected a writable SQLite path or a reachable PostgreSQL URL") from None


def storage_label(url: str) -> str:
    """The storage URL for people: a PostgreSQL URL's password (`user:password@`, or
    `?password=` in its query) masked. SQLite paths carry none and are shown as they are,
    `@` and `?` included."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        k + eq + (MASK if eq and names_a_credential(unquote_plus(k)) else v)
        for k, eq, v in (pair.partition("=") for pair in parts.query.split("&"))
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Outbox(ABC):
    # How long a claim holds a delivery. Only matters when a process dies mid-send: then the
    # delivery waits this long before another process (or the restarted one) sends it again.
    lease_seconds: float = 300.0

    @abstractmethod
    async def open(self, *, recover: bool = False) -> None:
        """Create the schema if needed. `recover` (the serving process only): take ownership
        and release leases that a dead process of ours left behind."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        """Store all of one intake's deliveries in one transaction; durable on return.

        A delivery whose id is already stored (a repeated isendu item) is skipped.
        Returns how many were new.
        """

    @abstractmethod
    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        """Take up to `limit` due pending deliveries of `sink`, oldest first, for `lease` seconds.

        Claiming counts an attempt: a send cut off by a crash was, for all we know, made.
        """

    @abstractmethod
    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        """Take up to `limit` pending, unleased deliveries of one digest group, due or not
        (the first one's window closing sends the whole group), oldest first."""

    @abstractmethod
    async def complete(self, ids: list[str], now: float) -> None: ...

    @abstractmethod
    async def retry_at(
        self, delivery_id: str, when: float, error: str, now: float, *, refund: bool = False
    ) -> None:
        """Try again at `when`. `refund`: the attempt does not count towards max_attempts
        (the receiver said "slow down", it did not fail)."""

    @abstractmethod
    async def dead_letter(self, delivery_id: str, reason: str, now: float) -> None: ...

    @abstractmethod
    async def release(self, claimed: list[Delivery], now: float) -> None:
        """Give claimed deliveries back untouched (graceful stop), undoing the attempt count:
        only those still held by the lease they were claimed with. One whose lease ran out
        may have been claimed again by another replica, whose claim must stand."""

    @abstractmethod
    async def next_due(self, sink: str) -> float | None:
        """When the earliest pending delivery of `sink` becomes due (leases included)."""

    @abstractmethod
    async def get(self, delivery_id: str) -> Delivery | None: ...

    @abstractmethod
    async def list_dead(self, limit: int = 100) -> list[Delivery]:
        """Dead deliveries, newest first."""

    @abstractmethod
    async def replay(self, ids: list[str] | None, now: float) -> int:
        """Dead -> pending with attempts and age reset; `None` means all dead deliveries."""

    @abstractmethod
    async def sweep(self, delivered_before: float) -> int:
        """Forget delivered rows older than the retention; returns how many."""

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of deliveries per status (pending, delivered, dead)."""

    @abstractmethod
    async def forget_state(self, updated_before: float) -> int:
        """Forget sink state not written since then (e.g. threads of long-settled shipments);
        returns how many entries."""

    @abstractmethod
    async def get_state(self, scope: str, key: str) -> str | None:
        """A sink's small durable memory, e.g. the Slack thread of a shipment."""

    @abstractmethod
    async def put_state(self, scope: str, key: str, value: str, now: float) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the storage cannot be written right now."""


def from_url(url: str) -> Outbox:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db`, `postgresql://...` or `memory://`."""
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        from bridge.outbox.sqlite import SqliteOutbox

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ValueError("sqlite storage URL needs a file path, e.g. sqlite:///data/bridge.db")
        return SqliteOutbox(path)
    if scheme in ("postgresql", "postgres"):
        from bridge.outbox.postgres import PostgresOutbox

        return PostgresOutbox(url)
    if scheme == "memory":
        from bridge.outbox.memory import MemoryOutbox

        return MemoryOutbox()
    raise ValueError(f"unsupported storage URL scheme {scheme!r}; "
                     "expected sqlite://, postgresql:// or memory://")
