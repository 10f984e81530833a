"""Dispatch: the pure retry policy and the loop that drains the outbox into sinks."""
