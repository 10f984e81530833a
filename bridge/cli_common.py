"""What every command needs: the config, the store, times for people."""

from __future__ import annotations

import argparse
import time

from bridge.config import LoadedConfig, config_path, load_config
from bridge.outbox import Store, from_url
from bridge.outbox.base import open_explained


def load_for(args: argparse.Namespace) -> LoadedConfig:
    """The config a command was given (`--config`, $BRIDGE_CONFIG or the default)."""
    return load_config(config_path(getattr(args, "config", None)))


async def open_store(storage: str) -> Store:
    """The configured store, migrated, without taking ownership (a serving process may be
    running on it)."""
    store = from_url(storage)
    await open_explained(store, storage)
    return store


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
