"""`bridge serve` with only its intake running: no sequencer, no dispatcher.

    python benchmarks/intake_only_serve.py [bridge options] serve --config FILE

For intake_floor.py only: what the intake alone accepts (reading, parsing, validating, the
inbox row and its commit, the answer), with nothing after the 200 taking a share of the
event loop or of the writer thread. Batches it accepts stay waiting in its inbox; a real
`bridge serve` on the same file would sequence them later.
"""

from __future__ import annotations

import sys

from bridge.dispatch.dispatcher import Dispatcher
from bridge.sequencer import Sequencer


async def _not_started(self: object) -> None:
    return None


# Never started, so nothing is claimed or taken; their stop() then has nothing to wait for.
Sequencer.start = _not_started  # type: ignore[method-assign]
Dispatcher.start = _not_started  # type: ignore[method-assign]

if __name__ == "__main__":
    from bridge.cli import main

    sys.exit(main())
