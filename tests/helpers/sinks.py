"""Small checks shared by the sink tests: outbox states and secrets that must not leak."""

from __future__ import annotations

import logging
from typing import Any

from bridge.canonical import canonical_json
from bridge.models import Delivery, Kind, Status
from bridge.routing.router import delivery_id
from tests.helpers.bridge import Bridge, eventually


async def delivered(bridge: Bridge, count: int = 1, timeout: float = 15.0) -> None:
    async def check() -> bool:
        return (await bridge.rt.store.counts())["delivered"] >= count
    await eventually(check, timeout=timeout, what=f"{count} deliveries delivered")


async def dead(bridge: Bridge, count: int = 1, timeout: float = 15.0) -> list[Delivery]:
    async def check() -> bool:
        return len(await bridge.rt.store.list_dead()) >= count
    await eventually(check, timeout=timeout, what=f"{count} dead letters")
    return await bridge.rt.store.list_dead()


async def first_retry(bridge: Bridge, sink: str, route: str, kind: Kind,
                      item: dict[str, Any]) -> tuple[Delivery, float]:
    """The item's delivery once a failed attempt was written back, and the delay chosen."""
    did = delivery_id(sink, route, kind, canonical_json(item))

    async def check() -> bool:
        row = await bridge.rt.store.get(did)
        return row is not None and row.status is Status.PENDING and row.last_error is not None
    await eventually(check, what="a retry decision")
    row = await bridge.rt.store.get(did)
    assert row is not None
    return row, row.next_attempt_at - row.updated_at


def assert_no_leak(secrets: list[str], records: list[logging.LogRecord], *texts: Any) -> None:
    """No secret in any log record (message and extra fields) nor in the given texts."""
    for record in records:
        seen = record.getMessage() + " " + repr(record.__dict__)
        if record.exc_info:
            seen += logging.Formatter().formatException(record.exc_info)
        for secret in secrets:
            assert secret not in seen, f"secret leaked into log record {record.name}"
    for text in texts:
        for secret in secrets:
            assert secret not in str(text), "secret leaked into " + repr(str(text)[:80])


# A shipment whose newest step (listed first: isendu does not sort steps) failed.
TRACKING_FAILED: dict[str, Any] = {
    "uuid": "7ea3ef27-e2e9-4528-a4e0-689e1888df20",
    "status": "EXCEPTION",
    "trackingNumber": "BRT100994275870",
    "trackingUrl": "https://vas.brt.it/vas/sped_det_show.hsm?Nspediz=BRT100994275870",
    "delivered": False,
    "steps": [
        {"datetime": "2025-11-04 06:57:40", "timestamp": "2025-11-04T05:57:40Z",
         "timezone": "Europe/Paris", "description": "Parcel held at customs", "location": "Paris",
         "status": "EXCEPTION",
         "error": {"code": "CUSTOMS_HOLD", "message": "Documents <required> & missing"}},
        {"datetime": "2025-11-03 18:02:11", "timestamp": "2025-11-03T17:02:11Z",
         "timezone": "Europe/Rome", "description": "In transit", "location": "Milano",
         "status": "IN_TRANSIT"},
    ],
}

ORDER: dict[str, Any] = {
    "uuid": "01d6a94c-ea60-4675-9e5e-3a9f64cec5fe",
    "reference": "ORD-2025-932194",
    "status": "PROCESSING",
    "recipient": {"name": "Marco Bianchi", "email": "marco.bianchi51@example.com",
                  "city": "Roma", "country": "IT"},
    "total": {"amount": 258.16, "currency": "EUR"},
}

# Only the documented fields: the default messages must still make sense.
TRACKING_BARE: dict[str, Any] = {"uuid": "0b8f3c1e-2f6d-4c1a-9a57-3a4be1f0c2d9"}


def long_tracking(n: int = 10_000) -> dict[str, Any]:
    """A delivered shipment whose step description is `n` characters long."""
    return {
        "uuid": "4c1f3a7e-8d2b-4e59-b0a6-1f2e3d4c5b6a", "status": "DELIVERED",
        "trackingNumber": "GLS821026103283", "delivered": True,
        "steps": [{"datetime": "2025-11-05 10:15:00", "timestamp": "2025-11-05T09:15:00Z",
                   "timezone": "Europe/Rome", "description": "x" * n, "location": "Roma",
                   "status": "DELIVERED"}],
    }
