"""Which numbered migrations a database still needs, the same rule for every engine.

Each engine applies the steps of `plan()` in order, each in a transaction of its own together
with its row in `schema_migrations` (PostgreSQL under an advisory lock, so replicas starting
together apply each step once).
"""

from __future__ import annotations

from bridge.errors import StorageError
from bridge.outbox.sql import Migration, migrations


def plan(engine: str, applied: set[int]) -> list[Migration]:
    """The steps not applied yet, oldest first. A database that records a step this release
    does not know was written by a newer release: refused, never written to."""
    steps = migrations(engine)
    known = {m.version for m in steps}
    unknown = sorted(applied - known)
    if unknown:
        raise StorageError(
            f"the storage was migrated by a newer bridge (schema version {unknown[-1]:04d}; "
            f"this release knows up to {max(known):04d}); run that release or newer")
    return [m for m in steps if m.version not in applied]
