-- Coalescing windows take their place in a shipment's order at a sink (queries.sql, claim):
-- a window that has closed (due, in flight or waiting for a retry) holds back its item's
-- later deliveries, as every pending delivery outside a window does. This index finds the
-- windows of an item for that check, as deliveries_by_item finds the other deliveries.
CREATE INDEX IF NOT EXISTS deliveries_windows
    ON deliveries (item_uuid, sink, seq) WHERE status = 'pending' AND group_key LIKE 'coalesce:%';
