"""Durable outbox backends behind one interface."""

from bridge.outbox.base import Outbox, from_url

__all__ = ["Outbox", "from_url"]
