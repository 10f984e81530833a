"""`bridge serve` with an outbox that keeps nothing: intake with routing but no storage.

    python benchmarks/null_serve.py [bridge options] serve --config FILE   # storage: memory://

For intake_floor.py only: it measures what routing and rendering cost on their own, which a
real backend (and even the memory one, with its Delivery objects) would add to. Nothing
accepted by it is ever sent.
"""

from __future__ import annotations

import sys

from bridge.models import NewDelivery
from bridge.outbox import memory


class NullOutbox(memory.MemoryStore):
    async def enqueue(self, deliveries: list[NewDelivery], now: float) -> int:
        return len(deliveries)


# from_url() imports MemoryStore from that module when it is called, so `memory://` gets this.
memory.MemoryStore = NullOutbox  # type: ignore[misc]

if __name__ == "__main__":
    from bridge.cli import main

    sys.exit(main())
