-- Per-shipment order at each sink: a delivery is claimed only while no earlier one (lower
-- seq) of the same item for the same sink is pending; this index answers that for every
-- candidate of a claim. Pending rows outside digests only (digests go out when their window
-- closes, whatever else is pending). The uuid comes first so that the index serves only
-- that question: led by sink, planners chose it over deliveries_due for scans of one
-- sink's pending rows, and read the table in random order.
CREATE INDEX IF NOT EXISTS deliveries_by_item
    ON deliveries (item_uuid, sink, seq) WHERE status = 'pending' AND group_key IS NULL;
