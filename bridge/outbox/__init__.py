"""Storage engines (memory, SQLite, PostgreSQL) behind a few narrow interfaces."""

from bridge.outbox.base import Inbox, Outbox, SinkMemory, Store, from_url

__all__ = ["Inbox", "Outbox", "SinkMemory", "Store", "from_url"]
