"""isendu-bridge: isendu webhooks in, durable outbox, notifications out."""

__version__ = "0.1.0"
