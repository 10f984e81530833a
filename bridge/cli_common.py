"""What every command needs: the config, the store, where a setting came from, times for
people."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bridge.config import LoadedConfig, config_path, load_config
from bridge.errors import StorageUnavailable
from bridge.outbox import Store, from_url
from bridge.outbox.base import open_explained, storage_label
from bridge.outbox.sqlite import SqliteStore
from bridge.yamlsource import variables_in

# Why a route made nothing of a matched item (the router's `skipped`), for people.
SKIP_REASONS = {"repeat": "a repeat, nothing new against what came before",
                "stale": "stale, older than what came before"}


def load_for(args: argparse.Namespace) -> LoadedConfig:
    """The config a command was given (`--config`, $BRIDGE_CONFIG or the default)."""
    return load_config(config_path(getattr(args, "config", None)))


def written_with(loaded: LoadedConfig, path: tuple[str | int, ...]) -> list[str]:
    """The variables a setting is written with (`${BRIDGE_LISTEN:-...}`: BRIDGE_LISTEN)."""
    raw = loaded.source.raw.get(path)
    return variables_in(raw) if raw else []


def origin(loaded: LoadedConfig, path: tuple[str | int, ...]) -> list[str]:
    """Where a setting's value came from, for people: `from BRIDGE_STORAGE`, or `the
    default of ${BRIDGE_STORAGE:-...}, BRIDGE_STORAGE not set`. Never the default itself,
    which may hold a password."""
    notes = []
    for name in written_with(loaded, path):
        notes.append(f"from ${name}" if name in os.environ
                     else f"{name} not set: the default written in the config")
    return notes


STORAGE_VARIABLE = "BRIDGE_STORAGE"  # what the shipped config and the image choose it with


def storage_in_use(loaded: LoadedConfig) -> str:
    """The storage really used: variables resolved, a password masked, a relative SQLite
    path shown with the file it names from here, and where the value came from. A
    BRIDGE_STORAGE set for a config that does not read it is said too: the Docker image
    sets it, and a config of one's own that writes `storage:` otherwise (or not at all)
    would quietly use another database (each replica a SQLite file of its own)."""
    url = loaded.config.storage
    notes = origin(loaded, ("storage",))
    if (STORAGE_VARIABLE in os.environ
            and STORAGE_VARIABLE not in written_with(loaded, ("storage",))):
        notes.append(f"${STORAGE_VARIABLE} is set but not used: this config's storage does "
                     f"not name it; write storage: ${{{STORAGE_VARIABLE}}} to use it")
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        relative = rest[1:] if rest.startswith("/") else rest
        if relative and not relative.startswith("/"):
            notes.append(f"file {Path(relative).resolve()}")
    return storage_label(url) + (f" ({'; '.join(notes)})" if notes else "")


def storage_origin(loaded: LoadedConfig) -> str:
    """Where the storage URL came from, for an error that sends a person to fix it: a
    variable ($BRIDGE_STORAGE) as often as the file."""
    return "; ".join(origin(loaded, ("storage",))) or "storage in the config"


async def open_store(loaded: LoadedConfig, create: bool = False) -> Store:
    """The configured store, migrated, without taking ownership (a serving process may be
    running on it). A SQLite file that is not there is refused unless `create`: a command
    that reads (`dlq list`) would make an empty one at a mistyped path, and report it
    empty."""
    storage = loaded.config.storage
    store = from_url(storage)
    if (not create and isinstance(store, SqliteStore)
            and not await asyncio.to_thread(os.path.exists, store.path)):
        raise StorageUnavailable(
            f"no SQLite database at {store.path} ({storage_origin(loaded)}): nothing was "
            "ever stored there; expected the storage `bridge serve` uses (`bridge migrate` "
            "makes a new one)")
    await open_explained(store, storage, origin=storage_origin(loaded))
    return store


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def positive_int(text: str) -> int:
    """argparse type for `--limit N`: 0 would list nothing and say there is nothing."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {n}")
    return n


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 item`, `2 items`, `1 delivery`, `0 deliveries`."""
    return f"{n} {one if n == 1 else many or one + 's'}"
