"""What the bridge should notify of a stream of batches, worked out independently of
bridge/state.py, for tests that check that nothing is lost or sent twice."""

from __future__ import annotations

import json
from typing import Any


def notified_items(batches: list[dict[str, Any]]) -> int:
    """Deliveries one route with the defaults makes of these batches, sequenced in this
    order, to one sink: one per item that is news for its uuid. A tracking snapshot is news
    when it brings a step never seen or a field that differs from the last news, unless its
    newest step is older than the newest seen (stale); an order when it differs from the
    last one (key order ignored)."""
    steps_seen: dict[str, set[str]] = {}
    newest_seen: dict[str, str] = {}
    last: dict[tuple[str, str], str] = {}
    count = 0
    for batch in batches:
        for kind in ("order", "tracking"):
            for item in batch.get(kind) or []:
                uuid = item["uuid"]
                if kind == "order":
                    text = json.dumps(item, sort_keys=True)
                    if last.get((kind, uuid)) != text:
                        count += 1
                        last[(kind, uuid)] = text
                    continue
                steps = [s for s in item.get("steps") or [] if isinstance(s, dict)]
                keys = {json.dumps([s.get("timestamp"), s.get("status"),
                                    s.get("description")]) for s in steps}
                fields = json.dumps({k: v for k, v in item.items() if k != "steps"},
                                    sort_keys=True)
                newest = max((str(s.get("timestamp")) for s in steps), default="")
                seen = steps_seen.setdefault(uuid, set())
                news = bool(keys - seen) or last.get((kind, uuid)) != fields
                stale = newest < newest_seen.get(uuid, "")
                seen |= keys
                newest_seen[uuid] = max(newest, newest_seen.get(uuid, ""))
                if news and not stale:
                    count += 1
                    last[(kind, uuid)] = fields
    return count
