"""A sample order and tracking update, for `bridge send-test` (the fields look like isendu's;
only `uuid` and the documented tracking fields are promised by isendu)."""

from __future__ import annotations

from typing import Any

SAMPLE_ORDER: dict[str, Any] = {
    "uuid": "00000000-send-test-order-000000000000",
    "reference": "ORD-TEST-0001",
    "status": "PROCESSING",
    "recipient": {"name": "Test Recipient", "city": "Roma", "country": "IT"},
    "total": {"amount": 42.5, "currency": "EUR"},
}

SAMPLE_TRACKING: dict[str, Any] = {
    "uuid": "00000000-send-test-tracking-0000000000",
    "status": "OUT_FOR_DELIVERY",
    "trackingNumber": "TEST000000001",
    "trackingUrl": "https://example.com/track/TEST000000001",
    "delivered": False,
    "steps": [
        {"datetime": "2025-11-03 08:10:00", "timestamp": "2025-11-03T07:10:00Z",
         "timezone": "Europe/Rome", "description": "Parcel picked up from sender",
         "location": "Milano", "status": "PICKED_UP"},
        {"datetime": "2025-11-04 07:45:00", "timestamp": "2025-11-04T06:45:00Z",
         "timezone": "Europe/Rome", "description": "Out for delivery (bridge send-test)",
         "location": "Roma", "status": "OUT_FOR_DELIVERY"},
    ],
}
