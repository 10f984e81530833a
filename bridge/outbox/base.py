"""Storage: a few narrow interfaces, one store per engine implementing them all.

- `Inbox`: accepted batches, one row each, written before the 200; the sequencer takes them
  in acceptance order and settles each (its deliveries stored, the row marked) in one
  transaction.
- `Outbox`: deliveries; retries are decisions stored here (`next_attempt_at`, or dead),
  never sleeps in memory, so a restart resumes exactly where the last process stopped.
- `SinkMemory`: a sink's small durable memory (the Slack thread of a shipment).

Every store passes tests/integration/test_storage_contract.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from bridge.errors import StorageError, StorageInUse, StorageUnavailable
from bridge.models import BatchInfo, Delivery, InboxBatch, NewDelivery, Outcome
from bridge.redact import MASK, names_a_credential, redact

__all__ = ["Inbox", "Outbox", "ShipmentStates", "SinkMemory", "StorageInUse",
           "StorageUnavailable", "Store", "from_url", "open_explained", "storage_label"]


async def open_explained(store: Store, url: str, *, recover: bool = False,
                         origin: str = "storage in the config") -> None:
    """`store.open()`, with any failure but StorageInUse turned into one sentence that
    names the `storage` setting (a missing folder, an unreachable PostgreSQL...) and where
    its value came from (`origin`: a variable, or the config)."""
    try:
        await store.open(recover=recover)
    except StorageInUse:
        raise
    except Exception as exc:
        detail = redact(str(exc)) or exc.__class__.__name__
        raise StorageUnavailable(
            f"cannot open storage {storage_label(url)} ({origin}): {detail}; "
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


LEASE_SECONDS = 300.0
POSTGRES_LEASE_SECONDS = 60.0  # shorter: nobody can release them at start (postgres.py)
# A send must end within this share of its claim's lease (the dispatcher cuts it off there,
# and config.py refuses a timeout past it): the rest is for writing its outcome back.
LEASE_SHARE = 2 / 3


def lease_for(url: str) -> float:
    """How long the store `url` names leases a claimed delivery."""
    return POSTGRES_LEASE_SECONDS if url.startswith(("postgresql:", "postgres:")) \
        else LEASE_SECONDS


class Outbox(ABC):
    """Deliveries: what the sequencer made, claimed and settled by the dispatcher."""

    # How long a claim holds a delivery. Only matters when a process dies mid-send: then the
    # delivery waits this long before another process (or the restarted one) sends it again.
    # A send must end well within it (config.py: sinks' timeouts), or it is sent twice.
    lease_seconds: float = LEASE_SECONDS

    @abstractmethod
    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        """Store deliveries in one transaction; durable on return (the sequencer stores
        them with `Inbox.settle`, which shares this contract).

        A delivery whose id is already stored (a repeated isendu item) is skipped.
        Returns how many were new.
        """

    @abstractmethod
    async def claim(self, sink: str, limit: int, now: float, lease: float) -> list[Delivery]:
        """Take up to `limit` due pending deliveries of `sink`, oldest first, for `lease` seconds.

        Per-shipment order: a delivery is not taken while an earlier one (made earlier by
        the sequencer) of the same sink and item uuid is pending, whether claimed and in
        flight, waiting for a retry or not yet due; only once that one is delivered or dead
        (a dead one holds nothing back). So a claim takes at most one delivery per (sink,
        uuid), and one item waiting for a retry holds back only its own later deliveries to
        that sink. This holds across replicas sharing the storage. A delivery replayed from
        the dead letters takes its place again: later ones not yet claimed wait for it (one
        already in flight is not called back). Digest members neither wait nor hold back: a
        digest goes out when its window closes (and an item whose latest step failed, sent
        on its own at once, does not wait for that window).

        Claiming counts an attempt: a send cut off by a crash was, for all we know, made.
        """

    @abstractmethod
    async def claim_group(
        self, sink: str, group_key: str, limit: int, now: float, lease: float
    ) -> list[Delivery]:
        """Take up to `limit` pending, unleased deliveries of one digest group, due or not
        (the first one's window closing sends the whole group), oldest first.

        Without claim's per-shipment order, like claim for digest members: a member goes
        out with its group even while an earlier delivery of its item outside the group is
        pending (a digest is one message about many items, sent when its window closes)."""

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
        """When the earliest pending delivery of `sink` becomes claimable (leases included).

        Deliveries held back by an earlier pending one of their item (see `claim`) do not
        count: they become claimable only when that one is settled, not at a time."""

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
    async def pending_by_sink(self) -> dict[str, int]:
        """Number of pending deliveries per sink that has any (a sink no longer in the
        config keeps its rows: they are said at start, never claimed)."""


class SinkMemory(ABC):
    """A sink's small durable memory, e.g. the Slack thread of a shipment."""

    @abstractmethod
    async def recall(self, scope: str, key: str) -> str | None: ...

    @abstractmethod
    async def remember(self, scope: str, key: str, value: str, now: float) -> None: ...

    @abstractmethod
    async def forget_memories(self, updated_before: float) -> int:
        """Forget what was not written since then (threads of long-settled shipments);
        returns how many entries."""


class Inbox(ABC):
    """Accepted batches, waiting to be sequenced, then kept for `inbox_retention`."""

    # Counts the times this process took the sequencer's lock anew: a sequencer seeing it
    # change knows another process may have sequenced in between.
    sequencer_term: int = 0

    @abstractmethod
    async def append(self, batch: InboxBatch) -> None:
        """Store one accepted batch; durable on return (only then may isendu hear 200)."""

    @abstractmethod
    async def waiting(self, limit: int) -> list[InboxBatch]:
        """The oldest waiting batches, in acceptance order."""

    @abstractmethod
    async def settle(self, outcomes: list[Outcome], now: float) -> list[int | None]:
        """In ONE transaction, per outcome: a sequenced batch's deliveries stored (ids
        already stored are skipped), its shipment states written and the batch marked
        sequenced, or the batch marked failed. Returns, per outcome, how many deliveries
        were new (None: failed, or no longer waiting, so nothing of it was written)."""

    @abstractmethod
    async def batches(self, limit: int) -> list[BatchInfo]:
        """The newest batches first, without their bodies."""

    @abstractmethod
    async def batch(self, batch_id: str) -> BatchInfo | None:
        """One batch with its body and per-item summary."""

    @abstractmethod
    async def reroute(self, ids: list[str] | None, since: float | None) -> int:
        """Sequenced or failed batches back to waiting (by id, or received since then);
        returns how many."""

    @abstractmethod
    async def inbox_depth(self) -> tuple[int, float | None, int]:
        """(batches waiting, received_at of the oldest waiting, batches failed)."""

    @abstractmethod
    async def sweep_batches(self, sequenced_before: float) -> int:
        """Forget sequenced batches older than the retention (failed ones are kept)."""

    async def acquire_sequencer(self) -> bool:
        """May this process sequence now? One sequencer at a time: with one process per
        store (SQLite, memory) always; PostgreSQL holds a lock for it."""
        return True

    async def release_sequencer(self) -> None:
        """Give the sequencer's turn up (stopping)."""


class ShipmentStates(ABC):
    """What the sequencer knows of each item (bridge/state.py), as JSON by (kind, uuid).
    Written only by `Inbox.settle`, in the transaction of the deliveries it causes."""

    @abstractmethod
    async def states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The stored states of these items (those never seen are absent)."""

    @abstractmethod
    async def forget_states(self, updated_before: float) -> int:
        """Forget states not changed since then (`state.retention`); returns how many."""


class Store(Inbox, Outbox, SinkMemory, ShipmentStates, ABC):
    """One engine's storage, every interface in one place."""

    @abstractmethod
    async def open(self, *, recover: bool = False) -> None:
        """Apply pending migrations. `recover` (the serving process only): take ownership
        and release leases that a dead process of ours left behind."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the storage cannot be written right now."""

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations; returns the ones applied (`0002_inbox`...)."""

    async def subscribe(self, on_batches: Callable[[], None],
                        on_deliveries: Callable[[], None]) -> None:
        """Call these when another process appended batches or stored deliveries (where
        several processes share the storage); in one process the callers wake directly."""


def from_url(url: str) -> Store:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db`, `postgresql://...` or `memory://`."""
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        from bridge.outbox.sqlite import SqliteStore

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise StorageError(f"storage {url!r} names no SQLite file; expected a URL such as "
                               "sqlite:///data/bridge.db (relative) or "
                               "sqlite:////var/lib/bridge/bridge.db (absolute)")
        return SqliteStore(path)
    if scheme in ("postgresql", "postgres"):
        from bridge.outbox.postgres import PostgresStore

        return PostgresStore(url)
    if scheme == "memory":
        from bridge.outbox.memory import MemoryStore

        return MemoryStore()
    # The config refuses these first (config.storage_problem), with the file's line; this
    # is for what reaches a store without it. Only the scheme is shown: a password may follow.
    raise StorageError(f"storage URL of scheme {url.split(':', 1)[0]!r} cannot be opened; "
                       "expected sqlite:///data/bridge.db, postgresql://user@host/db "
                       "or memory://")
